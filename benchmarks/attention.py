"""Banded attention vs JAX's local-window attention vs dense attention (and Hugging Face).

Prints one table from one run: forward and forward+backward time per sequence length for
(a) `cmvt_jax.models.attention.banded_attention`, (b) `jax.nn.dot_product_attention` with
`local_window_size=(w, w)` on its XLA path, (c) dense full attention; the machine's float32
matmul throughput measured in the same run and the banded kernel's useful FLOP/s as a
fraction of it; peak RSS of banded forward+backward at long lengths (each in a fresh
process); and (d) Hugging Face's `LongformerSelfAttention` (PyTorch, CPU) against the same
work in cmvt_jax, when `--torch_python` names an interpreter with torch and transformers
(a benchmark-only virtualenv; torch never enters requirements.txt).

  python -m benchmarks.attention [--quick] [--torch_python /path/to/venv/bin/python]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from cmvt_jax.models.attention import banded_attention

BATCH, HEADS, HEAD_DIM, WINDOW = 1, 8, 64, 128
# (b) and (c) hold B·H·T² float32 scores (plus masks and, for the backward, probabilities);
# beyond this many score bytes they are skipped rather than swapping the machine.
DENSE_SCORE_BYTES_LIMIT = 3 << 30
# (d): one attention layer with its projections, as Hugging Face's LongformerSelfAttention.
LAYER_LENGTH, LAYER_HIDDEN = 4096, 512


def timed(fn, *args, repeats: int) -> float:
  """Median wall time of `fn(*args)` after one warm-up (compile) call, in seconds."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def matmul_throughput(repeats: int) -> float:
  """float32 GFLOP/s of a 4096² matmul, the machine's practical peak."""
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4096, 4096)), jnp.float32)
  seconds = timed(jax.jit(jnp.matmul), x, x, repeats=repeats)
  return 2 * 4096**3 / seconds / 1e9


def implementations():
  banded = lambda q, k, v: banded_attention(q, k, v, window=WINDOW)
  local = lambda q, k, v: jax.nn.dot_product_attention(
    q, k, v, local_window_size=(WINDOW, WINDOW), implementation="xla"
  )
  dense = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla")
  return {"banded": banded, "jax local": local, "dense": dense}


def forward_and_backward(fn):
  forward = jax.jit(fn)
  loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) ** 2)
  both = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
  return forward, both


def useful_forward_flops(length: int) -> float:
  """4·B·H·T·(2w+1)·D: q·kᵀ and p·v over the keys the band allows (edges ignored)."""
  return 4 * BATCH * HEADS * length * (2 * WINDOW + 1) * HEAD_DIM


def timing_rows(lengths, repeats, peak):
  rows = []
  for length in lengths:
    keys = jax.random.split(jax.random.key(length), 3)
    q, k, v = (jax.random.normal(key, (BATCH, length, HEADS, HEAD_DIM)) for key in keys)
    for name, fn in implementations().items():
      score_bytes = 4 * BATCH * HEADS * length**2
      if name != "banded" and score_bytes > DENSE_SCORE_BYTES_LIMIT:
        rows.append((length, name, None, None, "skipped: T² scores would not fit"))
        continue
      forward, both = forward_and_backward(fn)
      fwd = timed(forward, q, k, v, repeats=repeats)
      fwd_bwd = timed(both, q, k, v, repeats=repeats)
      note = ""
      if name == "banded":
        rate = useful_forward_flops(length) / fwd / 1e9
        note = f"{rate:.1f} GFLOP/s useful = {rate / peak:.0%} of matmul"
      rows.append((length, name, fwd, fwd_bwd, note))
      print(f"  measured T={length} {name}", file=sys.stderr, flush=True)
  return rows


# VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec from the (large) parent process.
PEAK_RSS_CHILD = """
import re, sys, jax, jax.numpy as jnp
from cmvt_jax.models.attention import banded_attention
length = int(sys.argv[1])
x = jnp.ones((1, length, 8, 64), jnp.float32) * 0.01
loss = lambda q, k, v: jnp.sum(banded_attention(q, k, v, window=128) ** 2)
grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, x, x)
jax.block_until_ready(grads)
status = open("/proc/self/status").read()
print(int(re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1)) * 1024)
"""


def peak_rss_bytes(length: int) -> int:
  """Peak RSS of a fresh process that runs one banded forward+backward (B=1, H=8, D=64)."""
  result = subprocess.run(
    [sys.executable, "-c", PEAK_RSS_CHILD, str(length)], capture_output=True, text=True, check=True
  )
  return int(result.stdout.strip().splitlines()[-1])


def cmvt_layer_seconds(length: int, hidden: int, repeats: int) -> float:
  """Three projections + banded attention at hidden width, as in (d)."""
  heads = 8
  keys = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(keys[0], (1, length, hidden))
  weights = [
    jax.random.normal(key, (hidden, heads, hidden // heads)) * hidden**-0.5 for key in keys[1:]
  ]

  def layer(x, wq, wk, wv):
    q, k, v = (jnp.einsum("btd,dhk->bthk", x, w) for w in (wq, wk, wv))
    return banded_attention(q, k, v, window=WINDOW)

  return timed(jax.jit(layer), x, *weights, repeats=repeats)


def fresh_process_layer_seconds(repeats: int) -> float:
  """`cmvt_layer_seconds` in a fresh process, as the Hugging Face side is measured.

  The parent has by then allocated and freed gigabytes for (b) and (c); a fresh process
  starts from the same clean heap as the torch one.
  """
  result = subprocess.run(
    [sys.executable, "-m", "benchmarks.attention", "--layer_only", "--repeats", str(repeats)],
    capture_output=True,
    text=True,
    check=True,
  )
  return json.loads(result.stdout.strip().splitlines()[-1])["seconds"]


def hugging_face_seconds(torch_python: str, length: int, hidden: int, repeats: int) -> dict:
  script = __file__.replace("attention.py", "hf_longformer.py")
  result = subprocess.run(
    [
      torch_python,
      script,
      "--length",
      str(length),
      "--hidden",
      str(hidden),
      "--window",
      str(WINDOW),
      "--repeats",
      str(repeats),
    ],
    capture_output=True,
    text=True,
    check=True,
  )
  return json.loads(result.stdout.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="short lengths, few repeats")
  parser.add_argument("--torch_python", help="python with torch + transformers for (d)")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument(
    "--layer_only", action="store_true", help="print (d)'s cmvt_jax layer seconds as JSON and exit"
  )
  args = parser.parse_args()
  if args.layer_only:
    print(json.dumps({"seconds": cmvt_layer_seconds(LAYER_LENGTH, LAYER_HIDDEN, args.repeats)}))
    return
  lengths = [1024, 4096] if args.quick else [1024, 4096, 8192, 16384]
  rss_lengths = [4096] if args.quick else [16384, 65536]
  repeats = 2 if args.quick else args.repeats

  peak = matmul_throughput(repeats)
  rows = timing_rows(lengths, repeats, peak)

  print(
    f"\n{time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
    f"{jax.device_count()} × {jax.devices()[0].device_kind}, jax {jax.__version__}, "
    f"batch {BATCH}, heads {HEADS}, head_dim {HEAD_DIM}, window ±{WINDOW}, float32"
  )
  print(f"float32 matmul throughput (4096², same run): {peak:.0f} GFLOP/s\n")
  print("| T | implementation | forward ms | forward+backward ms | note |")
  print("|---:|---|---:|---:|---|")
  for length, name, fwd, fwd_bwd, note in rows:
    ms = lambda s: "—" if s is None else f"{s * 1e3:.1f}"
    print(f"| {length} | {name} | {ms(fwd)} | {ms(fwd_bwd)} | {note} |")
  by_name = {(length, name): fwd for length, name, fwd, _, _ in rows}
  print("\n| T | banded speed-up over jax local (forward) |")
  print("|---:|---:|")
  for length in lengths:
    local = by_name.get((length, "jax local"))
    speedup = "—" if local is None else f"{local / by_name[(length, 'banded')]:.1f}×"
    print(f"| {length} | {speedup} |")

  print("\n| T | banded forward+backward peak RSS (fresh process) |")
  print("|---:|---:|")
  for length in rss_lengths:
    print(f"| {length} | {peak_rss_bytes(length) / 2**30:.2f} GiB |")

  if args.torch_python:
    hidden, length = LAYER_HIDDEN, LAYER_LENGTH
    ours = fresh_process_layer_seconds(repeats)
    theirs = hugging_face_seconds(args.torch_python, length, hidden, repeats)
    print(
      f"\n(d) q/k/v projections + attention, T={length}, hidden {hidden}, 8 heads, "
      f"window ±{WINDOW} (HF attention_window={2 * WINDOW}), forward, CPU"
    )
    print("| implementation | forward ms |")
    print("|---|---:|")
    print(
      f"| Hugging Face LongformerSelfAttention (torch {theirs['torch']}, "
      f"transformers {theirs['transformers']}, {theirs['threads']} threads) | "
      f"{theirs['seconds'] * 1e3:.1f} |"
    )
    print(f"| cmvt_jax projections + banded_attention | {ours * 1e3:.1f} |")
    print(f"| speed-up | {theirs['seconds'] / ours:.1f}× |")


if __name__ == "__main__":
  main()
