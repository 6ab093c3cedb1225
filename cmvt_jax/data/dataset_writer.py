"""Videos -> TFDS ArrayRecord dataset of aligned clips (no TensorFlow needed).

`prepare(...)` runs in two phases:
  1. decode: every entry of the listing (a video file, or a row of an annotation list) is
     decoded in parallel processes (`video_io`), cut into clip windows and spilled to a local
     temporary folder; bad entries are skipped with their reason; the train split's
     normalisation statistics are accumulated;
  2. write: a TFDS `GeneratorBasedBuilder` reads the spilled clips and writes ArrayRecord
     shards. TFDS writes into an `incomplete.*` folder and renames it to
     `DATA_DIR/NAME/VERSION/` only when everything is written, so an interrupted run never
     leaves a dataset that reads as complete, and a finished dataset is never rebuilt.
Decoding first tells which splits have clips (TFDS refuses an empty split) and lets the
statistics be stored with the dataset, in its `metadata.json`.

What is prepared (a `Listing`): the files of a video folder (`scan_video_dir`):
`VIDEO_DIR/{train,validation,test}/CLASS/.../*.mp4` (labels from the class folders, splits
from the top-level folders), `VIDEO_DIR/CLASS/.../*.mp4` with a hash split, or any folder
without class folders (nested or flat; unlabelled); or the rows of an annotation list
(`annotations.read_lists`: a public dataset's CSV, each row a file or a segment of one, with
its labels and split).

Each example (features; format version `FORMAT_VERSION`, recorded in `metadata.json`):
  id         text: `SOURCE@START` with START in seconds, 3 decimals; unique and stable.
  source     text: the file's path relative to VIDEO_DIR.
  start      float32: the clip's start in seconds, on the file's timeline.
  label      ClassLabel: the clip's class (names in the dataset info) when it has exactly
             one, else -1 (unlabelled, or several labels).
  labels     int32 `[L]`: every class of the clip (sorted; empty when unlabelled).
  has_audio  bool: False for a file without audio kept with `keep_audioless` (audio is zeros).
  frames     uint8 `[clip_seconds * fps, H, W, 3]`, short side `short_side` (raw bytes: see
             BENCHMARKS.md "Frame storage" for why not JPEG).
  audio      int16 `[clip_seconds * sample_rate]`, mono; float value = int16 / 32768 (raw
             bytes since format 3).
Format 1 (written before annotation lists existed) has no `labels` and no format record; its
clips have exactly one label each. Formats 1 and 2 stored `audio` as a list of integers, which
TFDS reads back as the same int16 array. `datasets.open_prepared` reads all three.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import io
import multiprocessing
import os
import tempfile
import types
from collections.abc import Iterator
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from cmvt_jax import console
from cmvt_jax import files
from cmvt_jax.data import normalization
from cmvt_jax.data import spectrogram
from cmvt_jax.data import video_io

VERSION = "1.0.0"
# The example and metadata layout (module docstring); bumped when it changes.
FORMAT_VERSION = 3
# Written last, by TFDS or by the merge of parts: a dataset folder is complete when it exists.
INFO_FILE = "dataset_info.json"
SPLITS = ("train", "validation", "test")
VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi")
# Keys of the dataset's metadata.json.
STORAGE_KEY = "storage"
NORMALIZATION_KEY = "normalization"
SUMMARY_KEY = "prepare_summary"
FORMAT_KEY = "format"  # {"version": FORMAT_VERSION, "multi_label": bool}


@dataclasses.dataclass(frozen=True)
class StorageSpec:
  """How clips are cut and stored. Defaults match `configs/default.py` (`dataset` section)."""

  clip_seconds: float = 2.0
  stride_seconds: float = 2.0
  fps: float = 8.0
  short_side: int = 32
  sample_rate: int = 16000
  keep_audioless: bool = False

  def __post_init__(self):
    if self.clip_seconds <= 0 or self.stride_seconds <= 0:
      raise ValueError(f"clip_seconds and stride_seconds must be positive: {self}.")
    if self.fps <= 0 or self.short_side <= 0 or self.sample_rate <= 0:
      raise ValueError(f"fps, short_side and sample_rate must be positive: {self}.")

  @property
  def frames_per_clip(self) -> int:
    return round(self.clip_seconds * self.fps)

  @property
  def samples_per_clip(self) -> int:
    return round(self.clip_seconds * self.sample_rate)


@dataclasses.dataclass(frozen=True)
class VideoFile:
  """One entry to prepare: a file of the video folder, or a row of an annotation list.

  Attributes:
    path: absolute (any epath).
    source: relative to the video folder, printable (see `printable`).
    split: the split its clips go to.
    labels: its class names (a class folder's name; a list row's labels); () unlabelled.
    segment: (start, end) seconds cut out of the file (`--cut_segments`); None: the whole
      file is the entry.
    row: where an annotation list names it, `FILE:LINE`; '' for a folder's file.
    skip_reason, skip_detail: set when the listing already tells that the entry cannot be
      used (a file outside the class folders, a row listed twice): it is not decoded.
  """

  path: str
  source: str
  split: str
  labels: tuple[str, ...] = ()
  segment: tuple[float, float] | None = None
  row: str = ""
  skip_reason: str = ""
  skip_detail: str = ""

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> VideoFile:
    """Inverse of `dataclasses.asdict` after a JSON round trip (lists back to tuples)."""
    segment = values["segment"]
    return cls(
      **{
        **values,
        "labels": tuple(values["labels"]),
        "segment": None if segment is None else tuple(segment),
      }
    )


@dataclasses.dataclass(frozen=True)
class Listing:
  """What one preparation decodes, and its label map.

  Attributes:
    files: the entries, in a fixed order (a folder's sorted paths, a list's rows).
    label_names: class names; label i is `label_names[i]`; () when unlabelled.
    multi_label: an entry may have several labels (AudioSet); the dataset is then
      multi-label even if every kept clip has one.
    ignored: a folder's files that are not videos or lie outside the split folders.
    kind: 'folder' (the summary counts files found) or 'list' (rows listed).
  """

  files: list[VideoFile]
  label_names: list[str]
  multi_label: bool = False
  ignored: int = 0
  kind: str = "folder"


@dataclasses.dataclass
class FileOutcome:
  """What decoding one entry gave: clips spilled to `spill_path`, or why it was skipped.

  `cut_detail` says how a segment that ends past its file's usable end was cut to it;
  `has_audio` is False for a file kept without audio (`keep_audioless`).
  """

  file: VideoFile
  num_clips: int = 0
  seconds: float = 0.0
  spill_path: str = ""
  skip_reason: str = ""
  skip_detail: str = ""
  truncation_detail: str = ""
  cut_detail: str = ""
  has_audio: bool = True
  stats: normalization.StatsAccumulator | None = None


def printable(relative: str) -> str:
  """A file name as valid UTF-8 text: undecodable bytes become `\\xNN` escapes."""
  return os.fsencode(relative).decode("utf-8", "backslashreplace")


def hash_fraction(source: str) -> float:
  """A stable number in [0, 1) from a file's relative path (for hash splits)."""
  return int(hashlib.sha256(os.fsencode(source)).hexdigest()[:12], 16) / 16**12


def scan_video_dir(
  video_dir: epath.PathLike,
  hash_split: Mapping[str, float] | None = None,
  *,
  unlabelled: bool = False,
) -> Listing:
  """Lists the video files of `video_dir` with their split and class.

  Splits come from `hash_split` when given (split name -> fraction, summing to 1: each file
  goes to a split by a hash of its relative path, stable when files are added or removed),
  else from the top-level train/validation/test folders (files outside them are ignored),
  else, in a folder with neither split nor class folders, every file goes to train.
  The class is the first folder below the split folder (below VIDEO_DIR with a hash split);
  a file outside class folders is skipped. With `unlabelled`, or when no file lies in a
  class folder, the dataset is unlabelled: every video file is used, nested or flat.

  Returns:
    The listing, files sorted by source.
  """
  video_dir = epath.Path(video_dir)
  if not video_dir.is_dir():
    raise FileNotFoundError(f"Video folder {video_dir} does not exist or is not a folder.")
  split_folders = any((video_dir / split).is_dir() for split in SPLITS)
  if hash_split is not None:
    check_hash_split(hash_split)
  elif not split_folders and not unlabelled and any(p.is_dir() for p in video_dir.iterdir()):
    raise FileNotFoundError(
      f"{video_dir} has none of the split folders {', '.join(SPLITS)}. Put videos in "
      f"{video_dir}/train/CLASS/..., split them by hash (prepare --hash_split), or prepare "
      "them without labels (prepare --unlabelled)."
    )
  found, ignored = [], 0  # (path, source, split, class folder or '')
  for path in sorted(_walk_files(video_dir)):
    if path.suffix.lower() not in VIDEO_EXTENSIONS:
      ignored += 1
      continue
    parts = path.relative_to(video_dir).parts
    source = printable("/".join(parts))
    if hash_split is not None:
      split, class_parts = hash_assign(source, hash_split), parts[:-1]
    elif split_folders:
      if parts[0] not in SPLITS:
        ignored += 1
        continue
      split, class_parts = parts[0], parts[1:-1]
    else:
      split, class_parts = "train", parts[:-1]
    found.append((path, source, split, printable(class_parts[0]) if class_parts else ""))
  labelled = not unlabelled and any(label for *_, label in found)
  video_files = []
  for path, source, split, label in found:
    entry = VideoFile(path=os.fspath(path), source=source, split=split)
    if labelled and label:
      entry = dataclasses.replace(entry, labels=(label,))
    elif labelled:
      entry = dataclasses.replace(
        entry,
        skip_reason="not inside a class folder",
        skip_detail=f"expected SPLIT/CLASS/{source.rsplit('/', 1)[-1]}",
      )
    video_files.append(entry)
  label_names = sorted({label for *_, label in found if label}) if labelled else []
  return Listing(files=video_files, label_names=label_names, ignored=ignored)


def _walk_files(folder: epath.Path) -> Iterator[epath.Path]:
  # iterdir, not rglob or walk: recursive globs are refused on gs:// paths, and walk yields
  # gs:// folders without their scheme (as local relative paths).
  for path in folder.iterdir():
    if path.is_dir():
      yield from _walk_files(path)
    else:
      yield path


def check_hash_split(hash_split: Mapping[str, float]) -> None:
  """Refuses fractions that are not of known splits or do not sum to 1."""
  unknown = set(hash_split) - set(SPLITS)
  if unknown or abs(sum(hash_split.values()) - 1.0) > 1e-6 or min(hash_split.values()) < 0:
    raise ValueError(
      f"hash_split must map some of {SPLITS} to fractions summing to 1, got {dict(hash_split)}."
    )


def hash_assign(source: str, fractions: Mapping[str, float]) -> str:
  """The split of `fractions` (split name -> fraction) that `source`'s hash falls in."""
  position = hash_fraction(source)
  cumulative = 0.0
  for split in SPLITS:
    cumulative += fractions.get(split, 0.0)
    if position < cumulative:
      return split
  return max(fractions, key=fractions.get)  # float rounding at the very top


def stored_audio(waveform: np.ndarray | None, num_samples: int) -> np.ndarray:
  """A float waveform `[num_samples]` (None: no audio, silence) as stored: int16."""
  if waveform is None:
    return np.zeros(num_samples, np.int16)
  # In place after the first copy: a whole film's audio is hundreds of MB.
  scaled = np.clip(waveform, -1.0, 32767 / 32768)
  scaled *= 32768
  return np.round(scaled, out=scaled).astype(np.int16)


def _decode_file(
  task: tuple[VideoFile, StorageSpec, spectrogram.MelSettings | None, str],
) -> FileOutcome:
  """Decodes one entry and spills its clips (runs in a worker process)."""
  file, storage, mel, spill_dir = task
  outcome = FileOutcome(file=file, skip_reason=file.skip_reason, skip_detail=file.skip_detail)
  if file.skip_reason:
    return outcome
  try:
    video = video_io.decode_video(
      file.path,
      fps=storage.fps,
      short_side=storage.short_side,
      sample_rate=storage.sample_rate,
      require_audio=not storage.keep_audioless,
    )
    offset = 0.0
    if file.segment is not None:
      start, end = file.segment
      if end > video.duration + 1e-6:
        outcome.cut_detail = (
          f"the segment [{start:g}, {end:g}) s ends after the usable {video.duration:.2f} s; "
          f"cut to [{start:g}, {video.duration:.2f})"
        )
      offset = video_io.cut_offset(video, start) / video.fps
      video = video_io.cut(video, start, end, file.path)
    clips = list(video_io.iter_clips(video, storage.clip_seconds, storage.stride_seconds))
    if not clips:
      raise video_io.TooShortError(
        file.path,
        f"{video.duration:.2f} s usable, clips are {storage.clip_seconds} s"
        + (f" (truncated: {video.truncation_detail})" if video.truncated else ""),
      )
  except video_io.VideoReadError as error:
    outcome.skip_reason = error.reason
    outcome.skip_detail = error.detail
    outcome.cut_detail = ""
    return outcome
  outcome.num_clips = len(clips)
  outcome.seconds = video.duration
  outcome.truncation_detail = video.truncation_detail
  outcome.has_audio = video.audio is not None
  audio = np.stack([stored_audio(clip.audio, storage.samples_per_clip) for clip in clips])
  frames = np.stack([clip.frames for clip in clips])
  if mel is not None:  # train split: accumulate normalisation statistics
    outcome.stats = normalization.StatsAccumulator(mel)
    for clip_frames, clip_audio in zip(frames, audio):
      waveform = None
      if outcome.has_audio:
        waveform = normalization.waveform_at_rate(clip_audio, storage.sample_rate, mel.sample_rate)
      outcome.stats.add(clip_frames, waveform)
  # A file's segments (rows of a list) are entries of their own: each needs its own name.
  key = os.fsencode(file.path) + (repr(file.segment).encode() if file.segment else b"")
  outcome.spill_path = os.path.join(spill_dir, f"{hashlib.sha256(key).hexdigest()}.npz")
  with (
    files.replacing(outcome.spill_path, kind="prepare-spill", durable=False) as temporary,
    temporary.open("wb") as f,
  ):
    np.savez(
      f,
      frames=frames,
      audio=audio,
      starts=np.array([offset + clip.start for clip in clips]),
      has_audio=outcome.has_audio,
    )
  return outcome


@dataclasses.dataclass
class PrepareSummary:
  """Counts of one preparation; `found == good + len(skipped)` always.

  `found` counts a folder's video files (kind 'folder') or a list's rows (kind 'list');
  skipped entries are named (a list row by `FILE:LINE` and its file) with their reason.
  """

  found: int = 0
  good: int = 0
  ignored_non_video: int = 0
  hours: float = 0.0
  clips: dict[str, int] = dataclasses.field(default_factory=dict)
  skipped: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)
  truncated: list[tuple[str, str]] = dataclasses.field(default_factory=list)
  empty_splits: list[str] = dataclasses.field(default_factory=list)
  kind: str = "folder"
  audioless_clips: dict[str, int] = dataclasses.field(default_factory=dict)
  cut_short: list[tuple[str, str]] = dataclasses.field(default_factory=list)

  @property
  def skipped_by_reason(self) -> dict[str, int]:
    return dict(collections.Counter(reason for _, reason, _ in self.skipped))

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> PrepareSummary:
    """Also reads a summary of format 1, which lacks the later keys."""
    pairs = {key: [tuple(x) for x in values.get(key, ())] for key in ("truncated", "cut_short")}
    return cls(**{**values, "skipped": [tuple(x) for x in values["skipped"]], **pairs})

  def format(self, max_listed: int = 20) -> str:
    """A human-readable report."""
    counted = "Rows listed" if self.kind == "list" else "Video files found"
    lines = [
      f"{counted}: {self.found} = {self.good} used + {len(self.skipped)} skipped"
      f" ({self.hours:.3f} hours of usable video)."
    ]
    lines += [f"  clips written to {split}: {count}" for split, count in self.clips.items()]
    lines += [
      f"  {split}: {count} of the clips have no audio (kept, marked audioless)"
      for split, count in self.audioless_clips.items()
    ]
    lines += [
      f"  split {split}: every file was skipped, split not written" for split in self.empty_splits
    ]
    if self.ignored_non_video:
      lines.append(
        f"  ignored {self.ignored_non_video} files that are not videos or lie "
        "outside the split folders"
      )
    for reason, count in sorted(self.skipped_by_reason.items()):
      lines.append(f"  skipped, {reason}: {count}")
    for source, reason, detail in self.skipped[:max_listed]:
      lines.append(f"    {source}: {reason}: {detail}")
    if len(self.skipped) > max_listed:
      lines.append(f"    ... and {len(self.skipped) - max_listed} more")
    for title, entries in (
      ("truncated, kept the clips of their decodable part", self.truncated),
      ("segments ending past their file's end, cut to it", self.cut_short),
    ):
      if entries:
        lines.append(f"  {title}: {len(entries)}")
        lines += [f"    {source}: {detail}" for source, detail in entries[:max_listed]]
    return "\n".join(lines)


class _ClipFolderBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Writes clips spilled by the decode phase; named per dataset by `_builder_class`."""

  VERSION = tfds.core.Version(VERSION)
  # TFDS looks for a download-checksums file beside the builder's code; nothing is downloaded
  # here, and the look-up needs the importlib_resources backport, which TFDS does not install.
  code_path = None

  def __init__(
    self,
    *,
    outcomes: Sequence[FileOutcome],
    label_names: Sequence[str],
    metadata: Mapping[str, Any],
    stage: console.Stage,
    **kwargs,
  ):
    self._outcomes = outcomes
    self._label_names = list(label_names)
    self._dataset_metadata = dict(metadata)
    self._stage = stage
    self._total_clips = sum(outcome.num_clips for outcome in outcomes)
    self._written = 0
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description="Aligned video and audio clips prepared by cmvt_jax.prepare.",
      features=tfds.features.FeaturesDict(
        {
          "id": tfds.features.Text(),
          "source": tfds.features.Text(),
          "start": tfds.features.Scalar(dtype=np.float32),
          "label": tfds.features.ClassLabel(names=self._label_names),
          "labels": tfds.features.Tensor(shape=(None,), dtype=np.int32),
          "has_audio": tfds.features.Scalar(dtype=np.bool_),
          "frames": tfds.features.Tensor(
            shape=(None, None, None, 3), dtype=np.uint8, encoding="bytes"
          ),
          # Raw bytes: TFDS writes an int16 tensor without an encoding as a list of int64
          # protobuf values, 5 ms of CPU per 2-s clip to write and 0.6 ms to read, against
          # 0.07 and 0.05 ms as bytes (formats 1 and 2 stored it so; they still read).
          "audio": tfds.features.Tensor(shape=(None,), dtype=np.int16, encoding="bytes"),
        }
      ),
      metadata=tfds.core.MetadataDict(self._dataset_metadata),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    splits = sorted(
      {outcome.file.split for outcome in self._outcomes if outcome.num_clips}, key=SPLITS.index
    )
    return {split: self._generate_examples(split) for split in splits}

  def _generate_examples(self, split: str) -> Iterator[tuple[str, dict[str, Any]]]:
    index = {name: i for i, name in enumerate(self._label_names)}
    for outcome in self._outcomes:
      if outcome.file.split != split or not outcome.num_clips:
        continue
      labels = np.array(sorted(index[label] for label in outcome.file.labels), np.int32)
      with np.load(outcome.spill_path) as spilled:
        has_audio = bool(spilled["has_audio"])
        for frames, audio, start in zip(spilled["frames"], spilled["audio"], spilled["starts"]):
          example_id = f"{outcome.file.source}@{start:.3f}"
          self._written += 1
          self._stage.update(
            self._stage.total, note=f"writing clip {self._written}/{self._total_clips}"
          )
          yield (
            example_id,
            {
              "id": example_id,
              "source": outcome.file.source,
              "start": start,
              "label": int(labels[0]) if len(labels) == 1 else -1,
              "labels": labels,
              "has_audio": has_audio,
              "frames": frames,
              "audio": audio,
            },
          )


def check_name(name: str) -> None:
  """Refuses a dataset name that TFDS would refuse, before any work is done."""
  if not name.isidentifier() or name != name.lower():
    raise ValueError(
      f"Dataset name {name!r} must be a lower-case Python identifier "
      "(letters, digits, underscores), as TFDS requires."
    )


def _builder_class(name: str) -> type[_ClipFolderBuilder]:
  """A builder class named `name` (TFDS names datasets after their builder class)."""
  check_name(name)
  return types.new_class(
    name,
    (_ClipFolderBuilder,),
    {"skip_registration": True},
    lambda namespace: namespace.update(name=name, __module__=__name__),
  )


def dataset_dir(data_dir: epath.PathLike, name: str) -> epath.Path:
  """Where `prepare` writes dataset `name`: `DATA_DIR/NAME/VERSION`."""
  return epath.Path(data_dir) / name / VERSION


def is_prepared(directory: epath.PathLike) -> bool:
  """Whether `directory` holds a complete dataset (TFDS renames it into place when done)."""
  return (epath.Path(directory) / INFO_FILE).exists()


def decode_all(
  video_files: Sequence[VideoFile],
  storage: StorageSpec,
  mel: spectrogram.MelSettings,
  spill_dir: str,
  *,
  num_workers: int,
  stage: console.Stage,
) -> list[FileOutcome]:
  """Phase 1 (see module docstring): decodes and spills every file, in `video_files` order.

  `stage` counts the files (its total is `len(video_files)`) and the clips cut so far.
  """
  tasks = [
    (file, storage, mel if file.split == "train" else None, spill_dir) for file in video_files
  ]
  clips = 0

  def counted(outcome: FileOutcome) -> FileOutcome:
    nonlocal clips
    clips += outcome.num_clips
    stage.advance(note=f"{clips} clips")
    return outcome

  if num_workers <= 1:
    return [counted(outcome) for outcome in map(_decode_file, tasks)]
  # spawn, not fork: the caller (the trainer) may already run JAX's threads.
  with multiprocessing.get_context("spawn").Pool(num_workers) as pool:
    return [counted(outcome) for outcome in pool.imap(_decode_file, tasks)]


def summarize(outcomes: Sequence[FileOutcome], *, ignored: int, kind: str) -> PrepareSummary:
  """The counts of a preparation's outcomes (every entry of a listing of `kind`)."""
  summary = PrepareSummary(found=len(outcomes), ignored_non_video=ignored, kind=kind)
  for outcome in outcomes:
    name = entry_name(outcome.file)
    if outcome.skip_reason:
      summary.skipped.append((name, outcome.skip_reason, outcome.skip_detail))
      continue
    summary.good += 1
    summary.hours += outcome.seconds / 3600
    split = outcome.file.split
    summary.clips[split] = summary.clips.get(split, 0) + outcome.num_clips
    if not outcome.has_audio:
      summary.audioless_clips[split] = summary.audioless_clips.get(split, 0) + outcome.num_clips
    if outcome.truncation_detail:
      summary.truncated.append((name, outcome.truncation_detail))
    if outcome.cut_detail:
      summary.cut_short.append((name, outcome.cut_detail))
  found_splits = {outcome.file.split for outcome in outcomes}
  summary.empty_splits = [
    split for split in SPLITS if split in found_splits and split not in summary.clips
  ]
  in_order = lambda counts: {split: counts[split] for split in SPLITS if split in counts}
  summary.clips = in_order(summary.clips)
  summary.audioless_clips = in_order(summary.audioless_clips)
  return summary


def entry_name(file: VideoFile) -> str:
  """How summaries name an entry: its source; a list row as `FILE:LINE (source)`."""
  return f"{file.row} ({file.source})" if file.row else file.source


def describe_labels(label_names: Sequence[str], multi_label: bool) -> str:
  """'3 classes', '527 classes, several per clip' or 'no labels (unlabelled)'."""
  if not label_names:
    return "no labels (unlabelled)"
  return f"{len(label_names)} classes" + (", several per clip" if multi_label else "")


def prepare(
  video_dir: epath.PathLike,
  data_dir: epath.PathLike,
  name: str,
  *,
  storage: StorageSpec = StorageSpec(),
  mel: spectrogram.MelSettings,
  hash_split: Mapping[str, float] | None = None,
  unlabelled: bool = False,
  listing: Listing | None = None,
  num_workers: int = 0,
  progress: bool = True,
  log=print,
) -> epath.Path:
  """Prepares `video_dir` as dataset `name` in `data_dir` (a no-op when already there).

  Args:
    video_dir: the folder of videos (module docstring).
    data_dir: the TFDS data folder; the dataset lands in `DATA_DIR/NAME/VERSION/`.
    name: the dataset name (a lower-case identifier).
    storage: clip windows and storage format.
    mel: log-mel settings the stored log-mel statistics are computed with (the pipeline
      recomputes them from the data if it is configured otherwise).
    hash_split, unlabelled: see `scan_video_dir`.
    listing: what to prepare (e.g. `annotations.read_lists`' rows of files under
      `video_dir`); default: `scan_video_dir(video_dir, hash_split, unlabelled=...)`.
    num_workers: decoding processes (0: one per CPU core; 1: in this process).
    progress: show the stage's progress line (`console.Stage`).
    log: where the summary and notices go.

  Returns:
    The dataset folder `DATA_DIR/NAME/VERSION`.

  Raises:
    FileNotFoundError: the video folder or its split folders are missing.
    ValueError: bad arguments, or no entry gave a single clip.
  """
  check_name(name)
  target = dataset_dir(data_dir, name)
  if is_prepared(target):
    log(f"Dataset {name} is already prepared at {target}; nothing to do.")
    return target
  listing = listing or scan_video_dir(video_dir, hash_split, unlabelled=unlabelled)
  check_listing(listing, video_dir)
  num_workers = num_workers or os.cpu_count() or 1
  with (
    tempfile.TemporaryDirectory(prefix="cmvt_prepare_") as spill_dir,
    console.Stage("prepare", len(listing.files), "videos", enabled=progress) as stage,
  ):
    outcomes = decode_all(
      listing.files, storage, mel, spill_dir, num_workers=num_workers, stage=stage
    )
    summary = summarize(outcomes, ignored=listing.ignored, kind=listing.kind)
    if not summary.clips:
      raise ValueError(f"No usable clip in {video_dir}:\n{summary.format()}")
    write_dataset(
      name,
      data_dir,
      outcomes,
      listing.label_names,
      dataset_metadata(summary, outcomes, storage, mel, multi_label=listing.multi_label),
      scratch_dir=spill_dir,
      stage=stage,
    )
    stage.finish(note=f"{sum(summary.clips.values())} clips in {target}")
  labels = describe_labels(listing.label_names, listing.multi_label)
  log(f"Prepared dataset {name} at {target} ({labels})\n{summary.format()}")
  return target


def check_listing(listing: Listing, video_dir: epath.PathLike) -> None:
  """Refuses a listing with nothing in it to decode."""
  if all(file.skip_reason for file in listing.files):
    raise ValueError(
      f"Nothing to prepare under {video_dir}: no video file ({', '.join(VIDEO_EXTENSIONS)})."
    )


def dataset_metadata(
  summary: PrepareSummary,
  outcomes: Sequence[FileOutcome],
  storage: StorageSpec,
  mel: spectrogram.MelSettings,
  *,
  multi_label: bool,
) -> dict[str, Any]:
  """The dataset's metadata.json: format, storage, the summary, the train split's statistics.

  The statistics are merged in `outcomes` order, so the same outcomes give the same bits.
  """
  metadata = {
    FORMAT_KEY: {"version": FORMAT_VERSION, "multi_label": multi_label},
    STORAGE_KEY: dataclasses.asdict(storage),
    SUMMARY_KEY: summary.to_dict(),
  }
  train_stats = [outcome.stats for outcome in outcomes if outcome.stats is not None]
  if train_stats:
    accumulator = normalization.StatsAccumulator(mel)
    for stats in train_stats:
      accumulator.merge(stats)
    metadata[NORMALIZATION_KEY] = accumulator.result().to_dict()
  return metadata


def write_dataset(
  name: str,
  data_dir: epath.PathLike,
  outcomes: Sequence[FileOutcome],
  label_names: Sequence[str],
  metadata: Mapping[str, Any],
  *,
  scratch_dir: str,
  stage: console.Stage,
) -> None:
  """Phase 2 (see module docstring): TFDS writes the spilled clips of `outcomes`.

  `data_dir` must be a local (POSIX) folder: ArrayRecord files are written with `open()`.
  `stage` shows the clips written. TFDS's own progress bars and its "Downloading and
  preparing dataset" lines (printed to standard output) show only with `--verbosity=1`.
  """
  builder = _builder_class(name)(
    data_dir=os.fspath(data_dir),
    outcomes=outcomes,
    label_names=label_names,
    metadata=metadata,
    stage=stage,
  )
  verbose = logging.get_verbosity() >= 1
  tfds.display_progress_bar(verbose)
  # TFDS writes into a temporary folder and renames it into place when every shard is done.
  with (
    files.LibraryWrite("dataset", dataset_dir(data_dir, name)),
    contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO()),
  ):
    builder.download_and_prepare(
      download_dir=os.path.join(scratch_dir, "downloads"),
      file_format="array_record",
      download_config=tfds.download.DownloadConfig(try_download_gcs=False),
    )
