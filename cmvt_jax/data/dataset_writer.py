"""Folder of videos -> TFDS ArrayRecord dataset of aligned clips (no TensorFlow needed).

`prepare(...)` runs in two phases:
  1. decode: every video file is decoded in parallel processes (`video_io`), cut into clip
     windows and spilled to a local temporary folder; bad files are skipped with their reason;
     the train split's normalisation statistics are accumulated;
  2. write: a TFDS `GeneratorBasedBuilder` reads the spilled clips and writes ArrayRecord
     shards. TFDS writes into an `incomplete.*` folder and renames it to
     `DATA_DIR/NAME/VERSION/` only when everything is written, so an interrupted run never
     leaves a dataset that reads as complete, and a finished dataset is never rebuilt.
Decoding first tells which splits have clips (TFDS refuses an empty split) and lets the
statistics be stored with the dataset, in its `metadata.json`.

Input layout: `VIDEO_DIR/{train,validation,test}/CLASS/.../*.mp4` (labels from the class
folders, splits from the top-level folders), or `VIDEO_DIR/CLASS/.../*.mp4` with a hash split.

Each example (features):
  id         text: `SOURCE@START` with START in seconds, 3 decimals; unique and stable.
  source     text: the file's path relative to VIDEO_DIR.
  start      float32: the clip's start in seconds.
  label      ClassLabel: the class folder (names in the dataset info).
  has_audio  bool: False for a file without audio kept with `keep_audioless` (audio is zeros).
  frames     uint8 `[clip_seconds * fps, H, W, 3]`, short side `short_side` (raw bytes: see
             BENCHMARKS.md "Frame storage" for why not JPEG).
  audio      int16 `[clip_seconds * sample_rate]`, mono; float value = int16 / 32768.
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
# Written last, by TFDS or by the merge of parts: a dataset folder is complete when it exists.
INFO_FILE = "dataset_info.json"
SPLITS = ("train", "validation", "test")
VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi")
# Keys of the dataset's metadata.json.
STORAGE_KEY = "storage"
NORMALIZATION_KEY = "normalization"
SUMMARY_KEY = "prepare_summary"


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
  """A file found in the video folder."""

  path: str  # absolute (any epath)
  source: str  # relative to the video folder, printable (see `_printable`)
  split: str
  label: str  # class folder name; '' when the file is not inside one


@dataclasses.dataclass
class FileOutcome:
  """What decoding one file gave: clips spilled to `spill_path`, or why it was skipped."""

  file: VideoFile
  num_clips: int = 0
  seconds: float = 0.0
  spill_path: str = ""
  skip_reason: str = ""
  skip_detail: str = ""
  truncation_detail: str = ""
  stats: normalization.StatsAccumulator | None = None


def _printable(relative: str) -> str:
  """A file name as valid UTF-8 text: undecodable bytes become `\\xNN` escapes."""
  return os.fsencode(relative).decode("utf-8", "backslashreplace")


def _hash_fraction(source: str) -> float:
  """A stable number in [0, 1) from a file's relative path (for hash splits)."""
  return int(hashlib.sha256(os.fsencode(source)).hexdigest()[:12], 16) / 16**12


def scan_video_dir(
  video_dir: epath.PathLike, hash_split: Mapping[str, float] | None = None
) -> tuple[list[VideoFile], list[str], int]:
  """Lists the video files of `video_dir` with their split and class.

  Args:
    video_dir: the folder (see the module docstring for its layout).
    hash_split: None to take splits from the top-level train/validation/test folders;
      otherwise split name -> fraction (summing to 1), and each file goes to a split by a hash
      of its relative path (stable when files are added or removed).

  Returns:
    (files sorted by source, sorted class names, count of ignored non-video files).
  """
  video_dir = epath.Path(video_dir)
  if not video_dir.is_dir():
    raise FileNotFoundError(f"Video folder {video_dir} does not exist or is not a folder.")
  if hash_split is not None:
    unknown = set(hash_split) - set(SPLITS)
    if unknown or abs(sum(hash_split.values()) - 1.0) > 1e-6 or min(hash_split.values()) < 0:
      raise ValueError(
        f"hash_split must map some of {SPLITS} to fractions summing to 1, got {dict(hash_split)}."
      )
  elif not any((video_dir / split).is_dir() for split in SPLITS):
    raise FileNotFoundError(
      f"{video_dir} has none of the split folders {', '.join(SPLITS)}. Put videos in "
      f"{video_dir}/train/CLASS/..., or split them by hash (prepare --hash_split)."
    )
  video_files, ignored = [], 0
  for path in sorted(_walk_files(video_dir)):
    if path.suffix.lower() not in VIDEO_EXTENSIONS:
      ignored += 1
      continue
    parts = path.relative_to(video_dir).parts
    source = _printable("/".join(parts))
    if hash_split is None:
      if parts[0] not in SPLITS:
        ignored += 1
        continue
      split, class_parts = parts[0], parts[1:-1]
    else:
      split, class_parts = _hash_assign(source, hash_split), parts[:-1]
    label = _printable(class_parts[0]) if class_parts else ""
    video_files.append(VideoFile(path=os.fspath(path), source=source, split=split, label=label))
  label_names = sorted({file.label for file in video_files if file.label})
  return video_files, label_names, ignored


def _walk_files(folder: epath.Path) -> Iterator[epath.Path]:
  # iterdir, not rglob or walk: recursive globs are refused on gs:// paths, and walk yields
  # gs:// folders without their scheme (as local relative paths).
  for path in folder.iterdir():
    if path.is_dir():
      yield from _walk_files(path)
    else:
      yield path


def _hash_assign(source: str, fractions: Mapping[str, float]) -> str:
  position = _hash_fraction(source)
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
  """Decodes one file and spills its clips (runs in a worker process)."""
  file, storage, mel, spill_dir = task
  outcome = FileOutcome(file=file)
  if not file.label:
    outcome.skip_reason = "not inside a class folder"
    outcome.skip_detail = f"expected SPLIT/CLASS/{os.path.basename(file.source)}"
    return outcome
  try:
    video = video_io.decode_video(
      file.path,
      fps=storage.fps,
      short_side=storage.short_side,
      sample_rate=storage.sample_rate,
      require_audio=not storage.keep_audioless,
    )
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
    return outcome
  outcome.num_clips = len(clips)
  outcome.seconds = video.duration
  outcome.truncation_detail = video.truncation_detail
  has_audio = video.audio is not None
  audio = np.stack([stored_audio(clip.audio, storage.samples_per_clip) for clip in clips])
  frames = np.stack([clip.frames for clip in clips])
  if mel is not None:  # train split: accumulate normalisation statistics
    outcome.stats = normalization.StatsAccumulator(mel)
    for clip_frames, clip_audio in zip(frames, audio):
      waveform = None
      if has_audio:
        waveform = normalization.waveform_at_rate(clip_audio, storage.sample_rate, mel.sample_rate)
      outcome.stats.add(clip_frames, waveform)
  spill_name = hashlib.sha256(os.fsencode(file.path)).hexdigest()
  outcome.spill_path = os.path.join(spill_dir, f"{spill_name}.npz")
  with (
    files.replacing(outcome.spill_path, kind="prepare-spill", durable=False) as temporary,
    temporary.open("wb") as f,
  ):
    np.savez(
      f,
      frames=frames,
      audio=audio,
      starts=np.array([clip.start for clip in clips]),
      has_audio=has_audio,
    )
  return outcome


@dataclasses.dataclass
class PrepareSummary:
  """Counts of one preparation; `found == good + skipped` always."""

  found: int = 0
  good: int = 0
  ignored_non_video: int = 0
  hours: float = 0.0
  clips: dict[str, int] = dataclasses.field(default_factory=dict)
  skipped: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)
  truncated: list[tuple[str, str]] = dataclasses.field(default_factory=list)
  empty_splits: list[str] = dataclasses.field(default_factory=list)

  @property
  def skipped_by_reason(self) -> dict[str, int]:
    return dict(collections.Counter(reason for _, reason, _ in self.skipped))

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> PrepareSummary:
    return cls(
      **{
        **values,
        "skipped": [tuple(x) for x in values["skipped"]],
        "truncated": [tuple(x) for x in values["truncated"]],
      }
    )

  def format(self, max_listed: int = 20) -> str:
    """A human-readable report."""
    lines = [
      f"Video files found: {self.found} = {self.good} used + {len(self.skipped)} skipped"
      f" ({self.hours:.3f} hours of usable video)."
    ]
    lines += [f"  clips written to {split}: {count}" for split, count in self.clips.items()]
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
    if self.truncated:
      lines.append(f"  truncated, kept the clips of their decodable part: {len(self.truncated)}")
      lines += [f"    {source}: {detail}" for source, detail in self.truncated[:max_listed]]
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
          "has_audio": tfds.features.Scalar(dtype=np.bool_),
          "frames": tfds.features.Tensor(
            shape=(None, None, None, 3), dtype=np.uint8, encoding="bytes"
          ),
          "audio": tfds.features.Tensor(shape=(None,), dtype=np.int16),
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
    for outcome in self._outcomes:
      if outcome.file.split != split or not outcome.num_clips:
        continue
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
              "label": outcome.file.label,
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


def summarize(outcomes: Sequence[FileOutcome], ignored: int) -> PrepareSummary:
  summary = PrepareSummary(found=len(outcomes), ignored_non_video=ignored)
  for outcome in outcomes:
    if outcome.skip_reason:
      summary.skipped.append((outcome.file.source, outcome.skip_reason, outcome.skip_detail))
      continue
    summary.good += 1
    summary.hours += outcome.seconds / 3600
    split = outcome.file.split
    summary.clips[split] = summary.clips.get(split, 0) + outcome.num_clips
    if outcome.truncation_detail:
      summary.truncated.append((outcome.file.source, outcome.truncation_detail))
  found_splits = {outcome.file.split for outcome in outcomes}
  summary.empty_splits = [
    split for split in SPLITS if split in found_splits and split not in summary.clips
  ]
  summary.clips = {split: summary.clips[split] for split in SPLITS if split in summary.clips}
  return summary


def prepare(
  video_dir: epath.PathLike,
  data_dir: epath.PathLike,
  name: str,
  *,
  storage: StorageSpec = StorageSpec(),
  mel: spectrogram.MelSettings,
  hash_split: Mapping[str, float] | None = None,
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
    hash_split: see `scan_video_dir`.
    num_workers: decoding processes (0: one per CPU core; 1: in this process).
    progress: show the stage's progress line (`console.Stage`).
    log: where the summary and notices go.

  Returns:
    The dataset folder `DATA_DIR/NAME/VERSION`.

  Raises:
    FileNotFoundError: the video folder or its split folders are missing.
    ValueError: bad arguments, or no file gave a single clip.
  """
  check_name(name)
  target = dataset_dir(data_dir, name)
  if is_prepared(target):
    log(f"Dataset {name} is already prepared at {target}; nothing to do.")
    return target
  video_files, label_names, ignored = scan_video_dir(video_dir, hash_split)
  if not label_names:
    raise ValueError(
      f"No video file inside a class folder under {video_dir} (expected "
      f"SPLIT/CLASS/file{VIDEO_EXTENSIONS[0]})."
    )
  num_workers = num_workers or os.cpu_count() or 1
  with (
    tempfile.TemporaryDirectory(prefix="cmvt_prepare_") as spill_dir,
    console.Stage("prepare", len(video_files), "videos", enabled=progress) as stage,
  ):
    outcomes = decode_all(
      video_files, storage, mel, spill_dir, num_workers=num_workers, stage=stage
    )
    summary = summarize(outcomes, ignored)
    if not summary.clips:
      raise ValueError(f"No usable clip in {video_dir}:\n{summary.format()}")
    write_dataset(
      name,
      data_dir,
      outcomes,
      label_names,
      dataset_metadata(summary, outcomes, storage, mel),
      scratch_dir=spill_dir,
      stage=stage,
    )
    stage.finish(note=f"{sum(summary.clips.values())} clips in {target}")
  log(f"Prepared dataset {name} at {target}\n{summary.format()}")
  return target


def dataset_metadata(
  summary: PrepareSummary,
  outcomes: Sequence[FileOutcome],
  storage: StorageSpec,
  mel: spectrogram.MelSettings,
) -> dict[str, Any]:
  """The dataset's metadata.json: storage, the summary, the train split's statistics.

  The statistics are merged in `outcomes` order, so the same outcomes give the same bits.
  """
  metadata = {STORAGE_KEY: dataclasses.asdict(storage), SUMMARY_KEY: summary.to_dict()}
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
