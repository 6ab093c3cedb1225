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
  sample_rate=16000, n_fft=1024, hop_length=500, n_mels=32, fmin=60.0, fmax=7800.0
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
  pictures=None,
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
    pictures: `[num_frames, height, width, 3]` uint8 frames to write instead of the
      `index_frame`s.
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
      picture = index_frame(i, *size) if pictures is None else pictures[i]
      frame = av.VideoFrame.from_ndarray(picture, format="rgb24")
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


# Colours of `colour_video`'s classes.
COLOURS = {
  "red": (220, 40, 40),
  "green": (40, 200, 60),
  "blue": (40, 60, 220),
  "yellow": (230, 220, 40),
}


def colour_video(path, colour: str, rng: np.random.Generator, seconds: float = 2.0) -> None:
  """A video whose class is its colour: a square of `COLOURS[colour]` moving over a noisy
  background of random brightness (per file), with a tone of random pitch (per file)."""
  fps, size = 10, (32, 32)
  count = round(seconds * fps)
  background = rng.uniform(40, 160)
  pictures = np.clip(rng.normal(background, 20, (count, *size, 3)), 0, 255).astype(np.uint8)
  top, left = rng.integers(0, 16, 2)
  for i in range(count):
    row, column = (top + i) % 20, (left + 2 * i) % 20
    pictures[i, row : row + 12, column : column + 12] = COLOURS[colour]
  sound = tone(seconds, 16000, frequency=float(rng.uniform(200, 2000)))
  write_video(path, num_frames=count, fps=fps, size=size, pictures=pictures, audio=sound)


def _colour_files(videos, files: dict[str, tuple[int, float]], seed: int):
  """Writes, for each split, (files per colour, seconds) `colour_video`s named
  `{youtube_id}_{start:06d}.mp4` under `videos`; yields (split, colour, youtube_id, start)."""
  rng = np.random.default_rng(seed)
  for split, (count, seconds) in files.items():
    for colour in COLOURS:
      for index in range(count):
        youtube_id, start = f"{colour}-{split}-{index:03d}", int(rng.integers(0, 300))
        colour_video(videos / f"{youtube_id}_{start:06d}.mp4", colour, rng, seconds)
        yield split, colour, youtube_id, start


def colour_list(videos, list_path, files: dict[str, tuple[int, float]], seed: int = 0) -> None:
  """A VGGSound-style download of `colour_video`s (see `_colour_files`) and its list
  (`youtube_id, start, label, split`, no header) at `list_path`."""
  rows = [
    f"{youtube_id},{start},{colour},{split}\n"
    for split, colour, youtube_id, start in _colour_files(videos, files, seed)
  ]
  pathlib.Path(list_path).write_text("".join(rows))


# A second label per colour for multi-label lists: every clip is one colour and one of these.
COLOUR_TEMPERATURE = {"red": "warm", "yellow": "warm", "green": "cool", "blue": "cool"}


def colour_audioset_lists(
  videos, list_dir, files: dict[str, tuple[int, float]], seed: int = 0
) -> list[str]:
  """An AudioSet-style download of `colour_video`s (see `_colour_files`): one list per split
  (`YTID, start_seconds, end_seconds, "label,label"` after `#` comment lines), each clip
  labelled with its colour and its `COLOUR_TEMPERATURE`. Returns the `SPLIT=FILE` arguments."""
  lines = {split: ["# YTID, start_seconds, end_seconds, positive_labels"] for split in files}
  for split, colour, youtube_id, start in _colour_files(videos, files, seed):
    seconds = files[split][1]
    labels = f"{colour},{COLOUR_TEMPERATURE[colour]}"
    lines[split].append(f'{youtube_id}, {start:.3f}, {start + seconds:.3f}, "{labels}"')
  arguments = []
  for split, split_lines in lines.items():
    path = pathlib.Path(list_dir) / f"{split}_segments.csv"
    path.write_text("\n".join(split_lines) + "\n")
    arguments.append(f"{split}={path}")
  return arguments


def listed_file(path, kind: str) -> None:
  """A file as an annotation list's row may find it: 'good' (one 2-s clip), 'audioless',
  'short' (1 s), 'corrupt' (random bytes) or 'missing' (nothing written)."""
  if kind == "good":
    write_video(path, num_frames=25, fps=10, audio=tone(2.5, 16000))
  elif kind == "audioless":
    write_video(path, num_frames=25, fps=10)
  elif kind == "short":
    write_video(path, num_frames=10, fps=10, audio=tone(1.0, 16000))
  elif kind == "corrupt":
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(path).write_bytes(np.random.default_rng(0).bytes(4000))


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
