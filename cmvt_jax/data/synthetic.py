"""The generated audio-visual dataset: real H.264 + AAC .mp4 files driven by latent events.

Layout: `OUT/{train,validation,test}/CLASS/SPLIT_INDEX.mp4` and `OUT/manifest.json` (the
settings and every file's latent events; written last, so its presence means complete).
`python -m cmvt_jax.data.synthetic --output_dir DIR` writes it; `prepare` turns it into the
default dataset like any folder of videos.

Design. A file is `segments_per_file` independent segments of `segment_seconds` (2 s by
default, one clip each under the default `clip_seconds == stride_seconds == 2`). A segment is
a grid of 8 slots (0.25 s each) holding exactly 4 events in 4 random distinct slots. An event
is one object appearing for one slot while it sounds one note:

  * class (the file's label, 8 kinds) = the object's colour and shape <-> the note's timbre
    (harmonic recipe and decay); both modalities reveal it on every event;
  * pitch (4 levels, iid per event) = the object's height in the frame <-> the note's
    fundamental (262, 392, 587, 880 Hz, a fifth apart: each sits in its own mel bins);
  * slot = when the object is on screen <-> when the note sounds (same onset and offset);
  * nuisance, drawn independently per modality so that it links nothing across them: the
    object's horizontal start and drift (it moves while on screen), background brightness
    and pixel noise per file; note loudness per event and background hiss per file.

Why this satisfies the three requirements:
  (a) a clip's audio matches its own video and no other: 4 events x (8 choose 4 slot sets x
      4^4 pitch sequences) give 17,920 patterns per class, so among the 256 test clips
      (32 per class) a pattern practically never repeats; matching needs the pitches (content)
      and the slots (timing) of both streams;
  (b) neither modality alone tells which other clip it came from: segments are drawn
      independently, a file shares only its class between its clips, and the per-file
      nuisance (background, hiss) is independent between the modalities, so it identifies a
      file within one modality but never links a video to an audio;
  (c) order matters: pitches are iid, so a video model that mean-pools per-frame features
      only knows how many frames show each pitch. An oracle that matches those histograms
      (and the class) reaches R@1 ~ 0.58 over the 256 test clips, an oracle that knows the
      order ~ 1.0 (counted by simulation with this sampler). Measured on the default split
      with a tiny model (3 strided convolutions per frame, 2-layer 64-wide transformer per
      modality, batch 64, AdamW 2e-3, temperature 0.1, no augmentation, 2-core CPU): a->v
      R@1 0.80 after 1000 steps and 0.88 after 1500; with mean-pooled frame features in
      place of the video transformer it learns the histograms quickly (0.43 after 200 steps)
      and stays at 0.60.

Sizes: files are rendered at 48x48 and 12 fps (3 frames a slot; the default storage of 8 fps
and 32 px resamples them), audio at 22,050 Hz mono (prepare resamples it to 16 kHz). The
default 512 / 32 / 64 files of 8 s give 2048 / 128 / 256 clips.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import os
from collections.abc import Sequence
from typing import Any

import av
import numpy as np
from absl import app
from absl import flags
from etils import epath

from cmvt_jax import console
from cmvt_jax import files

SPLITS = ("train", "validation", "test")
SLOTS_PER_SEGMENT = 8
EVENTS_PER_SEGMENT = 4
PITCHES_HZ = (262.0, 392.0, 587.0, 880.0)


@dataclasses.dataclass(frozen=True)
class ObjectKind:
  """One class: how its object looks and how its note sounds.

  Attributes:
    name: the class (folder) name.
    shape: a key of `_SHAPES`.
    colour: RGB in [0, 1].
    partials: (frequency ratio, amplitude) pairs of the note's spectrum.
    decay_s: time constant of the note's exponential decay.
    vibrato: relative depth of a 7 Hz frequency vibrato (0 = none).
  """

  name: str
  shape: str
  colour: tuple[float, float, float]
  partials: tuple[tuple[float, float], ...]
  decay_s: float
  vibrato: float = 0.0


CLASSES = (
  ObjectKind("red_disc", "disc", (1.0, 0.15, 0.15), ((1, 1.0),), 0.5),
  ObjectKind(
    "green_square", "square", (0.15, 1.0, 0.15), tuple((n, 1.0 / n) for n in (1, 3, 5, 7, 9)), 0.5
  ),
  ObjectKind(
    "blue_triangle", "triangle", (0.25, 0.35, 1.0), tuple((n, 1.0 / n) for n in range(1, 8)), 0.4
  ),
  ObjectKind("yellow_plus", "plus", (1.0, 1.0, 0.1), ((1, 1.0), (2, 0.8), (3, 0.6), (5, 0.3)), 1.0),
  ObjectKind(
    "magenta_diamond",
    "diamond",
    (1.0, 0.2, 1.0),
    ((1, 1.0), (2.76, 0.6), (5.4, 0.4), (8.93, 0.25)),
    0.3,
  ),
  ObjectKind(
    "cyan_ring", "ring", (0.1, 1.0, 1.0), tuple((n, 1.0 / n**2) for n in range(1, 6)), 0.08
  ),
  ObjectKind("orange_bar", "bar", (1.0, 0.55, 0.05), ((1, 0.3), (2, 1.0), (3, 1.0), (4, 0.8)), 0.6),
  ObjectKind("white_cross", "cross", (1.0, 1.0, 1.0), ((1, 1.0), (2, 0.3)), 0.5, vibrato=0.03),
)


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
  """What to generate. Equal specs give byte-identical files."""

  seed: int = 0
  train_files: int = 512
  validation_files: int = 32
  test_files: int = 64
  segments_per_file: int = 4
  segment_seconds: float = 2.0
  fps: int = 12
  frame_size: int = 48
  sample_rate: int = 22050

  def __post_init__(self):
    if min(self.train_files, self.validation_files, self.test_files) < 0:
      raise ValueError(f"File counts must be >= 0: {self}.")
    if self.segments_per_file < 1 or self.segment_seconds <= 0:
      raise ValueError(f"segments_per_file and segment_seconds must be positive: {self}.")
    frames_per_slot = self.fps * self.segment_seconds / SLOTS_PER_SEGMENT
    if abs(frames_per_slot - round(frames_per_slot)) > 1e-9 or frames_per_slot < 1:
      raise ValueError(
        f"fps * segment_seconds / {SLOTS_PER_SEGMENT} must be a whole number of frames per "
        f"slot, got fps={self.fps}, segment_seconds={self.segment_seconds}."
      )
    if self.frame_size < 32 or self.frame_size % 2:
      raise ValueError(f"frame_size must be even and >= 32 (H.264), got {self.frame_size}.")

  @classmethod
  def from_config(cls, synthetic_config) -> SyntheticSpec:
    """From the config's `dataset.synthetic` section."""
    return cls(**{field.name: synthetic_config[field.name] for field in dataclasses.fields(cls)})

  def num_files(self, split: str) -> int:
    return {
      "train": self.train_files,
      "validation": self.validation_files,
      "test": self.test_files,
    }[split]


@dataclasses.dataclass(frozen=True)
class Event:
  """One object-and-note event; times in seconds from the start of the file."""

  onset: float
  duration: float
  pitch: int
  x_start: float  # object centre, fraction of the frame width
  x_velocity: float  # frame widths per second (bounces off the sides)
  loudness: float  # note amplitude


def file_path(split: str, index: int) -> str:
  """The file's path relative to the output folder."""
  label = CLASSES[index % len(CLASSES)].name
  return f"{split}/{label}/{split}_{index:05d}.mp4"


def sample_events(spec: SyntheticSpec, rng: np.random.Generator) -> list[Event]:
  """The latent events of one file (see the module docstring)."""
  slot_seconds = spec.segment_seconds / SLOTS_PER_SEGMENT
  events = []
  for segment in range(spec.segments_per_file):
    slots = np.sort(rng.choice(SLOTS_PER_SEGMENT, EVENTS_PER_SEGMENT, replace=False))
    for slot in slots:
      events.append(
        Event(
          onset=(segment * SLOTS_PER_SEGMENT + int(slot)) * slot_seconds,
          duration=slot_seconds,
          pitch=int(rng.integers(len(PITCHES_HZ))),
          x_start=float(rng.uniform(0.2, 0.8)),
          x_velocity=float(rng.uniform(0.3, 0.8) * rng.choice([-1, 1])),
          loudness=float(rng.uniform(0.25, 0.45)),
        )
      )
  return events


def _shape_mask(shape: str, size: int) -> np.ndarray:
  """`[size, size]` bool mask of a centred shape."""
  coords = (np.arange(size) - (size - 1) / 2) / (size / 2)  # in [-1, 1]
  y, x = np.meshgrid(coords, coords, indexing="ij")
  radius = np.hypot(x, y)
  return {
    "disc": radius <= 1.0,
    "square": np.maximum(abs(x), abs(y)) <= 0.8,
    "triangle": (y <= 0.8) & (abs(x) <= (y + 1.0) / 2),
    "plus": (abs(x) <= 0.3) | (abs(y) <= 0.3),
    "diamond": abs(x) + abs(y) <= 1.0,
    "ring": (radius <= 1.0) & (radius >= 0.55),
    "bar": (abs(y) <= 0.4) & (abs(x) <= 1.0),
    "cross": (abs(x - y) <= 0.35) | (abs(x + y) <= 0.35),
  }[shape]


def render_video(
  spec: SyntheticSpec, kind: ObjectKind, events: Sequence[Event], rng: np.random.Generator
) -> np.ndarray:
  """`[segments * segment_seconds * fps, size, size, 3]` uint8 frames of one file."""
  size = spec.frame_size
  num_frames = round(spec.segments_per_file * spec.segment_seconds * spec.fps)
  background = rng.uniform(0.03, 0.2)
  frames = background + rng.normal(0.0, 0.012, (num_frames, size, size, 3))
  object_size = (size * 2 // 9) | 1  # odd, so that the shape has a centre pixel
  mask = _shape_mask(kind.shape, object_size)
  half = object_size // 2
  travel = size - object_size  # range of the object's left edge
  for event in events:
    first = round(event.onset * spec.fps)
    last = round((event.onset + event.duration) * spec.fps)
    # Pitch 0 sits lowest; the rows of the 4 levels are evenly spaced within the frame.
    row = round(size * (len(PITCHES_HZ) - event.pitch) / (len(PITCHES_HZ) + 1)) - half
    for frame in range(first, min(last, num_frames)):
      seconds = (frame - first) / spec.fps
      position = (event.x_start + event.x_velocity * seconds) % 2.0  # bounce: reflect in [0, 1]
      position = 2.0 - position if position > 1.0 else position
      column = round(position * travel)
      patch = frames[frame, row : row + object_size, column : column + object_size]
      patch[mask] = kind.colour
  return np.clip(frames * 255.0 + 0.5, 0, 255).astype(np.uint8)


def render_audio(
  spec: SyntheticSpec, kind: ObjectKind, events: Sequence[Event], rng: np.random.Generator
) -> np.ndarray:
  """`[segments * segment_seconds * sample_rate]` float32 mono in [-1, 1] of one file."""
  rate = spec.sample_rate
  num_samples = round(spec.segments_per_file * spec.segment_seconds * rate)
  audio = rng.normal(0.0, rng.uniform(0.002, 0.01), num_samples)
  for event in events:
    first = round(event.onset * rate)
    length = min(round(event.duration * rate), num_samples - first)
    t = np.arange(length) / rate
    fundamental = PITCHES_HZ[event.pitch]
    phase = (
      2 * np.pi * fundamental * (t - kind.vibrato * np.cos(2 * np.pi * 7.0 * t) / (2 * np.pi * 7.0))
    )
    note = np.zeros(length)
    for ratio, amplitude in kind.partials:
      if ratio * fundamental < 0.45 * rate:  # no aliased partials
        note += amplitude * np.sin(ratio * phase)
    # 8 ms attack, decay, 15 ms release so that the note ends when the object vanishes.
    envelope = (
      np.minimum(t / 0.008, 1.0)
      * np.exp(-t / kind.decay_s)
      * np.minimum((event.duration - t) / 0.015, 1.0)
    )
    audio[first : first + length] += event.loudness * note * envelope / np.abs(note).max()
  return np.clip(audio, -1.0, 1.0).astype(np.float32)


def write_mp4(
  path: epath.PathLike, frames: np.ndarray, fps: int, audio: np.ndarray, sample_rate: int
) -> None:
  """Writes `[N, H, W, 3]` uint8 frames (H.264) and `[S]` float mono audio (AAC) as .mp4."""
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  # The mp4 muxer seeks back to finish the file, so it writes to a local path, not a stream.
  with (
    files.replacing(path, kind="synthetic-video", durable=False) as temporary,
    av.open(os.fspath(temporary), "w", "mp4") as container,
  ):
    video = container.add_stream("libx264", rate=fps)
    video.height, video.width = frames.shape[1:3]
    video.pix_fmt = "yuv420p"
    # One thread per encoder: files are encoded in parallel processes already.
    video.options = {"preset": "ultrafast", "crf": "16", "threads": "1"}
    sound = container.add_stream("aac", rate=sample_rate, layout="mono")
    sound.options = {"aac_coder": "fast"}
    for frame in frames:
      container.mux(video.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
    container.mux(video.encode())
    chunk = 1024  # AAC's frame size
    for start in range(0, len(audio), chunk):
      samples = np.ascontiguousarray(audio[None, start : start + chunk], np.float32)
      frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
      frame.sample_rate = sample_rate
      frame.pts = start
      container.mux(sound.encode(frame))
    container.mux(sound.encode(None))


def _make_file(task: tuple[SyntheticSpec, str, str, int]) -> dict[str, Any]:
  """Renders and writes one file; returns its manifest entry."""
  spec, output_dir, split, index = task
  rng = np.random.default_rng([spec.seed, SPLITS.index(split), index])
  kind = CLASSES[index % len(CLASSES)]
  events = sample_events(spec, rng)
  frames = render_video(spec, kind, events, rng)
  audio = render_audio(spec, kind, events, rng)
  relative_path = file_path(split, index)
  write_mp4(epath.Path(output_dir) / relative_path, frames, spec.fps, audio, spec.sample_rate)
  return {
    "path": relative_path,
    "split": split,
    "label": kind.name,
    "events": [dataclasses.asdict(event) for event in events],
  }


def generate(
  output_dir: epath.PathLike, spec: SyntheticSpec, *, num_workers: int = 0, progress: bool = True
) -> dict[str, Any]:
  """Writes the dataset's files and `manifest.json` into `output_dir` (a local folder).

  Args:
    output_dir: where to write; existing files of the same names are overwritten.
    spec: what to write.
    num_workers: processes encoding files in parallel (0: one per CPU core; 1: this process).
    progress: show the stage's progress line (`console.Stage`).

  Returns:
    The manifest: `spec` and, per file, `path`, `split`, `label` and `events`.
  """
  output_dir = epath.Path(output_dir)
  tasks = [
    (spec, os.fspath(output_dir), split, index)
    for split in SPLITS
    for index in range(spec.num_files(split))
  ]
  num_workers = num_workers or os.cpu_count() or 1
  with contextlib.ExitStack() as stack:
    stage = stack.enter_context(console.Stage("generate", len(tasks), "videos", enabled=progress))
    if num_workers == 1:
      made = map(_make_file, tasks)
    else:
      # spawn, not fork: the caller (the trainer) may already run JAX's threads.
      pool = stack.enter_context(multiprocessing.get_context("spawn").Pool(num_workers))
      made = pool.imap(_make_file, tasks, chunksize=4)
    entries = []
    for entry in made:
      entries.append(entry)
      stage.advance()
  manifest = {
    "spec": dataclasses.asdict(spec),
    "classes": [kind.name for kind in CLASSES],
    "files": entries,
  }
  files.write_json(output_dir / "manifest.json", manifest, kind="synthetic-manifest", indent=None)
  return manifest


def main(argv: Sequence[str]) -> None:
  del argv  # unused
  spec = SyntheticSpec(
    seed=flags.FLAGS.seed,
    train_files=flags.FLAGS.train_files,
    validation_files=flags.FLAGS.validation_files,
    test_files=flags.FLAGS.test_files,
    segments_per_file=flags.FLAGS.segments_per_file,
  )
  manifest = generate(flags.FLAGS.output_dir, spec, num_workers=flags.FLAGS.num_workers)
  print(f"Wrote {len(manifest['files'])} files to {flags.FLAGS.output_dir}.")


if __name__ == "__main__":
  # Flags are defined only when this module is the program, so that importing it next to
  # other command-line modules (prepare, main) defines no clashing flags.
  flags.DEFINE_string("output_dir", None, "Folder to write the videos into.", required=True)
  flags.DEFINE_integer("seed", SyntheticSpec.seed, "Random seed.")
  flags.DEFINE_integer("train_files", SyntheticSpec.train_files, "Train files.")
  flags.DEFINE_integer("validation_files", SyntheticSpec.validation_files, "Validation files.")
  flags.DEFINE_integer("test_files", SyntheticSpec.test_files, "Test files.")
  flags.DEFINE_integer(
    "segments_per_file", SyntheticSpec.segments_per_file, "Independent segments (clips) per file."
  )
  flags.DEFINE_integer("num_workers", 0, "Processes (0: one per core).")
  app.run(main)
