"""`banded_attention` forward + backward compiled for one TPU chip at long lengths (no TPU).

  python -m benchmarks.banded_attention_tpu [--lengths 16384,65536,...] [--topology v5e-1]

Needs the TPU compiler (`pip install -r requirements-tpu.txt`). For each length T it compiles
the gradient of `sum(banded_attention(q, k, v) · g)` (bf16, batch 1, 8 heads × 64, window ±128,
the layout of a whole-video pass) for one chip and prints per-chip arguments and temporaries,
temporaries per position, the largest array of the optimised HLO (elements; a dense score
matrix would have T² of them per head) and the compile time. Linear memory means a constant
bytes-per-position column.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from cmvt_jax import compile as compile_lib
from cmvt_jax.models import attention

HEADS, HEAD_DIM, WINDOW = 8, 64, 128
DEFAULT_LENGTHS = (16_384, 65_536, 131_072, 262_144, 524_288, 1_048_576)


def compiled_gradient(length: int, device) -> jax.stages.Compiled:
  """The compiled (q, k, v, g) → (dq, dk, dv) of banded attention at `length` on `device`."""
  on_chip = jax.sharding.SingleDeviceSharding(device)
  x = jax.ShapeDtypeStruct((1, length, HEADS, HEAD_DIM), jnp.bfloat16, sharding=on_chip)

  def loss(q, k, v, g):
    out = attention.banded_attention(q, k, v, window=WINDOW)
    return jnp.sum(out.astype(jnp.float32) * g.astype(jnp.float32))

  return jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, x, x, x).compile()


def largest_array(hlo_text: str) -> int:
  """Elements of the largest array any instruction of the HLO produces."""
  shapes = compile_lib.ARRAY_SHAPE.findall(hlo_text)
  return max((compile_lib.array_elements(dims) for _, dims in shapes), default=0)


def measure(length: int, device) -> dict:
  start = time.perf_counter()
  compiled = compiled_gradient(length, device)
  seconds = time.perf_counter() - start
  memory = compiled.memory_analysis()
  return {
    "length": length,
    "arguments": memory.argument_size_in_bytes,
    "temporaries": memory.temp_size_in_bytes,
    "largest": largest_array(compiled.as_text()),
    "seconds": seconds,
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--lengths", default=",".join(map(str, DEFAULT_LENGTHS)))
  parser.add_argument("--topology", default="v5e-1", help="a one-chip topology")
  args = parser.parse_args()
  device = compile_lib.Topology.parse(args.topology).devices(1)[0]
  print(f"banded_attention fwd+bwd, bf16, 1 × T × {HEADS} heads × {HEAD_DIM}, window ±{WINDOW},")
  print(f"one {device.device_kind} chip ({args.topology}), jax {jax.__version__}\n")
  print(
    "| T | arguments MiB | temporaries MiB | temporaries B/position | largest array "
    "(elements) | largest / T | compile s |"
  )
  print("|---|---|---|---|---|---|---|")
  for length in map(int, args.lengths.split(",")):
    row = measure(length, device)
    print(
      f"| {length:,} | {row['arguments'] / 2**20:.0f} | {row['temporaries'] / 2**20:.0f} | "
      f"{row['temporaries'] / length:,.0f} | {row['largest']:,} | "
      f"{row['largest'] / length:.0f} | {row['seconds']:.1f} |",
      flush=True,
    )


if __name__ == "__main__":
  main()
