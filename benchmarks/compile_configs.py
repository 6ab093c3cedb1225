"""The shipped accelerator configs compiled for their TPU topologies, remat on and off.

  python -m benchmarks.compile_configs [--cases=NAME,...] [--workdir=DIR]

Each case is one `python -m cmvt_jax.main --mode compile` in a fresh process (its compile
times are cold), needing requirements-tpu.txt. Prints one markdown row per program: per-chip
arguments, temporaries and total, the headroom in the chip's HBM, the collectives and the
compile time, from each case's `compile/summary.json`; a program the TPU compiler refused
shows the compiler's words. Paste the table into BENCHMARKS.md with date and machine.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

GIB = 1 << 30
REPO = pathlib.Path(__file__).resolve().parents[1]
# name: (config, overrides)
CASES = {
  "vtn_base": ("vtn_base", ()),
  "vtn_base (remat off)": (
    "vtn_base",
    ("--config.model.remat=False", "--config.compile.programs=('train_step',)"),
  ),
  "tpu_pod": ("tpu_pod", ()),
  "tpu_pod (2 slices)": (
    "tpu_pod",
    ("--config.compile.num_slices=2", "--config.compile.programs=('train_step',)"),
  ),
  "tpu_pod (remat off)": (
    "tpu_pod",
    ("--config.model.remat=False", "--config.compile.programs=('train_step',)"),
  ),
}
_CASES = flags.DEFINE_list("cases", list(CASES), f"Which of {list(CASES)}.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where the cases' compile/ folders go.")


def compile_case(name: str, workdir: pathlib.Path) -> tuple[dict, float, int]:
  """(summary.json, wall seconds, exit status) of one case."""
  config, overrides = CASES[name]
  command = [
    sys.executable,
    "-m",
    "cmvt_jax.main",
    f"--config=configs/{config}.py",
    f"--workdir={workdir}",
    "--mode=compile",
    *overrides,
  ]
  start = time.perf_counter()
  result = subprocess.run(command, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
  seconds = time.perf_counter() - start
  summary = json.loads((workdir / "compile" / "summary.json").read_text())
  return summary, seconds, result.returncode


def rows(name: str, summary: dict, seconds: float, status: int) -> list[str]:
  where = summary["topology"]
  if summary["num_slices"] > 1:
    where = f"{summary['num_slices']} × {where}"
  lines = []
  for program, found in summary["programs"].items():
    hbm = found["hbm_bytes_per_chip"] / GIB
    if "compiler" in found:
      lines.append(
        f"| {name} | {where} | {program} | — | — | does not fit: {found['compiler']} | "
        f"{hbm:.0f} | — | — | {found['lower_seconds']:.0f} + {found['compile_seconds']:.0f} |"
      )
      continue
    memory = {key: value / GIB for key, value in found["per_chip_bytes"].items()}
    counts = found["collectives"]
    collectives = " / ".join(
      str(counts.get(kind, 0)) for kind in ("all-gather", "reduce-scatter", "all-reduce")
    )
    lines.append(
      f"| {name} | {where} | {program} | {memory['arguments']:.2f} | "
      f"{memory['temporaries']:.2f} | {memory['total']:.2f} | {hbm:.0f} | "
      f"{100 * found['headroom']:.0f}% | {collectives} | "
      f"{found['lower_seconds']:.0f} + {found['compile_seconds']:.0f} |"
    )
  lines.append(f"|  | (whole case: {seconds:.0f} s wall, exit {status}) | | | | | | | | |")
  return lines


def main(argv):
  del argv
  root = pathlib.Path(_WORKDIR.value or tempfile.mkdtemp(prefix="compile_configs_"))
  table = [
    "| case | topology | program | arguments GiB | temporaries GiB | total GiB | HBM GiB "
    "| headroom | all-gather / reduce-scatter / all-reduce | lower + compile s |",
    "|---|---|---|---:|---:|---:|---:|---:|---|---:|",
  ]
  for name in _CASES.value:
    workdir = root / "".join(c if c.isalnum() else "_" for c in name)
    summary, seconds, status = compile_case(name, workdir)
    table += rows(name, summary, seconds, status)
    print("\n".join(table), flush=True)


if __name__ == "__main__":
  app.run(main)
