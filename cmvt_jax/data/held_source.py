"""A training source that keeps the examples it reads in memory, when its split is small.

Reading a stored example (ArrayRecord, then TFDS's decoding of its fields) costs about
0.5 ms of CPU per clip on our 2-core machines: half of the input pipeline's work, taken from
the cores that also run the train step. A small split (the default run's 2,048 clips: ~221
MiB as uint8 frames and int16 audio) is read from disk once, then every later epoch comes
from memory. A split larger than the budget streams from disk as before.

Each reading process (the trainer, or each grain worker process) holds its own copy, filled
as it reads: the budget is per process.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

_MIB = 2**20


def example_bytes(example: dict[str, Any]) -> int:
  """Bytes of one stored example's fields (arrays, text, scalars and nested dicts)."""
  total = 0
  for value in example.values():
    if isinstance(value, dict):
      total += example_bytes(value)
    elif isinstance(value, bytes | str):
      total += len(value)
    else:
      total += np.asarray(value).nbytes
  return total


class HeldSource(Sequence):
  """`source` (random access, any length) whose examples stay in memory once read.

  Pickles (into grain's worker processes) without what it holds, so each process fills its
  own copy.
  """

  def __init__(self, source: Sequence[dict[str, Any]]):
    self._source = source
    self._held: dict[int, dict[str, Any]] = {}

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    example = self._held.get(index)
    if example is None:
      example = self._held[index] = self._source[index]
    return example

  def __getstate__(self) -> dict[str, Any]:
    return {"_source": self._source, "_held": {}}


def held_if_small(
  source: Sequence[dict[str, Any]], budget_gib: float, log=None
) -> Sequence[dict[str, Any]]:
  """`HeldSource(source)` when the whole split fits `budget_gib` (estimated from its first
  example's bytes × its length), else `source` itself; 0 never holds.

  Args:
    source: a split's random-access source of stored examples.
    budget_gib: `input.cache_train_gib`, the most memory a reading process may hold it in.
    log: called with one line saying which was chosen (None: silent).
  """
  if budget_gib <= 0 or len(source) == 0:
    return source
  estimate = example_bytes(source[0]) * len(source)
  fits = estimate <= budget_gib * 1024 * _MIB
  if log is not None:
    verdict = "held in memory once read" if fits else "read from disk (larger than"
    limit = "" if fits else f" input.cache_train_gib={budget_gib:g})"
    log(f"Training split of {len(source)} clips (~{estimate / _MIB:.0f} MiB): {verdict}{limit}.")
  return HeldSource(source) if fits else source
