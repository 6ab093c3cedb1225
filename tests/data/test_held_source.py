"""The in-memory training source: each example read from storage once, the same stream."""

import dataclasses
import pickle

import numpy as np

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
  held = held_source.held_if_small(test_pipeline.SOURCE, size / 2**30, log=lines.append)
  assert isinstance(held, held_source.HeldSource) and "held in memory" in lines[-1]
  streamed = held_source.held_if_small(test_pipeline.SOURCE, size / 2**30 * 0.99, log=lines.append)
  assert streamed is test_pipeline.SOURCE
  assert "read from disk (larger than input.cache_train_gib=" in lines[-1]
  assert held_source.held_if_small(test_pipeline.SOURCE, 0.0) is test_pipeline.SOURCE


def test_a_held_split_gives_the_streamed_batches_and_reads_storage_once_per_process():
  """Three epochs with and without holding: equal batches; held, each example read once."""
  batches = 3 * test_pipeline.NUM_EXAMPLES // 4
  spec = test_pipeline.SPEC  # cache_train_gib 0: the reference stream
  held_spec = dataclasses.replace(spec, cache_train_gib=1.0)
  counted = CountingSource(test_pipeline.SOURCE)

  def take(source, input_spec):
    dataset = pipeline.train_dataset(
      source, test_pipeline._preprocessor(input_spec), batch_size=4, seed=5
    )
    return test_pipeline._take(dataset, batches)

  streamed = take(test_pipeline.SOURCE, spec)
  held = take(counted, held_spec)
  for a, b in zip(streamed, held, strict=True):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  # Example 0 once more: held_if_small measures the split from it.
  assert counted.reads == [2] + [1] * (len(counted) - 1)
