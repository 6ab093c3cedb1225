"""Two processes on localhost: training ends with a whole-video export (each process embeds
its own videos on its own first device, no collective inside a video) and plots; each process
writes its own part, and together they hold what one process exports."""

import hashlib
import json

import numpy as np
import pytest

from cmvt_jax import export
from tests import helpers
from tests.evaluate.conftest import MICRO_TEST_FILES
from tests.evaluate.conftest import micro_config

# Trains or spawns processes: the README's test command runs it, -m "not slow" skips it.
pytestmark = pytest.mark.slow


def test_two_process_run_exports_and_plots_at_the_end(tmp_path, micro_data_dir):
  workdir = tmp_path / "run"
  processes = helpers.start_processes(
    workdir,
    2,
    "--config.total_steps=1",
    "--config.export.at_end=True",
    "--config.export.whole_video=True",
    "--config.plots.at_end=True",
    data_dir=micro_data_dir,
  )
  helpers.finish_all(processes)

  folder = workdir / "embeddings" / "test_whole_video"
  manifest = json.loads((folder / "manifest.json").read_text())
  assert manifest["step"] == 1 and manifest["count"] == MICRO_TEST_FILES
  parts = [np.load(folder / name) for name in manifest["parts"]]
  assert sorted(manifest["parts"]) == ["part-00000-of-00002.npz", "part-00001-of-00002.npz"]
  assert manifest["part_sha256"] == {  # each process's digest, gathered by process 0
    name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in manifest["parts"]
  }
  ids = [set(part["id"]) for part in parts]
  assert ids[0] and ids[1] and not ids[0] & ids[1]
  union = export.load_embeddings(workdir, "test_whole_video")

  config = micro_config(
    micro_data_dir, **{"export.name": "one_process", "export.whole_video": True}
  )
  export.export_embeddings(config, str(workdir))
  single = export.load_embeddings(workdir, "one_process")
  assert sorted(union) == sorted(single)
  for key in ("id", "source", "label", "num_frames", "moment_row", "moment_time"):
    np.testing.assert_array_equal(union[key], single[key], err_msg=key)
  for key in ("video", "audio", "moment_video", "moment_audio"):
    np.testing.assert_allclose(union[key], single[key], atol=1e-5, err_msg=key)

  written = sorted(path.name for path in (workdir / "plots").iterdir())
  assert written == [
    "attention.png",
    "embeddings_pca.png",
    "manifest.json",
    "similarity_matrix.png",
    "training_curves.png",
  ]
