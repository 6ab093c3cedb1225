"""Proof that it learns: the default run's test metrics beside a random init and an ablation.

For each seed, `python -m cmvt_jax.main` trains (as a user runs it, in a fresh process):
  * the default config (Longformer temporal encoder over the frames), and
  * the ablation `model.video.temporal.num_layers=0`: the video tower's temporal encoder
    replaced by a masked mean over time, so the video embedding cannot know the order of
    the frames (only which objects at which heights appear how often);
and the final evaluation on the test split is read from the run's metrics.jsonl. The same
model at its random initialisation (no training) is evaluated in this process. Printed as a
Markdown table: mean ± sample std (min–max) over the seeds, per metric; then a→v R@1 of each
seed, since the promise is that every seed learns (not only their mean).

  python -m benchmarks.quality [--seeds 0 1 2 3 4] [--config configs/default.py]
                               [--data_dir DIR] [--workdir_root DIR] [--override KEY=VALUE ...]

Export and plots are switched off in these runs (they do not change the metrics); the wall
time column is the whole `main` process: dataset generation (first run only, when the data
folder holds no dataset yet), compilation, training and the final evaluation.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import flags
from ml_collections import config_flags

from cmvt_jax import evaluate
from cmvt_jax import run as run_lib
from cmvt_jax import sharding

REPO = pathlib.Path(__file__).resolve().parents[1]
METRICS = (
  ("a→v R@1", "eval/a2v_r1"),
  ("v→a R@1", "eval/v2a_r1"),
  ("a→v R@5", "eval/a2v_r5"),
  ("linear probe top-1", "eval/linear_probe_top1"),
  ("kNN top-1", "eval/knn_top1"),
)
ABLATION = "model.video.temporal.num_layers=0"


def train_and_read(config: str, workdir: pathlib.Path, overrides: list[str]) -> dict:
  """Runs `cmvt_jax.main` to completion; returns its final test eval line plus `wall_s`."""
  command = [
    sys.executable,
    "-m",
    "cmvt_jax.main",
    f"--config={config}",
    f"--workdir={workdir}",
    "--config.export.at_end=False",
    "--config.plots.at_end=False",
  ] + [f"--config.{item}" for item in overrides]
  env = dict(os.environ, PYTHONPATH=str(REPO))
  started = time.perf_counter()
  result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
  wall = time.perf_counter() - started
  if result.returncode != 0:
    raise RuntimeError(f"{' '.join(command)} exited {result.returncode}:\n{result.stderr[-4000:]}")
  lines = [
    json.loads(line)
    for line in (workdir / "metrics.jsonl").read_text().splitlines()
    if line.strip()
  ]
  final = [line for line in lines if line.get("split") == "test"][-1]
  return {**final, "wall_s": wall}


def random_init(config_path: str, workdir: pathlib.Path, overrides: list[str], seed: int) -> dict:
  """Test metrics of the model as initialised with `seed` (no training step)."""
  # The same config loading and overriding as `main`, so that both see the same config.
  argv = [sys.argv[0], *[f"--config.{item}" for item in overrides], f"--config.seed={seed}"]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file(
    "config", config_path, flag_values=flag_values, lock_config=True, sys_argv=argv
  )
  flag_values(argv)
  config = flag_values["config"].value
  run = run_lib.Run.create(config, workdir)
  state = run.init_state()
  return evaluate.Evaluator(run, run.stats()).evaluate(state.params["model"])["test"]


def cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    return platform.processor() or platform.machine()


def summary(values: list[float]) -> str:
  values = np.asarray(values, np.float64)
  spread = values.std(ddof=1) if len(values) > 1 else 0.0
  return f"{values.mean():.3f} ± {spread:.3f} ({values.min():.3f}–{values.max():.3f})"


def main() -> None:
  sharding.choose_platforms()  # as main does: no TPU start-up noise without TPU chips
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
  parser.add_argument("--config", default="configs/default.py")
  parser.add_argument(
    "--data_dir", default=None, help="dataset.data_dir for every run (default: the cache folder)"
  )
  parser.add_argument(
    "--workdir_root", default=None, help="where the runs' workdirs go (default: a temporary folder)"
  )
  parser.add_argument(
    "--override", nargs="*", default=[], help="extra KEY=VALUE config overrides for every model"
  )
  args = parser.parse_args()
  overrides = list(args.override)
  if args.data_dir:
    overrides.append(f"dataset.data_dir={args.data_dir}")
  root = pathlib.Path(args.workdir_root or tempfile.mkdtemp(prefix="cmvt_quality_"))

  variants = {"trained (default)": [], f"trained, video mean-pooled ({ABLATION})": [ABLATION]}
  results = {name: [] for name in [*variants, "random init (no training)"]}
  loads = []
  for seed in args.seeds:
    for index, (name, extra) in enumerate(variants.items()):
      workdir = root / f"variant{index}-seed{seed}"
      line = train_and_read(args.config, workdir, [*overrides, *extra, f"seed={seed}"])
      loads.append(os.getloadavg()[0])
      results[name].append(line)
      print(
        f"seed {seed} {name}: a→v R@1 {line['eval/a2v_r1']:.3f}, "
        f"probe {line['eval/linear_probe_top1']:.3f}, {line['wall_s']:.0f} s "
        f"(load {loads[-1]:.1f})",
        flush=True,
      )
    results["random init (no training)"].append(
      random_init(args.config, root / f"init-seed{seed}", overrides, seed)
    )

  print(
    f"\nDate: {datetime.date.today():%a %b %d %Y}. Machine: {cpu_name()}, "
    f"{os.cpu_count()} cores, load average {min(loads):.1f}–{max(loads):.1f} after the "
    f"runs. Command: python -m benchmarks.quality --seeds "
    f"{' '.join(map(str, args.seeds))}. Test split, "
    f"{int(results['trained (default)'][0]['eval/num_clips'])} clips; "
    f"mean ± sample std (min–max) over {len(args.seeds)} seeds.\n"
  )
  header = ["model", *(title for title, _ in METRICS), "main wall s"]
  print("| " + " | ".join(header) + " |")
  print("|" + " --- |" * len(header))
  for name, lines in results.items():
    cells = [summary([line[key] for line in lines]) for _, key in METRICS]
    walls = [line["wall_s"] for line in lines if "wall_s" in line]
    cells.append(f"{np.mean(walls):.0f}" if walls else "–")
    print(f"| {name} | " + " | ".join(cells) + " |")
  print("\na→v R@1 per seed (test split):\n")
  print("| model | " + " | ".join(f"seed {seed}" for seed in args.seeds) + " |")
  print("|" + " --- |" * (len(args.seeds) + 1))
  for name, lines in results.items():
    print(f"| {name} | " + " | ".join(f"{line['eval/a2v_r1']:.3f}" for line in lines) + " |")
  gap = np.mean([line["eval/a2v_r1"] for line in results["trained (default)"]]) - np.mean(
    [line["eval/a2v_r1"] for line in results[f"trained, video mean-pooled ({ABLATION})"]]
  )
  print(f"\na→v R@1, default − mean-pooled ablation: {gap:+.3f} (mean of seeds).")


if __name__ == "__main__":
  main()
