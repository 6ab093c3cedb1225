"""Trains the micro model for a few steps under several meshes and accumulations.

  python -m tests.train.parallel_steps OUT.npz [VARIANT ...]
  (with 8 fake CPU devices: helpers.environment; all variants when none are named)

One process, the same random global batches for every variant, the update step of
`train.make_train_step` itself (no data pipeline: the variants differ only in the layout of
the computation). Writes each variant's per-step losses and final parameters to OUT.npz;
tests/train/test_parallelism.py compares them.
"""

from __future__ import annotations

import sys
import tempfile

import jax
import numpy as np
from flax import traverse_util

from cmvt_jax import run as run_lib
from cmvt_jax import sharding
from cmvt_jax import train
from cmvt_jax.data import pipeline
from configs import micro

STEPS = 10
# The micro model's matrices are all smaller than sharding.FSDP_MIN_SIZE, so this process
# lowers the threshold (it only decides which tensors are worth splitting) to give FSDP
# most of the parameters to split.
FSDP_SPLIT_FROM = 2**10
# name: (mesh axes, optim.grad_accum_steps)
VARIANTS = {
  "data8": ((("data", 8), ("fsdp", 1)), 1),
  "data2_fsdp4": ((("data", 2), ("fsdp", 4)), 1),
  "fsdp8": ((("data", 1), ("fsdp", 8)), 1),
  "accumulate2": ((("data", 8), ("fsdp", 1)), 2),
  "accumulate4": ((("data", 8), ("fsdp", 1)), 4),
}


def micro_config(axes=VARIANTS["data8"][0], grad_accum_steps: int = 1):
  config = micro.get_config()
  config.mesh.axes = axes
  config.optim.grad_accum_steps = grad_accum_steps
  return config


def random_batches(spec, batch_size: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
  """`STEPS` batches of normalised-looking video `[B, T, S, S, 3]` and audio `[B, F, M]`, every
  clip with its audio (`has_audio` `[B]`)."""
  video, audio = run_lib.example_inputs(spec, batch_size)
  rng = np.random.default_rng(seed)
  return [
    {
      "video": rng.standard_normal(video.shape, np.float32),
      "audio": rng.standard_normal(audio.shape, np.float32),
      "has_audio": np.ones(batch_size, bool),
    }
    for _ in range(STEPS)
  ]


def train_variant(axes, grad_accum_steps: int, batches) -> dict[str, np.ndarray]:
  """Losses `[STEPS]`, the initial and the final parameters (flattened: "init/...",
  "params/..." keys)."""
  with tempfile.TemporaryDirectory() as workdir:
    run = run_lib.Run.create(micro_config(axes, grad_accum_steps), workdir)
    state = run.init_state()
    initial = traverse_util.flatten_dict(jax.device_get(state.params), sep="/")
    step = train.make_train_step(run)
    losses = []
    for batch in batches:
      state, metrics = step(state, sharding.global_batch(batch, run.mesh))
      losses.append(float(metrics["loss"]))
  params = traverse_util.flatten_dict(jax.device_get(state.params), sep="/")
  return {
    "losses": np.array(losses),
    **{f"init/{k}": np.asarray(v) for k, v in initial.items()},
    **{f"params/{k}": np.asarray(v) for k, v in params.items()},
  }


def main(out: str, names: list[str]) -> None:
  assert jax.device_count() == 8, "run with 8 devices (helpers.environment(8))"
  sharding.FSDP_MIN_SIZE = FSDP_SPLIT_FROM
  config = micro_config()
  batches = random_batches(pipeline.InputSpec.from_config(config.input), config.batch_size)
  results = {}
  for name in names or VARIANTS:
    axes, accumulate = VARIANTS[name]
    for key, value in train_variant(axes, accumulate, batches).items():
      results[f"{name}:{key}"] = value
  np.savez(out, **results)


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2:])
