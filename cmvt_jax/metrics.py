"""Run metrics: `metrics.jsonl`, TensorBoard event files, and progress lines with an ETA.

Only process 0 writes (every process may call; the others do nothing). `metrics.jsonl` holds
one JSON object per line; `step` counts optimiser updates completed. A resumed run first
drops the lines past its checkpoint, so each step keeps exactly one train line, and an
evaluation replaces an earlier line of the same (step, split). A last line that a crash cut
short is dropped with a warning, never a failure.

TensorBoard shows what metrics.jsonl holds: a writer that continues a workdir from step S
starts a new event file that tells TensorBoard to hide every earlier event at steps >= S
(a `SessionLog.START` at S, as tensorboardX's `purge_step` writes), and first writes
metrics.jsonl's records from step S again; so no step appears twice, whatever a crash left
in the older event files.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import logging
from etils import epath
from tensorboardX import event_file_writer
from tensorboardX import record_writer
from tensorboardX.proto import event_pb2
from tensorboardX.proto import summary_pb2

from cmvt_jax import console
from cmvt_jax import files


class EventFile:
  """One TensorBoard event file, written synchronously: a `flush()` that returns has
  handed every event to the operating system. (tensorboardX's SummaryWriter queues events
  for a thread and its flush does not wait for the queue, so a kill could lose events that
  metrics.jsonl already holds.)"""

  def __init__(self, folder: epath.PathLike, *, purge_step: int):
    record_writer.directory_check(os.fspath(folder))
    # The process id keeps two runs in one second from truncating the same file name.
    self._events = event_file_writer.EventsWriter(
      os.fspath(epath.Path(folder) / "events"), filename_suffix=f".{os.getpid()}"
    )
    # TensorBoard hides every event of earlier files at steps >= purge_step.
    start = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
    self._events.write_event(
      event_pb2.Event(wall_time=time.time(), step=purge_step, session_log=start)
    )

  def add_scalars(self, step: int, values: Mapping[str, float]) -> None:
    summary = summary_pb2.Summary(
      value=[
        summary_pb2.Summary.Value(tag=tag, simple_value=value) for tag, value in values.items()
      ]
    )
    self._events.write_event(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))

  def flush(self) -> None:
    self._events.flush()

  def close(self) -> None:
    self._events.close()


class MetricsWriter:
  """Writes metric lines to WORKDIR/metrics.jsonl and TensorBoard.

  TensorBoard first: it then never lacks a line of metrics.jsonl; an event whose line a
  kill prevented is hidden by the next writer's purge, which writes the line's step again.
  """

  def __init__(self, workdir: epath.PathLike, *, is_primary: bool):
    self.path = epath.Path(workdir) / "metrics.jsonl"
    self._tensorboard_dir = epath.Path(workdir) / "tensorboard"
    self._is_primary = is_primary
    self._events = None
    self._continues_from = 0  # the first step this writer's events may show

  def continue_from(self, step: int) -> None:
    """This writer's events start at `step` (see the module docstring); a new run's at 0."""
    self._continues_from = int(step)

  @property
  def _tensorboard(self) -> EventFile:
    """The event file, created with the first scalar (a refused run writes nothing)."""
    if self._events is None:
      with files.naming_full_disk(self._tensorboard_dir):
        self._events = EventFile(self._tensorboard_dir, purge_step=self._continues_from)
      for record in read(self.path.parent):
        if record["step"] >= self._continues_from:
          self._events.add_scalars(record["step"], _scalars(record))
    return self._events

  def drop_after(self, step: int) -> None:
    """Removes lines with `step` beyond the step a resumed run starts from."""
    if not self._is_primary or not self.path.exists():
      return
    self._keep(lambda record: record["step"] <= step)

  def drop_evals(self, step: int, splits: Sequence[str]) -> None:
    """Removes eval lines of `step` for `splits` (an evaluation that runs again replaces
    them)."""
    if self._is_primary and self.path.exists():
      self._keep(lambda record: record["step"] != step or record.get("split") not in splits)

  def _keep(self, keep: Callable[[dict], bool]) -> None:
    """Rewrites metrics.jsonl (atomically) with the records `keep` accepts, if any is not."""
    text = self.path.read_text()
    kept = [record for record in _parse(text, self.path) if keep(record)]
    if _text(kept) != text:  # also drops a torn last line, so that appends start clean
      files.write_text(self.path, _text(kept), kind="metrics-rewrite")

  def write(self, step: int, values: Mapping[str, Any]) -> None:
    if not self._is_primary:
      return
    record = {"step": int(step)}
    record.update({key: _plain(value) for key, value in values.items()})
    tensorboard = self._tensorboard
    with files.LibraryWrite("tensorboard", self._tensorboard_dir):
      with files.naming_full_disk(self._tensorboard_dir):
        tensorboard.add_scalars(record["step"], _scalars(record))
        tensorboard.flush()
    files.append_line(self.path, json.dumps(record), kind="metrics-append")

  def write_scalars(self, step: int, values: Mapping[str, float]) -> None:
    """TensorBoard only (e.g. input-pipeline timing, which metrics.jsonl leaves out); written
    with the next line's flush."""
    if self._is_primary:
      self._tensorboard.add_scalars(step, {key: float(value) for key, value in values.items()})

  def sync(self) -> None:
    """Forces metrics.jsonl to disk: a checkpoint must never outlive the lines before it."""
    if self._is_primary:
      files.sync(self.path)

  def close(self) -> None:
    if self._events is not None:
      events, self._events = self._events, None
      with files.naming_full_disk(self._tensorboard_dir):
        events.close()


def _scalars(record: Mapping[str, Any]) -> dict[str, float]:
  """A record's numbers (TensorBoard scalars), by key."""
  return {
    key: float(value)
    for key, value in record.items()
    if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)
  }


def write_evals(writer: MetricsWriter, step: int, results: Mapping[str, Mapping[str, Any]]) -> None:
  """One metrics line per evaluated split, `{"step", "split", "eval/...": ...}`, replacing
  any earlier line of the same step and split."""
  writer.drop_evals(step, list(results))
  for split, values in results.items():
    writer.write(step, {"split": split, **values})


def evaluated_splits(workdir: epath.PathLike, step: int) -> set[str]:
  """The splits metrics.jsonl holds an eval line of `step` for."""
  return {
    record["split"] for record in read(workdir) if record["step"] == step and "split" in record
  }


def read(workdir: epath.PathLike) -> list[dict]:
  """The records of WORKDIR/metrics.jsonl (none when there is no file)."""
  path = epath.Path(workdir) / "metrics.jsonl"
  return _parse(path.read_text(), path) if path.exists() else []


def _parse(text: str, path: epath.PathLike) -> list[dict]:
  """The JSON records of a metrics file's `text`. A line that does not parse is what a crash
  (or a full disk) left of an append: the last one is dropped with a warning naming the file
  and line; one before the last means the file was damaged otherwise, which is an error."""
  lines = text.splitlines()
  records = []
  for number, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError as error:
      if number < len(lines):
        raise ValueError(
          f"{path} line {number} is not JSON ({error}); only a last line can be cut short by "
          "a crash. Remove or repair that line."
        ) from error
      logging.warning("Dropping the last line of %s (line %d): cut short by a crash.", path, number)
  return records


def _text(records: Sequence[dict]) -> str:
  return "".join(json.dumps(record) + "\n" for record in records)


def _plain(value):
  value = np.asarray(value)
  if value.dtype.kind in "iu":
    return int(value)
  if value.dtype.kind == "b":
    return bool(value)
  if value.dtype.kind == "f":
    value = float(value)
    return value if math.isfinite(value) else str(value)
  return value.item() if value.ndim == 0 else value.tolist()


class Progress:
  """Training's clock: steps per second and an ETA over training time only (evaluations
  are paused out), counted from the end of the first step (which compiles the program)."""

  def __init__(self, first_step: int, total_steps: int):
    self.first_step, self.total_steps = first_step, total_steps
    self._training_seconds = 0.0
    self._started = None
    self._rate_origin = None  # (step, training seconds) at the end of the first step
    self.resume()

  def pause(self) -> None:
    if self._started is not None:
      self._training_seconds += time.perf_counter() - self._started
      self._started = None

  def resume(self) -> None:
    if self._started is None:
      self._started = time.perf_counter()

  def training_seconds(self) -> float:
    running = 0.0 if self._started is None else time.perf_counter() - self._started
    return self._training_seconds + running

  def note(self, step: int) -> str:
    """Steps per second and the ETA of the steps left, over training time alone (empty
    until two steps are done). Call after every step."""
    seconds = self.training_seconds()
    if self._rate_origin is None:
      self._rate_origin = (step, seconds)
    origin_step, origin_seconds = self._rate_origin
    if step <= origin_step or seconds <= origin_seconds:
      return ""
    rate = (step - origin_step) / (seconds - origin_seconds)
    eta = console.duration((self.total_steps - step) / rate)
    return f"{rate:.2f} steps/s, ETA {eta} (evals excluded)"
