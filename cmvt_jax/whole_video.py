"""One video of any length through the model: a whole-video embedding and per-moment ones.

A video arrives as a stream of stored frames (`video_io.VideoStream`: a file decoded as it is
read; or a prepared split's clips put back on one timeline) and its stored audio. Host memory
holds one chunk of decoded frames, the per-frame features `[T, D_f]` and the audio; devices
hold one pass of the temporal encoder and of the audio tower (`embedding.WholeVideoEmbedder`).

  stored frames (storage fps) ──every (storage fps / fps)-th── input frames at `input.fps`
    → eval view (centre crop, normalised) in chunks → frame encoder → features [T, D_f]
  whole video:  features → temporal encoder (one pass)      → `video` [E]
                log-mel of the whole audio → audio tower     → `audio` [E]
  moments:      every `moment_seconds`, the window [t, t + window) embedded exactly as a
                training clip of that window is (its frames' features, its audio's log-mel),
                in batches; windows that run past the end embed the part that exists (masked).

Input frame k is stored frame round(k · storage_fps / fps), so a moment's window starting at
input frame f holds the same frames as a clip cut at f / fps. Before decoding, a memory guard
compares what the video needs (from its declared duration: the whole-video program's buffers
as XLA assigns them, plus the host's features and audio) with the limit, and a video that
cannot fit is skipped (`TooLongError`) instead of failing the export.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable
from collections.abc import Iterator

import numpy as np
from etils import epath

from cmvt_jax import embedding
from cmvt_jax.data import dataset_writer
from cmvt_jax.data import normalization
from cmvt_jax.data import pipeline
from cmvt_jax.data import video_io

_GIB = 1 << 30


class TooLongError(video_io.VideoReadError):
  """The video needs more memory than the export may use."""

  reason = "over the memory limit"


@dataclasses.dataclass(frozen=True)
class Embedded:
  """One video's embeddings.

  Attributes:
    num_frames: input frames T.
    video, audio: `[E]` float32, L2-normalised: the whole video.
    moment_time: `[M]` float32, seconds from the start to each moment's window.
    moment_video, moment_audio: `[M, E]` float32, L2-normalised.
  """

  num_frames: int
  video: np.ndarray
  audio: np.ndarray
  moment_time: np.ndarray
  moment_video: np.ndarray
  moment_audio: np.ndarray


class VideoEmbedder:
  """Streams videos through a `embedding.WholeVideoEmbedder` (see the module docstring).

  Args:
    embedder: the device programs.
    preprocessor: the eval preprocessing (its storage rates are the stored frames' and audio's).
    moment_seconds: the moment grid's step; 0 for no moments.
    memory_limit_bytes: what one video may need (device programs + host arrays).
  """

  def __init__(
    self,
    embedder: embedding.WholeVideoEmbedder,
    preprocessor: pipeline.Preprocessor,
    *,
    moment_seconds: float,
    memory_limit_bytes: int,
  ):
    if not 0 <= moment_seconds < math.inf:
      raise ValueError(f"export.moment_seconds must be >= 0; got {moment_seconds}.")
    self.embedder, self.preprocessor = embedder, preprocessor
    self.spec = preprocessor.spec
    self.moment_seconds = moment_seconds
    self.memory_limit_bytes = memory_limit_bytes
    self._ratio = preprocessor.storage_fps / self.spec.fps
    self._feature_dim = None

  # --- memory guard

  def memory_needed(self, seconds: float) -> int:
    """Bytes a video of `seconds` needs at its peak: the whole-video program's device
    buffers, plus the host's features, audio (stored, resampled, log-mel) and one chunk."""
    spec, mel = self.spec, self.spec.mel
    frames = max(1, math.floor(seconds * spec.fps))
    audio_frames = max(1, mel.num_frames(round(seconds * mel.sample_rate)))
    device = self.embedder.whole_video_bytes(frames, audio_frames, mel.n_mels, self.feature_dim)
    stored_samples = seconds * self.preprocessor.storage_sample_rate
    host = (
      frames * self.feature_dim * 4 * 2  # features, and their padded copy
      + stored_samples * (4 + 2)  # decoded float32 and stored int16 audio
      + seconds * mel.sample_rate * 4  # audio at the log-mel's rate
      + audio_frames * mel.n_mels * 4 * 2  # log-mel, and its padded copy
      + self.embedder.chunk_frames * spec.frame_size**2 * 3 * 4 * 2
    )
    return int(device + host)

  def check_fits(self, path: epath.PathLike, seconds: float | None) -> None:
    """Raises `TooLongError` when a video of `seconds` (None: unknown) cannot fit."""
    if seconds is None:
      return
    needed = self.memory_needed(seconds)
    if needed > self.memory_limit_bytes:
      raise TooLongError(
        path,
        f"{seconds:.0f} s at {self.spec.fps} fps needs {needed / _GIB:.2f} GiB, more than the "
        f"{self.memory_limit_bytes / _GIB:.2f} GiB export.memory_limit_gib allows; raise it, "
        "lower input.fps, or export per clip (--config.export.whole_video=False)",
      )

  @property
  def feature_dim(self) -> int:
    """D_f, the frame encoder's output width (found by encoding one blank chunk)."""
    if self._feature_dim is None:
      blank = np.zeros((1, self.spec.frame_size, self.spec.frame_size, 3), np.float32)
      self._feature_dim = self.embedder.encode_frames(blank).shape[1]
    return self._feature_dim

  # --- embedding

  def embed_file(self, path: epath.PathLike, storage: dataset_writer.StorageSpec) -> Embedded:
    """A video file, decoded as it streams with `storage`'s settings (those of the model's
    training data).

    Raises:
      video_io.VideoReadError: the file cannot be used, or (`TooLongError`) cannot fit.
    """
    with video_io.VideoStream(
      path,
      fps=storage.fps,
      short_side=storage.short_side,
      sample_rate=storage.sample_rate,
      require_audio=not storage.keep_audioless,
    ) as stream:
      self.check_fits(path, stream.declared_seconds)
      stored_chunk = max(1, math.ceil(self.embedder.chunk_frames * self._ratio))
      checked = math.floor((stream.declared_seconds or 0) * self.spec.fps)
      features = self._features(stream.frames(stored_chunk), path, checked)
    end, stream.end = stream.end, None
    samples = round(end.num_frames / storage.fps * storage.sample_rate)
    audio = dataset_writer.stored_audio(end.audio, samples)
    num_frames = end.num_frames
    del end  # its float32 audio (230 MB an hour) is not needed once stored
    return self._embed(features, num_frames, audio, path)

  def embed_stored(self, frames: np.ndarray, audio: np.ndarray, source: str) -> Embedded:
    """A video already decoded and stored: uint8 frames `[N, H, W, 3]` at the storage fps,
    int16 audio `[S]` at the storage sample rate (a prepared split's clips put together)."""
    seconds = len(frames) / self.preprocessor.storage_fps
    self.check_fits(source, seconds)
    chunk = max(1, math.ceil(self.embedder.chunk_frames * self._ratio))
    chunks = (frames[first : first + chunk] for first in range(0, len(frames), chunk))
    features = self._features(chunks, source, math.floor(seconds * self.spec.fps))
    return self._embed(features, len(frames), audio, source)

  def _features(self, stored_chunks: Iterable[np.ndarray], path, checked: int) -> np.ndarray:
    """Features `[T', D_f]` of the input frames among the stored chunks (T' may exceed the
    usable T by the frames past a shorter audio stream), a chunk at a time; `checked` input
    frames are known to fit (headers that did not say get a first check at 16 chunks)."""
    chunk_frames = self.embedder.chunk_frames
    pending, parts, stored, taken = [], [], 0, 0
    checked = max(checked, 8 * chunk_frames)
    for chunk in stored_chunks:
      indices = self._input_frames_in(stored, stored + len(chunk), taken)
      if len(indices):
        pending.append(self.preprocessor.eval_frames(chunk[indices - stored]))
        taken += len(indices)
      stored += len(chunk)
      while sum(map(len, pending)) >= chunk_frames:
        batch = np.concatenate(pending)
        parts.append(self.embedder.encode_frames(batch[:chunk_frames]))
        pending = [batch[chunk_frames:]]
      if taken > 2 * checked:
        # Headers that did not say (or understated) the length: check as it doubles.
        self.check_fits(path, taken / self.spec.fps)
        checked = taken
    if sum(map(len, pending)):
      parts.append(self.embedder.encode_frames(np.concatenate(pending)))
    return np.concatenate(parts) if parts else np.zeros((0, self.feature_dim), np.float32)

  def embed_range(
    self,
    path: epath.PathLike,
    storage: dataset_writer.StorageSpec,
    *,
    modality: str,
    start: float | None = None,
    end: float | None = None,
  ) -> np.ndarray:
    """One modality of [start, end) of a media file (None: its start / end), embedded in one
    pass as a clip of that length (exactly a training clip's when it is one window long):
    `[E]` float32, L2-normalised. An audio query may be any file with an audio stream.

    Raises:
      video_io.VideoReadError: the file cannot be used.
      ValueError: the range is empty or outside the file.
    """
    spec = self.spec
    if modality == "audio":
      return self.embed_audio_range(self.read_audio(path, storage), start, end, path)
    if modality != "video":
      raise ValueError(f"modality must be 'audio' or 'video'; got {modality!r}.")
    with video_io.VideoStream(
      path,
      fps=storage.fps,
      short_side=storage.short_side,
      sample_rate=storage.sample_rate,
      require_audio=False,
    ) as stream:
      self.check_fits(path, stream.declared_seconds)
      stored_chunk = max(1, math.ceil(self.embedder.chunk_frames * self._ratio))
      checked = math.floor((stream.declared_seconds or 0) * spec.fps)
      features = self._features(stream.frames(stored_chunk), path, checked)
      num_frames = self._input_frames(stream.end.num_frames, path)
    first, last = _range(path, start, end, num_frames / spec.fps)
    first_frame = min(round(first * spec.fps), num_frames - 1)
    last_frame = max(min(round(last * spec.fps), num_frames), first_frame + 1)
    return self.embedder.embed_video_features(features[first_frame:last_frame])

  def read_audio(self, path: epath.PathLike, storage: dataset_writer.StorageSpec) -> np.ndarray:
    """A media file's audio as the model hears it: stored (int16 at the storage rate, as
    `prepare` stores it), then at the log-mel's rate, float32 `[S]`."""
    decoded = video_io.decode_audio(path, sample_rate=storage.sample_rate)
    stored = dataset_writer.stored_audio(decoded, len(decoded))
    return normalization.waveform_at_rate(stored, storage.sample_rate, self.spec.mel.sample_rate)

  def embed_audio_range(
    self, waveform: np.ndarray, start: float | None, end: float | None, path="the audio"
  ) -> np.ndarray:
    """[start, end) of a `read_audio` waveform → its audio embedding `[E]` (one pass)."""
    rate = self.spec.mel.sample_rate
    first, last = _range(path, start, end, len(waveform) / rate)
    segment = waveform[round(first * rate) : round(last * rate)]
    if len(segment) < self.spec.mel.hop_length:
      raise ValueError(f"{path}: [{first}, {last}) s holds less than one log-mel frame.")
    return self.embedder.embed_log_mel(self.preprocessor.log_mel(segment))

  def _input_frames(self, stored_frames: int, path) -> int:
    """Input frames T of `stored_frames` stored ones.

    Raises:
      video_io.EmptyVideoError: none (a stored frame or two, but no input frame; an export
        skips such a file as it skips an empty one).
    """
    num_frames = math.floor(stored_frames / self.preprocessor.storage_fps * self.spec.fps)
    if num_frames < 1:
      raise video_io.EmptyVideoError(
        path,
        f"the usable part ({stored_frames} frame(s) at {self.preprocessor.storage_fps:g} fps) "
        f"is shorter than one input frame at {self.spec.fps:g} fps ({1 / self.spec.fps:g} s)",
      )
    return num_frames

  def _input_frames_in(self, first: int, end: int, taken: int) -> np.ndarray:
    """Indices (stored) in [first, end) of input frames taken, taken + 1, ..."""
    count = math.floor(end / self._ratio) + 1
    indices = np.round(np.arange(taken, count) * self._ratio).astype(np.int64)
    return indices[(indices >= first) & (indices < end)]

  def _embed(
    self, features: np.ndarray, stored_frames: int, stored_audio: np.ndarray, path
  ) -> Embedded:
    spec = self.spec
    num_frames = self._input_frames(stored_frames, path)
    features = features[:num_frames]
    self.check_fits(path, num_frames / spec.fps)
    sample_rate = spec.mel.sample_rate
    waveform = normalization.waveform_at_rate(
      stored_audio, self.preprocessor.storage_sample_rate, sample_rate
    )
    samples = round(num_frames / spec.fps * sample_rate)
    waveform = video_io.fit_length(waveform, samples)
    whole = self.embedder.embed_whole(features, self.preprocessor.log_mel(waveform))
    moments = self._moments(features, waveform)
    return Embedded(num_frames=num_frames, video=whole["video"], audio=whole["audio"], **moments)

  def _moments(self, features: np.ndarray, waveform: np.ndarray) -> dict[str, np.ndarray]:
    """Moment windows every `moment_seconds` from 0 while one lies inside the video."""
    spec, mel = self.spec, self.spec.mel
    dim = self.embedder.model.embed_dim
    if not self.moment_seconds:
      empty = np.zeros((0, dim), np.float32)
      return {"moment_time": np.zeros(0, np.float32), "moment_video": empty, "moment_audio": empty}
    starts = moment_starts(len(features), spec.fps, self.moment_seconds)
    window, window_samples = spec.num_frames, round(spec.window_seconds * mel.sample_rate)
    videos, audios = [], []
    for first in range(0, len(starts), self.embedder.window_batch):
      batch = starts[first : first + self.embedder.window_batch]
      frames = batch[:, None] + np.arange(window)[None]
      frame_mask = frames < len(features)
      window_features = features[np.minimum(frames, len(features) - 1)] * frame_mask[..., None]
      samples = np.round(batch / spec.fps * mel.sample_rate).astype(np.int64)
      positions = samples[:, None] + np.arange(window_samples)[None]
      window_audio = np.where(
        positions < len(waveform), waveform[np.minimum(positions, len(waveform) - 1)], 0.0
      ).astype(np.float32)
      # A window past the end: the log-mel frames of the samples that exist are those of the
      # shorter signal (the STFT zero-pads either way); the rest is masked.
      valid = np.clip(len(waveform) - samples, 0, window_samples) // mel.hop_length
      log_mel = self.preprocessor.log_mel(window_audio)
      audio_mask = np.arange(log_mel.shape[1])[None] < np.maximum(valid, 1)[:, None]
      out = self.embedder.embed_windows(window_features, frame_mask, log_mel, audio_mask)
      videos.append(out["video"])
      audios.append(out["audio"])
    return {
      "moment_time": (starts / spec.fps).astype(np.float32),
      "moment_video": np.concatenate(videos),
      "moment_audio": np.concatenate(audios),
    }


def moment_starts(num_frames: int, fps: float, moment_seconds: float) -> np.ndarray:
  """Input-frame indices `[M]` where moments start: the frame nearest each multiple of
  `moment_seconds`, from 0 while it lies inside the video's `num_frames` frames."""
  count = math.ceil(num_frames / fps / moment_seconds - 1e-9)
  starts = np.round(np.arange(max(count, 1)) * moment_seconds * fps).astype(np.int64)
  return np.unique(starts[starts < num_frames])


def iter_embedded(
  embedder: VideoEmbedder, files: Iterable[tuple[epath.Path, str]], storage
) -> Iterator[tuple[str, Embedded | video_io.VideoReadError]]:
  """(source, embeddings or the error that skips it) of each video file in turn."""
  for path, source in files:
    try:
      yield source, embedder.embed_file(path, storage)
    except video_io.VideoReadError as error:
      yield source, error


def memory_available(device) -> int:
  """Bytes a whole video may use on `device`: an accelerator's memory, or on a CPU the host
  memory available now (its devices are the host)."""
  stats = device.memory_stats() if device.platform != "cpu" else None
  if stats and "bytes_limit" in stats:
    return int(stats["bytes_limit"])
  with open("/proc/meminfo") as meminfo:
    for line in meminfo:
      if line.startswith("MemAvailable:"):
        return int(line.split()[1]) * 1024
  return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _range(path, start: float | None, end: float | None, duration: float) -> tuple[float, float]:
  """[start, end) checked against a file of `duration` seconds (None: the file's ends)."""
  first = 0.0 if start is None else float(start)
  last = duration if end is None else float(end)
  if not 0 <= first < last:
    raise ValueError(f"{path}: the range [{first}, {last}) s is empty or starts before 0.")
  if last > duration + 1e-3:
    raise ValueError(
      f"{path}: the range [{first}, {last}) s lies outside the file, which lasts {duration:.2f} s."
    )
  return first, min(last, duration)
