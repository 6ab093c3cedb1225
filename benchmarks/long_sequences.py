"""The video temporal encoder alone on film-length sequences (CPU): memory, compile and run time.

  python -m benchmarks.long_sequences [--quick] [--configs default,vtn_base]
      [--lengths 10000,100000,1000000] [--repeats 3] [--compile_all]

What whole-video export runs over a video's frame features: `cmvt.from_config(config)
.video_encoder.temporal` (Dense + time embedding, CLS global, Longformer blocks with banded
attention) at the widths of `configs/default.py` and `configs/vtn_base.py`, inference
(`deterministic=True`, jitted), batch 1, T frames + 1 CLS, float32, all frames valid.

Each (config, T) runs in a fresh child process under an address-space limit
(`RLIMIT_AS`, the memory available when it starts less a margin), so nothing goes into swap
or to the OOM killer. The child lowers and compiles the program and reports its estimate,
arguments + outputs + temporaries of `compile().memory_analysis()`; it runs it only when
the estimate fits the limit: one warm-up call, then the median of `--repeats` timed calls
(one at T >= 1M). Peak RSS is the child's VmHWM while compiling, and again (reset through
/proc/self/clear_refs) while making the inputs and running. A length whose linear
extrapolation from the config's previous compiled estimate exceeds twice the limit is not
compiled (its compile alone would take minutes and GBs) unless `--compile_all`; the table
says so. The last table extrapolates, linearly from the two longest compiled estimates, the
largest T whose estimate fits 24 GiB.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

GIB = 2**30
DEFAULT_LENGTHS = (10_000, 100_000, 1_000_000)
QUICK_LENGTHS = (1_000, 10_000)
CONFIGS = ("default", "vtn_base")
MACHINE_BYTES = 24 * GIB  # the size asked about: the largest T whose estimate fits this
MARGIN = 1 * GIB  # of MemAvailable left to the machine's other users
EXTRAPOLATE_OVER = 2.0  # skip compiling when the extrapolated estimate exceeds this × limit
ONE_RUN_FROM = 1_000_000  # at and above this many frames one timed run is enough


# ----------------------------------------------------------------------------- child


def _status_kib(key: str) -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(key + ":"):
        return int(line.split()[1])
  return 0


def _reset_peak_rss() -> bool:
  """Resets VmHWM to the current RSS (Linux >= 4.0); False where that is not allowed."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def _emit(record: dict) -> None:
  print("RESULT " + json.dumps(record), flush=True)


def temporal_module(name: str):
  """The video temporal encoder of configs/NAME.py in float32, and its input width D_f."""
  from cmvt_jax.models import cmvt
  from configs import default
  from configs import vtn_base

  config = {"default": default, "vtn_base": vtn_base}[name].get_config()
  config.model.dtype = "float32"
  model = cmvt.from_config(config)
  # The frame encoder's output width is what the temporal encoder reads.
  video = config.model.video
  feature_dim = video.vit.width if video.frame_encoder == "vit" else video.resnet.stage_widths[-1]
  return model.video_encoder.temporal, feature_dim


def child(name: str, frames: int, repeats: int, limit: int) -> None:
  import jax
  import jax.numpy as jnp

  module, feature_dim = temporal_module(name)
  params = jax.jit(module.init)(jax.random.key(0), jnp.zeros((1, 16, feature_dim), jnp.float32))
  step = jax.jit(lambda params, x, mask: module.apply(params, x, mask, deterministic=True))
  features = jax.ShapeDtypeStruct((1, frames, feature_dim), jnp.float32)
  mask = jax.ShapeDtypeStruct((1, frames), jnp.bool_)
  start = time.perf_counter()
  lowered = step.lower(params, features, mask)
  lowered_at = time.perf_counter()
  compiled = lowered.compile()
  compiled_at = time.perf_counter()
  memory = compiled.memory_analysis()
  estimate = (
    memory.argument_size_in_bytes
    + memory.output_size_in_bytes
    - memory.alias_size_in_bytes
    + memory.temp_size_in_bytes
  )
  record = {
    "config": name,
    "frames": frames,
    "width": module.width,
    "layers": module.num_layers,
    "lower_s": lowered_at - start,
    "compile_s": compiled_at - lowered_at,
    "estimate": estimate,
    "arguments": memory.argument_size_in_bytes,
    "temporaries": memory.temp_size_in_bytes,
    "compile_peak_rss": _status_kib("VmHWM") * 1024,
  }
  if estimate > limit:
    _emit({**record, "ran": False})
    return
  _emit({**record, "ran": None})  # the estimate, in case the run dies
  record["peak_reset"] = _reset_peak_rss()
  x = jax.jit(lambda key: jax.random.normal(key, (1, frames, feature_dim), jnp.float32))(
    jax.random.key(1)
  )
  valid = jnp.ones((1, frames), jnp.bool_)
  jax.block_until_ready(compiled(params, x, valid))  # warm-up
  times = []
  for _ in range(1 if frames >= ONE_RUN_FROM else repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(params, x, valid))
    times.append(time.perf_counter() - start)
  _emit(
    {
      **record,
      "ran": True,
      "runs": len(times),
      "run_s": statistics.median(times),
      "run_peak_rss": _status_kib("VmHWM") * 1024,
    }
  )


# ----------------------------------------------------------------------------- parent


def memory_available() -> int:
  with open("/proc/meminfo") as f:
    for line in f:
      if line.startswith("MemAvailable:"):
        return int(line.split()[1]) * 1024
  raise RuntimeError("no MemAvailable in /proc/meminfo")


def load_average() -> str:
  return " ".join(f"{x:.2f}" for x in os.getloadavg())


def cpu_model() -> str:
  with open("/proc/cpuinfo") as f:
    for line in f:
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  return platform.processor() or platform.machine()


def measure(name: str, frames: int, repeats: int, limit: int) -> dict:
  """One child process under RLIMIT_AS = `limit`; its last RESULT line (or what killed it)."""

  def limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

  command = [sys.executable, "-m", "benchmarks.long_sequences", "--child"]
  command += [name, str(frames), str(repeats), str(limit)]
  start = time.perf_counter()
  result = subprocess.run(
    command, capture_output=True, text=True, preexec_fn=limit_memory, check=False
  )
  records = [
    json.loads(line.removeprefix("RESULT "))
    for line in result.stdout.splitlines()
    if line.startswith("RESULT ")
  ]
  record = records[-1] if records else {"config": name, "frames": frames}
  record["wall_s"] = time.perf_counter() - start
  record["limit"] = limit
  if result.returncode:
    tail = (result.stderr.strip().splitlines() or [f"exit {result.returncode}"])[-1]
    record["failed"] = f"exit {result.returncode} under its {limit / GIB:.1f} GiB limit: {tail}"
  return record


def _gib(x) -> str:
  return f"{x / GIB:.2f}"


def row(r: dict) -> str:
  per_frame = f"{r['estimate'] / (r['frames'] + 1) / 1024:.1f}" if "estimate" in r else "—"
  estimate = _gib(r["estimate"]) if "estimate" in r else f"~{_gib(r['extrapolated'])} (extrap.)"
  compile_s = f"{r['lower_s']:.1f} + {r['compile_s']:.1f}" if "compile_s" in r else "—"
  compile_rss = _gib(r["compile_peak_rss"]) if "compile_peak_rss" in r else "—"
  if r.get("ran"):
    run = f"{r['run_s']:.3f}" + (" (1 run)" if r["runs"] == 1 else "")
    rate = f"{r['frames'] / r['run_s']:,.0f}"
    rss = _gib(r["run_peak_rss"]) + ("" if r.get("peak_reset") else " (whole process)")
    note = ""
  else:
    run = rate = rss = "—"
    if "failed" in r:
      note = r["failed"]
    elif "estimate" in r:
      note = f"does not fit: {_gib(r['estimate'])} GiB estimated > {_gib(r['limit'])} GiB limit"
    else:
      note = (
        f"does not fit: ~{_gib(r['extrapolated'])} GiB estimated (extrapolated from "
        f"{r['from']:,} frames; not compiled, see --compile_all)"
      )
  return (
    f"| {r['config']} | {r['width']}×{r['layers']} | {r['frames']:,} | {estimate} | {per_frame} | "
    f"{compile_s} | {compile_rss} | {run} | {rate} | {rss} | {note} |"
  )


def largest_fitting(rows: list[dict]) -> str:
  compiled = sorted((r for r in rows if "estimate" in r), key=lambda r: r["frames"])
  if len(compiled) < 2:
    return "— (needs two compiled lengths)"
  a, b = compiled[-2], compiled[-1]
  slope = (b["estimate"] - a["estimate"]) / (b["frames"] - a["frames"])
  frames = b["frames"] + (MACHINE_BYTES - b["estimate"]) / slope
  fits = [r["frames"] for r in compiled if r["estimate"] <= MACHINE_BYTES]
  how = "interpolated" if fits and b["estimate"] > MACHINE_BYTES else "extrapolated"
  return (
    f"{frames:,.0f} ({how}, linear through {a['frames']:,} and {b['frames']:,}: "
    f"{slope * 1000 / 2**20:.1f} MiB per 1k frames)"
  )


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help=f"lengths {QUICK_LENGTHS}")
  parser.add_argument("--configs", default=",".join(CONFIGS))
  parser.add_argument("--lengths", default=None, help="comma-separated frame counts")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--compile_all", action="store_true", help="compile every length")
  parser.add_argument("--child", nargs=4, metavar=("CONFIG", "T", "REPEATS", "LIMIT"))
  args = parser.parse_args()
  if args.child:
    name, frames, repeats, limit = args.child
    child(name, int(frames), int(repeats), int(limit))
    return
  import jax  # the version only; every measurement runs in a child

  lengths = (
    [int(x) for x in args.lengths.split(",")]
    if args.lengths
    else (QUICK_LENGTHS if args.quick else DEFAULT_LENGTHS)
  )
  started = time.time()
  print(
    f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {cpu_model()}, {os.cpu_count()} "
    f"cores, {memory_available() / GIB:.1f} GiB available, load average {load_average()}, "
    f"jax {jax.__version__}"
  )
  print(
    "video temporal encoder alone, inference (deterministic, jitted), batch 1, T frames + 1 CLS, "
    "float32, one child process per row\n"
  )
  print(
    "| config | width×layers | T | estimate GiB | KiB per frame | lower + compile s | "
    "compile peak RSS GiB | run s (median) | frames/s | run peak RSS GiB | note |"
  )
  print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
  by_config = {}
  for name in args.configs.split(","):
    rows = by_config.setdefault(name, [])
    for frames in lengths:
      limit = memory_available() - MARGIN
      compiled = [r for r in rows if "estimate" in r]
      if compiled and not args.compile_all:
        last = compiled[-1]
        guess = last["estimate"] * (frames + 1) / (last["frames"] + 1)
        if guess > EXTRAPOLATE_OVER * limit:
          record = {
            "config": name,
            "frames": frames,
            "width": last["width"],
            "layers": last["layers"],
            "extrapolated": guess,
            "from": last["frames"],
            "limit": limit,
          }
          rows.append(record)
          print(row(record), flush=True)
          continue
      record = measure(name, frames, args.repeats, limit)
      if "width" not in record:  # died before its estimate
        print(f"| {name} | | {frames:,} | | | | | | | | {record['failed']} |", flush=True)
        continue
      rows.append(record)
      print(row(record), flush=True)

  print("\n| config | largest T whose estimate fits 24 GiB |")
  print("|---|---|")
  for name, rows in by_config.items():
    print(f"| {name} | {largest_fitting(rows)} |")
  print(
    f"\n{(time.time() - started) / 60:.1f} min in all; load average at the end {load_average()}"
  )


if __name__ == "__main__":
  main()
