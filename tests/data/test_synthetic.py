"""The generated dataset: layout, determinism, and both modalities following the events."""

import hashlib
import json

import numpy as np
import pytest

from cmvt_jax.data import synthetic
from cmvt_jax.data import video_io
from tests.data import media


def test_layout_labels_and_manifest(tiny_video_dir):
  manifest = json.loads((tiny_video_dir / "manifest.json").read_text())
  paths = sorted(str(p.relative_to(tiny_video_dir)) for p in tiny_video_dir.rglob("*.mp4"))
  assert paths == sorted(entry["path"] for entry in manifest["files"])
  assert len(paths) == 6
  for entry in manifest["files"]:
    split, label, _ = entry["path"].split("/")
    assert split == entry["split"] and label == entry["label"]
    segments = {}
    for event in entry["events"]:
      segments.setdefault(int(event["onset"] // 2.0), []).append(event)
    assert sorted(segments) == [0, 1]
    for events in segments.values():  # 4 events in distinct slots of each segment
      assert len({event["onset"] for event in events}) == synthetic.EVENTS_PER_SEGMENT


def test_same_seed_same_files(tiny_video_dir, tmp_path):
  spec = synthetic.SyntheticSpec(
    seed=media.TINY_SPEC.seed, train_files=2, validation_files=0, test_files=0, segments_per_file=2
  )
  synthetic.generate(tmp_path, spec, num_workers=1, progress=False)
  for name in ("train/red_disc/train_00000.mp4", "train/green_square/train_00001.mp4"):
    assert (
      hashlib.sha256((tmp_path / name).read_bytes()).digest()
      == hashlib.sha256((tiny_video_dir / name).read_bytes()).digest()
    )


def test_video_and_audio_follow_the_latent_events(tiny_video_dir):
  manifest = json.loads((tiny_video_dir / "manifest.json").read_text())
  entry = manifest["files"][0]
  kind = next(k for k in synthetic.CLASSES if k.name == entry["label"])
  video = video_io.decode_video(
    tiny_video_dir / entry["path"], fps=12, short_side=48, sample_rate=22050
  )
  colour = np.asarray(kind.colour) * 255
  onsets = {event["onset"] for event in entry["events"]}
  for event in entry["events"]:
    middle = event["onset"] + event["duration"] / 2
    # Video: the class colour appears, in the row band of the event's pitch (higher = up).
    frame = video.frames[int(middle * 12)].astype(float)
    object_pixels = np.linalg.norm(frame - colour, axis=-1) < 60
    assert object_pixels.sum() >= 10
    row = np.nonzero(object_pixels)[0].mean()
    expected_row = 48 * (4 - event["pitch"]) / 5
    assert abs(row - expected_row) < 4
    # Audio: the note's fundamental dominates the slot's spectrum.
    start = int((event["onset"] + 0.02) * 22050)
    segment = video.audio[start : start + int(0.2 * 22050)]
    spectrum = np.abs(np.fft.rfft(segment * np.hanning(len(segment))))
    frequencies = np.fft.rfftfreq(len(segment), 1 / 22050)
    peak = frequencies[np.argmax(spectrum * (frequencies > 150))]
    pitch = synthetic.PITCHES_HZ[event["pitch"]]
    if kind.name == "orange_bar":  # its second partial is the loudest
      pitch *= 2
    assert abs(peak - pitch) < 15
  # Slots without an event: no object, only background hiss.
  for slot in range(16):
    onset = slot * 0.25
    if onset in onsets:
      continue
    frame = video.frames[int((onset + 0.125) * 12)].astype(float)
    assert (np.linalg.norm(frame - colour, axis=-1) < 60).sum() == 0
    quiet = video.audio[int((onset + 0.02) * 22050) : int((onset + 0.23) * 22050)]
    assert np.sqrt(np.mean(quiet**2)) < 0.02


def test_spec_checks():
  with pytest.raises(ValueError, match="whole number of frames per slot"):
    synthetic.SyntheticSpec(fps=10)
  with pytest.raises(ValueError, match="frame_size"):
    synthetic.SyntheticSpec(frame_size=33)
