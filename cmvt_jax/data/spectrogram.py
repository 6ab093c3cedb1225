"""Log-mel spectrograms (librosa) and SpecAugment, computed on the host.

A log-mel is `[frames, n_mels]` float32 (time first, like the video's `[T, ...]`): the natural
log of mel power plus `LOG_FLOOR`, frames every `hop_length` samples, `len(waveform) //
hop_length` of them (librosa's centred STFT frames, without the one that starts past the end),
so that a clip of `clip_seconds` always gives the same number of frames.
"""

from __future__ import annotations

import dataclasses

# librosa's submodules load lazily (lazy_loader parses a stub with `ast`): `librosa.filters`
# is imported here, at import, so that the first LogMel built in a grain reader thread does not
# parse it there: CPython 3.11's parser can fail with "AST constructor recursion depth
# mismatch" when threads parse at once (python/cpython#106905).
import librosa
import librosa.filters
import numpy as np
import scipy.fft
from scipy import sparse

# Added to the mel power before the log: silence maps to log(1e-6) ~ -13.8 instead of -inf.
LOG_FLOOR = 1e-6


@dataclasses.dataclass(frozen=True)
class MelSettings:
  """Everything that fixes what a log-mel looks like."""

  sample_rate: int
  n_fft: int
  hop_length: int
  n_mels: int
  fmin: float
  fmax: float

  def __post_init__(self):
    if not 0 <= self.fmin < self.fmax <= self.sample_rate / 2:
      raise ValueError(
        f"Mel range must satisfy 0 <= fmin < fmax <= sample_rate / 2, got fmin={self.fmin}, "
        f"fmax={self.fmax}, sample_rate={self.sample_rate}."
      )
    if self.hop_length <= 0 or self.n_fft <= 0 or self.n_mels <= 0:
      raise ValueError(f"n_fft, hop_length and n_mels must be positive: {self}.")

  @classmethod
  def from_config(cls, input_config) -> MelSettings:
    """From the config's `input` section."""
    return cls(
      sample_rate=int(input_config.sample_rate),
      n_fft=int(input_config.n_fft),
      hop_length=int(input_config.hop_length),
      n_mels=int(input_config.n_mels),
      fmin=float(input_config.fmin),
      fmax=float(input_config.fmax),
    )

  def num_frames(self, num_samples: int) -> int:
    """Log-mel frames of a waveform of `num_samples` samples."""
    return num_samples // self.hop_length


# Log-mel frames transformed at once (a block's spectrum: ~16 MB at n_fft=1024).
_FRAMES_PER_BLOCK = 4096


class LogMel:
  """Waveforms `[..., S]` float -> log-mel `[..., S // hop_length, n_mels]` float32.

  Equal (to float32 rounding) to `log(librosa.feature.melspectrogram(...) + LOG_FLOOR)` with
  the same settings (power 2, periodic Hann window, centred frames, zero padding), transposed
  and cut to S // hop_length frames. The STFT is computed here, vectorised over leading axes,
  with librosa's window and mel filterbank: librosa.stft's per-call overhead is as large as
  the transform itself for 2-second clips.
  """

  def __init__(self, settings: MelSettings):
    self.settings = settings
    self._window = librosa.filters.get_window("hann", settings.n_fft, fftbins=True).astype(
      np.float32
    )
    # Sparse (each filter spans a few FFT bins): the product then also stays off multithreaded
    # BLAS, whose threads stall for milliseconds per call on a busy 2-core host.
    self._mel_basis_transposed = sparse.csr_matrix(
      librosa.filters.mel(
        sr=settings.sample_rate,
        n_fft=settings.n_fft,
        n_mels=settings.n_mels,
        fmin=settings.fmin,
        fmax=settings.fmax,
      )
      .astype(np.float32)
      .T
    )

  def __call__(self, waveform: np.ndarray) -> np.ndarray:
    waveform = np.asarray(waveform, np.float32)
    if waveform.ndim < 1:
      raise ValueError(f"Expected waveforms [..., S], got shape {waveform.shape}.")
    n_fft, hop = self.settings.n_fft, self.settings.hop_length
    num_frames = self.settings.num_frames(waveform.shape[-1])
    padded = np.pad(waveform, [(0, 0)] * (waveform.ndim - 1) + [(n_fft // 2, n_fft // 2)])
    frames = np.lib.stride_tricks.sliding_window_view(padded, n_fft, axis=-1)
    frames = frames[..., : num_frames * hop : hop, :]  # [..., num_frames, n_fft], a view
    log_mel = np.empty(frames.shape[:-1] + (self.settings.n_mels,), np.float32)
    # Frames are transformed a block at a time: an hour's spectrum at once would be GiBs.
    for first in range(0, num_frames, _FRAMES_PER_BLOCK):
      block = slice(first, first + _FRAMES_PER_BLOCK)
      log_mel[..., block, :] = self._log_mel(frames[..., block, :])
    return log_mel

  def _log_mel(self, frames: np.ndarray) -> np.ndarray:
    """`[..., F, n_fft]` windows → `[..., F, n_mels]` float32."""
    spectrum = scipy.fft.rfft(frames * self._window, axis=-1)
    power = np.square(spectrum.real) + np.square(spectrum.imag)
    mel = power.reshape(-1, power.shape[-1]) @ self._mel_basis_transposed
    mel = np.asarray(mel).reshape(power.shape[:-1] + (self.settings.n_mels,))
    return np.log(mel + LOG_FLOOR).astype(np.float32)


def spec_augment(
  log_mel: np.ndarray,
  rng: np.random.Generator,
  *,
  num_time_masks: int,
  max_time_width: int,
  num_freq_masks: int,
  max_freq_width: int,
  fill_value: float = 0.0,
) -> np.ndarray:
  """SpecAugment time and frequency masking (Park et al., 2019), without time warping.

  Args:
    log_mel: `[frames, n_mels]`; not modified.
    rng: the source of randomness (the pipeline passes grain's per-element generator).
    num_time_masks: how many time masks; each covers `w ~ U{0..max_time_width}` consecutive
      frames starting at `U{0..frames - w}`.
    max_time_width: widest time mask (clipped to the number of frames).
    num_freq_masks: how many frequency masks, likewise over mel bins.
    max_freq_width: widest frequency mask (clipped to n_mels).
    fill_value: what masked cells become (0 = the mean once normalised).

  Returns:
    A masked copy, `[frames, n_mels]`.
  """
  masked = np.array(log_mel, copy=True)
  for axis, count, max_width in (
    (0, num_time_masks, max_time_width),
    (1, num_freq_masks, max_freq_width),
  ):
    size = masked.shape[axis]
    for _ in range(count):
      width = int(rng.integers(0, min(max_width, size) + 1))
      start = int(rng.integers(0, size - width + 1))
      index = [slice(None), slice(None)]
      index[axis] = slice(start, start + width)
      masked[tuple(index)] = fill_value
  return masked
