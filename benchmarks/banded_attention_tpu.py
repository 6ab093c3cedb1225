"""`banded_attention` forward + backward compiled for one TPU chip at long lengths (no TPU).

  python -m benchmarks.banded_attention_tpu [--lengths 16384,65536,...] [--topology v5e-1]
      [--implementations lax,splash] [--no_global_token]

Needs the TPU compiler (`pip install -r requirements-tpu.txt`). For each length T and each
implementation it compiles the gradient of `sum(banded_attention(q, k, v) · g)` (bf16,
batch 1, 8 heads × 64, window ±128, one global token as in a whole-video pass, or none)
for one chip and prints per-chip arguments and temporaries, temporaries per position, the
largest array of the optimised HLO outside the kernels (elements; a dense score matrix
would have T² of them per head) and the compile time. Linear memory means a constant
bytes-per-position column. A second table times building the splash kernel's block
structure (its `MaskInfo`s) at each length.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from cmvt_jax import compile as compile_lib
from cmvt_jax.models import attention

HEADS, HEAD_DIM, WINDOW = 8, 64, 128
DEFAULT_LENGTHS = (16_384, 65_536, 131_072, 262_144, 524_288, 1_048_576)


def compiled_gradient(
  length: int, device, implementation: str, *, global_token: bool = True
) -> jax.stages.Compiled:
  """The compiled (q, k, v, global_mask, g) → (dq, dk, dv) of banded attention at `length`
  on `device`, with one global token per row or none (the mask an input: as a constant XLA
  would spend seconds folding `jnp.nonzero` over it)."""
  on_chip = jax.sharding.SingleDeviceSharding(device)
  x = jax.ShapeDtypeStruct((1, length, HEADS, HEAD_DIM), jnp.bfloat16, sharding=on_chip)
  mask = jax.ShapeDtypeStruct((1, length), jnp.bool_, sharding=on_chip)

  def loss(q, k, v, global_mask, g):
    out = attention.banded_attention(
      q,
      k,
      v,
      window=WINDOW,
      global_mask=global_mask if global_token else None,
      max_global=1 if global_token else None,
      implementation=implementation,
    )
    return jnp.sum(out.astype(jnp.float32) * g.astype(jnp.float32))

  return jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, x, x, mask, x).compile()


def largest_array(hlo_text: str) -> int:
  """Elements of the largest array any instruction of the HLO produces."""
  shapes = compile_lib.ARRAY_SHAPE.findall(hlo_text)
  return max((compile_lib.array_elements(dims) for _, dims in shapes), default=0)


def measure(length: int, device, implementation: str, global_token: bool) -> dict:
  start = time.perf_counter()
  compiled = compiled_gradient(length, device, implementation, global_token=global_token)
  seconds = time.perf_counter() - start
  memory = compiled.memory_analysis()
  return {
    "length": length,
    "implementation": implementation,
    "arguments": memory.argument_size_in_bytes,
    "temporaries": memory.temp_size_in_bytes,
    "largest": largest_array(compiled.as_text()),
    "seconds": seconds,
  }


def block_structure_seconds(length: int, repeats: int = 5) -> float:
  """Median wall seconds of building the splash kernel's `MaskInfo`s (median of `repeats`)
  for one band of `length` positions with one global slot (what one layer's trace does)."""
  layout = attention._SplashLayout(length, WINDOW, 1)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(layout.mask_infos())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--lengths", default=",".join(map(str, DEFAULT_LENGTHS)))
  parser.add_argument("--topology", default="v5e-1", help="a one-chip topology")
  parser.add_argument("--implementations", default=",".join(attention.IMPLEMENTATIONS))
  parser.add_argument(
    "--no_global_token", action="store_true", help="the band alone, without a global token"
  )
  args = parser.parse_args()
  global_token = not args.no_global_token
  lengths = [int(length) for length in args.lengths.split(",")]
  device = compile_lib.Topology.parse(args.topology).devices(1)[0]
  print(
    f"banded_attention fwd+bwd, bf16, 1 × T × {HEADS} heads × {HEAD_DIM}, window ±{WINDOW}, "
    + ("one global token," if global_token else "no global token,")
  )
  print(f"one {device.device_kind} chip ({args.topology}), jax {jax.__version__}\n")
  print(
    "| T | implementation | arguments MiB | temporaries MiB | temporaries B/position | "
    "largest array (elements) | largest / T | compile s |"
  )
  print("|---|---|---|---|---|---|---|---|")
  for length in lengths:
    for implementation in args.implementations.split(","):
      try:
        row = measure(length, device, implementation, global_token)
      except jax.errors.JaxRuntimeError as error:
        words = str(error).strip().splitlines()[0]
        if not words.startswith("RESOURCE_EXHAUSTED"):
          raise
        print(f"| {length:,} | {implementation} | does not fit one chip: {words} |", flush=True)
        continue
      print(
        f"| {length:,} | {implementation} | {row['arguments'] / 2**20:.0f} | "
        f"{row['temporaries'] / 2**20:.0f} | {row['temporaries'] / length:,.0f} | "
        f"{row['largest']:,} | {row['largest'] / length:.0f} | {row['seconds']:.1f} |",
        flush=True,
      )
  block = attention._splash_block(WINDOW)
  print(f"\nsplash block structure (blocks of {block}, one global slot), built on this CPU:\n")
  print("| T | kernel calls (chunks) | query blocks per call | key blocks per call | build ms |")
  print("|---|---|---|---|---|")
  for length in lengths:
    layout = attention._SplashLayout(length, WINDOW, 1)
    print(
      f"| {length:,} | {layout.chunks} | {layout.query_blocks} | {layout.key_blocks} | "
      f"{block_structure_seconds(length) * 1e3:.2f} |",
      flush=True,
    )


if __name__ == "__main__":
  main()
