"""Entry point: `python -m cmvt_jax.main --config configs/X.py --workdir DIR [--mode M]`.

Parses flags, joins the multi-host runtime, and dispatches on `--mode`; the work itself lives
in train.py, evaluate.py, export.py and plots.py.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging as logging_lib
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

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
  ["train", "eval", "export", "plots"],
  "train (then evaluate and export), eval (latest checkpoint), export (embeddings), plots.",
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
  "train": ("train", "train_and_evaluate"),
  "eval": ("evaluate", "evaluate_latest"),
  "export": ("export", "export_embeddings"),
  "plots": ("plots", "make_plots"),
}

# Environment variables that mean a scheduler started one process per host: then
# `jax.distributed.initialize()` finds the coordinator, process count and index by itself.
_CLUSTER_MARKERS = {
  "SLURM_NTASKS": "SLURM",
  "OMPI_COMM_WORLD_SIZE": "Open MPI",
  "TPU_WORKER_HOSTNAMES": "TPU VM",
  "MEGASCALE_NUM_SLICES": "TPU multi-slice",
}


def initialize_distributed(config) -> None:
  """Joins the multi-host runtime when this is one process of several."""
  import jax  # after absl has parsed flags, before any computation

  # Collectives between CPU processes (localhost rehearsals) go through gloo; the setting
  # is ignored by GPU and TPU backends.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  timeouts = dict(
    initialization_timeout=config.distributed.initialization_timeout_seconds,
    heartbeat_timeout_seconds=config.distributed.heartbeat_timeout_seconds,
  )
  explicit = (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  if any(value is not None for value in explicit):
    if any(value is None for value in explicit):
      raise app.UsageError(
        f"--coordinator_address, --num_processes and --process_id go together; got {explicit}."
      )
    jax.distributed.initialize(
      _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, **timeouts
    )
    return
  detected = [name for var, name in _CLUSTER_MARKERS.items() if _more_than_one(var)]
  if not detected and _has_tpu_chips():
    # A Cloud TPU VM (`gcloud ... tpu-vm ssh --worker=all`) sets no environment variable;
    # JAX finds the slice's workers in the VM's metadata.
    detected = ["Cloud TPU VM"]
  if detected:
    logging.info("Detected a %s cluster; joining it.", detected[0])
    jax.distributed.initialize(**timeouts)


def _has_tpu_chips() -> bool:
  """TPU chips on this machine's PCI bus (JAX's own test, which reads no network)."""
  from jax._src import hardware_utils

  return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0


def _more_than_one(variable: str) -> bool:
  value = os.environ.get(variable, "")
  if variable == "TPU_WORKER_HOSTNAMES":
    return "," in value
  return value.isdigit() and int(value) > 1


class _OwnInfoOnly(logging_lib.Filter):
  """Keeps cmvt_jax's INFO lines and every library's warnings; drops libraries' INFO chatter."""

  def filter(self, record: logging_lib.LogRecord) -> bool:
    return record.levelno >= logging_lib.WARNING or "cmvt_jax" in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if flags.FLAGS.verbosity < 1:  # --verbosity=1 shows the libraries' INFO logs too
    logging.get_absl_handler().addFilter(_OwnInfoOnly())
  config = _CONFIG.value
  initialize_distributed(config)
  # Imported here, so that no backend starts before the distributed runtime is joined.
  module_name, function = _MODES[_MODE.value]
  module = importlib.import_module(f"cmvt_jax.{module_name}")
  from cmvt_jax.checkpoints import NoUsableCheckpointError

  # Errors that describe a problem with the config, the data or the workdir and say what to do.
  user_errors = (
    ValueError,
    FileNotFoundError,
    PermissionError,
    FloatingPointError,
    NoUsableCheckpointError,
  )
  import jax

  try:
    getattr(module, function)(config, _WORKDIR.value)
  except user_errors as error:
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
    message = _unknown_key_message(argv, error)
  except flags.Error as error:  # e.g. a value of the wrong type
    message = str(error)
  sys.stderr.write(
    f"FATAL Flags parsing error: {message}\nPass --helpshort or --helpfull to see help on flags.\n"
  )
  sys.exit(1)


def _unknown_key_message(argv: list[str], error: Exception) -> str:
  """Names the first override whose key the config file does not define, and its siblings."""
  config = _load_config_file(argv)
  for arg in argv:
    if not arg.startswith("--config."):
      continue
    path = arg[len("--config.") :].split("=", 1)[0].split(".")
    node = config
    for depth, part in enumerate(path):
      keys = sorted(node.keys()) if hasattr(node, "keys") else []
      if part not in keys:
        where = ".".join(["config", *path[:depth]])
        return (
          f"{arg}: {where} has no key {part!r}; its keys are: {', '.join(keys)}. "
          "Overrides can only set keys that the config file defines."
        )
      node = node[part]
  return f"a --config override names a key that the config does not have ({error})."


def _load_config_file(argv: list[str]):
  path = next((arg.split("=", 1)[1] for arg in argv if arg.startswith("--config=")), None)
  if path is None and "--config" in argv:
    path = argv[argv.index("--config") + 1]
  spec = importlib.util.spec_from_file_location("cmvt_config_file", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
