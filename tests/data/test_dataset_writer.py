"""prepare: a folder of videos (good and bad) -> TFDS ArrayRecord dataset."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from cmvt_jax import prepare as prepare_cli
from cmvt_jax.data import dataset_writer
from cmvt_jax.data import datasets
from configs import default
from tests import helpers
from tests.data import media


def _prepare(video_dir, data_dir, name="clips", **kwargs):
  return dataset_writer.prepare(
    video_dir,
    data_dir,
    name,
    mel=media.MEL,
    num_workers=1,
    progress=False,
    log=lambda _: None,
    **kwargs,
  )


def test_tiny_generated_set_reads_back(tiny_dataset, tiny_video_dir):
  manifest = json.loads((tiny_video_dir / "manifest.json").read_text())
  reader = tfds.builder_from_directory(os.fspath(tiny_dataset.directory))

  assert tiny_dataset.directory.parts[-2:] == ("tiny", dataset_writer.VERSION)
  assert tiny_dataset.num_examples == {"train": 4, "validation": 4, "test": 4}
  assert reader.info.features["label"].names == ["green_square", "red_disc"]
  for split in ("train", "test"):
    examples = [tiny_dataset.source(split)[i] for i in range(4)]
    files = {entry["path"]: entry for entry in manifest["files"] if entry["split"] == split}
    expected_ids = {f"{path}@{start:.3f}" for path in files for start in (0.0, 2.0)}
    assert {e["id"].decode() for e in examples} == expected_ids
    for example in examples:
      source = example["source"].decode()
      assert example["id"].decode() == f"{source}@{example['start']:.3f}"
      label = tiny_dataset.label_names[example["label"]]
      assert label == files[source]["label"] == source.split("/")[1]
      assert example["has_audio"]
      assert example["frames"].shape == (16, 32, 32, 3) and example["frames"].dtype == np.uint8
      assert example["audio"].shape == (32000,) and example["audio"].dtype == np.int16


def test_stored_statistics_match_a_direct_computation(tiny_dataset):
  source = tiny_dataset.source("train")
  frames = np.stack([source[i]["frames"] for i in range(4)]) / 255.0
  stats = tiny_dataset.stored_stats
  np.testing.assert_allclose(stats.video_mean, frames.reshape(-1, 3).mean(0), rtol=1e-5)
  np.testing.assert_allclose(stats.video_std, frames.reshape(-1, 3).std(0), rtol=1e-4)
  assert stats.mel == media.MEL


def test_rerun_over_a_finished_dataset_is_a_no_op(tiny_dataset, tiny_video_dir):
  info_file = pathlib.Path(tiny_dataset.directory) / "dataset_info.json"
  before = info_file.stat().st_mtime_ns
  messages = []
  directory = dataset_writer.prepare(
    tiny_video_dir,
    tiny_dataset.directory.parent.parent,
    "tiny",
    mel=media.MEL,
    num_workers=1,
    progress=False,
    log=messages.append,
  )
  assert directory == tiny_dataset.directory
  assert info_file.stat().st_mtime_ns == before
  assert "nothing to do" in messages[0]


def test_interrupted_run_leaves_no_dataset(tiny_video_dir, tmp_path, monkeypatch):
  original = dataset_writer._ClipFolderBuilder._generate_examples

  def fail_midway(self, split):
    for count, item in enumerate(original(self, split)):
      if count == 2:
        raise KeyboardInterrupt("simulated interruption")
      yield item

  monkeypatch.setattr(dataset_writer._ClipFolderBuilder, "_generate_examples", fail_midway)
  with pytest.raises(KeyboardInterrupt):
    _prepare(tiny_video_dir, tmp_path, name="broken")
  assert not dataset_writer.is_prepared(dataset_writer.dataset_dir(tmp_path, "broken"))
  assert list((tmp_path / "broken").iterdir()) == []  # TFDS removed its incomplete folder
  with pytest.raises(FileNotFoundError, match="No prepared dataset"):
    datasets.open_prepared(dataset_writer.dataset_dir(tmp_path, "broken"))


def test_bad_files_are_skipped_counted_and_every_good_clip_written(tmp_path):
  layout = media.bad_data_folder(tmp_path / "videos")

  directory = _prepare(tmp_path / "videos", tmp_path / "data")
  dataset = datasets.open_prepared(directory)
  summary = dataset.summary

  assert summary.found == len(layout) == summary.good + len(summary.skipped)
  assert summary.good == sum(1 for clips in layout.values() if clips)
  assert summary.ignored_non_video == 1
  reasons = {source: reason for source, reason, _ in summary.skipped}
  assert reasons == {
    "train/dogs/short.mp4": "shorter than one clip",
    "train/dogs/silent.mp4": "no audio stream",
    "train/cats/sound_only.mp4": "no video stream",
    "test/loose.mp4": "not inside a class folder",
    "train/cats/empty.mp4": "empty",
    "train/dogs/noise.avi": "unreadable",
  }
  assert [source for source, _ in summary.truncated] == ["test/cats/cut.mp4"]
  assert summary.clips == {"train": 6, "test": 3}
  sources = []
  for split in ("train", "test"):
    source = dataset.source(split)
    sources += [source[i]["source"].decode() for i in range(len(source))]
  expected = {path.replace("\udce9", "\\xe9"): clips for path, clips in layout.items()}
  assert sorted(sources) == sorted(path for path, clips in expected.items() for _ in range(clips))
  assert "train/cats/caf\\xe9.mp4" in sources
  assert "skipped, unreadable: 1" in summary.format()


def test_a_split_whose_files_are_all_bad_is_left_out(tmp_path):
  media.write_video(
    tmp_path / "videos/train/a/good.mp4", num_frames=20, fps=10, audio=media.tone(2.0, 16000)
  )
  (tmp_path / "videos/validation/a").mkdir(parents=True)
  (tmp_path / "videos/validation/a/bad.mp4").write_bytes(b"")

  dataset = datasets.open_prepared(_prepare(tmp_path / "videos", tmp_path / "data"))

  assert dataset.num_examples == {"train": 1}
  assert dataset.summary.empty_splits == ["validation"]
  assert "split validation: every file was skipped" in dataset.summary.format()
  with pytest.raises(ValueError, match="has train"):
    dataset.source("validation")


def test_no_usable_clip_at_all_is_an_error(tmp_path):
  (tmp_path / "videos/train/a").mkdir(parents=True)
  (tmp_path / "videos/train/a/bad.mp4").write_bytes(b"")
  with pytest.raises(ValueError, match="No usable clip"):
    _prepare(tmp_path / "videos", tmp_path / "data")
  assert not (tmp_path / "data/clips").exists()


def test_keep_audioless_keeps_silent_videos(tmp_path):
  media.write_video(tmp_path / "videos/train/a/silent.mp4", num_frames=42, fps=10)
  media.write_video(
    tmp_path / "videos/train/a/loud.mp4", num_frames=42, fps=10, audio=media.tone(4.2, 16000)
  )

  directory = _prepare(
    tmp_path / "videos", tmp_path / "data", storage=dataset_writer.StorageSpec(keep_audioless=True)
  )

  source = datasets.open_prepared(directory).source("train")
  examples = [source[i] for i in range(len(source))]
  kept = sorted((e["source"].decode(), bool(e["has_audio"])) for e in examples)
  assert kept == [("train/a/loud.mp4", True)] * 2 + [("train/a/silent.mp4", False)] * 2
  for example in examples:
    assert (np.abs(example["audio"]).max() > 1000) == example["has_audio"]


def test_clip_and_stride_options(tmp_path):
  media.write_video(
    tmp_path / "videos/train/a/long.mp4", num_frames=55, fps=10, audio=media.tone(5.5, 16000)
  )

  directory = _prepare(
    tmp_path / "videos",
    tmp_path / "data",
    storage=dataset_writer.StorageSpec(
      clip_seconds=3.0, stride_seconds=1.0, fps=4.0, short_side=16, sample_rate=8000
    ),
  )

  source = datasets.open_prepared(directory).source("train")
  starts = sorted(float(source[i]["start"]) for i in range(len(source)))
  assert starts == [0.0, 1.0, 2.0]  # windows of 3 s every 1 s inside 5.5 s
  assert source[0]["frames"].shape == (12, 16, 24, 3)
  assert source[0]["audio"].shape == (24000,)


def test_hash_split_is_stable_and_uses_top_level_folders_as_labels(tmp_path):
  for i in range(12):
    media.write_video(
      tmp_path / f"videos/{'ab'[i % 2]}/v{i}.mp4",
      num_frames=20,
      fps=10,
      audio=media.tone(2.0, 16000),
    )
  fractions = {"train": 0.5, "test": 0.5}
  listing = dataset_writer.scan_video_dir(tmp_path / "videos", fractions)
  again = dataset_writer.scan_video_dir(tmp_path / "videos", fractions)
  assert listing == again and listing.label_names == ["a", "b"]
  assert {file.split for file in listing.files} == {"train", "test"}
  assert all(file.labels == (file.source.split("/")[0],) for file in listing.files)
  with pytest.raises(ValueError, match="summing to 1"):
    dataset_writer.scan_video_dir(tmp_path / "videos", {"train": 0.5})


def test_missing_split_folders_are_a_clear_error(tmp_path):
  (tmp_path / "videos/cats").mkdir(parents=True)
  with pytest.raises(FileNotFoundError, match="none of the split folders.*--unlabelled"):
    _prepare(tmp_path / "videos", tmp_path / "data")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    _prepare(tmp_path / "absent", tmp_path / "data")


def test_bad_dataset_name(tmp_path):
  with pytest.raises(ValueError, match="lower-case Python identifier"):
    _prepare(tmp_path, tmp_path, name="My-Data")


def test_prepare_defaults_match_the_default_config():
  config = default.get_config()
  storage = dataset_writer.StorageSpec()
  assert (
    storage.clip_seconds,
    storage.stride_seconds,
    storage.fps,
    storage.short_side,
    storage.sample_rate,
    storage.keep_audioless,
  ) == (
    config.dataset.clip_seconds,
    config.dataset.stride_seconds,
    config.dataset.fps,
    config.dataset.short_side,
    config.dataset.sample_rate,
    config.dataset.keep_audioless,
  )
  flags = {
    name: prepare_cli.flags.FLAGS[name].default
    for name in (
      "clip_seconds",
      "fps",
      "short_side",
      "sample_rate",
      "n_fft",
      "hop_length",
      "n_mels",
      "fmin",
      "fmax",
    )
  }
  assert flags == {
    "clip_seconds": config.dataset.clip_seconds,
    "fps": config.dataset.fps,
    "short_side": config.dataset.short_side,
    "sample_rate": config.dataset.sample_rate,
    "n_fft": config.input.n_fft,
    "hop_length": config.input.hop_length,
    "n_mels": config.input.n_mels,
    "fmin": config.input.fmin,
    "fmax": config.input.fmax,
  }


@pytest.mark.slow
def test_command_line_twice(tiny_video_dir, tmp_path):
  command = [
    sys.executable,
    "-m",
    "cmvt_jax.prepare",
    f"--video_dir={tiny_video_dir}",
    f"--data_dir={tmp_path}",
    "--name=cli",
    "--num_workers=2",
  ]
  result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=300)
  assert result.returncode == 0, result.stderr
  assert "clips written to train: 4" in result.stdout
  assert "Video files found: 6 = 6 used + 0 skipped" in result.stdout
  # Our progress line, not TFDS's bars and "Downloading and preparing" notice.
  assert any(line.startswith("prepare    6/6 videos  100%") for line in result.stderr.splitlines())
  assert "Downloading and preparing" not in result.stdout + result.stderr
  assert "examples/s" not in result.stderr
  assert dataset_writer.is_prepared(dataset_writer.dataset_dir(tmp_path, "cli"))

  before = helpers.file_digests(tmp_path)
  again = subprocess.run(command, capture_output=True, text=True, check=False, timeout=300)
  assert again.returncode == 0, again.stderr
  assert "already prepared" in again.stdout
  assert helpers.file_digests(tmp_path) == before  # kept as it was


def _write_clip(path):
  media.write_video(path, num_frames=20, fps=10, audio=media.tone(2.0, 16000))


def test_folders_without_class_folders_prepare_unlabelled(tmp_path):
  # Nested, no class folders: unlabelled when asked, every file used, splits by hash.
  for relative in ("2023/jan/a.mp4", "2023/feb/b.mp4", "2024/c.mp4", "d.mp4"):
    _write_clip(tmp_path / "nested" / relative)
  listing = dataset_writer.scan_video_dir(tmp_path / "nested", unlabelled=True)
  assert listing.label_names == [] and {f.split for f in listing.files} == {"train"}
  assert [(f.source, f.labels, f.skip_reason) for f in listing.files] == [
    ("2023/feb/b.mp4", (), ""),
    ("2023/jan/a.mp4", (), ""),
    ("2024/c.mp4", (), ""),
    ("d.mp4", (), ""),
  ]
  dataset = datasets.open_prepared(
    _prepare(tmp_path / "nested", tmp_path / "data", unlabelled=True)
  )
  assert dataset.label_names == () and not dataset.labelled
  source = dataset.source("train")
  assert len(source) == 4
  assert all(source[i]["label"] == -1 and len(source[i]["labels"]) == 0 for i in range(4))

  # Flat: unlabelled without being asked; a hash split gives the splits.
  for name in ("a.mp4", "b.mp4", "c.mp4", "d.mp4"):
    _write_clip(tmp_path / "flat" / name)
  flat = dataset_writer.scan_video_dir(tmp_path / "flat", {"train": 0.5, "test": 0.5})
  assert flat.label_names == [] and all(not f.labels and not f.skip_reason for f in flat.files)
  assert {f.split for f in flat.files} == {"train", "test"}

  # Split folders holding the files directly: unlabelled, splits from the folders.
  for relative in ("train/a.mp4", "train/b.mp4", "test/c.mp4"):
    _write_clip(tmp_path / "splits" / relative)
  loose = dataset_writer.scan_video_dir(tmp_path / "splits")
  assert loose.label_names == []
  assert [(f.source, f.split) for f in loose.files] == [
    ("test/c.mp4", "test"),
    ("train/a.mp4", "train"),
    ("train/b.mp4", "train"),
  ]
