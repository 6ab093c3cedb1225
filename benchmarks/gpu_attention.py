"""Banded attention and a reduced `vtn_base` train step on an NVIDIA GPU (H100/H200).

Prepared for a borrowed GPU machine that runs its own image (jax 0.11.x, Python 3.12, flax
and optax, no network): `sh benchmarks/gpu_attention.sh` there (the one-line runner; it
says what to carry), or on any machine

  python -m benchmarks.gpu_attention [--smoke] [--lengths 4096,16384,65536] [--repeats 10]

1. Attention, bf16, batch 1, 8 heads × 64, window ±128: forward and forward+backward ms
   (median of `--repeats` after a compile call) and the compiled program's temporaries, at
   each length, for
     lax          `banded_attention(implementation="lax")`, the band alone
     lax + CLS    the same with a global token at position 0 (the model's layers)
     cuDNN causal `jax.nn.dot_product_attention(implementation="cudnn", is_causal=True,
                  local_window_size=(128, 0))`: the sliding window cuDNN supports (one-sided:
                  half the keys of ±128, so not the same work), the speed reference
     XLA ±128     `jax.nn.dot_product_attention(local_window_size=(128, 128))` on XLA's
                  path: a dense T × T mask, skipped where its scores would not fit
     tokamax ±128 `tokamax.dot_product_attention(local_window_size=(128, 128),
                  implementation="triton")`, when tokamax is installed (carried): the
                  two-sided band as per-row key ranges, the kernel `banded_attention` does
                  not use (it cannot be checked without a GPU: README, "Attention
                  implementations"); timed to tell whether it would be worth it
   This part imports nothing of the project but `cmvt_jax/models/attention.py` (whose
   package `__init__`s are empty) and the CPU benchmark's timer (`benchmarks/attention.py`,
   jax and numpy only), so it runs with the image's jax alone.
2. A reduced `vtn_base` train step in bf16 (8 frames of 64×64, batch 4 clips, as
   BENCHMARKS.md's CPU table; `--train_batch`, `--train_frames`, `--train_frame_size`):
   forward + backward + AdamW of the full model on random batches, steps/s, MFU against the
   device's datasheet peak, the compiled program's memory and the device's peak. It imports
   `cmvt_jax.models`, `cmvt_jax.losses`, `cmvt_jax.flops` and `configs.vtn_base`, which need
   flax, optax, absl, etils (in the image) and ml_collections (carried as a wheel); without
   them the section says what is missing and the attention table still prints.

`--smoke` runs both at toy sizes (T = 256 and 512, 2 heads; the micro model): how the script
is checked on a CPU, where the cuDNN row says it needs a GPU.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.attention import timed
from cmvt_jax.models import attention

# The train step's modules: flax, optax, absl, etils (in the GPU image) and ml_collections
# (carried). The attention table needs none of them.
try:
  import optax

  from cmvt_jax import flops as flops_lib
  from cmvt_jax import losses
  from cmvt_jax.models import cmvt
  from configs import micro
  from configs import vtn_base
except ImportError as error:
  TRAIN_STEP_MISSING: ImportError | None = error
else:
  TRAIN_STEP_MISSING = None
try:
  import tokamax
except ImportError:
  tokamax = None

HEADS, HEAD_DIM, WINDOW = 8, 64, 128
LENGTHS = (4096, 16384, 65536)
# XLA's dense local-window path holds B·H·T² float32 scores (and more for the backward);
# beyond this it is skipped.
DENSE_SCORE_BYTES_LIMIT = 16 << 30


def temporaries_mib(jitted, *args) -> float:
  """The compiled program's temporaries (XLA's buffer assignment), MiB."""
  return jitted.lower(*args).compile().memory_analysis().temp_size_in_bytes / 2**20


def implementations(length: int, heads: int, on_gpu: bool) -> dict:
  """name → (q, k, v) → out, or a string saying why the row is skipped."""
  cls = jnp.zeros((1, length), bool).at[:, 0].set(True)
  rows = {
    "lax": lambda q, k, v: attention.banded_attention(q, k, v, window=WINDOW, implementation="lax"),
    "lax + CLS": lambda q, k, v: attention.banded_attention(
      q, k, v, window=WINDOW, global_mask=cls, max_global=1, implementation="lax"
    ),
    "cuDNN causal": "needs an NVIDIA GPU",
    "XLA ±128": lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, local_window_size=(WINDOW, WINDOW), implementation="xla"
    ),
  }
  rows["tokamax ±128"] = "tokamax is not installed"
  if on_gpu:
    rows["cuDNN causal"] = lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, is_causal=True, local_window_size=(WINDOW, 0), implementation="cudnn"
    )
    if tokamax is not None:
      rows["tokamax ±128"] = lambda q, k, v: tokamax.dot_product_attention(
        q, k, v, local_window_size=(WINDOW, WINDOW), implementation="triton"
      )
  elif tokamax is not None:
    rows["tokamax ±128"] = "its kernels need a GPU"
  if 4 * heads * length**2 > DENSE_SCORE_BYTES_LIMIT:
    rows["XLA ±128"] = f"T² scores: {4 * heads * length**2 / 2**30:.0f} GiB"
  return rows


def attention_rows(lengths, heads: int, repeats: int, on_gpu: bool) -> list[tuple]:
  rows = []
  for length in lengths:
    keys = jax.random.split(jax.random.key(length), 3)
    q, k, v = (jax.random.normal(key, (1, length, heads, HEAD_DIM), jnp.bfloat16) for key in keys)
    for name, fn in implementations(length, heads, on_gpu).items():
      if isinstance(fn, str):
        rows.append((length, name, None, None, None, f"skipped: {fn}"))
        continue
      forward = jax.jit(fn)
      loss = lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v).astype(jnp.float32) ** 2)
      both = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
      try:
        fwd = timed(forward, q, k, v, repeats=repeats)
        fwd_bwd = timed(both, q, k, v, repeats=repeats)
        memory = temporaries_mib(both, q, k, v)
      except (jax.errors.JaxRuntimeError, ValueError, NotImplementedError) as error:
        # A backend refusing a case (cuDNN's limits, out of memory) is a result to print.
        words = (str(error).strip().splitlines() or [""])[0][:120]
        rows.append((length, name, None, None, None, f"failed: {type(error).__name__} {words}"))
        continue
      rows.append((length, name, fwd, fwd_bwd, memory, ""))
      print(f"  measured T={length} {name}", file=sys.stderr, flush=True)
  return rows


def train_step_row(config, steps: int) -> dict:
  """steps/s, MFU and memory of forward + backward + AdamW of the model of `config`."""
  inputs = config.input
  batch, frames, size = config.batch_size, inputs.num_frames, inputs.frame_size
  audio_frames = round(frames / inputs.fps * inputs.sample_rate) // inputs.hop_length
  rng = np.random.default_rng(0)
  video = jnp.asarray(rng.normal(size=(batch, frames, size, size, 3)), jnp.float32)
  audio = jnp.asarray(rng.normal(size=(batch, audio_frames, inputs.n_mels)), jnp.float32)
  model = cmvt.from_config(config)
  params = jax.jit(model.init)(jax.random.key(0), video[:1], audio[:1])["params"]
  tx = optax.adamw(1e-4)

  def step(params, opt_state, video, audio, key):
    def loss(params):
      out = model.apply({"params": params}, video, audio, train=True, rngs={"dropout": key})
      return losses.cross_modal_nt_xent(out["video"], out["audio"], 0.1)

    value, grads = jax.value_and_grad(loss)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  jitted = jax.jit(step, donate_argnums=(0, 1))
  opt_state = tx.init(params)
  key = jax.random.key(1)
  compiled = jitted.lower(params, opt_state, video, audio, key).compile()
  memory = compiled.memory_analysis()
  params, opt_state, value = jitted(params, opt_state, video, audio, key)  # warm-up
  jax.block_until_ready(value)
  start = time.perf_counter()
  for index in range(steps):
    params, opt_state, value = jitted(params, opt_state, video, audio, jax.random.key(index))
  jax.block_until_ready(value)
  seconds = (time.perf_counter() - start) / steps
  flops = flops_lib.count(model, video_shape=video.shape[1:], audio_shape=audio.shape[1:])
  stats = jax.devices()[0].memory_stats() or {}
  return {
    "params": sum(x.size for x in jax.tree.leaves(params)),
    "step_s": seconds,
    "mfu": flops.train_step * batch / seconds / flops_lib.peak_flops_per_device(),
    "arguments": memory.argument_size_in_bytes,
    "temporaries": memory.temp_size_in_bytes,
    "peak": stats.get("peak_bytes_in_use"),
    "loss": float(value),
  }


def train_config(args):
  """The reduced `vtn_base` (or, with --smoke, the micro model) in bf16."""
  config = micro.get_config() if args.smoke else vtn_base.get_config()
  config.input.num_frames = args.train_frames
  config.input.frame_size = args.train_frame_size
  config.batch_size = args.train_batch
  config.model.dtype = "bfloat16"
  return config


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--smoke", action="store_true", help="toy sizes, to check the script")
  parser.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--train_steps", type=int, default=20)
  parser.add_argument("--train_batch", type=int, default=4)
  parser.add_argument("--train_frames", type=int, default=8)
  parser.add_argument("--train_frame_size", type=int, default=64)
  args = parser.parse_args()
  heads, lengths = HEADS, [int(x) for x in args.lengths.split(",")]
  if args.smoke:
    heads, lengths, args.repeats, args.train_steps = 2, [256, 512], 2, 2
    args.train_batch, args.train_frames, args.train_frame_size = 2, 4, 16
  device = jax.devices()[0]
  on_gpu = device.platform == "gpu"
  print(
    f"{time.strftime('%Y-%m-%d %H:%M')}, {device.device_kind} ({device.platform}), "
    f"jax {jax.__version__}, Python {platform.python_version()}\n"
  )
  print(
    f"banded attention, bf16, batch 1, {heads} heads × {HEAD_DIM}, window ±{WINDOW}; "
    f"median of {args.repeats} after a compile call"
  )
  print(
    "| T | implementation | forward ms | forward+backward ms | fwd+bwd temporaries MiB | note |"
  )
  print("|---:|---|---:|---:|---:|---|")
  ms = lambda s: "—" if s is None else f"{s * 1e3:.2f}"
  for length, name, fwd, fwd_bwd, memory, note in attention_rows(
    lengths, heads, args.repeats, on_gpu
  ):
    mib = "—" if memory is None else f"{memory:.0f}"
    print(f"| {length} | {name} | {ms(fwd)} | {ms(fwd_bwd)} | {mib} | {note} |", flush=True)

  if TRAIN_STEP_MISSING is not None:
    print(
      f"\ntrain step skipped: {TRAIN_STEP_MISSING} (carry the wheel: see "
      "benchmarks/gpu_attention.sh)"
    )
    return
  config = train_config(args)
  row = train_step_row(config, args.train_steps)
  name = "micro" if args.smoke else "vtn_base"
  print(
    f"\n{name} train step, bf16, {config.batch_size} clips × {config.input.num_frames} "
    f"frames of {config.input.frame_size}², random batches, median over {args.train_steps}"
  )
  print("| params | step ms | steps/s | MFU | arguments GiB | temporaries GiB | device peak GiB |")
  print("|---:|---:|---:|---:|---:|---:|---:|")
  gib = lambda b: "—" if b is None else f"{b / 2**30:.2f}"
  print(
    f"| {row['params'] / 1e6:.1f} M | {row['step_s'] * 1e3:.1f} | {1 / row['step_s']:.2f} | "
    f"{row['mfu']:.1%} | {gib(row['arguments'])} | {gib(row['temporaries'])} | "
    f"{gib(row['peak'])} |"
  )


if __name__ == "__main__":
  main()
