"""Log-mel against librosa itself; SpecAugment masks."""

import librosa
import numpy as np
import pytest

from cmvt_jax.data import spectrogram
from tests.data import media


def _librosa_log_mel(waveform, settings):
  mel = librosa.feature.melspectrogram(
    y=waveform,
    sr=settings.sample_rate,
    n_fft=settings.n_fft,
    hop_length=settings.hop_length,
    n_mels=settings.n_mels,
    fmin=settings.fmin,
    fmax=settings.fmax,
  )
  return np.log(mel + spectrogram.LOG_FLOOR)[:, : len(waveform) // settings.hop_length].T


@pytest.mark.parametrize("num_samples", [32000, 32499])
def test_log_mel_matches_librosa(num_samples):
  waveforms = np.random.default_rng(0).normal(0, 0.1, (3, num_samples)).astype(np.float32)
  log_mel = spectrogram.LogMel(media.MEL)

  batched = log_mel(waveforms)

  frames = num_samples // media.MEL.hop_length
  assert batched.shape == (3, frames, media.MEL.n_mels) and batched.dtype == np.float32
  for waveform, result in zip(waveforms, batched):
    np.testing.assert_allclose(result, _librosa_log_mel(waveform, media.MEL), atol=1e-4)
    np.testing.assert_array_equal(log_mel(waveform), result)


def test_log_mel_puts_a_tone_in_its_mel_bin():
  waveform = media.tone(1.0, 16000, frequency=1000.0)[0]
  log_mel = spectrogram.LogMel(media.MEL)(waveform)
  # librosa's mel filter k peaks at the (k+1)-th of n_mels + 2 equally mel-spaced edges.
  centres = librosa.mel_frequencies(
    n_mels=media.MEL.n_mels + 2, fmin=media.MEL.fmin, fmax=media.MEL.fmax
  )[1:-1]
  loudest = np.argmax(log_mel[10])
  nearest = np.argmin(np.abs(centres - 1000.0))
  assert loudest == nearest, (centres[loudest], centres[nearest])


def test_mel_settings_are_checked():
  with pytest.raises(ValueError, match="fmax"):
    spectrogram.MelSettings(
      sample_rate=16000, n_fft=512, hop_length=160, n_mels=64, fmin=0.0, fmax=9000.0
    )


def _masked_runs(masked_line):
  """(start, length) of the runs of NaN in a 1-D array."""
  runs, start = [], None
  for i, value in enumerate(np.append(masked_line, 0.0)):
    if np.isnan(value) and start is None:
      start = i
    elif not np.isnan(value) and start is not None:
      runs.append((start, i - start))
      start = None
  return runs


@pytest.mark.parametrize("seed", range(20))
def test_spec_augment_masks_stay_in_bounds(seed):
  log_mel = np.ones((50, 40), np.float32)
  masked = spectrogram.spec_augment(
    log_mel,
    np.random.default_rng(seed),
    num_time_masks=2,
    max_time_width=7,
    num_freq_masks=3,
    max_freq_width=60,
    fill_value=np.nan,
  )

  assert masked.shape == log_mel.shape and np.all(log_mel == 1.0)  # input untouched
  masked_frames = np.isnan(masked).all(axis=1)
  masked_bins = np.isnan(masked).all(axis=0)
  # Every NaN lies in a fully masked frame or a fully masked bin: masks are whole bands.
  assert np.array_equal(np.isnan(masked), masked_frames[:, None] | masked_bins[None, :])
  if not masked_bins.all():  # a column outside the frequency masks shows the time masks
    time_runs = _masked_runs(masked[:, np.flatnonzero(~masked_bins)[0]])
    assert len(time_runs) <= 2 and sum(length for _, length in time_runs) <= 2 * 7
  if not masked_frames.all():  # a row outside the time masks shows the frequency masks
    freq_runs = _masked_runs(masked[np.flatnonzero(~masked_frames)[0]])
    assert len(freq_runs) <= 3 and all(start + length <= 40 for start, length in freq_runs)


def test_spec_augment_without_masks_is_identity():
  log_mel = np.random.default_rng(0).normal(size=(20, 8)).astype(np.float32)
  same = spectrogram.spec_augment(
    log_mel,
    np.random.default_rng(1),
    num_time_masks=0,
    max_time_width=5,
    num_freq_masks=0,
    max_freq_width=5,
  )
  np.testing.assert_array_equal(same, log_mel)
