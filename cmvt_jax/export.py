"""Embedding export: per-clip or whole-video embeddings of a split, or of raw video files.

`--mode export` (and the end of training, with `export.at_end`) writes

  WORKDIR/embeddings/NAME/part-{process_index:05d}-of-{process_count:05d}.npz
  WORKDIR/embeddings/NAME/manifest.json

NAME is `export.name`, by default the split (`export.split`) or, with `export.video_dir`, the
video folder's name; whole-video exports append `_whole_video`. Each part holds its process's
rows: `id` (str; `SOURCE@START` per clip, `SOURCE` per whole video), `source` (str, the
video's path relative to the video folder), `start` (float32 seconds), `video` and `audio`
(float32 `[N, E]`, L2-normalised), `label` (int32, when the dataset has labels: the
prepared dataset's class, named in the manifest's `label_names`, -1 for a clip with none or
several), `labels` (uint8 `[N, C]` multi-hot, for multi-label data: the manifest then says
`multi_label`) and, for whole videos, `num_frames` (int32 input frames) and
the per-moment arrays (`whole_video`: a moment every `export.moment_seconds`, its window
embedded exactly as a training clip): `moment_video`, `moment_audio` `[M, E]`, `moment_time`
`[M]` (seconds from the video's start) and `moment_row` `[M]` (the moment's video among the
part's rows). `load_embeddings` merges the parts in id order (moments renumbered to the
merged rows, in (row, time) order).

Multi-host. Every process embeds and writes only its own share: clips p, p + P, ... of the
split (the eval pipeline's shard), or every P-th video file or source video. Clips are
embedded by `embedding.ClipEmbedder` with local rows (each process keeps the rows on its own
devices; nothing is gathered), whole videos by `whole_video.VideoEmbedder` (one at a time
on each process's first local device, no collective). A video that cannot be used (unreadable,
too short, or over `export.memory_limit_gib`) is skipped, logged and counted by reason in the
manifest (`skipped`); the rest of the folder exports.

Interruption. Process 0 first removes the folder's manifest, the search cache built from the
previous export (`search-cache/`, search.py) and the parts; each part is written under a
temporary name and renamed when complete; process 0 writes the manifest (step, config hash,
model hash, counts, each part's SHA-256, embedding dim, moment grid, the stored data's
settings) only after every process has finished its part. A folder without a manifest is
an incomplete export, and `load_embeddings` refuses it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Iterator
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from ml_collections import config_dict

from cmvt_jax import console
from cmvt_jax import embedding
from cmvt_jax import files
from cmvt_jax import run as run_lib
from cmvt_jax import sharding
from cmvt_jax import whole_video
from cmvt_jax.data import dataset_writer
from cmvt_jax.data import datasets
from cmvt_jax.data import pipeline
from cmvt_jax.data import video_io

MANIFEST = "manifest.json"
# search.py's cache of a collection's moments, beside its parts: an export that writes the
# parts again removes it with them.
SEARCH_CACHE = "search-cache"
# The `input` keys an eval view depends on (the rest tune the pipeline or augment training).
_INPUT_KEYS_EMBEDDED = (
  "num_frames",
  "fps",
  "frame_size",
  "sample_rate",
  "n_fft",
  "hop_length",
  "n_mels",
  "fmin",
  "fmax",
)
# Config keys added after runs were recorded, as `section.key` (`workdir_config` gives an
# older run's config these defaults; tests check they are configs/default.py's).
KEYS_ADDED = {
  "export.frame_chunk": 256,
  "export.moment_seconds": 1.0,
  "export.memory_limit_gib": None,
  "input.eval_num_workers": 0,
  "input.cache_train_gib": 1.0,
  "model.attention_implementation": None,
}
# Per-row metadata of every export (the host-side keys of the eval batches).
_CLIP_KEYS = ("id", "source", "start")
# Why a video is left out of an export (the manifest counts each).
SKIP_REASONS = tuple(
  sorted({error.reason for error in (*video_io.READ_ERRORS, whole_video.TooLongError)})
)


def trained_params(
  run: run_lib.Run, *, step: int | None = None, trained: run_lib.TrainedParams | None = None
) -> run_lib.TrainedParams:
  """`trained` (training's final parameters) unless another checkpoint `step` is asked
  for; otherwise that checkpoint's (None: the latest) parameters, read from the workdir."""
  if trained is not None and step in (None, trained.step):
    return trained
  return run.restore_params(step=step)


def export_name(export_config) -> str:
  """The folder under WORKDIR/embeddings/ that an export with these settings writes."""
  if export_config.name:
    name = export_config.name
  elif export_config.video_dir:
    name = epath.Path(export_config.video_dir).name
  else:
    name = export_config.split
  if not export_config.name and export_config.whole_video:
    name += "_whole_video"
  if not name or "/" in name or name.startswith("."):
    raise ValueError(f"export.name must be a plain folder name; got {name!r}.")
  return name


def model_digest(config: config_dict.ConfigDict) -> str:
  """SHA-256 of what decides an embedding: the model (not which attention implementation
  computes it: they agree to float rounding), what its input is (not how the pipeline runs
  or augments) and the stored data's settings (a collection can be searched with queries
  embedded by the same model)."""
  model = config.model.to_dict()
  model.pop("attention_implementation", None)
  sections = {
    "model": model,
    "input": {key: config.input[key] for key in _INPUT_KEYS_EMBEDDED},
    "storage": {
      key: config.dataset[key] for key in ("clip_seconds", "fps", "short_side", "sample_rate")
    },
  }
  return hashlib.sha256(json.dumps(sections, sort_keys=True).encode("utf-8")).hexdigest()


def part_name(process_index: int, process_count: int) -> str:
  return f"part-{process_index:05d}-of-{process_count:05d}.npz"


def is_current(config: config_dict.ConfigDict, workdir: epath.PathLike, step: int) -> bool:
  """Whether the workdir holds this config's complete export of checkpoint `step` (a rerun
  of a finished run skips it then). Call on every process."""
  folder = epath.Path(workdir) / "embeddings" / export_name(config.export)
  return run_lib.output_is_current(folder / MANIFEST, config, step, listed="parts")


# ----------------------------------------------------------------------------- export


def export_embeddings(
  config: config_dict.ConfigDict,
  workdir: str,
  *,
  run: run_lib.Run | None = None,
  trained: run_lib.TrainedParams | None = None,
) -> epath.Path:
  """`--mode export`: embeddings of `export.split` (or `export.video_dir`) into the workdir.

  Every process must call this (training does, with its `run` and final parameters).

  Returns:
    The export folder `WORKDIR/embeddings/NAME`.
  """
  export = config.export
  run = run or run_lib.Run.create(config, workdir)
  trained = trained_params(run, step=export.step, trained=trained)
  folder = epath.Path(workdir) / "embeddings" / export_name(export)
  # Bad settings are refused before the previous export is removed.
  _check_settings(run, export)
  if export.video_dir:
    video_files = _video_files(epath.Path(export.video_dir))
  else:
    run.dataset.source(export.split)  # names the splits there are when there is no such one
  _clear(folder)
  started = time.perf_counter()
  if export.video_dir:
    share = sharding.process_share(video_files)
    rows, skipped = _embed_files(run, trained, export, share, skip_unreadable=True)
    labels = None
  else:
    rows, skipped = _embed_split(run, trained, export)
    labels = {
      "label_names": list(run.dataset.label_names),
      "multi_label": run.dataset.multi_label,
    }
  digest = _write_part(folder, rows)
  counts = sharding.gather(
    [len(rows["id"]), len(rows.get("moment_time", ()))]
    + [skipped.count(reason) for reason in SKIP_REASONS]
  )
  digests = [row.tobytes().hex() for row in sharding.gather(list(digest), np.uint8)]
  if jax.process_index() == 0:
    _write_manifest(folder, config, trained, counts, digests, labels, run.dataset.storage)
  multihost_utils.sync_global_devices("cmvt_jax export: manifest written")
  seconds = time.perf_counter() - started
  total = int(counts[:, 0].sum())
  logging.info(
    "Exported %d %s (checkpoint step %d) to %s in %.1f s (%.1f per s on this process).",
    total,
    "videos" if export.whole_video else "clips",
    trained.step,
    folder,
    seconds,
    len(rows["id"]) / max(seconds, 1e-9),
  )
  return folder


def embed_videos(
  paths: Sequence[epath.PathLike],
  workdir: epath.PathLike,
  *,
  config: config_dict.ConfigDict | None = None,
) -> dict[str, np.ndarray]:
  """Embeds video files with a workdir's model, without preparing a dataset.

  Files are decoded and preprocessed as the model's training clips were (the training
  dataset's storage settings, the checkpoint's normalisation statistics), per clip window or,
  with `config.export.whole_video`, whole.

  Args:
    paths: video files (any `etils.epath` path). In a multi-process program each process
      embeds, and returns, its share `paths[process_index::process_count]`.
    workdir: a training workdir; its latest checkpoint (or `config.export.step`) is used.
    config: the run's config; by default the one recorded in `WORKDIR/config.json`.

  Returns:
    The export's keys (module docstring; no `label`), rows in the order of `paths` and, per
    file, of its clips; `source` is the path as given.

  Raises:
    video_io.VideoReadError: a file cannot be used (it names the file and why).
  """
  config = config or workdir_config(workdir)
  run = run_lib.Run.create(config, workdir)
  trained = run.restore_params(step=config.export.step)
  video_files = sharding.process_share([(epath.Path(path), os.fspath(path)) for path in paths])
  rows, _ = _embed_files(run, trained, config.export, video_files, skip_unreadable=False)
  return rows


def embed_segment(
  workdir: epath.PathLike,
  path: epath.PathLike,
  *,
  modality: str,
  start: float | None = None,
  end: float | None = None,
  step: int | None = None,
  config: config_dict.ConfigDict | None = None,
  storage: dataset_writer.StorageSpec | None = None,
) -> np.ndarray:
  """One modality of [start, end) of a media file (None: its start / end) with a workdir's
  model, embedded in one pass as a clip of that length: `[E]` float32, L2-normalised.

  Args:
    workdir: a training workdir.
    path: a video file, or (modality 'audio') any file with an audio stream.
    modality: 'audio' or 'video'.
    start, end: seconds from the file's start.
    step, config, storage: as `segment_embedder`'s.

  Raises:
    video_io.VideoReadError: the file cannot be used.
    ValueError: the range is empty or outside the file (or, as `segment_embedder`, no
      such checkpoint).
  """
  embed = segment_embedder(workdir, step=step, config=config, storage=storage)
  return embed(path, modality=modality, start=start, end=end)


def segment_embedder(
  workdir: epath.PathLike,
  *,
  step: int | None = None,
  config: config_dict.ConfigDict | None = None,
  storage: dataset_writer.StorageSpec | None = None,
) -> Callable[..., np.ndarray]:
  """A workdir's model, loaded once, as `embed(path, *, modality, start=None, end=None)`:
  `embed_segment` without loading it again.

  Args:
    workdir: a training workdir.
    step: the checkpoint (None: `config.export.step`, or the latest); a search embeds its
      query with the checkpoint that embedded the collection.
    config: the run's config; by default the one recorded in `WORKDIR/config.json`.
    storage: the stored data's settings (frame rate, frame size, sample rate) that the
      model's input is made from. None: the training dataset's, which opens it (and makes
      the synthetic one first); a search passes those its collection's manifest records.

  Raises:
    FileNotFoundError: no checkpoint; ValueError: no checkpoint `step`, or one of another
      model; checkpoints.NoUsableCheckpointError: none can be restored.
  """
  config = config or workdir_config(workdir)
  run = run_lib.Run.create(config, workdir)
  trained = run.restore_params(step=config.export.step if step is None else step)
  storage = storage or run.dataset.storage
  embedder = video_embedder(run, trained, config.export, storage=storage)
  return functools.partial(embedder.embed_range, storage=storage)


def workdir_config(workdir: epath.PathLike) -> config_dict.ConfigDict:
  """The resolved config that training recorded in `WORKDIR/config.json`."""
  path = epath.Path(workdir) / "config.json"
  if not path.exists():
    raise FileNotFoundError(
      f"{path} does not exist: {workdir} holds no training run. Train "
      "first, or pass the run's config."
    )
  config = config_dict.ConfigDict(json.loads(path.read_text())["config"])
  for path, value in KEYS_ADDED.items():  # a run recorded before they existed
    section, key = path.split(".")
    if key not in config[section]:
      config[section][key] = value
  return config


def load_embeddings(workdir_or_embeddings_dir: epath.PathLike, name: str) -> dict[str, np.ndarray]:
  """A complete export's rows, every part merged, sorted by `id`.

  Args:
    workdir_or_embeddings_dir: a workdir, or its `embeddings/` folder.
    name: the export's folder name under `embeddings/` (`export_name`: by default the
      split, or the video folder's name; `_whole_video` appended for whole videos).

  Returns:
    The keys of the module docstring, each with one row per clip (or video).

  Raises:
    FileNotFoundError: no complete export of that name (none, or interrupted: no manifest).
    ValueError: a part does not hold the rows the manifest counts.
  """
  folder, manifest = read_manifest(workdir_or_embeddings_dir, name)
  parts = []
  for part_file, count in manifest["parts"].items():
    with (folder / part_file).open("rb") as f:
      part = dict(np.load(f, allow_pickle=False))
    if len(part["id"]) != count:
      raise ValueError(
        f"{folder / part_file} holds {len(part['id'])} rows, the manifest counts {count}; "
        "export again."
      )
    parts.append(part)
  offsets = np.cumsum([0] + [len(part["id"]) for part in parts])
  for part, offset in zip(parts, offsets):
    if "moment_row" in part:
      part["moment_row"] = part["moment_row"] + np.int32(offset)
  rows = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
  order = np.argsort(rows["id"], kind="stable")
  merged = {key: value[order] for key, value in rows.items() if not key.startswith("moment_")}
  if "moment_row" in rows:
    # Moments follow their videos into id order: rows renumbered, then sorted by (row, time).
    new_row = np.empty_like(order)
    new_row[order] = np.arange(len(order))
    moment_row = new_row[rows["moment_row"]].astype(np.int32)
    moment_order = np.lexsort((rows["moment_time"], moment_row))
    merged.update({key: rows[key][moment_order] for key in rows if key.startswith("moment_")})
    merged["moment_row"] = moment_row[moment_order]
  return merged


def read_manifest(
  workdir_or_embeddings_dir: epath.PathLike, name: str
) -> tuple[epath.Path, dict[str, Any]]:
  """(export folder, its manifest) of a complete export; arguments as `load_embeddings`.

  Raises:
    FileNotFoundError: no complete export of that name (none, or interrupted: no manifest).
  """
  root = epath.Path(workdir_or_embeddings_dir)
  folder = root / "embeddings" / name
  if not folder.exists():
    folder = root / name
  path = folder / MANIFEST
  if not path.exists():
    found = sorted(part.name for part in folder.glob("part-*")) if folder.exists() else []
    raise FileNotFoundError(
      f"No complete export {name!r} under {root}: {path} is missing"
      + (f" (the folder holds {', '.join(found)}: an interrupted export)" if found else "")
      + ". Export with `python -m cmvt_jax.main --mode export --config ... --workdir ...`."
    )
  return folder, json.loads(path.read_text())


# ----------------------------------------------------------------------------- sources


def _video_files(video_dir: epath.Path) -> list[tuple[epath.Path, str]]:
  """(path, path relative to `video_dir`) of every video file under it, sorted."""
  if not video_dir.is_dir():
    raise FileNotFoundError(f"export.video_dir {video_dir} does not exist or is not a folder.")
  found = []
  for parent, _, names in video_dir.walk():  # walk, not rglob: rglob is refused on gs://
    for name in names:
      path = epath.Path(parent) / name
      if path.suffix.lower() in dataset_writer.VIDEO_EXTENSIONS:
        found.append((path, "/".join(path.relative_to(video_dir).parts)))
  if not found:
    raise FileNotFoundError(
      f"No video file ({', '.join(dataset_writer.VIDEO_EXTENSIONS)}) under "
      f"export.video_dir {video_dir}."
    )
  return sorted(found, key=lambda file: file[1])


def _split_videos(
  run: run_lib.Run, embedder: whole_video.VideoEmbedder, split: str
) -> tuple[int, Iterator[tuple[dict[str, Any], whole_video.Embedded | video_io.VideoReadError]]]:
  """(count, (metadata, embeddings or the error that skips it) of each of this process's
  source videos of a prepared split), each rebuilt from its clips on one timeline.

  Every process reads the whole split once to find which clips belong to which video.
  """
  source = run.dataset.source(split)
  clips: dict[str, list[tuple[float, int]]] = {}
  for index in range(len(source)):
    example = source[index]
    clips.setdefault(pipeline.text(example["source"]), []).append((float(example["start"]), index))
  videos = sharding.process_share(sorted(clips))
  storage = run.dataset.storage

  def embedded():
    for video in videos:
      first = source[min(clips[video])[1]]
      metadata = {
        "id": video,
        "source": video,
        "start": np.float32(first["start"]),
        **pipeline.label_fields(first, run.dataset.multi_hot_classes),
      }
      try:
        duration = len(clips[video]) * storage.stride_seconds
        embedder.check_fits(video, duration)
        examples = [source[index] for _, index in sorted(clips[video])]
        frames, audio = _stitch(examples, storage, video, split)
        yield metadata, embedder.embed_stored(frames, audio, video)
      except video_io.VideoReadError as error:
        yield metadata, error

  return len(videos), embedded()


def _stitch(
  examples: Sequence[dict[str, Any]], storage: dataset_writer.StorageSpec, video: str, split: str
) -> tuple[np.ndarray, np.ndarray]:
  """The stored clips of one video (sorted by start) put back on one timeline.

  Returns uint8 frames `[N, H, W, 3]` and int16 audio `[S]` from the first clip's start to
  the last clip's end; overlapping clips hold the same samples, so either copy will do.
  """
  frame_at = lambda example: round(float(example["start"]) * storage.fps)
  sample_at = lambda example: round(float(example["start"]) * storage.sample_rate)
  first_frame, first_sample = frame_at(examples[0]), sample_at(examples[0])
  num_frames = frame_at(examples[-1]) - first_frame + len(examples[-1]["frames"])
  num_samples = sample_at(examples[-1]) - first_sample + len(examples[-1]["audio"])
  frames = np.zeros((num_frames,) + examples[0]["frames"].shape[1:], np.uint8)
  audio = np.zeros(num_samples, np.int16)
  covered = np.zeros(num_frames, bool)
  for example in examples:
    offset = frame_at(example) - first_frame
    frames[offset : offset + len(example["frames"])] = example["frames"]
    covered[offset : offset + len(example["frames"])] = True
    offset = sample_at(example) - first_sample
    audio[offset : offset + len(example["audio"])] = example["audio"]
  if not covered.all():
    raise ValueError(
      f"Split {split!r} does not cover {video} without gaps (clips of "
      f"{storage.clip_seconds} s every {storage.stride_seconds} s, or clips skipped), so it "
      "cannot be embedded whole from the prepared dataset. Export the raw files with "
      "--config.export.video_dir=DIR."
    )
  return frames, audio


def _file_elements(
  video_files: Iterable[tuple[epath.Path, str]],
  preprocessor: pipeline.Preprocessor,
  storage: dataset_writer.StorageSpec,
  *,
  skip_unreadable: bool,
  skipped: list[str],
  stage: console.Stage,
) -> Iterator[dict[str, Any]]:
  """Eval elements of each file's clips in turn; unreadable files are skipped (and their
  reasons appended to `skipped`) or raise."""
  for path, source in video_files:
    try:
      elements = pipeline.file_elements(path, preprocessor, storage, source=source)
    except video_io.VideoReadError as error:
      if not skip_unreadable:
        raise
      logging.warning("Skipping %s: %s: %s", source, error.reason, error.detail)
      skipped.append(error.reason)
      elements = []
    else:
      if not elements:
        logging.warning("Skipping %s: shorter than one clip (%s s).", source, storage.clip_seconds)
        skipped.append(video_io.TooShortError.reason)
    yield from elements
    stage.advance()


# ----------------------------------------------------------------------------- embedding


def _embed_split(
  run: run_lib.Run, trained: run_lib.TrainedParams, export: config_dict.ConfigDict
) -> tuple[dict[str, np.ndarray], list[str]]:
  """This process's rows of the prepared split `export.split` (per clip, or whole videos,
  as the config's `export` section says), and the reasons of the videos it skipped."""
  split = export.split
  primary = jax.process_index() == 0
  if export.whole_video:
    embedder = video_embedder(run, trained, export)
    count, embedded = _split_videos(run, embedder, split)
    with console.Stage("export", count, f"{split} videos", enabled=primary) as stage:
      return _whole_rows(_ticking(embedded, stage), run, label_keys(run.dataset))
  batch_size = _host_batch_size(run, export.batch_size)
  clips = len(run.dataset.source(split))
  with (
    embedding.split_batches(run, trained.stats, split, batch_size=batch_size) as batches,
    console.Stage("export", clips, f"{split} clips", enabled=primary) as stage,
  ):
    embedder = embedding.ClipEmbedder(run.model, run.mesh, run.spec)
    rows = embedder.embed(
      trained.params,
      _ticking(
        batches, stage, weight=lambda batch: int(np.sum(batch["mask"])) * jax.process_count()
      ),
      batch_size=batch_size,
      gather=False,
      metadata=_CLIP_KEYS + label_keys(run.dataset),
    )
  return rows, []


def _embed_files(
  run: run_lib.Run,
  trained: run_lib.TrainedParams,
  export: config_dict.ConfigDict,
  video_files: Sequence[tuple[epath.Path, str]],
  *,
  skip_unreadable: bool,
) -> tuple[dict[str, np.ndarray], list[str]]:
  """Rows of this process's video files (path, source), per clip or whole as the config's
  `export` section says; returns (rows, the reason of each file skipped)."""
  with console.Stage(
    "export", len(video_files), "video files", enabled=jax.process_index() == 0
  ) as stage:
    if export.whole_video:
      embedder = video_embedder(run, trained, export)
      embedded = (
        ({"id": source, "source": source, "start": np.float32(0)}, outcome)
        for source, outcome in whole_video.iter_embedded(embedder, video_files, run.dataset.storage)
      )
      if not skip_unreadable:
        embedded = _raising(embedded)
      return _whole_rows(_ticking(embedded, stage), run, ())
    skipped = []
    elements = _file_elements(
      video_files,
      run.preprocessor(trained.stats),
      run.dataset.storage,
      skip_unreadable=skip_unreadable,
      skipped=skipped,
      stage=stage,
    )
    batch_size = _host_batch_size(run, export.batch_size)
    embedder = embedding.ClipEmbedder(run.model, run.mesh, run.spec)
    rows = embedder.embed(
      trained.params,
      _batched(elements, batch_size, run.spec),
      batch_size=batch_size,
      gather=False,
      metadata=_CLIP_KEYS,
    )
  return rows, skipped


def _raising(embedded: Iterable[tuple[dict, Any]]) -> Iterator[tuple[dict, Any]]:
  for metadata, outcome in embedded:
    if isinstance(outcome, video_io.VideoReadError):
      raise outcome
    yield metadata, outcome


def _check_settings(run: run_lib.Run, export: config_dict.ConfigDict) -> None:
  """Refuses bad `export` settings, whatever the mode (before anything is removed).

  Raises:
    ValueError: naming the setting and a value that works.
  """
  _host_batch_size(run, export.batch_size)
  if not export.frame_chunk >= 1:
    raise ValueError(
      f"export.frame_chunk={export.frame_chunk} must be at least 1 (frames per frame-encoder "
      "call while a video streams); e.g. --config.export.frame_chunk=256."
    )
  if not 0 <= export.moment_seconds < math.inf:
    raise ValueError(
      f"export.moment_seconds={export.moment_seconds} must be a number of seconds >= 0 (the "
      "step of the moment grid; 0: no moments); e.g. --config.export.moment_seconds=1."
    )
  if export.memory_limit_gib is not None and not 0 < export.memory_limit_gib < math.inf:
    raise ValueError(
      f"export.memory_limit_gib={export.memory_limit_gib} must be a positive number of GiB "
      "(what one whole video may use; unset: the device's memory)."
    )


def _host_batch_size(run: run_lib.Run, size: int) -> int:
  """This process's share of the global export batch `size`."""
  processes = jax.process_count()
  unit = math.lcm(run.mesh.devices.size, processes)
  if size < 1 or size % unit:
    raise ValueError(
      f"export.batch_size={size} must be a positive multiple of {unit} (the "
      f"{run.mesh.devices.size} devices and {processes} processes); e.g. "
      f"--config.export.batch_size={unit * max(1, math.ceil(size / unit))}."
    )
  return size // processes


def video_embedder(
  run: run_lib.Run,
  trained: run_lib.TrainedParams,
  export: config_dict.ConfigDict,
  *,
  storage: dataset_writer.StorageSpec | None = None,
) -> whole_video.VideoEmbedder:
  """The whole-video embedder of the export settings (on this process's first device), for
  data stored with `storage` (None: the dataset's)."""
  device = embedding.WholeVideoEmbedder(
    run.model,
    run.mesh,
    trained.params,
    chunk_frames=export.frame_chunk,
    window_batch=max(1, export.batch_size // jax.process_count()),
  )
  if export.memory_limit_gib is not None:
    limit = int(export.memory_limit_gib * (1 << 30))
  else:
    limit = whole_video.memory_available(device.device)
  return whole_video.VideoEmbedder(
    device,
    run.preprocessor(trained.stats, storage=storage),
    moment_seconds=export.moment_seconds,
    memory_limit_bytes=limit,
  )


def label_keys(dataset: datasets.PreparedDataset) -> tuple[str, ...]:
  """The label keys an export of a prepared split holds: none for unlabelled data, `label`,
  and `labels` for multi-label data."""
  if not dataset.label_names:
    return ()
  return ("label", "labels") if dataset.multi_label else ("label",)


def _whole_rows(
  embedded: Iterable[tuple[dict[str, Any], whole_video.Embedded | video_io.VideoReadError]],
  run: run_lib.Run,
  labels: tuple[str, ...],
) -> tuple[dict[str, np.ndarray], list[str]]:
  """Rows (with `num_frames` and the `moment_*` keys) of the videos embedded, and the
  reasons of those skipped (each logged with its source); `labels`: the label keys kept."""
  dim = run.config.model.embed_dim
  keys = _CLIP_KEYS + labels
  rows = {key: [] for key in (*keys, "video", "audio", "num_frames")}
  moments = {key: [] for key in ("moment_video", "moment_audio", "moment_time", "moment_row")}
  skipped = []
  for metadata, outcome in embedded:
    if isinstance(outcome, video_io.VideoReadError):
      logging.warning("Skipping %s: %s: %s", metadata["source"], outcome.reason, outcome.detail)
      skipped.append(outcome.reason)
      continue
    moments["moment_row"].append(np.full(len(outcome.moment_time), len(rows["id"]), np.int32))
    for key in keys:
      rows[key].append(metadata[key])
    rows["num_frames"].append(outcome.num_frames)
    rows["video"].append(outcome.video)
    rows["audio"].append(outcome.audio)
    for key in ("moment_video", "moment_audio", "moment_time"):
      moments[key].append(getattr(outcome, key))
  types = {"id": str, "source": str, "start": np.float32, "label": np.int32, "num_frames": np.int32}
  result = {key: np.array(rows[key], dtype=types[key]) for key in types if key in rows}
  if "labels" in rows:
    classes = run.dataset.multi_hot_classes
    result["labels"] = np.array(rows["labels"], np.uint8).reshape(-1, classes)
  for key in ("video", "audio"):
    result[key] = np.array(rows[key], np.float32).reshape(-1, dim)
  for key, empty in (
    ("moment_video", np.zeros((0, dim), np.float32)),
    ("moment_audio", np.zeros((0, dim), np.float32)),
    ("moment_time", np.zeros(0, np.float32)),
    ("moment_row", np.zeros(0, np.int32)),
  ):
    result[key] = np.concatenate([empty, *moments[key]])
  return result, skipped


def _batched(
  elements: Iterable[dict[str, Any]], batch_size: int, spec: pipeline.InputSpec
) -> Iterator[dict[str, np.ndarray]]:
  """Eval elements → batches of `batch_size`, the last one filled with padding rows."""
  pending = []
  for element in elements:
    pending.append(element)
    if len(pending) == batch_size:
      yield _stack(pending)
      pending = []
  if pending:
    padding = pipeline.padding_rows(spec, batch_size - len(pending))
    yield {key: np.concatenate([_stack(pending)[key], padding[key]]) for key in padding}


def _stack(elements: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
  keys = ("video", "audio", "label", "has_audio", "mask", "id", "source", "start")
  return {key: np.stack([np.asarray(element[key]) for element in elements]) for key in keys}


def _ticking(
  iterable: Iterable, stage: console.Stage, weight: Callable[[Any], int] = lambda item: 1
) -> Iterator:
  """`iterable`'s items; each advances `stage` by its `weight` once it has been used."""
  for item in iterable:
    yield item
    stage.advance(weight(item))


# ----------------------------------------------------------------------------- files


def _clear(folder: epath.Path) -> None:
  """Process 0 removes a previous export (manifest first) and the search cache built from
  it; then every process may write."""
  if jax.process_index() == 0:
    folder.mkdir(parents=True, exist_ok=True)
    files.remove(folder / MANIFEST, kind="export-clear")
    files.remove(folder / SEARCH_CACHE, kind="export-clear")
    for path in folder.glob("part-*"):
      files.remove(path, kind="export-clear")
  multihost_utils.sync_global_devices("cmvt_jax export: folder cleared")


def _write_part(folder: epath.Path, rows: dict[str, np.ndarray]) -> bytes:
  """This process's part, under a temporary name until it is complete; returns the SHA-256
  of its bytes (read back once here, so that no search has to)."""
  path = folder / part_name(jax.process_index(), jax.process_count())
  with files.replacing(path, kind="export-part") as temporary:
    with temporary.open("wb") as f:
      np.savez(f, **rows)
    with temporary.open("rb") as f:
      digest = hashlib.file_digest(f, "sha256").digest()
  return digest


def _write_manifest(
  folder: epath.Path,
  config: config_dict.ConfigDict,
  trained: run_lib.TrainedParams,
  counts: np.ndarray,
  digests: Sequence[str],
  labels: dict[str, Any] | None,
  storage: dataset_writer.StorageSpec,
) -> None:
  """`labels`: the prepared dataset's `label_names` and `multi_label` (None for raw files);
  `storage`: the stored data's settings the videos were cut with."""
  export = config.export
  manifest = {
    "split": None if export.video_dir else export.split,
    "video_dir": export.video_dir,
    "whole_video": bool(export.whole_video),
    "step": trained.step,
    "config_sha256": run_lib.config_digest(config),
    "embed_dim": int(config.model.embed_dim),
    "count": int(counts[:, 0].sum()),
    "parts": {
      part_name(index, len(counts)): int(count) for index, count in enumerate(counts[:, 0])
    },
    "part_sha256": {part_name(index, len(counts)): digest for index, digest in enumerate(digests)},
    "skipped_files": int(counts[:, 2:].sum()),
    "skipped": {
      reason: int(count) for reason, count in zip(SKIP_REASONS, counts[:, 2:].sum(0)) if count
    },
    "label_names": labels and labels["label_names"],
    "multi_label": bool(labels and labels["multi_label"]),
    "model_sha256": model_digest(config),
    # What a search needs to cut its queries as the moments were, without the dataset.
    "storage": dataclasses.asdict(storage),
  }
  if export.whole_video and export.moment_seconds:
    manifest["moments"] = {
      "count": int(counts[:, 1].sum()),
      "moment_seconds": float(export.moment_seconds),
      "window_seconds": float(config.input.num_frames / config.input.fps),
    }
  files.write_json(folder / MANIFEST, manifest, kind="export-manifest")
