"""Opening datasets from the config; the synthetic dataset made once, on first use."""

import dataclasses

import numpy as np
import pytest

from cmvt_jax.data import dataset_writer
from cmvt_jax.data import datasets
from cmvt_jax.data import pipeline
from configs import default
from tests.data import media


def _tiny_config(data_dir):
  config = default.get_config()
  config.dataset.data_dir = str(data_dir)
  synthetic_config = config.dataset.synthetic
  synthetic_config.train_files, synthetic_config.validation_files = 2, 1
  synthetic_config.test_files, synthetic_config.segments_per_file = 1, 2
  return config


def test_synthetic_dataset_is_made_once_then_reused(tmp_path):
  config = _tiny_config(tmp_path)
  messages = []

  dataset = datasets.open_from_config(config.dataset, config.input, log=messages.append)

  assert dataset.num_examples == {"train": 4, "validation": 2, "test": 2}
  assert dataset.directory == datasets.synthetic_dataset_dir(config.dataset)
  assert str(dataset.directory).startswith(str(tmp_path / "cmvt_synthetic-"))
  assert any("Generating the synthetic dataset" in m for m in messages)
  # Another process (or a later run) finds it complete and does nothing.
  messages.clear()
  again = datasets.open_from_config(
    config.dataset, config.input, process_index=1, log=messages.append
  )
  assert again.directory == dataset.directory and messages == []
  # Other generator settings are another dataset.
  config.dataset.synthetic.seed = 1
  assert datasets.synthetic_dataset_dir(config.dataset) != dataset.directory


def test_other_processes_wait_for_process_zero(tmp_path):
  config = _tiny_config(tmp_path)
  with pytest.raises(TimeoutError, match="process 0"):
    datasets.ensure_synthetic_dataset(
      config.dataset, media.MEL, process_index=1, timeout_s=0.5, log=lambda _: None
    )
  assert not dataset_writer.is_prepared(datasets.synthetic_dataset_dir(config.dataset))


def test_a_named_dataset_that_is_not_there(tmp_path):
  config = default.get_config()
  config.dataset.name = "my_videos"
  config.dataset.data_dir = str(tmp_path)
  with pytest.raises(FileNotFoundError, match="python -m cmvt_jax.prepare"):
    datasets.open_from_config(config.dataset, config.input)


def test_default_cache_folder_follows_xdg(monkeypatch, tmp_path):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  assert datasets.default_data_dir() == tmp_path / "cmvt_jax"


def test_statistics_recomputed_for_other_mel_settings(tiny_dataset):
  assert tiny_dataset.normalization_stats(media.MEL) is tiny_dataset.stored_stats
  other = dataclasses.replace(media.MEL, n_mels=32)
  messages = []
  stats = tiny_dataset.normalization_stats(other, log=messages.append)
  assert stats.mel == other and "computing statistics" in messages[0]
  assert stats.video_mean == pytest.approx(tiny_dataset.stored_stats.video_mean)
  assert stats.audio_mean != pytest.approx(tiny_dataset.stored_stats.audio_mean)


def test_default_config_builds_a_pipeline_over_the_prepared_dataset(tiny_dataset):
  config = default.get_config()
  spec = dataclasses.replace(pipeline.InputSpec.from_config(config.input), num_workers=0)
  preprocessor = pipeline.Preprocessor(
    spec,
    tiny_dataset.normalization_stats(spec.mel),
    tiny_dataset.storage.fps,
    tiny_dataset.storage.sample_rate,
  )
  [batch] = list(pipeline.eval_dataset(tiny_dataset.source("test"), preprocessor, batch_size=4))
  assert batch["video"].shape == (4, 8, 32, 32, 3)
  assert batch["audio"].shape == (4, 64, 64)
  assert batch["mask"].all()
  assert abs(float(batch["audio"].mean())) < 1.0 and 0.5 < float(batch["video"].std()) < 2.0
  assert sorted(batch["id"].tolist()) == sorted(
    tiny_dataset.source("test")[i]["id"].decode() for i in range(4)
  )


def _eval_preprocessor(dataset):
  spec = dataclasses.replace(
    pipeline.InputSpec.from_config(default.get_config().input), num_workers=0
  )
  return pipeline.Preprocessor(
    spec, dataset.normalization_stats(spec.mel), dataset.storage.fps, dataset.storage.sample_rate
  )


def test_elements_from_a_raw_file_equal_the_prepared_eval_elements(tiny_dataset, tiny_video_dir):
  preprocessor = _eval_preprocessor(tiny_dataset)
  batches = list(pipeline.eval_dataset(tiny_dataset.source("test"), preprocessor, batch_size=4))
  prepared_rows = {
    batch["id"][i]: {key: batch[key][i] for key in batch} for batch in batches for i in range(4)
  }
  for name in ("test/red_disc/test_00000.mp4", "test/green_square/test_00001.mp4"):
    elements = pipeline.file_elements(
      tiny_video_dir / name, preprocessor, tiny_dataset.storage, source=name
    )
    assert [e["start"] for e in elements] == [0.0, 2.0]
    for element in elements:
      row = prepared_rows[element["id"]]
      assert element["source"] == row["source"] and element["start"] == row["start"]
      np.testing.assert_array_equal(element["video"], row["video"])
      np.testing.assert_array_equal(element["audio"], row["audio"])


def test_whole_video_element_covers_the_file(tiny_dataset, tiny_video_dir):
  preprocessor = _eval_preprocessor(tiny_dataset)
  [element] = pipeline.file_elements(
    tiny_video_dir / "test/red_disc/test_00000.mp4",
    preprocessor,
    tiny_dataset.storage,
    whole_video=True,
  )
  assert element["video"].shape == (16, 32, 32, 3)  # 4 s at the input's 4 fps
  assert element["audio"].shape == (128, 64)  # 4 s of 500-sample hops at 16 kHz
