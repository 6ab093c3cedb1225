"""Opening datasets from the config; the synthetic dataset made once, on first use."""

import dataclasses
import json
import pathlib

import numpy as np
import pytest
import tensorflow_datasets as tfds

from cmvt_jax.data import dataset_writer
from cmvt_jax.data import datasets
from cmvt_jax.data import normalization
from cmvt_jax.data import parts
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
  other = dataclasses.replace(media.MEL, n_mels=64)
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
  assert batch["video"].shape == (4, 8, 16, 16, 3)  # 8 frames of 16 px
  assert batch["audio"].shape == (4, 64, 32)  # 2 s of 500-sample hops at 16 kHz, 32 mel bins
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
  assert element["video"].shape == (16, 16, 16, 3)  # 4 s at the input's 4 fps, 16 px
  assert element["audio"].shape == (128, 32)  # 4 s of 500-sample hops at 16 kHz, 32 mel bins


def test_audio_is_stored_as_raw_bytes(tiny_dataset):
  """Format 3: as a list of integers (formats 1 and 2), TFDS took 5 ms per clip to write
  the audio and 0.6 ms to read it back."""
  features = json.loads((tiny_dataset.directory / "features.json").read_text())
  stored = features["featuresDict"]["features"]
  assert stored["audio"]["tensor"] == {
    "dtype": "int16",
    "encoding": "bytes",
    "shape": {"dimensions": ["-1"]},
  }
  assert tiny_dataset.format_version == 3
  assert tiny_dataset.source("train")[0]["audio"].dtype == np.int16


class FormatOneClips(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A dataset as `prepare` wrote it before format 2 (no `labels`, no format record, audio a
  list of integers as formats 1 and 2 stored it), written plainly here."""

  VERSION = tfds.core.Version("1.0.0")
  code_path = None

  def _info(self):
    storage = dataclasses.asdict(dataset_writer.StorageSpec())
    summary = {
      "found": 2,
      "good": 2,
      "ignored_non_video": 0,
      "hours": 0.001,
      "clips": {"train": 2},
      "skipped": [],
      "truncated": [],
      "empty_splits": [],
    }
    return tfds.core.DatasetInfo(
      builder=self,
      features=tfds.features.FeaturesDict(
        {
          "id": tfds.features.Text(),
          "source": tfds.features.Text(),
          "start": tfds.features.Scalar(dtype=np.float32),
          "label": tfds.features.ClassLabel(names=["cat", "dog"]),
          "has_audio": tfds.features.Scalar(dtype=np.bool_),
          "frames": tfds.features.Tensor(
            shape=(None, None, None, 3), dtype=np.uint8, encoding="bytes"
          ),
          "audio": tfds.features.Tensor(shape=(None,), dtype=np.int16),
        }
      ),
      metadata=tfds.core.MetadataDict({"storage": storage, "prepare_summary": summary}),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for index, label in enumerate(("dog", "cat")):
      yield (
        f"v{index}.mp4@0.000",
        {
          "id": f"v{index}.mp4@0.000",
          "source": f"v{index}.mp4",
          "start": 0.0,
          "label": label,
          "has_audio": True,
          "frames": np.full((16, 32, 32, 3), 100 + index, np.uint8),
          "audio": np.zeros(32000, np.int16),
        },
      )


def test_a_dataset_of_format_one_is_read(tmp_path):
  builder = FormatOneClips(data_dir=str(tmp_path))
  builder.download_and_prepare(
    file_format="array_record", download_config=tfds.download.DownloadConfig()
  )
  dataset = datasets.open_prepared(builder.data_dir)

  assert dataset.format_version == 1 and not dataset.multi_label
  assert dataset.label_names == ("cat", "dog") and dataset.labelled
  assert dataset.summary.kind == "folder" and dataset.summary.audioless_clips == {}
  assert dataset.audio_fraction("train") == 1.0
  element = dataset.source("train")[0]
  assert pipeline.stored_labels(element).tolist() == [element["label"]]
  assert pipeline.label_fields(element, 2)["labels"].tolist() == [0, 1]  # dog: class 1

  # A later format than this version reads is refused with what to do.
  path = pathlib.Path(builder.data_dir) / "metadata.json"
  metadata = json.loads(path.read_text())
  metadata[dataset_writer.FORMAT_KEY] = {"version": 99, "multi_label": False}
  path.write_text(json.dumps(metadata))
  with pytest.raises(ValueError, match="newer cmvt_jax \\(dataset format 99.*upgrade cmvt_jax"):
    datasets.open_prepared(builder.data_dir)


def test_parts_of_an_older_format_are_refused_with_what_to_run(tmp_path):
  for worker in (0, 1):
    part = parts.part_dir(tmp_path, "clips", worker, 2)
    part.mkdir(parents=True)
    (part / parts.OUTCOMES_FILE).write_text(json.dumps({"num_workers": 2, "outcomes": []}))
  with pytest.raises(ValueError, match="format 1.*Delete .*1.0.0.parts, run every worker again"):
    parts.merge_parts(tmp_path, "clips", num_workers=2, log=lambda _: None)


def test_mixture_statistics_equal_those_of_the_clips_drawn():
  rng = np.random.default_rng(0)

  def clip(with_audio):
    frames = rng.integers(0, 256, (4, 8, 8, 3)).astype(np.uint8)
    return frames, rng.normal(0, 0.1, 8000).astype(np.float32) if with_audio else None

  first = [clip(True) for _ in range(3)]
  second = [clip(True), clip(False)]  # half of the second dataset's clips have no audio
  accumulated = []
  for clips in (first, second, first + second):
    accumulator = normalization.StatsAccumulator(media.MEL)
    for frames, waveform in clips:
      accumulator.add(frames, waveform)
    accumulated.append(accumulator.result())
  # Drawn in proportion to their sizes, the mixture is the union of the clips.
  mixed = normalization.mixture(accumulated[:2], [3, 2], [3 * 1.0, 2 * 0.5])
  expected = accumulated[2]
  np.testing.assert_allclose(mixed.video_mean, expected.video_mean, rtol=1e-9)
  np.testing.assert_allclose(mixed.video_std, expected.video_std, rtol=1e-9)
  assert mixed.audio_mean == pytest.approx(expected.audio_mean, rel=1e-9)
  assert mixed.audio_std == pytest.approx(expected.audio_std, rel=1e-9)


@pytest.mark.parametrize(
  "mixture, message",
  [
    ((("a", 0.5), ("a", 0.5)), "names a dataset twice"),
    ((("a", 0),), "is not \\(NAME, WEIGHT\\) with a positive weight"),
    ((("a",),), "is not \\(NAME, WEIGHT\\)"),
    (((1, 0.5),), "is not \\(NAME, WEIGHT\\)"),
  ],
)
def test_bad_mixtures_are_refused(mixture, message):
  config = default.get_config()
  config.dataset.mixture = mixture
  with pytest.raises(ValueError, match=message):
    datasets.mixture_weights(config.dataset)
