"""Preparation on many machines: N workers each write a part, one merge joins them, and the
result is the dataset a single machine writes (same ids, same contents, same metadata)."""

import subprocess
import sys

import numpy as np
import pytest

from cmvt_jax.data import dataset_writer
from cmvt_jax.data import datasets
from cmvt_jax.data import parts
from cmvt_jax.data import synthetic
from tests import helpers
from tests.data import media


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory):
  """The tiny generated set: 6 files over train/validation/test, 4 clips per split."""
  directory = tmp_path_factory.mktemp("videos")
  synthetic.generate(directory, media.TINY_SPEC, num_workers=1, progress=False)
  return directory


def prepare_cli(*args: str) -> subprocess.CompletedProcess:
  """`python -m cmvt_jax.prepare ARGS` as a user types it on one machine."""
  return subprocess.run(
    [sys.executable, "-m", "cmvt_jax.prepare", *args],
    cwd=helpers.REPO,
    env=helpers.environment(),
    capture_output=True,
    text=True,
    timeout=300,
  )


def examples_by_id(dataset: datasets.PreparedDataset, split: str) -> dict[bytes, dict]:
  source = dataset.source(split)
  return {example["id"]: example for example in (source[i] for i in range(len(source)))}


@pytest.mark.slow
def test_two_workers_and_a_merge_equal_one_machine(video_dir, tmp_path):
  one = datasets.open_prepared(
    dataset_writer.prepare(
      video_dir,
      tmp_path / "one",
      "clips",
      mel=media.MEL,
      num_workers=1,
      progress=False,
      log=lambda message: None,
    )
  )

  common = (
    f"--video_dir={video_dir}",
    f"--data_dir={tmp_path / 'two'}",
    "--name=clips",
    "--num_workers=2",
  )
  second = prepare_cli(*common, "--worker_index=1")
  assert second.returncode == 0, second.stderr
  early = prepare_cli(*common[1:], "--merge")
  assert early.returncode == 1
  assert "Workers [0] of 2 have not finished" in early.stderr
  first = prepare_cli(*common, "--worker_index=0")
  assert first.returncode == 0, first.stderr
  merge = prepare_cli(*common[1:], "--merge")
  assert merge.returncode == 0, merge.stderr
  assert "Merged 2 parts into dataset clips" in merge.stdout
  before = helpers.file_digests(tmp_path / "two")
  again = prepare_cli(*common[1:], "--merge")  # a second merge keeps the dataset as it is
  assert again.returncode == 0, again.stderr
  assert "already prepared" in again.stdout
  assert helpers.file_digests(tmp_path / "two") == before

  two = datasets.open_prepared(dataset_writer.dataset_dir(tmp_path / "two", "clips"))
  assert not parts.parts_dir(tmp_path / "two", "clips").exists()
  assert two.num_examples == one.num_examples == {"train": 4, "validation": 4, "test": 4}
  assert two.label_names == one.label_names
  assert two.storage == one.storage
  assert two.stored_stats == one.stored_stats  # merged in file order: the same bits
  assert two.summary == one.summary
  for split in one.num_examples:
    ours, theirs = examples_by_id(two, split), examples_by_id(one, split)
    assert ours.keys() == theirs.keys()
    for example_id, example in theirs.items():
      assert ours[example_id].keys() == example.keys()
      for key, value in example.items():
        np.testing.assert_array_equal(ours[example_id][key], value, err_msg=f"{example_id} {key}")
  # The info lists every worker's shard: one per worker and split here.
  shards = sorted(path.name for path in two.directory.glob("clips-train.array_record-*"))
  assert shards == [
    "clips-train.array_record-00000-of-00002",
    "clips-train.array_record-00001-of-00002",
  ]


def test_worker_flags_are_checked():
  result = prepare_cli(
    "--video_dir=/nowhere",
    "--data_dir=/nowhere",
    "--name=clips",
    "--num_workers=2",
    "--worker_index=2",
  )
  assert result.returncode != 0
  assert "--worker_index=2 needs --num_workers N with 0 <= worker_index < N" in result.stderr
