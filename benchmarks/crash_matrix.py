"""The whole crash matrix: every write point of every scenario, killed at each of its phases.

  python -m benchmarks.crash_matrix [--scenarios=train,resumed,extended,nothing,parts,list,films]
      [--sample_seed=N]  # one trial per kind of file instead of all (what CI runs)
      [--jobs=N]         # trials run side by side (each is its own subprocess)

For each scenario of tests/reliability/crash_harness.py it runs the commands once
uninterrupted (listing their write points), then, for every (write point, phase), kills a
fresh copy there, reruns the same command and checks the invariants against the
uninterrupted outputs. Prints one table row per kind of write point (the reliability table
of BENCHMARKS.md) and the failures, if any; exits 1 if any trial failed.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import datetime
import os
import pathlib
import shutil
import tempfile
import time
from collections.abc import Sequence

from absl import app
from absl import flags
from absl import logging

from cmvt_jax.data import synthetic
from tests import helpers
from tests.data import media
from tests.reliability import crash_harness as harness

SCENARIO_NAMES = ("train", "resumed", "extended", "nothing", "parts", "list", "films")
_SCENARIOS = flags.DEFINE_list("scenarios", list(SCENARIO_NAMES), "Scenarios to run, in order.")
_SAMPLE_SEED = flags.DEFINE_integer(
  "sample_seed", None, "Run one trial per kind of file (seeded) instead of every trial."
)
_JOBS = flags.DEFINE_integer("jobs", 1, "Trials run at the same time.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where trials run (default: a temporary folder).")

REPO = pathlib.Path(__file__).resolve().parents[1]
# The crash that makes the starting state of the "resumed" scenario: after the train line
# of step 3 (checkpoint at 2 and its evaluation done), so that the rerun drops a line.
RESUME_AFTER = "metrics-append:4:after"


@dataclasses.dataclass
class Outcome:
  scenario: str
  trial: harness.Trial
  seconds: float
  failure: str | None


def scenarios(names: Sequence[str], base: pathlib.Path) -> list[tuple[str, harness.Scenario]]:
  """The named scenarios, with the starting states they need made in `base`."""
  data_dir = helpers.make_micro_dataset(base / "micro_data")
  made = []
  if {"train", "extended"} & set(names):
    made.append(("train", harness.training(data_dir)))
  if "resumed" in names:
    crashed = base / "crashed"
    crashed.mkdir()
    result = harness.run(harness.training(data_dir).command(0, crashed), crash=RESUME_AFTER)
    assert result.returncode == -9, result.stderr[-3000:]
    made.append(("resumed", harness.resumed_training(data_dir, crashed)))
  if "extended" in names:
    finished = base / "finished"
    harness.reference(harness.training(data_dir), finished)
    made.append(("extended", harness.extended_training(data_dir, finished)))
  if "nothing" in names:
    made.append(("nothing", harness.from_nothing()))
  if {"parts", "list"} & set(names):
    videos = base / "videos"
    synthetic.generate(videos, media.TINY_SPEC, num_workers=1, progress=False)
  if "parts" in names:
    made.append(("parts", harness.prepare_in_parts(videos)))
  if "list" in names:
    harness.write_segment_list(videos, base / "segments.csv")
    made.append(("list", harness.prepare_from_list(videos, base / "segments.csv")))
  if "films" in names:
    made.append(("films", searching_films(base, data_dir)))
  chosen = dict(made)
  return [(name, chosen[name]) for name in names]


def searching_films(base: pathlib.Path, data_dir) -> harness.Scenario:
  """The films scenario, and its starting state: a 4-step run that exported and searched
  other films under the same names (`films-state`)."""
  old, films = base / "old_films", base / "films"
  for folder, frequency in ((old, 330.0), (films, 880.0)):
    for index, seconds in enumerate((6, 9)):  # two films of a few moments each
      media.write_video(
        folder / f"film_{index}.mp4",
        num_frames=seconds * 5,
        fps=5,
        audio=media.tone(seconds, 16000, frequency=frequency * (index + 1)),
      )
  state = base / "films-state"
  harness.reference(harness.training(data_dir), state)
  commands = harness.film_commands(old, data_dir, "film_0.mp4")
  harness.reference(harness.Scenario("old films", commands, check=lambda *roots: None), state)
  return harness.searching_films(films, data_dir, "film_0.mp4", state)


def run_matrix(
  base: pathlib.Path, names: Sequence[str], sample_seed: int | None, jobs: int
) -> list[Outcome]:
  outcomes = []
  for name, scenario in scenarios(names, base):
    reference = base / f"{name}-reference"
    points = [
      point
      for point in harness.reference(scenario, reference).points
      if scenario.crash_kinds is None or point.kind in scenario.crash_kinds
    ]
    if sample_seed is None:
      trials = harness.all_trials(points)
    else:
      trials = harness.sample_trials(points, sample_seed)
    print(f"{scenario.name}: {len(points)} write points, {len(trials)} trials", flush=True)

    def one_trial(
      index: int, trial: harness.Trial, name=name, scenario=scenario, reference=reference
    ):
      root = base / f"{name}-{index}"
      started = time.perf_counter()
      try:
        harness.run_trial(scenario, trial, root, reference)
        failure = None
      except AssertionError as error:
        failure = str(error)
      print(f"  {trial}: {'ok' if failure is None else 'FAILED'}", flush=True)
      shutil.rmtree(root, ignore_errors=True)
      return Outcome(scenario.name, trial, time.perf_counter() - started, failure)

    # Threads only wait on the trials' subprocesses; the checks between them are light.
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
      outcomes.extend(pool.map(one_trial, range(len(trials)), trials))
    # The table so far after each scenario: a long matrix stopped early still reports.
    print(f"\nAfter {scenario.name}:\n{table(outcomes)}\n", flush=True)
  return outcomes


def table(outcomes: Sequence[Outcome]) -> str:
  """One row per kind of write point: where it is, how many points and trials, passed."""
  rows = collections.OrderedDict()
  for outcome in outcomes:
    point = outcome.trial.point
    row = rows.setdefault(
      point.kind,
      {"file": harness.FILE_OF_KIND[point.kind], "scenarios": [], "points": set(), "trials": 0},
    )
    row.setdefault("passed", 0)
    row.setdefault("seconds", 0.0)
    if outcome.scenario not in row["scenarios"]:
      row["scenarios"].append(outcome.scenario)
    row["points"].add((outcome.scenario, point.command, point.ordinal))
    row["trials"] += 1
    row["passed"] += outcome.failure is None
    row["seconds"] += outcome.seconds
  lines = [
    "| kind of file | write point | scenarios | points | crash trials | resumed and checked | s |",
    "| --- | --- | --- | ---: | ---: | ---: | ---: |",
  ]
  for kind, row in sorted(rows.items(), key=lambda item: item[1]["file"]):
    lines.append(
      f"| {row['file']} | `{kind}` | {'; '.join(row['scenarios'])} | {len(row['points'])} | "
      f"{row['trials']} | {row['passed']} | {row['seconds']:.0f} |"
    )
  total = len(outcomes)
  passed = sum(outcome.failure is None for outcome in outcomes)
  points = sum(len(row["points"]) for row in rows.values())
  lines.append(
    f"| **all** | | | {points} | {total} | {passed} | {sum(o.seconds for o in outcomes):.0f} |"
  )
  return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
  del argv
  unknown = set(_SCENARIOS.value) - set(SCENARIO_NAMES)
  if unknown:
    raise app.UsageError(f"unknown --scenarios {sorted(unknown)}; choose from {SCENARIO_NAMES}.")
  # The trials' runs share one persistent compilation cache (as the tests' do).
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(REPO / ".cache" / "jax-compilation"))
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
  logging.set_verbosity(logging.WARNING)  # the checks restore checkpoints in this process
  started = datetime.datetime.now(datetime.UTC)
  with tempfile.TemporaryDirectory(prefix="cmvt_crash_matrix_") as scratch:
    base = pathlib.Path(_WORKDIR.value or scratch)
    base.mkdir(parents=True, exist_ok=True)
    wall = time.perf_counter()
    outcomes = run_matrix(base, _SCENARIOS.value, _SAMPLE_SEED.value, _JOBS.value)
    wall = time.perf_counter() - wall
  print(
    f"\nDate: {started:%a %b %d %Y, %H:%M} UTC. Machine: {harness.machine()}. "
    "Command: `python -m benchmarks.crash_matrix "
    f"--scenarios={','.join(_SCENARIOS.value)} --jobs={_JOBS.value}"
    + (f" --sample_seed={_SAMPLE_SEED.value}`" if _SAMPLE_SEED.value is not None else "`")
    + f". Wall time: {wall / 60:.0f} min (the s column sums each trial's own time).\n"
  )
  print(table(outcomes))
  failures = [outcome for outcome in outcomes if outcome.failure is not None]
  for outcome in failures:
    print(f"\nFAILED {outcome.scenario}, {outcome.trial}:\n{outcome.failure[:4000]}")
  if failures:
    raise SystemExit(1)


if __name__ == "__main__":
  app.run(main)
