"""gs:// folders work wherever cmvt_jax touches files through `epath` (no GCS here).

`gs://` is served by an in-memory fsspec file system standing in for gcsfs (epath reaches
gs:// through fsspec when TensorFlow is not installed). Not covered by the stand-in:
checkpoints (orbax writes gs:// with tensorstore's own GCS driver), TensorBoard event files
(tensorboardX's own GCS writer) and reading ArrayRecord shards (POSIX only: pod runs read
the dataset through a Cloud Storage FUSE mount, see docs/scaling.md).
"""

import importlib
import io
import warnings

import numpy as np
import pytest
from etils import epath
from etils.epath import backend
from fsspec.implementations.memory import MemoryFile
from fsspec.implementations.memory import MemoryFileSystem

from cmvt_jax import files
from cmvt_jax import metrics
from cmvt_jax import train
from cmvt_jax.data import dataset_writer
from cmvt_jax.data import datasets
from cmvt_jax.data import parts
from cmvt_jax.data import synthetic
from configs import micro
from tests.data import media


class Upload(io.BytesIO):
  """An object upload as gcsfs makes one: the object appears, whole, when the file is
  closed (the upload finalised), and `discard()` abandons it."""

  def __init__(self, fs, path):
    super().__init__()
    self.fs, self.path, self.discarded = fs, path, False

  def discard(self):
    self.discarded = True

  def close(self):
    if not self.closed and not self.discarded:
      self.fs.store[self.path] = MemoryFile(self.fs, self.path, self.getvalue())
    super().close()


class InMemoryGcs(MemoryFileSystem):
  """gs://BUCKET/PATH kept in memory, with its own store, writing like gcsfs: objects
  appear when their upload is closed; append mode is not supported and, as gcsfs does,
  becomes overwrite with a warning."""

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

  def _open(self, path, mode="rb", **kwargs):
    if "r" in mode:
      return super()._open(path, mode, **kwargs)
    if "a" in mode:
      warnings.warn(
        "Append mode 'a' is not supported in GCS. Using overwrite mode instead.", stacklevel=2
      )
    return Upload(self, self._strip_protocol(path))


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

  class EventFile:  # tensorboardX writes gs:// with its own client, not through epath
    def __init__(self, folder, *, purge_step):
      written.append((str(folder), purge_step))

    def add_scalars(self, step, values):
      del step, values

    def flush(self):
      pass

    def close(self):
      pass

  monkeypatch.setattr(metrics, "EventFile", EventFile)
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
  assert written == [("gs://runs/cmvt-1/tensorboard", 0)]
  assert sorted(path.name for path in workdir.iterdir()) == ["config.json", "metrics.jsonl"]


def test_whole_files_on_gs_appear_complete_or_not_at_all(gcs):
  del gcs
  path = epath.Path("gs://runs/cmvt-1/config.json")
  files.write_json(path, {"run": 1}, kind="config.json")
  files.write_json(path, {"run": 2}, kind="config.json")  # replaced, as locally
  assert path.read_text() == '{\n  "run": 2\n}\n'
  with pytest.raises(RuntimeError, match="drawing failed"):
    with files.replacing(epath.Path("gs://runs/cmvt-1/plots/a.png"), kind="plot") as temporary:
      temporary.write_bytes(b"half a figure")
      raise RuntimeError("drawing failed")
  assert sorted(InMemoryGcs.store) == ["/runs/cmvt-1/config.json"]  # no object, no temporary


def test_an_upload_that_fails_midway_leaves_the_old_object(gcs, monkeypatch):
  del gcs
  path = epath.Path("gs://runs/cmvt-1/embeddings/test/part-00000-of-00001.npz")
  files.write_bytes(path, b"old part", kind="export-part")

  def write(self, data):
    raise OSError("connection reset")  # the network fails during the upload

  with monkeypatch.context() as patched, pytest.raises(OSError, match="connection reset"):
    patched.setattr(Upload, "write", write)
    files.write_bytes(path, b"new part", kind="export-part")
  assert path.read_bytes() == b"old part"
  assert len(InMemoryGcs.store) == 1


def test_appended_lines_on_gs_are_all_kept(gcs):
  """gcsfs has no append (it overwrites, with a warning): every metrics line but the last
  would be lost. append_line rewrites the object with the new line instead."""
  del gcs
  path = epath.Path("gs://runs/cmvt-1/metrics.jsonl")
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # append mode is never asked of the object store
    for step in (1, 2, 3):
      files.append_line(path, f'{{"step": {step}}}', kind="metrics-append")
  assert path.read_text() == '{"step": 1}\n{"step": 2}\n{"step": 3}\n'
