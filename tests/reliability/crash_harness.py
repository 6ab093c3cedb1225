"""Crash-point enumeration: kill a command at every file-write point, rerun it, check the result.

The technique of SQLite's crash tests and of the ALICE study of application crash
consistency. `cmvt_jax.files` names every write the package makes (its *kind*: "config.json",
"metrics-append", "checkpoint", ...) and reports each one to a log when `CMVT_WRITE_LOG` is
set; `CMVT_CRASH_AT=KIND:N:PHASE` makes the N-th write of KIND kill the whole program with
SIGKILL before it, in the middle of it, or after it.

A `Scenario` is a list of commands a user runs in order (a training run; two prepare
workers and a merge), a starting state, and the invariants its outputs must meet. For a
scenario the harness
  1. runs it once uninterrupted, with the write log on: the reference outputs and the list
     of write points of each command;
  2. for each chosen (command, write point, phase): starts from the same state, runs the
     commands before it, runs that command with the crash armed (it must die by SIGKILL
     there), runs the same command again, then the rest, each of which must exit 0;
  3. checks the scenario's invariants against the reference (`check`).

Used by tests/reliability/test_crash_points.py (a sample covering every kind of file) and
benchmarks/crash_matrix.py (every point and phase).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import platform
import shutil
import signal
import struct
import subprocess
import sys
from collections.abc import Callable
from collections.abc import Sequence

import numpy as np
from tensorboardX.proto import event_pb2

from cmvt_jax import export
from cmvt_jax import files
from cmvt_jax import plots
from cmvt_jax.data import datasets
from tests import helpers

# The file each kind of write point writes, by kind of file (BENCHMARKS.md's reliability table).
FILE_OF_KIND = {
  "write-probe": "config.json and the workdir probe",
  "write-probe-remove": "config.json and the workdir probe",
  "config.json": "config.json and the workdir probe",
  "metrics-append": "metrics.jsonl",
  "metrics-rewrite": "metrics.jsonl",
  "tensorboard": "TensorBoard events (tensorboardX)",
  "checkpoint": "checkpoints (orbax)",
  "export-clear": "export",
  "export-part": "export",
  "export-manifest": "export",
  "plot": "plots",
  "plots-manifest": "plots",
  "synthetic-video": "synthetic videos (scratch)",
  "synthetic-manifest": "synthetic videos (scratch)",
  "prepare-spill": "prepared dataset (scratch clips, TFDS)",
  "dataset": "prepared dataset (scratch clips, TFDS)",
  "part-clear": "prepare parts",
  "part-copy": "prepare parts",
  "part-outcomes": "prepare parts",
  "merge-move": "merge of parts",
  "merge-info": "merge of parts",
  "merge-clean": "merge of parts",
  "compile-hlo": "compile outputs",
  "compile-summary": "compile outputs",
  "search-cache": "moment search cache",
}
# Metrics that measure time, not behaviour: the only ones two runs may differ in.
TIMING_TAGS = (*helpers.TIMING_KEYS, "input/wait_fraction")
TIMEOUT_S = 600


@dataclasses.dataclass(frozen=True)
class WritePoint:
  """The `ordinal`-th write of `kind` in a process of command `command`."""

  command: int
  kind: str
  ordinal: int
  phases: tuple[str, ...]
  path: str

  def crash_spec(self, phase: str) -> str:
    return f"{self.kind}:{self.ordinal}:{phase}"


@dataclasses.dataclass(frozen=True)
class Trial:
  point: WritePoint
  phase: str

  def __str__(self) -> str:
    return f"command {self.point.command}, {self.point.crash_spec(self.phase)}"


@dataclasses.dataclass
class Scenario:
  """Commands run in order in a folder; `{root}` in them is replaced by that folder.

  Attributes:
    name: for reports.
    commands: argument lists (after `python -m`).
    check: `check(trial_root, reference_root)` asserts the invariants.
    setup: makes the starting state in a fresh folder (default: nothing).
    crash_kinds: the kinds of write point its trials kill at (None: every kind); for a
      scenario whose other points another scenario covers already.
  """

  name: str
  commands: list[list[str]]
  check: Callable[[pathlib.Path, pathlib.Path], None]
  setup: Callable[[pathlib.Path], None] = lambda root: None
  crash_kinds: tuple[str, ...] | None = None

  def command(self, index: int, root: pathlib.Path) -> list[str]:
    return [
      sys.executable,
      "-m",
      *(arg.replace("{root}", str(root)) for arg in self.commands[index]),
    ]


def run(command: Sequence[str], *, crash: str | None = None, write_log=None):
  """Runs `command` as its own session (so that a crash kills all of it, workers too)."""
  env = helpers.environment()
  env.pop(files.CRASH_ENV, None)
  env.pop(files.WRITE_LOG_ENV, None)
  if crash is not None:
    env[files.CRASH_ENV] = crash
  if write_log is not None:
    env[files.WRITE_LOG_ENV] = str(write_log)
  return subprocess.run(
    command,
    cwd=helpers.REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=TIMEOUT_S,
    start_new_session=True,
  )


def _must_succeed(result: subprocess.CompletedProcess, what: str) -> None:
  if result.returncode != 0:
    raise AssertionError(f"{what} exited {result.returncode}:\n{result.stderr[-6000:]}")


@dataclasses.dataclass(frozen=True)
class Reference:
  """An uninterrupted scenario: its folder and the write points of its commands, in order."""

  scenario: Scenario
  root: pathlib.Path
  points: list[WritePoint]


def reference(scenario: Scenario, root: pathlib.Path) -> Reference:
  """Runs the scenario uninterrupted in `root`, listing its write points."""
  root.mkdir(parents=True, exist_ok=True)
  scenario.setup(root)
  points = []
  for index in range(len(scenario.commands)):
    log = root.parent / f"{root.name}-writes-{index}.log"
    log.unlink(missing_ok=True)
    _must_succeed(run(scenario.command(index, root), write_log=log), f"command {index}")
    points += read_write_log(log, index)
  return Reference(scenario, root, points)


def read_write_log(log: pathlib.Path, command: int) -> list[WritePoint]:
  """The distinct (kind, ordinal) write points of a log, in order of first appearance.

  Worker processes count their own ordinals; a crash spec kills at the first process that
  reaches it, so workers' points of the same ordinal are one point. A pool hands its workers
  tasks as they free up, so how many writes one worker makes differs from run to run: of a
  kind written by worker processes (any process but the command's own, which writes the
  log's last line), only ordinal 1 is reached in every run and kept.
  """
  rows = [line.split("\t") for line in log.read_text().splitlines()] if log.exists() else []
  command_pid = rows[-1][0] if rows else None
  pooled = {kind for pid, kind, *_ in rows if pid != command_pid}
  points = {}
  for _, kind, ordinal, phases, path in rows:
    key = (kind, int(ordinal))
    if key not in points and (kind not in pooled or key[1] == 1):
      points[key] = WritePoint(command, kind, int(ordinal), tuple(phases.split(",")), path)
  return list(points.values())


def run_trial(scenario: Scenario, trial: Trial, root: pathlib.Path, reference_root) -> None:
  """Runs one crash trial in a fresh `root` and checks the scenario's invariants."""
  root.mkdir(parents=True)
  scenario.setup(root)
  for index in range(len(scenario.commands)):
    command = scenario.command(index, root)
    if index == trial.point.command:
      crashed = run(command, crash=trial.point.crash_spec(trial.phase))
      if crashed.returncode != -signal.SIGKILL:
        raise AssertionError(
          f"{trial}: the crash point was not reached (exit {crashed.returncode}):\n"
          + crashed.stderr[-3000:]
        )
    _must_succeed(run(command), f"{trial}: command {index} after the crash")
  scenario.check(root, reference_root)


def all_trials(points: Sequence[WritePoint]) -> list[Trial]:
  return [Trial(point, phase) for point in points for phase in point.phases]


def sample_trials(points: Sequence[WritePoint], seed: int) -> list[Trial]:
  """One trial per kind of file among `points`: a random write point of that file and one
  of its phases (seeded)."""
  rng = np.random.default_rng(seed)
  by_file = {}
  for point in points:
    by_file.setdefault(FILE_OF_KIND[point.kind], []).append(point)
  chosen = []
  for file_points in by_file.values():
    point = file_points[int(rng.integers(len(file_points)))]
    chosen.append(Trial(point, point.phases[int(rng.integers(len(point.phases)))]))
  return chosen


# ----------------------------------------------------------------------------- invariants


def check_training(root: pathlib.Path, reference_root: pathlib.Path) -> None:
  """A training workdir (`root/run`) against the uninterrupted one: the same metrics
  (one train line per logged step, one eval line per step and split), the same final
  state, export, plots and TensorBoard scalars, no temporary left behind."""
  workdir, expected = root / "run", reference_root / "run"
  records = strict_records(workdir)
  steps = [record["step"] for record in records if "loss" in record]
  assert steps == sorted(set(steps)), f"train lines not one per step: {steps}"
  evals = [(record["step"], record["split"]) for record in records if "split" in record]
  assert len(evals) == len(set(evals)), f"eval lines not one per (step, split): {evals}"
  assert by_key(workdir) == by_key(expected)
  final = max(helpers.complete_steps(expected))
  assert max(helpers.complete_steps(workdir)) == final
  helpers.assert_trees_equal(
    helpers.load_state(workdir, final), helpers.load_state(expected, final)
  )
  for folder in ("embeddings", "plots"):
    assert (workdir / folder).exists() == (expected / folder).exists(), folder
  if (expected / "embeddings").exists():
    for name in sorted(p.name for p in (expected / "embeddings").iterdir()):
      check_export(workdir, expected, name)
  if (expected / "plots").exists():
    figures = lambda folder: {
      name: content
      for name, content in helpers.file_digests(folder / "plots").items()
      if name != plots.MANIFEST
    }
    assert figures(workdir) == figures(expected)
    assert _manifest(workdir / "plots") == _manifest(expected / "plots")
  assert tensorboard_scalars(workdir / "tensorboard") == tensorboard_scalars(
    expected / "tensorboard"
  )
  check_no_leftovers(workdir)


def strict_records(workdir: pathlib.Path) -> list[dict]:
  """metrics.jsonl's records; every line must parse (a torn line must not survive a rerun)."""
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  return [json.loads(line) for line in lines]


def by_key(workdir: pathlib.Path) -> dict:
  """{(step, split or None): record without timing keys}."""
  return {
    (record["step"], record.get("split")): record
    for record in helpers.metrics_without_timing(workdir)
  }


def check_export(workdir: pathlib.Path, expected: pathlib.Path, name: str) -> None:
  ours, theirs = export.load_embeddings(workdir, name), export.load_embeddings(expected, name)
  assert sorted(ours) == sorted(theirs)
  for key in theirs:
    np.testing.assert_array_equal(ours[key], theirs[key], err_msg=f"embeddings/{name} {key}")
  folder = pathlib.Path("embeddings") / name
  assert _manifest(workdir / folder) == _manifest(expected / folder)
  assert sorted(p.name for p in (workdir / "embeddings" / name).iterdir()) == sorted(
    p.name for p in (expected / "embeddings" / name).iterdir()
  )


def _manifest(folder: pathlib.Path) -> dict:
  """An output folder's manifest.json, without the config digest: that covers
  `dataset.data_dir`, which differs between the trial folders of some scenarios."""
  manifest = json.loads((folder / "manifest.json").read_text())
  return {key: value for key, value in manifest.items() if key != "config_sha256"}


def check_no_leftovers(folder: pathlib.Path) -> None:
  """Nothing under `folder` that an interrupted write left: our temporaries, orbax's."""
  leftovers = [
    str(p)
    for p in folder.rglob("*")
    if p.name.endswith(files.TEMPORARY_SUFFIX) or p.name.endswith(".orbax-checkpoint-tmp")
  ]
  assert not leftovers, f"left behind: {leftovers}"


def tensorboard_scalars(folder: pathlib.Path) -> dict[tuple[str, int], float]:
  """The scalars TensorBoard shows for an event-file folder: {(tag, step): value}.

  Files are read in name order, as TensorBoard does, applying its rule for restarts: a
  `SessionLog.START` event at step S hides every earlier event at a step >= S. A point
  shown twice, or a torn record before the end of a file, fails.
  """
  shown = []
  for path in sorted(folder.glob("events.out.tfevents.*")):
    for event in read_events(path):
      if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
        shown = [point for point in shown if point[1] < event.step]
      for value in event.summary.value:
        if value.tag not in TIMING_TAGS:
          shown.append((value.tag, event.step, value.simple_value))
  keys = [(tag, step) for tag, step, _ in shown]
  duplicates = sorted({key for key in keys if keys.count(key) > 1})
  assert not duplicates, f"TensorBoard shows these (tag, step) twice: {duplicates[:10]}"
  return {(tag, step): value for tag, step, value in shown}


def read_events(path: pathlib.Path) -> list[event_pb2.Event]:
  """The events of one file (TFRecord framing: length, its CRC, data, data CRC). A record
  cut short at the end of the file (a kill mid-write) is ignored, as TensorBoard does."""
  data, offset, events = path.read_bytes(), 0, []
  while offset + 12 <= len(data):
    (length,) = struct.unpack("<Q", data[offset : offset + 8])
    if offset + 12 + length + 4 > len(data):
      break
    events.append(event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length]))
    offset += 12 + length + 4
  return events


def check_dataset(directory: pathlib.Path, expected: pathlib.Path) -> None:
  """A prepared dataset folder equals the reference's: splits, metadata, every example."""
  ours, theirs = datasets.open_prepared(directory), datasets.open_prepared(expected)
  assert ours.num_examples == theirs.num_examples
  assert ours.label_names == theirs.label_names
  # Both through JSON (as the dataset stores them): tuples of skipped files become lists.
  mine = json.loads(json.dumps(ours.summary.to_dict()))
  assert mine == _relocated(theirs.summary.to_dict(), expected, directory)
  assert ours.stored_stats == theirs.stored_stats
  for split in theirs.num_examples:
    mine = {e["id"]: e for e in _examples(ours, split)}
    for example in _examples(theirs, split):
      for key, value in example.items():
        np.testing.assert_array_equal(mine[example["id"]][key], value, err_msg=f"{split} {key}")
  check_no_leftovers(directory)


def _examples(dataset: datasets.PreparedDataset, split: str) -> list[dict]:
  source = dataset.source(split)
  return [source[i] for i in range(len(source))]


def _relocated(value, old: pathlib.Path, new: pathlib.Path):
  """`value` with the reference's folder names replaced by the trial's (summaries name
  source files relative to the video folder, so normally nothing changes)."""
  return json.loads(json.dumps(value).replace(str(old), str(new)))


def copy_tree(source: pathlib.Path, destination: pathlib.Path) -> None:
  shutil.copytree(source, destination, symlinks=True, dirs_exist_ok=True)


def machine() -> str:
  """The CPU model, core count and Python version (for benchmark tables)."""
  model = platform.processor() or platform.machine()
  with contextlib.suppress(OSError):
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        model = line.split(":", 1)[1].strip()
        break
  return f"{os.cpu_count()}-core {model}, Python {platform.python_version()}"


# ----------------------------------------------------------------------------- scenarios

# A micro run with every kind of workdir file: checkpoints at 2 and 4, an evaluation at 2
# and at the end, an export and plots.
TRAINING = [
  "cmvt_jax.main",
  "--config=configs/micro.py",
  "--workdir={root}/run",
  "--config.total_steps=4",
  "--config.checkpoint_every_steps=2",
  "--config.eval_every_steps=2",
  "--config.checkpoint.keep=10",
  "--config.export.at_end=True",
  "--config.plots.at_end=True",
]


def training(data_dir) -> Scenario:
  """`TRAINING` from an empty workdir, on a prepared dataset."""
  return Scenario(
    "train", [[*TRAINING, f"--config.dataset.data_dir={data_dir}"]], check=check_training
  )


def resumed_training(data_dir, crashed_root: pathlib.Path) -> Scenario:
  """`TRAINING` again on the workdir a crash left in `crashed_root` (recovery crashes:
  the rerun's own writes, the metrics rewrite among them)."""
  return dataclasses.replace(
    training(data_dir), name="train, resumed", setup=lambda root: copy_tree(crashed_root, root)
  )


def extended_training(data_dir, finished_root: pathlib.Path) -> Scenario:
  """A finished `TRAINING` workdir extended to 6 steps (export and plots replaced)."""
  command = [*TRAINING, f"--config.dataset.data_dir={data_dir}", "--config.total_steps=6"]
  return Scenario(
    "train, extended",
    [command],
    check=check_training,
    setup=lambda root: copy_tree(finished_root, root),
  )


def from_nothing() -> Scenario:
  """`TRAINING` with a data folder of its own: it generates and prepares the synthetic
  dataset first (README command 1 in small)."""
  return Scenario(
    "train from nothing",
    [[*TRAINING, "--config.dataset.data_dir={root}/data"]],
    check=lambda root, expected: (
      check_dataset(_only_dataset(root / "data"), _only_dataset(expected / "data")),
      check_training(root, expected),
    ),
    # Its training's write points are the "train" scenario's.
    crash_kinds=("synthetic-video", "synthetic-manifest", "prepare-spill", "dataset"),
  )


def _only_dataset(data_dir: pathlib.Path) -> pathlib.Path:
  (found,) = data_dir.glob("*/*/*/dataset_info.json")
  return found.parent


def prepare_in_parts(video_dir) -> Scenario:
  """Two prepare workers and a merge into `{root}/data` (prepare's parts and merge)."""
  common = [
    "cmvt_jax.prepare",
    f"--video_dir={video_dir}",
    "--data_dir={root}/data",
    "--name=clips",
  ]
  workers = [[*common, "--num_workers=2", f"--worker_index={index}"] for index in (0, 1)]
  merge = [
    "cmvt_jax.prepare",
    "--data_dir={root}/data",
    "--name=clips",
    "--num_workers=2",
    "--merge",
  ]
  return Scenario(
    "prepare in parts",
    [*workers, merge],
    check=lambda root, expected: (
      check_dataset(root / "data" / "clips" / "1.0.0", expected / "data" / "clips" / "1.0.0"),
      _check_parts_gone(root / "data" / "clips"),
    ),
  )


def prepare_from_list(video_dir, list_path) -> Scenario:
  """`prepare --list` cutting segments out of the files (`write_segment_list`'s list) into
  `{root}/data` (a list's entries spill per row, under names of their own)."""
  command = [
    "cmvt_jax.prepare",
    f"--list=test={list_path}",
    "--columns=youtube_id=file,start=t0,end=t1,label=cls",
    "--path_template={youtube_id}",
    "--cut_segments",
    f"--video_dir={video_dir}",
    "--data_dir={root}/data",
    "--name=listed",
    "--num_workers=1",
  ]
  return Scenario(
    "prepare from a list",
    [command],
    check=lambda root, expected: check_dataset(
      root / "data" / "listed" / "1.0.0", expected / "data" / "listed" / "1.0.0"
    ),
  )


def write_segment_list(video_dir: pathlib.Path, list_path: pathlib.Path) -> None:
  """A list cutting each test file of a generated set (`synthetic.generate`) into 2-s
  segments, its class as label, and one row whose file is missing."""
  manifest = json.loads((video_dir / "manifest.json").read_text())
  seconds = manifest["spec"]["segments_per_file"] * manifest["spec"]["segment_seconds"]
  rows = ["file,t0,t1,cls"]
  for entry in manifest["files"]:
    for start in range(0, int(seconds), 2):
      rows.append(f"{entry['path']},{start},{start + 2},{entry['label']}")
  rows.append("absent.mp4,0,2,none")
  list_path.write_text("\n".join(rows) + "\n")


def _check_parts_gone(folder: pathlib.Path) -> None:
  assert sorted(p.name for p in folder.iterdir()) == ["1.0.0"], sorted(folder.iterdir())


# A whole-video export of a film folder as collection FILMS, then a moment search of it.
FILMS = "films"


def film_commands(films: pathlib.Path, data_dir, query: str) -> list[list[str]]:
  """The two commands of `searching_films` on the folder `films` (`query`: a file in it)."""
  return [
    [
      "cmvt_jax.main",
      "--config=configs/micro.py",
      "--workdir={root}/run",
      "--mode=export",
      f"--config.dataset.data_dir={data_dir}",
      "--config.export.whole_video=True",
      f"--config.export.video_dir={films}",
      f"--config.export.name={FILMS}",
    ],
    [
      "cmvt_jax.search",
      "--workdir={root}/run",
      f"--collection={FILMS}",
      f"--query={films / query}@1-2",
      "--query_modality=audio",
      "--json",
    ],
  ]


def searching_films(
  films: pathlib.Path, data_dir, query: str, searched_root: pathlib.Path
) -> Scenario:
  """`film_commands` on a copy of `searched_root`: a trained workdir that holds an earlier
  export of collection FILMS (other films, of the same names) and its search cache, which
  the export must remove and the search build again."""
  return Scenario(
    "export films and search",
    film_commands(films, data_dir, query),
    check=check_films,
    setup=lambda root: copy_tree(searched_root, root),
    # The training workdir's other files are copied, not written: only these kinds.
    crash_kinds=("export-clear", "export-part", "export-manifest", "search-cache"),
  )


def check_films(root: pathlib.Path, reference_root: pathlib.Path) -> None:
  """The collection equals the uninterrupted run's, and so does its search cache, file for
  file (its cache.json names this export's manifest: the search would use it as it is)."""
  workdir, expected = root / "run", reference_root / "run"
  check_export(workdir, expected, FILMS)
  cache = pathlib.Path("embeddings", FILMS, export.SEARCH_CACHE)
  assert helpers.file_digests(workdir / cache) == helpers.file_digests(expected / cache)
  check_no_leftovers(workdir)
