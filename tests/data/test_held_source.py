"""The in-memory training source: each example read from storage once, each window's log-mel
computed once, the same stream."""

import dataclasses
import pickle

import numpy as np
import pytest

from cmvt_jax.data import held_source
from cmvt_jax.data import pipeline
from tests.data import test_pipeline


class CountingSource(list):
  """A list of examples that counts how often each index is read."""

  def __init__(self, examples):
    super().__init__(examples)
    self.reads = [0] * len(examples)

  def __getitem__(self, index):
    self.reads[index] += 1
    return super().__getitem__(index)


def test_example_bytes_add_up_arrays_text_and_scalars():
  example = {
    "frames": np.zeros((16, 32, 40, 3), np.uint8),
    "audio": np.zeros(32000, np.int16),
    "id": b"clip0",
    "start": np.float32(0.5),
    "label": 3,
    "meta": {"labels": np.zeros(4, np.int32)},
  }
  expected = 16 * 32 * 40 * 3 + 2 * 32000 + 5 + 4 + np.asarray(3).nbytes + 16
  assert held_source.example_bytes(example) == expected


def test_each_example_is_read_once_and_a_pickled_copy_holds_nothing():
  source = CountingSource(test_pipeline.SOURCE)
  held = held_source.HeldSource(source)
  for _ in range(3):
    for index in range(len(held)):
      assert held[index] is test_pipeline.SOURCE[index]
  assert source.reads == [1] * len(source)

  copy = pickle.loads(pickle.dumps(held))  # what a grain worker process receives
  assert len(copy) == len(held) and copy._held == {}


def test_a_split_is_held_only_within_the_budget():
  size = held_source.example_bytes(test_pipeline.SOURCE[0]) * len(test_pipeline.SOURCE)
  lines = []
  held, log_mels = held_source.held_if_small(test_pipeline.SOURCE, size / 2**30, log=lines.append)
  assert isinstance(held, held_source.HeldSource) and "held in memory" in lines[-1]
  assert log_mels.budget_bytes == 0  # the examples took all of it
  held, log_mels = held_source.held_if_small(test_pipeline.SOURCE, 2 * size / 2**30)
  assert isinstance(held, held_source.HeldSource) and log_mels.budget_bytes == size
  streamed = held_source.held_if_small(test_pipeline.SOURCE, size / 2**30 * 0.99, log=lines.append)
  assert streamed == (test_pipeline.SOURCE, None)
  assert "read from disk (larger than input.cache_train_gib=" in lines[-1]
  assert held_source.held_if_small(test_pipeline.SOURCE, 0.0) == (test_pipeline.SOURCE, None)


def test_log_mels_are_kept_within_their_budget_read_only_and_not_pickled():
  log_mels = held_source.HeldLogMels(budget_bytes=2 * 400)
  computed = []

  def compute(value):
    def log_mel():
      computed.append(value)
      return np.full((10, 10), value, np.float32)  # 400 bytes

    return log_mel

  for key in (1, 2, 1, 3, 2, 3):
    assert log_mels.get(key, compute(key))[0, 0] == key
  # 1 and 2 fill the budget; 3 is computed each time it is asked for.
  assert computed == [1, 2, 3, 3] and len(log_mels) == 2 and log_mels.held_bytes == 800
  with pytest.raises(ValueError, match="read-only"):
    log_mels.get(1, compute(1))[0, 0] = 0.0

  copy = pickle.loads(pickle.dumps(log_mels))  # what a grain worker process receives
  assert len(copy) == 0 and copy.held_bytes == 0 and copy.budget_bytes == 800


@pytest.mark.parametrize(
  "num_frames",
  [
    4,  # 1-s windows of the 2-s clips: 9 starts each, SpecAugment after
    8,  # windows of the whole clip (as the default's): one log-mel per clip
  ],
)
def test_a_held_split_gives_the_streamed_batches_and_computes_each_window_once(
  num_frames, monkeypatch
):
  """Three epochs with and without holding: equal batches; held, each example read once and
  each (clip, window start)'s log-mel computed once."""
  batches = 3 * test_pipeline.NUM_EXAMPLES // 4
  spec = dataclasses.replace(test_pipeline.SPEC, num_frames=num_frames)  # cache 0: reference
  held_spec = dataclasses.replace(spec, cache_train_gib=1.0)
  counted = CountingSource(test_pipeline.SOURCE)
  windows = []
  window_audio = pipeline.Preprocessor._window_audio

  def counted_window_audio(self, audio, start, frames):
    windows.append((audio.tobytes(), start))
    return window_audio(self, audio, start, frames)

  monkeypatch.setattr(pipeline.Preprocessor, "_window_audio", counted_window_audio)

  def take(source, input_spec):
    windows.clear()
    dataset = pipeline.train_dataset(
      source, test_pipeline._preprocessor(input_spec), batch_size=4, seed=5
    )
    return test_pipeline._take(dataset, batches)

  streamed = take(test_pipeline.SOURCE, spec)
  assert len(windows) == 3 * len(test_pipeline.SOURCE)
  held = take(counted, held_spec)
  for a, b in zip(streamed, held, strict=True):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  # Example 0 once more: held_if_small measures the split from it.
  assert counted.reads == [2] + [1] * (len(counted) - 1)
  assert len(windows) == len(set(windows))
  if num_frames == 8:
    assert len(windows) == len(test_pipeline.SOURCE)
