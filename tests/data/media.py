"""Test media written with PyAV, independently of the code under test, and tiny settings."""

import fractions
import os
import pathlib

import av
import numpy as np

from cmvt_jax.data import spectrogram
from cmvt_jax.data import synthetic

# Log-mel settings of the tests (the default config's).
MEL = spectrogram.MelSettings(
  sample_rate=16000, n_fft=1024, hop_length=500, n_mels=64, fmin=60.0, fmax=7800.0
)
# Tiny generated set: 2 files per split of 2 two-second segments -> 4 clips per split.
TINY_SPEC = synthetic.SyntheticSpec(
  seed=3, train_files=2, validation_files=2, test_files=2, segments_per_file=2
)


def index_frame(index: int, height: int, width: int) -> np.ndarray:
  """A uniform grey frame whose level encodes `index` < 60 (steps of 4 survive lossy coding)."""
  return np.full((height, width, 3), 16 + 4 * index, np.uint8)


def frame_index(frame: np.ndarray) -> int:
  """Inverse of `index_frame` on a decoded (possibly resized) frame."""
  return int(round((float(frame[2:-2, 2:-2].mean()) - 16) / 4))


def write_video(
  path,
  *,
  num_frames=20,
  fps=10,
  size=(32, 48),
  codec="libx264",
  frame_times=None,
  audio=None,
  sample_rate=16000,
  audio_codec="aac",
  audio_layout="mono",
  container_options=None,
):
  """Writes a test video with PyAV, independently of the code under test.

  Args:
    path: output file; the container follows its suffix (.mp4, .mkv, .webm, .avi, .m4a).
    num_frames: frames; frame i is `index_frame(i)` (none when 0: an audio-only file).
    fps: nominal frame rate (the stream rate; frames are spaced 1 / fps apart unless
      `frame_times` says otherwise).
    size: (height, width).
    codec: video encoder.
    frame_times: per-frame presentation times in seconds (a variable frame rate file).
    audio: `[channels, samples]` float32 in [-1, 1], or None for a file without audio.
    sample_rate: audio rate.
    audio_codec: audio encoder.
    audio_layout: 'mono' or 'stereo' (must match audio's channels).
    container_options: muxer options, e.g. {'movflags': '+faststart'}.
  """
  pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
  with av.open(os.fspath(path), "w", options=container_options or {}) as container:
    if num_frames:
      video = container.add_stream(codec, rate=fps)
      video.height, video.width = size
      video.pix_fmt = "yuv420p"
      # Constant rate: frame i at pts i in units of 1 / fps. Variable rate: milliseconds.
      time_base = fractions.Fraction(1, 1000 if frame_times is not None else fps)
      video.time_base = time_base
      video.codec_context.time_base = time_base
    if audio is not None:
      sound = container.add_stream(audio_codec, rate=sample_rate, layout=audio_layout)
    for i in range(num_frames):
      frame = av.VideoFrame.from_ndarray(index_frame(i, *size), format="rgb24")
      frame.time_base = time_base
      frame.pts = round(frame_times[i] * 1000) if frame_times is not None else i
      container.mux(video.encode(frame))
    if num_frames:
      container.mux(video.encode())
    if audio is not None:
      chunk = sound.codec_context.frame_size or 1024
      for start in range(0, audio.shape[1], chunk):
        samples = np.ascontiguousarray(audio[:, start : start + chunk], np.float32)
        frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout=audio_layout)
        frame.sample_rate = sample_rate
        frame.pts = start
        container.mux(sound.encode(frame))
      container.mux(sound.encode(None))


def tone(seconds, sample_rate, frequency=440.0, channels=1, amplitude=0.5):
  """`[channels, seconds * sample_rate]` float32 sine."""
  t = np.arange(round(seconds * sample_rate)) / sample_rate
  return np.repeat((amplitude * np.sin(2 * np.pi * frequency * t))[None], channels, axis=0).astype(
    np.float32
  )


def bad_data_folder(root):
  """Good and bad files; returns {relative path: clips expected (0 = skipped)}."""
  stereo = tone(4.2, 44100, channels=2)
  good = dict(num_frames=42, fps=10, audio=stereo, sample_rate=44100, audio_layout="stereo")
  layout = {}

  def put(relative, clips, **kwargs):
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    write_video(path, **kwargs)
    layout[relative] = clips

  put("train/cats/good.mp4", 2, **good)  # 4.2 s -> clips at 0 and 2
  put(
    "train/dogs/good.webm",
    2,
    codec="libvpx-vp9",
    audio_codec="libopus",
    **{**good, "sample_rate": 48000, "audio": tone(4.2, 48000, channels=2)},
  )
  put("train/dogs/short.mp4", 0, **{**good, "num_frames": 15})  # 1.5 s < one clip
  put("train/dogs/silent.mp4", 0, num_frames=42, fps=10)  # no audio
  put(
    "train/cats/sound_only.mp4",
    0,
    num_frames=0,
    audio=stereo,
    sample_rate=44100,
    audio_layout="stereo",
  )
  put(
    "test/cats/cut.mp4",
    1,
    container_options={"movflags": "+faststart"},
    **{**good, "num_frames": 60, "audio": tone(6.0, 44100, channels=2)},
  )
  data = (root / "test/cats/cut.mp4").read_bytes()
  (root / "test/cats/cut.mp4").write_bytes(data[: len(data) // 2])
  put("test/dogs/ok.mkv", 2, **good)
  put("test/loose.mp4", 0, **good)  # not inside a class folder
  (root / "train/cats/empty.mp4").write_bytes(b"")
  layout["train/cats/empty.mp4"] = 0
  (root / "train/dogs/noise.avi").write_bytes(np.random.default_rng(0).bytes(5000))
  layout["train/dogs/noise.avi"] = 0
  (root / "train/dogs/notes.txt").write_text("not a video")
  # A file name that is not UTF-8: kept, its source escaped.
  put(os.fsdecode(b"train/cats/caf\xe9.mp4"), 2, **good)
  return layout
