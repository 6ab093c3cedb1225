"""Preparing from an annotation list vs from a folder, and a list's skip summary.

  python -m benchmarks.prepare_lists [--files_per_class 12] [--repeats 3] [--num_workers 2]

1. Throughput: the synthetic generator writes a folder (`SPLIT/CLASS/*.mp4`); the same files
   are prepared as a folder and from a VGGSound-style list naming each of them
   (`--path_template '{split}/{label}/{youtube_id}.mp4'`), alternately, `--repeats` times;
   clips/s of each (median) and their ratio, measured in one run.
2. Skip summary: a list of good rows and rows whose file is missing, corrupt, without audio
   or too short (and one listed twice): every row is counted as used or skipped by reason.
Prints Markdown tables.
"""

from __future__ import annotations

import datetime
import json
import pathlib
import statistics
import tempfile
import time

import numpy as np
from absl import app
from absl import flags

from cmvt_jax.data import annotations
from cmvt_jax.data import dataset_writer
from cmvt_jax.data import spectrogram
from cmvt_jax.data import synthetic
from configs import default
from tests.data import media
from tests.reliability import crash_harness

_FILES_PER_CLASS = flags.DEFINE_integer(
  "files_per_class", 12, "Generated train files per class (8 classes; 2 clips per file)."
)
_REPEATS = flags.DEFINE_integer("repeats", 3, "Preparations of each kind, alternating.")
_NUM_WORKERS = flags.DEFINE_integer("num_workers", 2, "Decoding processes of each preparation.")

MEL = spectrogram.MelSettings.from_config(default.get_config().input)


def _prepare(video_dir, data_dir, name, listing=None, **kwargs) -> dataset_writer.PrepareSummary:
  """Prepares and returns the summary (read back from the dataset's metadata)."""
  directory = dataset_writer.prepare(
    video_dir,
    data_dir,
    name,
    mel=MEL,
    listing=listing,
    num_workers=_NUM_WORKERS.value,
    progress=False,
    log=lambda _: None,
    **kwargs,
  )
  metadata = json.loads((pathlib.Path(directory) / "metadata.json").read_text())
  return dataset_writer.PrepareSummary.from_dict(metadata[dataset_writer.SUMMARY_KEY])


def throughput(root: pathlib.Path) -> str:
  videos = root / "videos"
  spec = synthetic.SyntheticSpec(
    seed=11,
    train_files=8 * _FILES_PER_CLASS.value,
    validation_files=0,
    test_files=0,
    segments_per_file=2,
  )
  synthetic.generate(videos, spec, num_workers=_NUM_WORKERS.value, progress=False)
  manifest = json.loads((videos / "manifest.json").read_text())
  rows = [
    f"{pathlib.Path(entry['path']).stem},0,{entry['label']},{entry['split']}\n"
    for entry in manifest["files"]
  ]
  (root / "list.csv").write_text("".join(rows))
  seconds = {"folder": [], "list": []}
  clips = {}
  for repeat in range(_REPEATS.value):
    for kind in ("folder", "list"):
      started = time.perf_counter()
      listing = None
      if kind == "list":  # reading the list is part of the work
        listing = annotations.read_lists(
          [str(root / "list.csv")],
          videos,
          list_format="vggsound",
          path_template="{split}/{label}/{youtube_id}.mp4",
        )
      summary = _prepare(videos, root / f"data-{kind}-{repeat}", "bench", listing)
      seconds[kind].append(time.perf_counter() - started)
      clips[kind] = sum(summary.clips.values())
  assert clips["folder"] == clips["list"], clips
  rates = {kind: clips[kind] / statistics.median(times) for kind, times in seconds.items()}
  lines = [
    f"{len(rows)} files, {clips['folder']} clips of 2 s, {_NUM_WORKERS.value} decoding "
    f"processes, median of {_REPEATS.value} alternating runs",
    "",
    "| prepared from | seconds (each run) | clips/s (median) |",
    "| --- | --- | --- |",
  ]
  for kind in ("folder", "list"):
    runs = ", ".join(f"{s:.1f}" for s in seconds[kind])
    lines.append(f"| {kind} | {runs} | {rates[kind]:.1f} |")
  lines += ["", f"list / folder throughput: {rates['list'] / rates['folder']:.3f}"]
  return "\n".join(lines)


def skip_summary(root: pathlib.Path) -> str:
  """A VGGSound-style list with good rows and every kind of bad one, prepared."""
  videos = root / "skips"
  rng = np.random.default_rng(0)
  kinds = ["good"] * 6 + ["missing"] * 2 + ["corrupt"] * 2 + ["audioless"] * 2 + ["short"] * 2
  rows = []
  for index, kind in enumerate(kinds):
    youtube_id, start = f"{kind}{index:02d}", int(rng.integers(0, 300))
    media.listed_file(videos / f"{youtube_id}_{start:06d}.mp4", kind)
    rows.append(f"{youtube_id},{start},{list(media.COLOURS)[index % 4]},train\n")
  rows.append(rows[0])  # the first row listed again
  (root / "skips.csv").write_text("".join(rows))
  listing = annotations.read_lists([str(root / "skips.csv")], videos, list_format="vggsound")
  summary = _prepare(videos, root / "data-skips", "skips", listing)
  lines = [
    f"Rows listed: {summary.found} = {summary.good} used + {len(summary.skipped)} skipped",
    "",
    "| outcome | rows |",
    "| --- | --- |",
    f"| used | {summary.good} |",
  ]
  lines += [
    f"| skipped: {reason} | {count} |"
    for reason, count in sorted(summary.skipped_by_reason.items())
  ]
  lines.append(f"| **listed** | **{summary.found}** |")
  assert summary.found == summary.good + len(summary.skipped) == len(rows)
  return "\n".join(lines)


def main(argv) -> None:
  del argv
  print(f"{datetime.date.today()}, {crash_harness.machine()}")
  with tempfile.TemporaryDirectory(prefix="cmvt_bench_lists_") as scratch:
    print(throughput(pathlib.Path(scratch)))
    print()
    print(skip_summary(pathlib.Path(scratch)))


if __name__ == "__main__":
  app.run(main)
