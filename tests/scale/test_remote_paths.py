"""gs:// folders work wherever cmvt_jax touches files through `epath` (no GCS here).

`gs://` is served by an in-memory fsspec file system standing in for gcsfs (epath reaches
gs:// through fsspec when TensorFlow is not installed). Not covered by the stand-in:
checkpoints (orbax writes gs:// with tensorstore's own GCS driver), TensorBoard event files
(tensorboardX's own GCS writer) and reading ArrayRecord shards (POSIX only: pod runs read
the dataset through a Cloud Storage FUSE mount, see docs/scaling.md).
"""

import importlib

import numpy as np
import pytest
from etils import epath
from etils.epath import backend
from fsspec.implementations.memory import MemoryFileSystem

from cmvt_jax import metrics
from cmvt_jax import train
from cmvt_jax.data import dataset_writer
from cmvt_jax.data import datasets
from cmvt_jax.data import parts
from cmvt_jax.data import synthetic
from configs import micro
from tests.data import media


class InMemoryGcs(MemoryFileSystem):
  """gs://BUCKET/PATH kept in memory, with its own store."""

  protocol = ("gs", "gcs")
  store = {}
  pseudo_dirs = [""]

  @classmethod
  def _strip_protocol(cls, path):
    path = str(path)
    for prefix in ("gs://", "gcs://"):
      if path.startswith(prefix):
        path = path[len(prefix) :]
    return super()._strip_protocol(path)


@pytest.fixture
def gcs(monkeypatch):
  monkeypatch.setattr(InMemoryGcs, "store", {})
  monkeypatch.setattr(InMemoryGcs, "pseudo_dirs", [""])
  # fsspec's registry module (the package attribute of that name is a read-only view).
  registry = importlib.import_module("fsspec.registry")._registry
  for protocol in InMemoryGcs.protocol:
    monkeypatch.setitem(registry, protocol, InMemoryGcs)
  backend.fsspec_backend._get_filesystem.cache_clear()
  yield
  backend.fsspec_backend._get_filesystem.cache_clear()
  InMemoryGcs.clear_instance_cache()


def upload(local: epath.Path, remote: epath.Path) -> None:
  for path in local.iterdir():
    if path.is_dir():
      upload(path, remote / path.name)
    else:
      remote.mkdir(parents=True, exist_ok=True)
      (remote / path.name).write_bytes(path.read_bytes())


def test_two_workers_prepare_from_and_into_gs(gcs, tmp_path):
  del gcs
  local_videos = tmp_path / "videos"
  synthetic.generate(local_videos, media.TINY_SPEC, num_workers=1, progress=False)
  upload(epath.Path(local_videos), epath.Path("gs://videos/tiny"))
  quiet = dict(mel=media.MEL, processes=1, progress=False, log=lambda message: None)

  for index in range(2):
    parts.prepare_part(
      "gs://videos/tiny", "gs://data", "clips", worker_index=index, num_workers=2, **quiet
    )
  target = parts.merge_parts("gs://data", "clips", num_workers=2, log=lambda message: None)

  assert str(target) == f"gs://data/clips/{dataset_writer.VERSION}" and dataset_writer.is_prepared(
    target
  )
  assert not parts.parts_dir("gs://data", "clips").exists()
  downloaded = tmp_path / "downloaded"
  upload(target, epath.Path(downloaded))  # ArrayRecord is read from local files only
  from_gs = datasets.open_prepared(downloaded)
  local = datasets.open_prepared(
    dataset_writer.prepare(
      local_videos,
      tmp_path / "local",
      "clips",
      mel=media.MEL,
      num_workers=1,
      progress=False,
      log=lambda message: None,
    )
  )
  assert from_gs.summary == local.summary and from_gs.stored_stats == local.stored_stats
  for split, count in local.num_examples.items():
    theirs = local.source(split)
    ours = {e["id"]: e for e in (from_gs.source(split)[i] for i in range(count))}
    for example in (theirs[i] for i in range(count)):
      np.testing.assert_array_equal(ours[example["id"]]["frames"], example["frames"])
      np.testing.assert_array_equal(ours[example["id"]]["audio"], example["audio"])


def test_run_files_go_to_a_gs_workdir(gcs, monkeypatch):
  del gcs
  written = []

  class EventWriter:  # tensorboardX writes gs:// with its own client, not through epath
    def __init__(self, logdir):
      written.append(logdir)

    def add_scalar(self, *args):
      del args

    def flush(self):
      pass

    def close(self):
      pass

  monkeypatch.setattr("tensorboardX.SummaryWriter", EventWriter)
  workdir = epath.Path("gs://runs/cmvt-1")
  train.check_workdir_writable(workdir)
  train.write_config_json(workdir, micro.get_config())
  writer = metrics.MetricsWriter(workdir, is_primary=True)
  for step in (1, 2):
    writer.write(step, {"loss": 1.0 / step})
  writer.drop_after(1)  # what a resumed run does
  writer.close()

  assert metrics.read("gs://runs/cmvt-1") == [{"step": 1, "loss": 1.0}]
  assert '"processes": 1' in (workdir / "config.json").read_text()
  assert written == ["gs://runs/cmvt-1/tensorboard"]
  assert sorted(path.name for path in workdir.iterdir()) == ["config.json", "metrics.jsonl"]
