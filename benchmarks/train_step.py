"""Training-step throughput and compiled memory, printed as tables.

1. clips/s, step time and MFU of the full train step (random batches, so the input pipeline
   is not measured here) for the default config and a reduced `vtn_base` on this machine.
2. Compiled memory (`compile().memory_analysis()`, nothing executed) of the temporal encoder
   alone at `vtn_base` widths, forward+backward, from 256 to 65536 frames: it grows linearly.
3. Compiled memory of the full `vtn_base` train step at 16 and 256 frames.

  python -m benchmarks.train_step [--quick]
"""

from __future__ import annotations

import argparse
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from cmvt_jax import flops as flops_lib
from cmvt_jax import run as run_lib
from cmvt_jax import sharding
from cmvt_jax import train
from cmvt_jax.models import temporal_encoder
from configs import default
from configs import vtn_base


def reduced_vtn_base():
  """vtn_base widths and depths on a CPU-sized input: 8 frames of 64×64, batch 4."""
  config = vtn_base.get_config()
  config.input.num_frames = 8
  config.input.frame_size = 64
  config.batch_size = 4
  config.model.dtype = "float32"  # a CPU gains nothing from bf16
  return config


def random_batch(run: run_lib.Run, batch_size: int) -> dict:
  rng = np.random.default_rng(0)
  video, audio = run_lib.example_inputs(run.spec, batch_size)
  host = {
    "video": rng.normal(size=video.shape).astype(np.float32),
    "audio": rng.normal(size=audio.shape).astype(np.float32),
    "label": np.zeros(batch_size, np.int32),
    "has_audio": np.ones(batch_size, bool),
  }
  return sharding.global_batch(host, run.mesh)


def step_timing(name: str, config, steps: int) -> dict:
  run = run_lib.Run.create(config, "/tmp/unused_workdir")
  state = run.init_state()
  step = train.make_train_step(run)
  batch = random_batch(run, config.batch_size)
  state, metrics = step(state, batch)  # compile
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  seconds = (time.perf_counter() - start) / steps
  flops = run.flops().train_step * config.batch_size
  peak = flops_lib.peak_flops_per_device() * jax.device_count()
  params = sum(x.size for x in jax.tree.leaves(state.params))
  return {
    "name": name,
    "batch": config.batch_size,
    "params": params,
    "step_s": seconds,
    "clips_per_s": config.batch_size / seconds,
    "mfu": flops / seconds / peak,
    "gflop_per_step": flops / 1e9,
  }


def temporal_encoder_bytes(frames: int) -> int:
  """Peak temp + argument + output bytes of forward+backward of vtn_base's temporal encoder."""
  temporal = vtn_base.get_config().model.video.temporal
  module = temporal_encoder.TemporalEncoder(
    width=temporal.width,
    num_layers=temporal.num_layers,
    num_heads=temporal.num_heads,
    mlp_dim=temporal.mlp_dim,
    windows=(temporal.windows[0],) * temporal.num_layers,
    dilations=(1,) * temporal.num_layers,
    global_projections=True,
    dropout_rate=0.0,
  )
  features = jax.ShapeDtypeStruct((1, frames, 768), jnp.float32)
  params = jax.eval_shape(module.init, jax.random.key(0), features)

  def loss(params, features):
    return jnp.sum(module.apply(params, features) ** 2)

  compiled = jax.jit(jax.grad(loss)).lower(params, features).compile()
  return _bytes(compiled)


def full_step_bytes(frames: int) -> int:
  config = vtn_base.get_config()
  config.input.num_frames = frames
  config.batch_size = 2  # the smallest contrastive batch: one positive, one negative
  config.model.dtype = "float32"
  run = run_lib.Run.create(config, "/tmp/unused_workdir")
  video, audio = run_lib.example_inputs(run.spec, 2)
  batch = {
    "video": jax.ShapeDtypeStruct(video.shape, jnp.float32),
    "audio": jax.ShapeDtypeStruct(audio.shape, jnp.float32),
    "label": jax.ShapeDtypeStruct((2,), jnp.int32),
    "has_audio": jax.ShapeDtypeStruct((2,), jnp.bool_),
  }
  compiled = train.make_train_step(run).lower(run.abstract_state, batch).compile()
  return _bytes(compiled)


def _bytes(compiled) -> int:
  memory = compiled.memory_analysis()
  return (
    memory.temp_size_in_bytes
    + memory.argument_size_in_bytes
    + memory.output_size_in_bytes
    - memory.alias_size_in_bytes
  )


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="fewer steps and lengths")
  args = parser.parse_args()
  steps = 3 if args.quick else 10

  print(
    f"{time.strftime('%Y-%m-%d')}, {platform.machine()}, {jax.device_count()} × "
    f"{jax.devices()[0].device_kind}, jax {jax.__version__}"
  )
  print("\n| config | global batch | params | step s | clips/s | GFLOP/step | MFU |")
  print("|---|---:|---:|---:|---:|---:|---:|")
  for name, config in (
    ("default", default.get_config()),
    ("vtn_base reduced (8×64², batch 4, fp32)", reduced_vtn_base()),
  ):
    row = step_timing(name, config, steps)
    print(
      f"| {row['name']} | {row['batch']} | {row['params'] / 1e6:.2f} M | "
      f"{row['step_s']:.3f} | {row['clips_per_s']:.1f} | {row['gflop_per_step']:.1f} | "
      f"{row['mfu']:.1%} |"
    )

  lengths = [256, 4096] if args.quick else [256, 1024, 4096, 16384, 65536]
  print(
    "\nTemporal encoder alone (vtn_base: width 768, 3 layers, 12 heads, window ±9), "
    "forward+backward, batch 1, float32, compiled memory:"
  )
  print("| frames | MiB | MiB per 1k frames |")
  print("|---:|---:|---:|")
  for frames in lengths:
    size = temporal_encoder_bytes(frames)
    print(f"| {frames} | {size / 2**20:.1f} | {size / 2**20 / frames * 1000:.1f} |")

  print("\nFull vtn_base train step (ViT-B/16 at 224², batch 2, float32), compiled memory:")
  print("| frames | GiB |")
  print("|---:|---:|")
  for frames in (16, 256):
    print(f"| {frames} | {full_step_bytes(frames) / 2**30:.2f} |")


if __name__ == "__main__":
  main()
