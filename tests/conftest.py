"""Test-wide settings: a persistent XLA compilation cache shared with subprocesses.

Many tests (and the training runs they start as subprocesses) compile the same small
programs; the on-disk cache makes each one compile once per machine.
"""

import os
import pathlib

import jax

_CACHE_DIR = pathlib.Path(__file__).resolve().parents[1] / ".cache" / "jax-compilation"
_CACHE_DIR.mkdir(parents=True, exist_ok=True)
# Environment first, so subprocesses started by tests inherit the same cache.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_CACHE_DIR))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update(
  "jax_persistent_cache_min_compile_time_secs",
  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]),
)


import pytest  # noqa: E402  (after the cache settings above)

from tests import helpers  # noqa: E402

REFERENCE_STEPS = 20
REFERENCE_CHECKPOINT_EVERY = 5


@pytest.fixture(scope="session")
def micro_data_dir(tmp_path_factory):
  """The micro config's generated dataset, made once for every end-to-end test."""
  return helpers.make_micro_dataset(tmp_path_factory.mktemp("micro_data"))


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, micro_data_dir):
  """One uninterrupted micro run of REFERENCE_STEPS steps, checkpoints every 5 steps.

  Resume, preemption and fault tests compare their results with this run's losses and
  final parameters.
  """
  workdir = tmp_path_factory.mktemp("reference") / "run"
  helpers.run_main(
    workdir,
    f"--config.total_steps={REFERENCE_STEPS}",
    f"--config.checkpoint_every_steps={REFERENCE_CHECKPOINT_EVERY}",
    "--config.checkpoint.keep=10",
    data_dir=micro_data_dir,
  )
  return workdir
