"""grain input pipelines: train (sharded, shuffled, repeated, augmented, checkpointable) and
eval (deterministic, padded with a mask), and the preprocessing they share with export.

Batches are dicts of numpy arrays (B = per-host batch size):
  video        float32 `[B, num_frames, frame_size, frame_size, 3]`, normalised
  audio        float32 `[B, audio_frames, n_mels]`, normalised log-mel, audio_frames =
               round(num_frames / fps * sample_rate) // hop_length
  label        int32 `[B]`: the clip's class, -1 when it has none or several (and on
               padding rows)
  labels       uint8 `[B, C]` multi-hot, only when the pipeline is given
               `multi_hot_classes=C` (multi-label data)
  has_audio    bool `[B]`: False for a clip kept without audio (and on padding rows)
  mask         bool `[B]`: False on eval padding rows (always True in training)
  video_view2, audio_view2   with `two_views`: a second, independently augmented view
  id, source   str `[B]`, start float32 `[B]` (eval only; host-side metadata)
`file_elements` gives the same eval elements straight from a video file (export without
`prepare`, whole-video embedding).

Train order: the source is shuffled globally (same permutation on every host, a new one each
epoch), repeated, augmented with a generator seeded by the element's position in that global
stream, then host p takes positions p, p + P, p + 2P, ... and batches them. So global batch b
is stream positions [b * global_batch, (b + 1) * global_batch) whatever the number of hosts,
and `start_step` rebuilds any position without replaying the stream.

A mixture (`mixture_train_dataset`) builds that stream per component (its own source,
storage rates and preprocessor, shuffle and augmentation seeds `seed + i`) and interleaves
them with grain's `MapDataset.mix` by weight before the host split: still a `MapDataset`,
so the position is still rebuilt from step × global batch and the iterator still saves its
state. A mixture of one component is the single dataset's stream.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import math
import os
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np
from absl import flags
from absl import logging
from etils import epath
from grain import multiprocessing as grain_multiprocessing

from cmvt_jax.data import dataset_writer
from cmvt_jax.data import held_source
from cmvt_jax.data import normalization
from cmvt_jax.data import spectrogram
from cmvt_jax.data import video_io


@dataclasses.dataclass(frozen=True)
class InputSpec:
  """What the model gets and how it is augmented (the config's `input` section)."""

  num_frames: int
  fps: float
  frame_size: int
  mel: spectrogram.MelSettings
  crop_scale: tuple[float, float]
  crop_ratio: tuple[float, float]
  flip: bool
  num_time_masks: int
  max_time_mask: int
  num_freq_masks: int
  max_freq_mask: int
  two_views: bool
  num_workers: int
  eval_num_workers: int
  worker_buffer_size: int
  read_threads: int
  read_buffer_size: int
  cache_train_gib: float = 0.0

  @classmethod
  def from_config(cls, input_config) -> InputSpec:
    return cls(
      num_frames=int(input_config.num_frames),
      fps=float(input_config.fps),
      frame_size=int(input_config.frame_size),
      mel=spectrogram.MelSettings.from_config(input_config),
      crop_scale=tuple(input_config.crop_scale),
      crop_ratio=tuple(input_config.crop_ratio),
      flip=bool(input_config.flip),
      num_time_masks=int(input_config.num_time_masks),
      max_time_mask=int(input_config.max_time_mask),
      num_freq_masks=int(input_config.num_freq_masks),
      max_freq_mask=int(input_config.max_freq_mask),
      two_views=bool(input_config.two_views),
      num_workers=int(input_config.num_workers),
      eval_num_workers=int(input_config.eval_num_workers),
      worker_buffer_size=int(input_config.worker_buffer_size),
      read_threads=int(input_config.read_threads),
      read_buffer_size=int(input_config.read_buffer_size),
      cache_train_gib=float(input_config.cache_train_gib),
    )

  @property
  def window_seconds(self) -> float:
    return self.num_frames / self.fps

  @property
  def audio_frames(self) -> int:
    return self.mel.num_frames(round(self.window_seconds * self.mel.sample_rate))


def crop_and_resize(
  frames: np.ndarray, top: float, left: float, height: float, width: float, size: int
) -> np.ndarray:
  """Bilinear resize of the box (top, left, height, width) of `[T, H, W, 3]` to `size`^2.

  Pixel centres are at integer + 0.5 (no corner alignment), so the full frame at its own size
  comes back unchanged. Returns float32 `[T, size, size, 3]` in the input's value range.
  """
  frames_height, frames_width = frames.shape[1:3]

  def sample_points(start, extent, limit):
    points = start + (np.arange(size) + 0.5) * extent / size - 0.5
    points = np.clip(points, 0, limit - 1)
    low = np.floor(points).astype(np.int64)
    high = np.minimum(low + 1, limit - 1)
    return low, high, (points - low).astype(np.float32)

  y_low, y_high, y_weight = sample_points(top, height, frames_height)
  x_low, x_high, x_weight = sample_points(left, width, frames_width)
  frames = frames.astype(np.float32)
  rows = (
    frames[:, y_low] * (1 - y_weight)[None, :, None, None]
    + frames[:, y_high] * y_weight[None, :, None, None]
  )
  return (
    rows[:, :, x_low] * (1 - x_weight)[None, None, :, None]
    + rows[:, :, x_high] * x_weight[None, None, :, None]
  )


class Preprocessor:
  """Stored clip -> model inputs; random augmentation when given a generator.

  Args:
    spec: the input settings.
    stats: normalisation statistics (their `mel` must equal `spec.mel`).
    storage_fps: frame rate of the stored frames.
    storage_sample_rate: sample rate of the stored audio.
  """

  def __init__(
    self,
    spec: InputSpec,
    stats: normalization.NormalizationStats,
    storage_fps: float,
    storage_sample_rate: int,
  ):
    if stats.mel != spec.mel:
      raise ValueError(
        f"Normalisation statistics were computed for log-mel settings "
        f"{stats.mel}, the input asks for {spec.mel}."
      )
    self.spec = spec
    self.storage_fps = storage_fps
    self.storage_sample_rate = storage_sample_rate
    self._video_mean = np.asarray(stats.video_mean, np.float32) * 255.0
    self._video_scale = 1.0 / (np.asarray(stats.video_std, np.float32) * 255.0)
    self._audio_mean = np.float32(stats.audio_mean)
    self._audio_scale = np.float32(1.0 / stats.audio_std)
    self._log_mels: held_source.HeldLogMels | None = None

  def frames_needed(self, num_frames: int) -> int:
    """Stored frames spanned by a window of `num_frames` input frames."""
    return round(num_frames / self.spec.fps * self.storage_fps)

  def window(
    self,
    frames: np.ndarray,
    audio: np.ndarray,
    rng: np.random.Generator | None,
    num_frames: int | None = None,
  ) -> tuple[np.ndarray, np.ndarray]:
    """The temporal crop: the frames and the audio of the same window of the clip.

    Args:
      frames: `[T_stored, H, W, 3]` uint8 at `storage_fps`.
      audio: `[S]` int16 (as stored) or float32 in [-1, 1], at `storage_sample_rate`.
      rng: None for the centred window; otherwise the window starts at a random stored frame.
      num_frames: input frames in the window (default `spec.num_frames`).

    Returns:
      `[num_frames, H, W, 3]` uint8 frames (every `storage_fps / fps`-th stored frame) and
      `[round(num_frames / fps * sample_rate)]` float32 audio at `spec.mel.sample_rate`,
      starting at the first frame's time.
    """
    num_frames = num_frames or self.spec.num_frames
    start = self._window_start(len(frames), num_frames, rng)
    return self._window_frames(frames, start, num_frames), self._window_audio(
      audio, start, num_frames
    )

  def _window_start(self, stored_frames: int, num_frames: int, rng) -> int:
    """The window's first stored frame: random with `rng`, else centred."""
    span = self.frames_needed(num_frames)
    if span > stored_frames:
      raise ValueError(
        f"A window of {num_frames} frames at {self.spec.fps} fps needs {span} stored frames "
        f"at {self.storage_fps} fps, the clip has {stored_frames}: prepare clips at least "
        f"{num_frames / self.spec.fps} s long, or lower input.num_frames."
      )
    latest_start = stored_frames - span
    return int(rng.integers(latest_start + 1)) if rng is not None else latest_start // 2

  def _window_frames(self, frames: np.ndarray, start: int, num_frames: int) -> np.ndarray:
    indices = start + np.round(np.arange(num_frames) * self.storage_fps / self.spec.fps)
    return frames[indices.astype(np.int64)]

  def _window_audio(self, audio: np.ndarray, start: int, num_frames: int) -> np.ndarray:
    sample_rate = self.spec.mel.sample_rate
    waveform = normalization.waveform_at_rate(audio, self.storage_sample_rate, sample_rate)
    first = round(start / self.storage_fps * sample_rate)
    count = round(num_frames / self.spec.fps * sample_rate)
    return np.pad(waveform[first : first + count], (0, max(0, first + count - len(waveform))))

  def keeping_log_mels(self, log_mels: held_source.HeldLogMels) -> Preprocessor:
    """This preprocessor, keeping the log-mel of each (clip, window) it computes in `log_mels`
    (for the calls given a `clip_id`)."""
    keeping = copy.copy(self)
    keeping._log_mels = log_mels
    return keeping

  def __call__(
    self,
    frames: np.ndarray,
    audio: np.ndarray,
    rng: np.random.Generator | None = None,
    num_frames: int | None = None,
    clip_id: Any = None,
  ) -> dict[str, np.ndarray]:
    """One view of a clip: `window`, then spatial crop, log-mel, normalisation, masks.

    Args:
      frames, audio, num_frames: as for `window` (a whole video's frame count embeds it in
        one window).
      rng: None for the deterministic eval view (centre crops, no flip, no masks); otherwise
        the source of every random choice.
      clip_id: what identifies the clip (its stored `id`): with `keeping_log_mels`, a window's
        log-mel is computed once per clip and start, then taken from memory.

    Returns:
      `video` float32 `[num_frames, frame_size, frame_size, 3]` and `audio` float32
      `[audio_frames, n_mels]`, both normalised.
    """
    num_frames = num_frames or self.spec.num_frames
    start = self._window_start(len(frames), num_frames, rng)
    frames = self._window_frames(frames, start, num_frames)
    video = (self._spatial(frames, rng) - self._video_mean) * self._video_scale

    def window_log_mel():
      return self.log_mel(self._window_audio(audio, start, num_frames))

    if self._log_mels is not None and clip_id is not None:
      log_mel = self._log_mels.get((clip_id, start, num_frames), window_log_mel)
    else:
      log_mel = window_log_mel()
    if rng is not None:
      log_mel = spectrogram.spec_augment(
        log_mel,
        rng,
        num_time_masks=self.spec.num_time_masks,
        max_time_width=self.spec.max_time_mask,
        num_freq_masks=self.spec.num_freq_masks,
        max_freq_width=self.spec.max_freq_mask,
      )
    # C order: the crop's fancy indexing and the flip leave strided views, and grain's worker
    # processes hand only C-contiguous arrays over in shared memory (others are pickled
    # through a pipe, which also keeps a worker from exiting when its iterator is closed).
    return {
      "video": np.ascontiguousarray(video, np.float32),
      "audio": np.ascontiguousarray(log_mel, np.float32),
    }

  def eval_frames(self, frames: np.ndarray) -> np.ndarray:
    """Input frames `[N, H, W, 3]` uint8 → their eval view (centre crop, normalised), float32
    `[N, frame_size, frame_size, 3]`: frame by frame, so a video can go through in chunks."""
    return ((self._spatial(frames, None) - self._video_mean) * self._video_scale).astype(np.float32)

  def log_mel(self, waveform: np.ndarray) -> np.ndarray:
    """Waveforms `[..., S]` float32 at `spec.mel.sample_rate` → normalised log-mel
    `[..., S // hop_length, n_mels]` float32."""
    log_mel = normalization.log_mel_transform(self.spec.mel)(waveform)
    return ((log_mel - self._audio_mean) * self._audio_scale).astype(np.float32)

  def _spatial(self, frames: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
    """Random resized crop + flip (train) or centre square crop (eval), to frame_size."""
    height, width = frames.shape[1:3]
    size = self.spec.frame_size
    if rng is None:
      side = min(height, width)
      return crop_and_resize(frames, (height - side) / 2, (width - side) / 2, side, side, size)
    area = height * width * rng.uniform(*self.spec.crop_scale)
    ratio = math.exp(rng.uniform(*np.log(self.spec.crop_ratio)))
    crop_height = min(height, math.sqrt(area / ratio))
    crop_width = min(width, math.sqrt(area * ratio))
    top = rng.uniform(0, height - crop_height)
    left = rng.uniform(0, width - crop_width)
    video = crop_and_resize(frames, top, left, crop_height, crop_width, size)
    if self.spec.flip and rng.random() < 0.5:
      video = video[:, :, ::-1]
    return video


def stored_labels(element: dict[str, Any]) -> np.ndarray:
  """Every class of a stored example, int32 `[L]` (a dataset of format 1 has only `label`)."""
  if "labels" in element:
    return np.asarray(element["labels"], np.int32)
  label = int(element["label"])
  return np.array([label] if label >= 0 else [], np.int32)


def label_fields(element: dict[str, Any], multi_hot_classes: int) -> dict[str, np.ndarray]:
  """A stored example's `label`, `has_audio` and (`multi_hot_classes` > 0) `labels` fields."""
  fields = {"label": np.int32(element["label"]), "has_audio": np.bool_(element["has_audio"])}
  if multi_hot_classes:
    fields["labels"] = np.zeros(multi_hot_classes, np.uint8)
    fields["labels"][stored_labels(element)] = 1
  return fields


class _TrainTransform(grain.transforms.RandomMap):
  """Stored example -> augmented training element (one or two views)."""

  def __init__(self, preprocessor: Preprocessor, multi_hot_classes: int):
    self._preprocessor = preprocessor
    self._multi_hot_classes = multi_hot_classes

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    view = self._preprocessor(element["frames"], element["audio"], rng, clip_id=element["id"])
    output = {
      "video": view["video"],
      "audio": view["audio"],
      **label_fields(element, self._multi_hot_classes),
      "mask": np.bool_(True),
    }
    if self._preprocessor.spec.two_views:
      second = self._preprocessor(element["frames"], element["audio"], rng, clip_id=element["id"])
      output["video_view2"] = second["video"]
      output["audio_view2"] = second["audio"]
    return output


def _read_options(spec: InputSpec) -> grain.ReadOptions:
  return grain.ReadOptions(
    num_threads=spec.read_threads, prefetch_buffer_size=spec.read_buffer_size
  )


def _with_workers(dataset: grain.IterDataset, spec: InputSpec, workers: int) -> grain.IterDataset:
  if workers == 0:
    return dataset
  if not flags.FLAGS.is_parsed():
    # grain's worker processes read grain's absl flags; outside an absl program (a notebook,
    # pytest) nobody parsed them, so take their defaults.
    flags.FLAGS.mark_as_parsed()
  return dataset.mp_prefetch(
    grain.MultiprocessingOptions(
      num_workers=workers, per_worker_buffer_size=spec.worker_buffer_size
    )
  )


def close(iterator: grain.DatasetIterator) -> None:
  """Stops an iterator's worker processes and releases the shared memory of its batches.

  Two things of grain's would otherwise outlive the iterator, and at exit Python's resource
  tracker reports what they hold as "leaked shared_memory objects": (1) its thread prefetch
  keeps the `StopIteration` it met at the end of the data, whose traceback's frame holds
  the last element it produced in a reference cycle, freed only by the cycle collector;
  (2) a batch's shared memory is unlinked on a background thread when the batch is deleted,
  which a program that ends soon after may not wait for.
  """
  iterator.close()
  gc.collect()
  # grain's deletion pool has one thread taking tasks in order: a task queued now runs
  # after every unlink queued before it.
  deletions = getattr(grain_multiprocessing.SharedMemoryArray, "_del_thread_pool", None)
  if deletions is not None:
    deletions.apply(int)


def _check_shard(batch_size: int, process_index: int, process_count: int) -> None:
  if batch_size <= 0:
    raise ValueError(f"The per-host batch size must be positive, got {batch_size}.")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in [0, {process_count}).")


@dataclasses.dataclass(frozen=True)
class Component:
  """One dataset of a training mixture: its train source, preprocessor and weight."""

  source: Sequence[dict[str, Any]]
  preprocessor: Preprocessor
  weight: float = 1.0


def train_dataset(
  source: Sequence[dict[str, Any]], preprocessor: Preprocessor, **kwargs
) -> grain.IterDataset:
  """The endless training stream of one dataset (`mixture_train_dataset` of one component).

  Args:
    source: a random-access source of stored examples (`PreparedDataset.source('train')`).
    preprocessor: turns stored clips into augmented model inputs.
    **kwargs: as for `mixture_train_dataset`.
  """
  return mixture_train_dataset([Component(source, preprocessor)], **kwargs)


def mixture_train_dataset(
  components: Sequence[Component],
  *,
  batch_size: int,
  seed: int,
  process_index: int = 0,
  process_count: int = 1,
  start_step: int = 0,
  multi_hot_classes: int = 0,
) -> grain.IterDataset:
  """The endless training stream of this host (see module docstring for the order).

  Args:
    components: the datasets drawn from, each with its own preprocessor (storage rates) and
      its weight (its share of the stream; one component: all of it).
    batch_size: this host's batch size (global batch / process_count).
    seed: shuffling and augmentation seed.
    process_index: this host's index.
    process_count: number of hosts.
    start_step: the first global batch to yield (to resume without a saved iterator state,
      e.g. after a change of host count).
    multi_hot_classes: C > 0 adds `labels` `[B, C]` (multi-label data).

  Returns:
    An IterDataset whose iterators support `get_state()` / `set_state()`.
  """
  _check_shard(batch_size, process_index, process_count)
  streams = []
  for index, component in enumerate(components):
    if len(component.source) == 0:
      raise ValueError(f"The training source of mixture component {index} is empty.")
    if component.weight <= 0:
      raise ValueError(
        f"Mixture weights must be positive; component {index} has {component.weight}."
      )
    source, log_mels = held_source.held_if_small(
      component.source, component.preprocessor.spec.cache_train_gib, log=logging.info
    )
    preprocessor = component.preprocessor
    if log_mels is not None:
      preprocessor = preprocessor.keeping_log_mels(log_mels)
    stream = grain.MapDataset.source(source).shuffle(seed=seed + index).repeat()
    transform = _TrainTransform(preprocessor, multi_hot_classes)
    streams.append(stream.random_map(transform, seed=seed + index))
  if len(streams) == 1:
    dataset = streams[0]
  else:
    dataset = grain.MapDataset.mix(streams, [component.weight for component in components])
  dataset = dataset[process_index::process_count].batch(batch_size, drop_remainder=True)
  dataset = dataset[start_step:]
  spec = components[0].preprocessor.spec
  return _with_workers(dataset.to_iter_dataset(_read_options(spec)), spec, spec.num_workers)


def num_eval_batches(num_examples: int, batch_size: int, process_count: int) -> int:
  """Batches every host yields for an eval split of `num_examples` (same on every host)."""
  return math.ceil(math.ceil(num_examples / process_count) / batch_size)


_PADDING = {"padding": True}


class _PaddedShard:
  """Host p's eval rows: examples p, p + P, ... then padding rows, `rows` in all."""

  def __init__(self, source, process_index: int, process_count: int, rows: int):
    self._source = source
    self._indices = range(process_index, len(source), process_count)
    self._rows = rows

  def __len__(self) -> int:
    return self._rows

  def __getitem__(self, row: int) -> dict[str, Any]:
    # A padding row is a marker dict, not None: grain drops None elements as filtered.
    return self._source[self._indices[row]] if row < len(self._indices) else _PADDING


class _EvalTransform(grain.transforms.Map):
  """Stored example (or `_PADDING`) -> deterministic eval element with metadata."""

  def __init__(self, preprocessor: Preprocessor, multi_hot_classes: int):
    self._preprocessor = preprocessor
    self._multi_hot_classes = multi_hot_classes

  def map(self, element: dict[str, Any]) -> dict[str, Any]:
    if "padding" in element:
      padding = padding_rows(self._preprocessor.spec, 1, self._multi_hot_classes)
      return {key: value[0] for key, value in padding.items()}
    view = self._preprocessor(element["frames"], element["audio"])
    return {
      "video": view["video"],
      "audio": view["audio"],
      **label_fields(element, self._multi_hot_classes),
      "mask": np.bool_(True),
      "id": np.str_(text(element["id"])),
      "source": np.str_(text(element["source"])),
      "start": np.float32(element["start"]),
    }


def padding_rows(spec: InputSpec, rows: int, multi_hot_classes: int = 0) -> dict[str, np.ndarray]:
  """`rows` eval rows that count for nothing: zeros, `mask` False, label -1, empty id."""
  padding = {
    "video": np.zeros((rows, spec.num_frames, spec.frame_size, spec.frame_size, 3), np.float32),
    "audio": np.zeros((rows, spec.audio_frames, spec.mel.n_mels), np.float32),
    "label": np.full(rows, -1, np.int32),
    "has_audio": np.zeros(rows, bool),
    "mask": np.zeros(rows, bool),
    "id": np.full(rows, "", dtype=np.str_),
    "source": np.full(rows, "", dtype=np.str_),
    "start": np.zeros(rows, np.float32),
  }
  if multi_hot_classes:
    padding["labels"] = np.zeros((rows, multi_hot_classes), np.uint8)
  return padding


def text(value: bytes | str) -> str:
  """A stored string field (TFDS gives bytes) as str."""
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def eval_dataset(
  source: Sequence[dict[str, Any]],
  preprocessor: Preprocessor,
  *,
  batch_size: int,
  process_index: int = 0,
  process_count: int = 1,
  multi_hot_classes: int = 0,
) -> grain.IterDataset:
  """One deterministic pass over this host's share of a split, padded to whole batches.

  Host p gets examples p, p + P, ...; every host yields `num_eval_batches(...)` batches, the
  rows past its share being padding (`mask` False, zeros, label -1, empty id), so that every
  example counts exactly once over all hosts. `multi_hot_classes` C > 0 adds `labels`.
  """
  _check_shard(batch_size, process_index, process_count)
  rows = num_eval_batches(len(source), batch_size, process_count) * batch_size
  dataset = grain.MapDataset.source(_PaddedShard(source, process_index, process_count, rows))
  dataset = dataset.map(_EvalTransform(preprocessor, multi_hot_classes)).batch(batch_size)
  spec = preprocessor.spec
  return _with_workers(dataset.to_iter_dataset(_read_options(spec)), spec, spec.eval_num_workers)


def file_elements(
  path: epath.PathLike,
  preprocessor: Preprocessor,
  storage: dataset_writer.StorageSpec,
  *,
  source: str | None = None,
  whole_video: bool = False,
) -> list[dict[str, Any]]:
  """Eval elements of a video file, without preparing a dataset (export from raw files).

  The file is decoded and stored exactly as `prepare` would (fps, size, int16 audio), then
  given the eval view, so that an element equals the eval pipeline's element for the same
  clip of a prepared dataset.

  Args:
    path: the video file.
    preprocessor: the eval preprocessing (its `storage_fps` / `storage_sample_rate` must be
      `storage.fps` / `storage.sample_rate`).
    storage: how clips are cut and stored (the dataset settings the model was trained with).
    source: the `source` recorded in the elements (default: the path as given).
    whole_video: one element covering the whole file (as many input frames as it holds)
      instead of one per clip window.

  Returns:
    Unbatched elements with the eval batch keys (`label` -1: unknown).

  Raises:
    video_io.VideoReadError: the file cannot be used (see video_io).
  """
  if (preprocessor.storage_fps, preprocessor.storage_sample_rate) != (
    storage.fps,
    storage.sample_rate,
  ):
    raise ValueError(
      f"The preprocessor expects {preprocessor.storage_fps} fps and "
      f"{preprocessor.storage_sample_rate} Hz storage, not {storage}."
    )
  source = os.fspath(path) if source is None else source
  video = video_io.decode_video(
    path,
    fps=storage.fps,
    short_side=storage.short_side,
    sample_rate=storage.sample_rate,
    require_audio=not storage.keep_audioless,
  )
  if whole_video:
    num_frames = math.floor(len(video.frames) / storage.fps * preprocessor.spec.fps)
    clips = [video_io.Clip(start=0.0, frames=video.frames, audio=video.audio)]
  else:
    num_frames = None
    clips = list(video_io.iter_clips(video, storage.clip_seconds, storage.stride_seconds))
  elements = []
  for clip in clips:
    num_samples = round(len(clip.frames) / storage.fps * storage.sample_rate)
    audio = dataset_writer.stored_audio(clip.audio, num_samples)
    view = preprocessor(clip.frames, audio, num_frames=num_frames)
    elements.append(
      {
        "video": view["video"],
        "audio": view["audio"],
        "label": np.int32(-1),
        "has_audio": np.bool_(clip.audio is not None),
        "mask": np.bool_(True),
        "id": np.str_(f"{source}@{clip.start:.3f}"),
        "source": np.str_(source),
        "start": np.float32(clip.start),
      }
    )
  return elements
