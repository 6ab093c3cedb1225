"""Entry point: `python -m cmvt_jax.main --config configs/X.py --workdir DIR [--mode M]`.

Parses flags, joins the multi-host runtime, and dispatches on `--mode`; the work itself lives
in train.py, evaluate.py, export.py and plots.py. Importing them starts no backend: that
happens at the first computation, after the distributed runtime is joined.
"""

from __future__ import annotations

import logging as logging_lib
import os
import sys
import threading
import traceback

import jax
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from cmvt_jax import checkpoints
from cmvt_jax import compile as compile_lib
from cmvt_jax import config_overrides
from cmvt_jax import console
from cmvt_jax import evaluate
from cmvt_jax import export
from cmvt_jax import files
from cmvt_jax import plots
from cmvt_jax import sharding
from cmvt_jax import train

_CONFIG = config_flags.DEFINE_config_file(
  "config",
  None,
  "Config file, e.g. configs/default.py; override keys with --config.KEY=VALUE.",
  lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and exports go.")
_MODE = flags.DEFINE_enum(
  "mode",
  "train",
  ["train", "eval", "export", "plots", "compile"],
  "train (then evaluate and export), eval (latest checkpoint), export (embeddings), plots, "
  "compile (ahead of time for --config.compile.topology; needs requirements-tpu.txt).",
)
_COORDINATOR = flags.DEFINE_string(
  "coordinator_address",
  None,
  "host:port of process 0, for multi-process runs on machines "
  "that JAX cannot detect (TPU VMs, SLURM and Open MPI are detected).",
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0-based.")
flags.mark_flags_as_required(["config", "workdir"])

_MODES = {
  "train": train.train_and_evaluate,
  "eval": evaluate.evaluate_latest,
  "export": export.export_embeddings,
  "plots": plots.make_plots,
}
# Errors that describe a problem with the config, the data or the workdir and say what to do.
_USER_ERRORS = (
  ValueError,
  FileNotFoundError,
  PermissionError,
  FloatingPointError,
  checkpoints.NoUsableCheckpointError,
  files.DiskFullError,
)


class _FullDiskEchoes(logging_lib.Filter):
  """Drops the libraries' own error reports of a full disk: orbax's background threads log
  every write that failed, with a traceback, and asyncio logs their tasks' exceptions when
  they are collected. Main reports the full disk once, with the path and what to do."""

  def filter(self, record: logging_lib.LogRecord) -> bool:
    if record.levelno < logging_lib.ERROR or "cmvt_jax" in record.pathname:
      return True
    error = record.exc_info[1] if record.exc_info else None
    return not (files.mentions_full_disk(record.getMessage()) or files.full_disk_cause(error))


def _quiet_full_disk_echoes() -> None:
  """Also silences a full disk's echoes that bypass logging: a library thread that dies of
  it (tensorboardX's writer), a library's exit handler that fails on it, and the callbacks
  that TensorStore (orbax's array writer) runs from its own threads for the writes that a
  failed save left pending, into orbax's event loop that is closed by then: each reports
  `RuntimeError: Event loop is closed` as unraisable, with nothing to act on."""
  thread_hook, unraisable_hook = threading.excepthook, sys.unraisablehook

  def on_thread_error(args):
    if not files.full_disk_cause(args.exc_value):
      thread_hook(args)

  def on_unraisable(args):
    frames = traceback.extract_tb(args.exc_traceback)
    late_callback = (
      isinstance(args.exc_value, RuntimeError)
      and str(args.exc_value) == "Event loop is closed"
      and bool(frames)
      and frames[0].name == "call_soon_threadsafe"  # called from native code, not ours
    )
    if not (late_callback or files.full_disk_cause(args.exc_value)):
      unraisable_hook(args)

  threading.excepthook, sys.unraisablehook = on_thread_error, on_unraisable


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if flags.FLAGS.verbosity < 1:  # --verbosity=1 shows the libraries' INFO logs too
    console.plain_logs().addFilter(_FullDiskEchoes())
    _quiet_full_disk_echoes()
  config = _CONFIG.value
  sharding.choose_platforms()
  try:
    if _MODE.value == "compile":  # one machine compiles for the whole slice: no cluster
      compile_lib.compile_programs(config, _WORKDIR.value, make_train_step=train.make_train_step)
      return
    sharding.initialize_distributed(
      config.distributed,
      coordinator_address=_COORDINATOR.value,
      num_processes=_NUM_PROCESSES.value,
      process_id=_PROCESS_ID.value,
    )
    outcome = _MODES[_MODE.value](config, _WORKDIR.value)
    finished = _MODE.value == "train" and int(outcome.step) == config.total_steps
    if finished and jax.process_index() == 0:
      config_file = config_flags.get_config_filename(flags.FLAGS["config"])
      print(train.summary(config, _WORKDIR.value, config_file), flush=True)
  except _USER_ERRORS as error:
    if flags.FLAGS.verbosity >= 1:
      raise
    # The message says what to do; a traceback would only bury it (--verbosity=1 shows it).
    logging.error("%s: %s", type(error).__name__, error)
    sys.exit(1)
  except jax.errors.JaxRuntimeError as error:
    if jax.process_count() == 1 or flags.FLAGS.verbosity >= 1:
      raise
    _exit_after_failed_collective(jax.process_index(), jax.process_count(), error)


def _exit_after_failed_collective(index: int, count: int, error: Exception) -> None:
  """One process of several failed in the runtime: usually because another one died."""
  detail = (str(error).strip().splitlines() or [type(error).__name__])[0]
  logging.error(
    "Process %d of %d stopped: %s. In a multi-host run this usually means that another "
    "process died, hangs or was preempted (see its log). Restart every process with the "
    "same command to resume from the last complete checkpoint.",
    index,
    count,
    detail,
  )
  logging.flush()
  # Exiting normally would run the distributed runtime's shutdown barrier, which waits for
  # the dead process until the heartbeat timeout and then aborts with a stack dump.
  os._exit(1)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing; a bad flag or config override is one clear line and exit status 1."""
  try:
    return flags.FLAGS(argv)
  except (KeyError, AttributeError) as error:  # ml_collections: an override names no key
    message = config_overrides.unknown_key_message(argv, error)
  except flags.Error as error:  # e.g. a value of the wrong type
    message = str(error)
  sys.stderr.write(
    f"FATAL Flags parsing error: {message}\nPass --helpshort or --helpfull to see help on flags.\n"
  )
  sys.exit(1)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
