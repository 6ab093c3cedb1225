"""Session fixtures of the data tests: a tiny generated video set and its prepared dataset."""

import pytest

from cmvt_jax.data import dataset_writer
from cmvt_jax.data import datasets
from cmvt_jax.data import synthetic
from tests.data import media


@pytest.fixture(scope="session")
def tiny_video_dir(tmp_path_factory):
  """The synthetic generator's output at `TINY_SPEC` (written in this process)."""
  directory = tmp_path_factory.mktemp("tiny_videos")
  synthetic.generate(directory, media.TINY_SPEC, num_workers=1, progress=False)
  return directory


@pytest.fixture(scope="session")
def tiny_dataset(tiny_video_dir, tmp_path_factory):
  """`tiny_video_dir` prepared with the default storage, opened."""
  data_dir = tmp_path_factory.mktemp("tiny_data")
  directory = dataset_writer.prepare(
    tiny_video_dir,
    data_dir,
    "tiny",
    mel=media.MEL,
    num_workers=1,
    progress=False,
    log=lambda _: None,
  )
  return datasets.open_prepared(directory)
