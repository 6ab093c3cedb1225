"""Dataset-level normalisation statistics: frame mean/std per channel, log-mel mean/std.

They are computed once over the train split when a dataset is prepared, stored beside it (in
the TFDS `metadata.json`), passed into the input pipeline, and saved by the trainer with its
checkpoints (`to_dict` / `from_dict`), so that a model embeds any other dataset with the
statistics it was trained with.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable
from collections.abc import Sequence
from typing import Any

import librosa
import numpy as np

from cmvt_jax.data import spectrogram


@dataclasses.dataclass(frozen=True)
class NormalizationStats:
  """Means and standard deviations the pipeline normalises with.

  Attributes:
    video_mean: per RGB channel, of frames scaled to [0, 1].
    video_std: per RGB channel, likewise.
    audio_mean: of log-mel values (see `spectrogram.LogMel`).
    audio_std: likewise.
    mel: the log-mel settings `audio_mean`/`audio_std` were computed with; they describe
      another spectrogram when the pipeline's settings differ.
  """

  video_mean: tuple[float, float, float]
  video_std: tuple[float, float, float]
  audio_mean: float
  audio_std: float
  mel: spectrogram.MelSettings

  def to_dict(self) -> dict[str, Any]:
    """A JSON-serialisable dict (plain floats, ints, lists)."""
    return {
      "video_mean": list(self.video_mean),
      "video_std": list(self.video_std),
      "audio_mean": self.audio_mean,
      "audio_std": self.audio_std,
      "mel": dataclasses.asdict(self.mel),
    }

  @classmethod
  def from_dict(cls, values: dict[str, Any]) -> NormalizationStats:
    return cls(
      video_mean=tuple(float(x) for x in values["video_mean"]),
      video_std=tuple(float(x) for x in values["video_std"]),
      audio_mean=float(values["audio_mean"]),
      audio_std=float(values["audio_std"]),
      mel=spectrogram.MelSettings(**values["mel"]),
    )


@functools.lru_cache(maxsize=4)
def log_mel_transform(settings: spectrogram.MelSettings) -> spectrogram.LogMel:
  """One `LogMel` per settings per process (building the filterbank costs milliseconds)."""
  return spectrogram.LogMel(settings)


@dataclasses.dataclass
class StatsAccumulator:
  """Running sums over clips; accumulators of disjoint clips merge by `merge`.

  Frames are `[T, H, W, 3]` uint8; waveforms `[S]` float32 at `mel.sample_rate`, or None for
  a clip without audio (its frames still count).
  """

  mel: spectrogram.MelSettings
  pixel_count: int = 0
  pixel_sum: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(3))
  pixel_square_sum: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(3))
  mel_count: int = 0
  mel_sum: float = 0.0
  mel_square_sum: float = 0.0

  def add(self, frames: np.ndarray, waveform: np.ndarray | None) -> None:
    pixels = frames.reshape(-1, 3).astype(np.float64) / 255.0
    self.pixel_count += len(pixels)
    self.pixel_sum += pixels.sum(axis=0)
    self.pixel_square_sum += np.square(pixels).sum(axis=0)
    if waveform is not None:
      log_mel = log_mel_transform(self.mel)(waveform).astype(np.float64)
      self.mel_count += log_mel.size
      self.mel_sum += float(log_mel.sum())
      self.mel_square_sum += float(np.square(log_mel).sum())

  def merge(self, other: StatsAccumulator) -> None:
    if other.mel != self.mel:
      raise ValueError(
        f"Cannot merge statistics of different mel settings: {self.mel} vs {other.mel}."
      )
    self.pixel_count += other.pixel_count
    self.pixel_sum += other.pixel_sum
    self.pixel_square_sum += other.pixel_square_sum
    self.mel_count += other.mel_count
    self.mel_sum += other.mel_sum
    self.mel_square_sum += other.mel_square_sum

  def result(self) -> NormalizationStats:
    """The statistics; raises ValueError when no clip was added."""
    if self.pixel_count == 0:
      raise ValueError("No clip was seen: cannot compute normalisation statistics.")
    video_mean = self.pixel_sum / self.pixel_count
    video_std = _std(self.pixel_square_sum / self.pixel_count, video_mean)
    if self.mel_count:
      audio_mean = self.mel_sum / self.mel_count
      audio_std = float(_std(self.mel_square_sum / self.mel_count, audio_mean))
    else:  # every clip silent: normalising is then a no-op
      audio_mean, audio_std = 0.0, 1.0
    return NormalizationStats(
      video_mean=tuple(float(x) for x in video_mean),
      video_std=tuple(float(x) for x in video_std),
      audio_mean=float(audio_mean),
      audio_std=audio_std,
      mel=self.mel,
    )


def mixture(
  stats: Sequence[NormalizationStats],
  video_weights: Sequence[float],
  audio_weights: Sequence[float],
) -> NormalizationStats:
  """The statistics of a mixture of datasets, from each one's: the mean and standard
  deviation of a mixture distribution, its first two moments being the weighted means of the
  components' (`E[x²] = Σ wᵢ (σᵢ² + μᵢ²)`).

  Args:
    stats: each component's statistics (the same `mel` settings).
    video_weights: each component's share of the mixture's clips.
    audio_weights: each component's share of the mixture's clips with audio (its clip share
      times the fraction of its clips that have audio).
  """
  if len({item.mel for item in stats}) != 1:
    raise ValueError("Mixture components' statistics must share their log-mel settings.")

  def moments(means, stds, weights):
    weights = np.asarray(weights, np.float64) / np.sum(weights)
    means, stds = np.asarray(means, np.float64), np.asarray(stds, np.float64)
    mean = np.tensordot(weights, means, axes=1)
    square = np.tensordot(weights, np.square(stds) + np.square(means), axes=1)
    return mean, _std(square, mean)

  video_mean, video_std = moments(
    [item.video_mean for item in stats], [item.video_std for item in stats], video_weights
  )
  if sum(audio_weights) > 0:
    audio_mean, audio_std = moments(
      [item.audio_mean for item in stats], [item.audio_std for item in stats], audio_weights
    )
  else:  # no component has audio: normalising is then a no-op
    audio_mean, audio_std = 0.0, 1.0
  return NormalizationStats(
    video_mean=tuple(float(x) for x in video_mean),
    video_std=tuple(float(x) for x in video_std),
    audio_mean=float(audio_mean),
    audio_std=float(audio_std),
    mel=stats[0].mel,
  )


def _std(mean_of_squares, mean):
  # Floors the std so that a constant channel normalises to 0 instead of dividing by zero.
  return np.maximum(np.sqrt(np.maximum(mean_of_squares - np.square(mean), 0.0)), 1e-6)


def compute_stats(
  examples: Iterable[dict[str, Any]], mel: spectrogram.MelSettings, storage_sample_rate: int
) -> NormalizationStats:
  """Statistics of stored examples (`frames`, `audio` int16, `has_audio`), for `mel`.

  Used when the pipeline asks for log-mel settings other than those stored with the dataset.
  """
  accumulator = StatsAccumulator(mel)
  for example in examples:
    waveform = None
    if example["has_audio"]:
      waveform = waveform_at_rate(example["audio"], storage_sample_rate, mel.sample_rate)
    accumulator.add(example["frames"], waveform)
  return accumulator.result()


def waveform_at_rate(audio: np.ndarray, audio_sample_rate: int, sample_rate: int) -> np.ndarray:
  """`[S]` int16 (as stored; value / 32768) or float audio -> float32 at `sample_rate`."""
  if audio.dtype == np.int16:
    waveform = audio.astype(np.float32)
    waveform /= 32768.0  # in place: a whole film's audio is hundreds of MB
  else:
    waveform = np.asarray(audio, np.float32)
  if sample_rate != audio_sample_rate:
    waveform = librosa.resample(waveform, orig_sr=audio_sample_rate, target_sr=sample_rate)
  return waveform
