"""A training source that keeps the examples it reads in memory, when its split is small.

Reading a stored example (ArrayRecord, then TFDS's decoding of its fields) costs about
0.5 ms of CPU per clip on our 2-core machines: half of the input pipeline's work, taken from
the cores that also run the train step. A small split (the default run's 2,048 clips: ~221
MiB as uint8 frames and int16 audio) is read from disk once, then every later epoch comes
from memory. A split larger than the budget streams from disk as before.

The log-mel of a training window is held too (`HeldLogMels`): it depends only on the clip and
the window's start (SpecAugment masks a copy after), and at ~0.35 ms per clip it was over half
of what was left of the input pipeline's CPU once the examples were held. The default's
windows are its whole clips, so each clip's log-mel is computed once, not once an epoch.

Each reading process (the trainer, or each grain worker process) holds its own copy, filled
as it reads: the budget is per process, examples and log-mels together.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Hashable
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


class HeldLogMels:
  """Log-mels kept once computed, by key, until they fill `budget_bytes`; later ones are
  computed and not kept. Kept arrays are read-only, so no caller can change them in place.

  Pickles (into grain's worker processes) empty, like `HeldSource`.
  """

  def __init__(self, budget_bytes: int):
    self.budget_bytes = budget_bytes
    self.held_bytes = 0
    self._held: dict[Hashable, np.ndarray] = {}

  def get(self, key: Hashable, compute: Callable[[], np.ndarray]) -> np.ndarray:
    """The array kept under `key`, else `compute()` (kept while the budget allows)."""
    log_mel = self._held.get(key)
    if log_mel is None:
      log_mel = compute()
      if self.held_bytes + log_mel.nbytes <= self.budget_bytes:
        log_mel.flags.writeable = False
        self._held[key] = log_mel
        self.held_bytes += log_mel.nbytes
    return log_mel

  def __len__(self) -> int:
    return len(self._held)

  def __getstate__(self) -> dict[str, Any]:
    return {"budget_bytes": self.budget_bytes, "held_bytes": 0, "_held": {}}


def held_if_small(
  source: Sequence[dict[str, Any]], budget_gib: float, log=None
) -> tuple[Sequence[dict[str, Any]], HeldLogMels | None]:
  """`(HeldSource(source), HeldLogMels(the rest of the budget))` when the whole split fits
  `budget_gib` (estimated from its first example's bytes × its length), else `(source,
  None)`; 0 never holds.

  Args:
    source: a split's random-access source of stored examples.
    budget_gib: `input.cache_train_gib`, the most memory a reading process may hold it in.
    log: called with one line saying which was chosen (None: silent).
  """
  if budget_gib <= 0 or len(source) == 0:
    return source, None
  budget = budget_gib * 1024 * _MIB
  estimate = example_bytes(source[0]) * len(source)
  fits = estimate <= budget
  if log is not None:
    verdict = "held in memory once read" if fits else "read from disk (larger than"
    limit = "" if fits else f" input.cache_train_gib={budget_gib:g})"
    log(f"Training split of {len(source)} clips (~{estimate / _MIB:.0f} MiB): {verdict}{limit}.")
  if not fits:
    return source, None
  return HeldSource(source), HeldLogMels(int(budget - estimate))
