"""`prepare` over a folder of good and bad videos writes every good clip, skips and names
every bad file, and its counts add up (good + skipped = found)."""

import subprocess
import sys

import pytest

from cmvt_jax.data import datasets
from tests import helpers
from tests.data import media

# Trains or spawns processes: the README's test command runs it, -m "not slow" skips it.
pytestmark = pytest.mark.slow


def test_prepare_skips_and_counts_every_bad_file(tmp_path):
  videos = tmp_path / "videos"
  layout = media.bad_data_folder(videos)  # {relative path: clips expected (0 = skipped)}
  # Two 8200×8200 frames, over the 8192² pixel limit (encodes in about 2 s).
  media.write_video(
    videos / "train" / "dogs" / "huge.mp4",
    num_frames=2,
    fps=1,
    size=(8200, 8200),
    audio=media.tone(2.0, 16000),
    sample_rate=16000,
  )
  layout["train/dogs/huge.mp4"] = 0
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "cmvt_jax.prepare",
      f"--video_dir={videos}",
      f"--data_dir={tmp_path / 'data'}",
      "--name=mixed",
      "--num_workers=1",
    ],
    cwd=helpers.REPO,
    env=helpers.environment(),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  report = result.stdout + result.stderr

  found, good = len(layout), sum(1 for clips in layout.values() if clips)
  assert f"Video files found: {found} = {good} used + {found - good} skipped" in report
  for reason, count in (
    ("unreadable", 1),
    ("empty", 1),
    ("no video stream", 1),
    ("no audio stream", 1),
    ("shorter than one clip", 1),
    ("frame too large", 1),
    ("not inside a class folder", 1),
  ):
    assert f"skipped, {reason}: {count}" in report, reason
  assert "train/dogs/huge.mp4: frame too large: 8200x8200 frames exceed" in report
  assert "truncated, kept the clips of their decodable part: 1" in report

  dataset = datasets.open_prepared(tmp_path / "data" / "mixed" / "1.0.0")
  written = []
  for split in dataset.num_examples:
    source = dataset.source(split)
    written += [source[i]["source"].decode() for i in range(len(source))]
  # The non-UTF-8 name is kept, its undecodable byte written as \xe9.
  expected = {path.replace("\udce9", "\\xe9"): clips for path, clips in layout.items()}
  assert sorted(written) == sorted(path for path, clips in expected.items() for _ in range(clips))
