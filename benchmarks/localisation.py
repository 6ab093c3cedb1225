"""Long-video localisation: find where a sound happens in hours of generated film, by sight.

Long files that no training run sees (`data/synthetic.py` with many segments and seeds of
their own; each file is one object kind, so its segments differ only in which notes sound
when, where the objects move) are exported whole with moments (a moment every second, its
2-s window embedded as a training clip). For each two-second segment of each file, its
audio alone (`FILE@START-END`) is the query, searched against every file's *video* moments
(cross-modal, as `python -m cmvt_jax.search` does by default). A hit: the top-1 moment is in
the same file and starts within ±1 s of the segment's start (hit@5: one of the top 5 does).

Models: the default-trained workdir, the mean-pooled ablation
(`model.video.temporal.num_layers=0`), and the default model at its random initialisation.

  python -m benchmarks.localisation --default_workdir DIR --ablation_workdir DIR
      [--minutes 10] [--files 3] [--seed 1000]

Each workdir must hold a trained run of configs/default.py (README command 1; for the
ablation add `--config.model.video.temporal.num_layers=0`).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import pathlib
import tempfile
import time

import numpy as np

from benchmarks import quality
from cmvt_jax import export
from cmvt_jax import run as run_lib
from cmvt_jax import search
from cmvt_jax import whole_video
from cmvt_jax.data import synthetic
from configs import default

TOLERANCE_S = 1.0


def write_films(folder: pathlib.Path, minutes: float, files: int, seed: int) -> list[str]:
  """`files` generated films of `minutes` each (two-second segments) under `folder`."""
  base = synthetic.SyntheticSpec.from_config(default.get_config().dataset.synthetic)
  names = []
  for index in range(files):
    spec = dataclasses.replace(
      base, segments_per_file=round(minutes * 60 / base.segment_seconds), seed=seed + index
    )
    rng = np.random.default_rng([seed, index])
    kind = synthetic.CLASSES[index % len(synthetic.CLASSES)]
    events = synthetic.sample_events(spec, rng)
    frames = synthetic.render_video(spec, kind, events, rng)
    audio = synthetic.render_audio(spec, kind, events, rng)
    name = f"film_{index:02d}.mp4"
    synthetic.write_mp4(folder / name, frames, spec.fps, audio, spec.sample_rate)
    names.append(name)
  return names


def embedder_of(workdir: pathlib.Path | None, config) -> whole_video.VideoEmbedder:
  """The export's whole-video embedder of a workdir's latest checkpoint, or (None) of the
  config's model at its random initialisation (with the dataset's statistics)."""
  if workdir is None:
    run = run_lib.Run.create(config, tempfile.mkdtemp(prefix="cmvt_init_"))
    trained = run_lib.TrainedParams(
      step=0, params=run.init_state().params["model"], stats=run.stats()
    )
  else:
    run = run_lib.Run.create(config, workdir)
    trained = run.restore_params()
  return export.video_embedder(run, trained, config.export), run.dataset.storage


def localise(embedder: whole_video.VideoEmbedder, storage, folder, names) -> dict[str, float]:
  """hit@1, hit@5 of every segment's audio against every film's video moments."""
  started = time.perf_counter()
  moments, times, owners = [], [], []
  for index, name in enumerate(names):
    embedded = embedder.embed_file(folder / name, storage)
    moments.append(embedded.moment_video)
    times.append(embedded.moment_time)
    owners.append(np.full(len(embedded.moment_time), index))
  moments, times, owners = map(np.concatenate, (moments, times, owners))
  export_s = time.perf_counter() - started
  segment = default.get_config().dataset.synthetic.segment_seconds
  hits1, hits5 = [], []
  for index, name in enumerate(names):
    waveform = embedder.read_audio(folder / name, storage)
    duration = len(waveform) / embedder.spec.mel.sample_rate
    for start in np.arange(0, duration - segment + 1e-6, segment):
      query = embedder.embed_audio_range(waveform, start, start + segment)
      top, _ = search.nearest(moments, query[None], top_k=5)
      hit = (owners[top[0]] == index) & (np.abs(times[top[0]] - start) <= TOLERANCE_S)
      hits1.append(bool(hit[0]))
      hits5.append(bool(hit.any()))
  return {
    "hit@1": float(np.mean(hits1)),
    "hit@5": float(np.mean(hits5)),
    "queries": len(hits1),
    "moments": len(times),
    "seconds": time.perf_counter() - started,
    "export_s": export_s,
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--default_workdir", type=pathlib.Path, required=True)
  parser.add_argument("--ablation_workdir", type=pathlib.Path, required=True)
  parser.add_argument("--minutes", type=float, default=10.0)
  parser.add_argument("--files", type=int, default=3)
  parser.add_argument("--seed", type=int, default=1000, help="the films' seed (no run uses it)")
  args = parser.parse_args()
  folder = pathlib.Path(tempfile.mkdtemp(prefix="cmvt_films_"))
  names = write_films(folder, args.minutes, args.files, args.seed)
  ablation = default.get_config()
  ablation.model.video.temporal.num_layers = 0
  models = {
    "trained (default)": (args.default_workdir, default.get_config()),
    "trained, video mean-pooled (ablation)": (args.ablation_workdir, ablation),
    "random init (no training)": (None, default.get_config()),
  }
  rows = {}
  for title, (workdir, config) in models.items():
    embedder, storage = embedder_of(workdir, config)
    rows[title] = localise(embedder, storage, folder, names)
    print(f"{title}: {rows[title]}", flush=True)
  first = next(iter(rows.values()))
  print(
    f"\nDate: {datetime.date.today():%a %b %d %Y}. Machine: {quality.cpu_name()}, "
    f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}. Command: python -m "
    f"benchmarks.localisation --minutes {args.minutes:g} --files {args.files} --seed "
    f"{args.seed}. {args.files} films of {args.minutes:g} min, {first['moments']} moments, "
    f"{first['queries']} segment queries (audio → video moments, hit: top moment within "
    f"±{TOLERANCE_S:g} s of the segment's start).\n"
  )
  print("| model | hit@1 | hit@5 | export + queries s |")
  print("| --- | --- | --- | --- |")
  for title, row in rows.items():
    print(f"| {title} | {row['hit@1']:.3f} | {row['hit@5']:.3f} | {row['seconds']:.0f} |")


if __name__ == "__main__":
  main()
