"""Embedding export: round trip, checkpoint choice, interruption, raw files, whole videos."""

import dataclasses
import hashlib
import json
import re
import shutil

import numpy as np
import pytest

from cmvt_jax import export
from cmvt_jax import files
from cmvt_jax import whole_video
from cmvt_jax.data import pipeline
from cmvt_jax.data import synthetic
from configs import micro
from tests import helpers
from tests.evaluate.conftest import LATEST_STEP
from tests.evaluate.conftest import MICRO_TEST_CLIPS
from tests.evaluate.conftest import MICRO_TEST_FILES
from tests.evaluate.conftest import micro_config


@pytest.fixture(scope="module")
def clip_export(workdir, run, micro_data_dir):
  """The micro test split exported per clip from the latest checkpoint, in batches of 6
  (16 clips: the third batch holds 2 padding rows)."""
  config = micro_config(micro_data_dir, **{"export.batch_size": 6})
  export.export_embeddings(config, str(workdir), run=run)
  return export.load_embeddings(workdir, "test")


@pytest.fixture(scope="module")
def test_videos(tmp_path_factory):
  """The micro test split's video files, generated again (equal specs give equal files)."""
  spec = dataclasses.replace(
    synthetic.SyntheticSpec.from_config(micro.get_config().dataset.synthetic),
    train_files=0,
    validation_files=0,
  )
  directory = tmp_path_factory.mktemp("micro_test_videos")
  synthetic.generate(directory, spec, num_workers=1, progress=False)
  return directory


def assert_matches_direct(rows, expected, atol=1e-5):
  for index, clip_id in enumerate(rows["id"]):
    video, audio, label, source = expected[clip_id]
    np.testing.assert_allclose(rows["video"][index], video, atol=atol, err_msg=clip_id)
    np.testing.assert_allclose(rows["audio"][index], audio, atol=atol, err_msg=clip_id)
    if "label" in rows:
      assert rows["label"][index] == label
    assert rows["source"][index] == source


def test_export_round_trip_equals_a_direct_forward_pass(clip_export, workdir, direct):
  rows = clip_export
  assert len(rows["id"]) == MICRO_TEST_CLIPS
  assert len(set(rows["id"])) == MICRO_TEST_CLIPS
  assert list(rows["id"]) == sorted(rows["id"])
  for key in ("video", "audio"):
    assert rows[key].dtype == np.float32 and rows[key].shape == (MICRO_TEST_CLIPS, 32)
    np.testing.assert_allclose(np.linalg.norm(rows[key], axis=1), 1, atol=1e-5)
  expected = direct.split(LATEST_STEP)
  assert set(rows["id"]) == set(expected)
  assert_matches_direct(rows, expected)
  for clip_id, source, start in zip(rows["id"], rows["source"], rows["start"]):
    assert clip_id == f"{source}@{start:.3f}"
  manifest = json.loads((workdir / "embeddings" / "test" / "manifest.json").read_text())
  assert manifest["step"] == LATEST_STEP
  assert manifest["count"] == MICRO_TEST_CLIPS and manifest["embed_dim"] == 32
  assert manifest["parts"] == {"part-00000-of-00001.npz": MICRO_TEST_CLIPS}
  part = workdir / "embeddings" / "test" / "part-00000-of-00001.npz"
  assert manifest["part_sha256"] == {part.name: hashlib.sha256(part.read_bytes()).hexdigest()}
  assert len(manifest["config_sha256"]) == 64


def test_export_from_a_given_checkpoint_step(workdir, run, micro_data_dir, direct):
  config = micro_config(micro_data_dir, **{"export.step": 5, "export.name": "test_step5"})
  export.export_embeddings(config, str(workdir), run=run)
  rows = export.load_embeddings(workdir / "embeddings", "test_step5")
  assert_matches_direct(rows, direct.split(5))
  manifest = json.loads((workdir / "embeddings" / "test_step5" / "manifest.json").read_text())
  assert manifest["step"] == 5


def test_an_interrupted_export_is_not_loaded(clip_export, workdir, tmp_path):
  del clip_export  # written
  complete = tmp_path / "embeddings" / "test"
  shutil.copytree(workdir / "embeddings" / "test", complete)
  # A stray temporary part beside a complete export is ignored.
  (complete / f"part-00001-of-00002.npz{files.TEMPORARY_SUFFIX}").write_bytes(b"half a part")
  assert len(export.load_embeddings(tmp_path, "test")["id"]) == MICRO_TEST_CLIPS
  # Killed before the rename: the part under its temporary name, no manifest yet.
  (complete / "manifest.json").unlink()
  (complete / "part-00000-of-00001.npz").rename(
    complete / f"part-00000-of-00001.npz{files.TEMPORARY_SUFFIX}"
  )
  with pytest.raises(FileNotFoundError, match="interrupted export"):
    export.load_embeddings(tmp_path, "test")
  with pytest.raises(FileNotFoundError, match="No complete export 'validation'"):
    export.load_embeddings(tmp_path, "validation")


def test_raw_video_files_give_the_prepared_export(
  clip_export, workdir, run, micro_data_dir, test_videos
):
  config = micro_config(
    micro_data_dir, **{"export.video_dir": str(test_videos), "export.name": "raw_test"}
  )
  export.export_embeddings(config, str(workdir), run=run)
  rows = export.load_embeddings(workdir, "raw_test")
  assert "label" not in rows
  np.testing.assert_array_equal(rows["id"], clip_export["id"])
  np.testing.assert_array_equal(rows["start"], clip_export["start"])
  for key in ("video", "audio"):
    np.testing.assert_allclose(rows[key], clip_export[key], atol=1e-5)

  # The Python API, on two files given by path.
  first, second = sorted(test_videos.glob("test/*/*.mp4"))[:2]
  embedded = export.embed_videos([first, second], workdir)
  assert list(embedded["source"]) == [str(first)] * 2 + [str(second)] * 2
  relative = [
    f"{path.relative_to(test_videos)}@{start:.3f}"
    for path, start in zip([first, first, second, second], embedded["start"])
  ]
  index = {clip_id: i for i, clip_id in enumerate(clip_export["id"])}
  rows_of = [index[clip_id] for clip_id in relative]
  np.testing.assert_allclose(embedded["video"], clip_export["video"][rows_of], atol=1e-5)
  np.testing.assert_allclose(embedded["audio"], clip_export["audio"][rows_of], atol=1e-5)


def test_whole_video_export_rebuilds_each_video_from_its_clips(
  workdir, run, micro_data_dir, test_videos
):
  config = micro_config(micro_data_dir, **{"export.whole_video": True})
  export.export_embeddings(config, str(workdir), run=run)
  rows = export.load_embeddings(workdir, "test_whole_video")
  assert len(rows["id"]) == MICRO_TEST_FILES
  # 4-second files at 4 input frames per second.
  np.testing.assert_array_equal(rows["num_frames"], 16)
  np.testing.assert_array_equal(rows["id"], rows["source"])
  config = micro_config(micro_data_dir, **{"export.whole_video": True})
  paths = [test_videos / source for source in rows["source"]]
  from_files = export.embed_videos(paths, workdir, config=config)
  np.testing.assert_array_equal(from_files["num_frames"], 16)
  for key in ("video", "audio"):
    np.testing.assert_allclose(from_files[key], rows[key], atol=1e-5)


def test_whole_video_mode_embeds_a_minute_in_one_pass(tmp_path, workdir, micro_data_dir, direct):
  fps, sample_rate, seconds = 8, 16000, 60
  rng = np.random.default_rng(0)
  frames = rng.integers(0, 255, size=(fps * seconds, 32, 32, 3), dtype=np.uint8)
  audio = 0.3 * np.sin(2 * np.pi * 440 * np.arange(seconds * sample_rate) / sample_rate)
  path = tmp_path / "minute.mp4"
  synthetic.write_mp4(path, frames, fps, audio.astype(np.float32), sample_rate)

  # 240 frames in chunks of 64 (the last one padded), the temporal encoder over all of them
  # padded to its bucket, the audio tower over all 60 s padded to its own.
  config = micro_config(micro_data_dir, **{"export.whole_video": True, "export.frame_chunk": 64})
  rows = export.embed_videos([path], workdir, config=config)
  frames_at_input_rate = seconds * 4  # the micro input samples 4 frames per second
  np.testing.assert_array_equal(rows["num_frames"], [frames_at_input_rate])
  assert list(rows["id"]) == [str(path)]

  # A direct forward pass over all 240 frames (no padding, no mask) gives the same numbers.
  [element] = pipeline.file_elements(
    path, direct.preprocessor, direct.dataset.storage, whole_video=True
  )
  assert element["video"].shape[0] == frames_at_input_rate
  video, audio = direct(LATEST_STEP, element["video"][None], element["audio"][None])
  np.testing.assert_allclose(rows["video"], video, atol=1e-5)
  np.testing.assert_allclose(rows["audio"], audio, atol=1e-5)

  config = micro_config(
    micro_data_dir, **{"export.whole_video": True, "export.memory_limit_gib": 0.01}
  )
  with pytest.raises(whole_video.TooLongError, match=r"60 s .* more than the 0.01 GiB"):
    export.embed_videos([path], workdir, config=config)


def test_moments_are_the_clip_windows_and_cover_each_video(
  clip_export, workdir, run, micro_data_dir
):
  # The micro model sees 1-s windows (4 frames at 4 fps), centred in its 2-s clips: the eval
  # view of the clip at 0 s is the window at 0.5 s. Moments every 0.5 s.
  config = micro_config(
    micro_data_dir, **{"export.whole_video": True, "export.moment_seconds": 0.5}
  )
  config.export.name = "moments"
  export.export_embeddings(config, str(workdir), run=run)
  rows = export.load_embeddings(workdir, "moments")
  manifest = json.loads((workdir / "embeddings" / "moments" / "manifest.json").read_text())
  assert manifest["moments"] == {"count": 8 * 8, "moment_seconds": 0.5, "window_seconds": 1.0}
  for row, source in enumerate(rows["source"]):
    of_row = rows["moment_row"] == row
    # 4-s files: a moment every 0.5 s from 0 while one lies inside the video.
    np.testing.assert_allclose(rows["moment_time"][of_row], np.arange(8) * 0.5)
    for clip_start, moment_time in ((0.0, 0.5), (2.0, 2.5)):
      clip = list(clip_export["id"]).index(f"{source}@{clip_start:.3f}")
      moment = np.flatnonzero(of_row & (rows["moment_time"] == moment_time))[0]
      for key in ("video", "audio"):
        np.testing.assert_allclose(
          rows[f"moment_{key}"][moment], clip_export[key][clip], atol=1e-5, err_msg=source
        )
  for key in ("moment_video", "moment_audio"):
    np.testing.assert_allclose(np.linalg.norm(rows[key], axis=1), 1, atol=1e-5)


@pytest.mark.parametrize("setting", ["split", "step", "whole_video", "video_dir"])
def test_each_export_setting_twice_replaces_its_folder_with_equal_files(
  setting, workdir, run, micro_data_dir, test_videos
):
  overrides = {
    "split": {},
    "step": {"export.step": 5},
    "whole_video": {"export.whole_video": True},
    "video_dir": {"export.video_dir": str(test_videos)},
  }[setting]
  config = micro_config(micro_data_dir, **overrides, **{"export.name": f"twice_{setting}"})
  folder = export.export_embeddings(config, str(workdir), run=run)
  first = export.load_embeddings(workdir, f"twice_{setting}")
  assert export.export_embeddings(config, str(workdir), run=run) == folder
  second = export.load_embeddings(workdir, f"twice_{setting}")
  assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "part-00000-of-00001.npz"]
  assert sorted(first) == sorted(second)
  for key in first:
    np.testing.assert_array_equal(second[key], first[key], err_msg=key)


@pytest.mark.parametrize(
  "setting, value, says",
  [
    ("moment_seconds", -1.0, "export.moment_seconds=-1.0 must be"),
    ("moment_seconds", float("nan"), "export.moment_seconds=nan must be"),
    ("frame_chunk", 0, "export.frame_chunk=0 must be"),
    ("memory_limit_gib", 0.0, "export.memory_limit_gib=0.0 must be"),
    ("batch_size", 0, "export.batch_size=0 must be"),
  ],
)
def test_bad_settings_are_refused_before_the_previous_export_is_touched(
  clip_export, workdir, run, micro_data_dir, setting, value, says
):
  del clip_export  # the finished export that a refused rerun must leave as it is
  folder = workdir / "embeddings" / "test"
  before = helpers.file_digests(folder)
  config = micro_config(
    micro_data_dir,
    **{"export.whole_video": True, "export.name": "test", f"export.{setting}": value},
  )
  with pytest.raises(ValueError, match=re.escape(says)):
    export.export_embeddings(config, str(workdir), run=run)
  assert helpers.file_digests(folder) == before
