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
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
