"""Orbax checkpoints of a run: train state, every process's data-iterator state, run metadata.

A checkpoint is `WORKDIR/checkpoints/STEP/` with three items:
  state  the TrainState pytree (sharded arrays; restored onto any mesh, e.g. 8 → 2 devices)
  data   grain's iterator state, one `process_I-of-N.json` per process
  meta   JSON: the resolved config, the normalisation statistics, the step
Saves are asynchronous; orbax writes into a temporary folder and renames it when every item
is committed, so an interrupted save never looks complete. Restoring walks back from the
newest step and skips (with a warning that says why) any checkpoint that fails to load.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from cmvt_jax import files


class NoUsableCheckpointError(RuntimeError):
  """The workdir holds checkpoints, but none of them could be restored."""


@dataclasses.dataclass
class Restored:
  step: int
  state: Any
  meta: dict


def checkpoint_dir(workdir: epath.PathLike) -> epath.Path:
  path = epath.Path(workdir) / "checkpoints"
  # orbax refuses relative paths; `--workdir runs/default` is relative to the current folder.
  return path if path.is_absolute() else path.absolute()


def manager(workdir: epath.PathLike, *, max_to_keep: int) -> ocp.CheckpointManager:
  """The training run's manager: asynchronous saves of all three items, resume."""
  # cleanup_tmp_directories: remove the folders of saves that a crash interrupted.
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, cleanup_tmp_directories=True)
  handlers = {
    "state": ocp.StandardCheckpointHandler(),
    "data": grain.checkpoint.CheckpointHandler(),
    "meta": ocp.JsonCheckpointHandler(),
  }
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_handlers=handlers)


def reader(workdir: epath.PathLike) -> ocp.CheckpointManager:
  """A manager that only reads (evaluation, export, plots): it creates and deletes nothing,
  and restores a part of the train state (`restore_latest(..., partial=True)`)."""
  # save_interval_steps=0: read-only anyway (orbax warns when it has to set it itself).
  options = ocp.CheckpointManagerOptions(create=False, read_only=True, save_interval_steps=0)
  handlers = {
    "state": ocp.PyTreeCheckpointHandler(),
    "data": grain.checkpoint.CheckpointHandler(),  # never read; named so orbax knows the item
    "meta": ocp.JsonCheckpointHandler(),
  }
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_handlers=handlers)


def holds_run(workdir: epath.PathLike) -> bool:
  """True when the workdir has at least one complete checkpoint.

  Lists the finalised step folders directly: a CheckpointManager runs cross-process
  barriers when it is built, and whether the folder exists yet can differ between processes
  (process 0 creates it), which would pair one process's barrier with another's.
  """
  return bool(ocp.path.step.checkpoint_steps(checkpoint_dir(workdir)))


def save(checkpoints: ocp.CheckpointManager, step: int, state, data_iterator, meta: dict) -> None:
  """Starts an asynchronous save of step `step` (returns once the arrays are copied).

  Orbax's commit protocol is one opaque write point for the crash tests: "after" is when
  this returns, with the save still under way in the background.
  """
  write = files.LibraryWrite("checkpoint", epath.Path(checkpoints.directory) / str(step))
  with files.naming_full_disk(checkpoints.directory):
    checkpoints.save(
      step,
      force=True,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iterator),
        meta=ocp.args.JsonSave(meta),
      ),
    )
  write.finished()


def wait(checkpoints: ocp.CheckpointManager) -> None:
  """Waits for the asynchronous saves under way (their errors surface here)."""
  with files.naming_full_disk(checkpoints.directory):
    checkpoints.wait_until_finished()


def restore_latest(
  checkpoints: ocp.CheckpointManager,
  target,
  *,
  check: Callable[[dict, Any], None] = lambda meta, saved_state: None,
  step: int | None = None,
  partial: bool = False,
) -> Restored | None:
  """Restores the newest checkpoint that loads (or exactly `step`); None if there are none.

  Args:
    checkpoints: `manager(...)`, or `reader(...)` when `partial`.
    target: ShapeDtypeStructs with the target shardings: the whole train state, or (with
      `partial`) a dict holding some of its fields, e.g. `{"params": ...}`; only those arrays
      are read from disk.
    check: called with the checkpoint's metadata and the saved state's tree metadata (array
      shapes and dtypes, nothing read) before any array is read; it may raise to refuse the
      checkpoint (e.g. a model of another shape). Such an error is not a damaged checkpoint
      and propagates.
    step: restore exactly this step.
    partial: restore only the fields of `target`.
  """
  steps = sorted(checkpoints.all_steps(), reverse=True)
  if step is not None:
    if step not in steps:
      raise ValueError(
        f"No complete checkpoint at step {step} in {checkpoints.directory}; "
        f"the complete ones are {sorted(steps)}."
      )
    steps = [step]
  if not steps:
    return None
  if partial:
    restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), target)
    state_args = ocp.args.PyTreeRestore(target, restore_args=restore_args, partial_restore=True)
  else:
    state_args = ocp.args.StandardRestore(target)
  problems = []
  for candidate in steps:
    try:
      meta = checkpoints.restore(candidate, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
      saved_state = checkpoints.item_metadata(candidate)["state"]
    except Exception as error:
      problems.append(_skip(candidate, "its metadata", error))
      continue
    check(meta["meta"], saved_state)
    try:
      state = checkpoints.restore(candidate, args=ocp.args.Composite(state=state_args))["state"]
    except Exception as error:
      problems.append(_skip(candidate, "its train state", error))
      continue
    set_aside(checkpoints, [s for s in steps if s > candidate])
    return Restored(step=candidate, state=state, meta=meta["meta"])
  raise NoUsableCheckpointError(
    f"None of the checkpoints in {checkpoints.directory} could be restored:\n  "
    + "\n  ".join(problems)
    + "\nMove the damaged checkpoints away to keep them, or start over in a new --workdir."
  )


def set_aside(checkpoints: ocp.CheckpointManager, steps) -> None:
  """Moves unusable checkpoints to WORKDIR/damaged_checkpoints/ (kept for inspection).

  The run will write those steps again; leaving them in place would block the new saves.
  """
  if not steps:
    return
  target = epath.Path(checkpoints.directory).parent / "damaged_checkpoints"
  if jax.process_index() == 0:
    target.mkdir(parents=True, exist_ok=True)
    for step in steps:
      destination = target / f"{step}-{int(time.time())}"
      files.move(
        epath.Path(checkpoints.directory) / str(step), destination, kind="checkpoint-set-aside"
      )
      logging.warning("Moved the unusable checkpoint %d to %s.", step, destination)
  multihost_utils.sync_global_devices("cmvt_jax: damaged checkpoints set aside")
  checkpoints.reload()


def restore_data(checkpoints: ocp.CheckpointManager, step: int, data_iterator) -> bool:
  """Sets `data_iterator` to its state saved at `step`; False when there is none for us."""
  try:
    checkpoints.restore(
      step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(data_iterator))
    )
    return True
  except (ValueError, FileNotFoundError) as error:
    # grain keys its files by process index and count: another count has no file for us.
    logging.warning(
      "Checkpoint %d has no data-iterator state for process %d of %d (%s).",
      step,
      jax.process_index(),
      jax.process_count(),
      error,
    )
    return False


def _skip(step: int, what: str, error: Exception) -> str:
  # TensorStore errors carry a page-long spec; the first line says what went wrong.
  detail = (str(error).strip().splitlines() or [""])[0][:300]
  problem = f"checkpoint {step}: {what} failed to load ({type(error).__name__}: {detail})"
  logging.warning("Skipping %s; trying the one before.", problem)
  return problem
