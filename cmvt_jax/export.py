"""Embedding export: per-clip or whole-video embeddings of a split, or of raw video files.

`--mode export` (and the end of training, with `export.at_end`) writes

  WORKDIR/embeddings/NAME/part-{process_index:05d}-of-{process_count:05d}.npz
  WORKDIR/embeddings/NAME/manifest.json

NAME is `export.name`, by default the split (`export.split`) or, with `export.video_dir`, the
video folder's name; whole-video exports append `_whole_video`. Each part holds its process's
rows: `id` (str; `SOURCE@START` per clip, `SOURCE` per whole video), `source` (str, the
video's path relative to the video folder), `start` (float32 seconds), `video` and `audio`
(float32 `[N, E]`, L2-normalised), `label` (int32, when known: the prepared dataset's
classes, named in the manifest) and, for whole videos, `num_frames` (int32 input frames).
`load_embeddings` merges the parts in id order.

Multi-host. Every process embeds and writes only its own share: clips p, p + P, ... of the
split (the eval pipeline's shard), or every P-th video file or source video. Clips are
embedded by `embedding.ClipEmbedder` with local rows (each process keeps the rows on its own
devices; nothing is gathered), whole videos by `embedding.WholeVideoEmbedder` (one at a time
on each process's first local device, no collective).

Interruption. Process 0 first removes the folder's manifest and parts; each part is written
under a temporary name and renamed when complete; process 0 writes the manifest (step, config
hash, counts, embedding dim) only after every process has finished its part. A folder
without a manifest is an incomplete export, and `load_embeddings` refuses it.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterable
from collections.abc import Iterator
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import tqdm
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from ml_collections import config_dict

from cmvt_jax import embedding
from cmvt_jax import files
from cmvt_jax import run as run_lib
from cmvt_jax import sharding
from cmvt_jax.data import dataset_writer
from cmvt_jax.data import pipeline
from cmvt_jax.data import video_io

MANIFEST = "manifest.json"
# Per-row metadata of every export (the host-side keys of the eval batches).
_CLIP_KEYS = ("id", "source", "start")


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
  _host_batch_size(run, export.batch_size)
  if export.video_dir:
    video_files = _video_files(epath.Path(export.video_dir))
  else:
    run.dataset.source(export.split)  # names the splits there are when there is no such one
  _clear(folder)
  started = time.perf_counter()
  if export.video_dir:
    share = sharding.process_share(video_files)
    rows, skipped = _embed_files(run, trained, export, share, skip_unreadable=True)
    label_names = None
  else:
    rows, skipped = _embed_split(run, trained, export), 0
    label_names = list(run.dataset.label_names)
  _write_part(folder, rows)
  counts = sharding.gather([len(rows["id"]), skipped])
  if jax.process_index() == 0:
    _write_manifest(folder, config, trained, counts, label_names)
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


def workdir_config(workdir: epath.PathLike) -> config_dict.ConfigDict:
  """The resolved config that training recorded in `WORKDIR/config.json`."""
  path = epath.Path(workdir) / "config.json"
  if not path.exists():
    raise FileNotFoundError(
      f"{path} does not exist: {workdir} holds no training run. Train "
      "first, or pass the run's config."
    )
  return config_dict.ConfigDict(json.loads(path.read_text())["config"])


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
  rows = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
  order = np.argsort(rows["id"], kind="stable")
  return {key: value[order] for key, value in rows.items()}


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


def _check_frames(num_frames: int, source: str, spec: pipeline.InputSpec, max_frames: int) -> None:
  if num_frames > max_frames:
    raise ValueError(
      f"{source}: {num_frames} input frames ({num_frames / spec.fps:.1f} s at {spec.fps} "
      f"fps) exceed export.max_frames={max_frames}. Raise --config.export.max_frames "
      "(time and memory grow linearly with frames) or export per clip "
      "(--config.export.whole_video=False)."
    )
  if num_frames < 1:
    raise ValueError(f"{source} is shorter than one input frame ({1 / spec.fps} s).")


def _split_videos(
  run: run_lib.Run, preprocessor: pipeline.Preprocessor, split: str, max_frames: int
) -> tuple[int, Iterator[dict[str, Any]]]:
  """(count, elements) of this process's source videos of a prepared split, each rebuilt
  from its clips on one timeline and preprocessed whole.

  Every process reads the whole split once to find which clips belong to which video.
  """
  source = run.dataset.source(split)
  clips: dict[str, list[tuple[float, int]]] = {}
  for index in range(len(source)):
    example = source[index]
    clips.setdefault(pipeline.text(example["source"]), []).append((float(example["start"]), index))
  videos = sharding.process_share(sorted(clips))

  def elements():
    for video in videos:
      examples = [source[index] for _, index in sorted(clips[video])]
      frames, audio = _stitch(examples, run.dataset.storage, video, split)
      num_frames = math.floor(len(frames) / run.dataset.storage.fps * run.spec.fps)
      _check_frames(num_frames, video, run.spec, max_frames)
      view = preprocessor(frames, audio, num_frames=num_frames)
      yield {
        "video": view["video"],
        "audio": view["audio"],
        "id": video,
        "source": video,
        "start": np.float32(examples[0]["start"]),
        "label": np.int32(examples[0]["label"]),
      }

  return len(videos), elements()


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
  whole_video: bool,
  max_frames: int,
  skip_unreadable: bool,
  skipped: list[str],
  bar,
) -> Iterator[dict[str, Any]]:
  """Eval elements of each file in turn (whole, or per clip); unreadable files are skipped
  (and their sources appended to `skipped`) or raise."""
  for path, source in video_files:
    try:
      elements = pipeline.file_elements(
        path, preprocessor, storage, source=source, whole_video=whole_video
      )
    except video_io.VideoReadError as error:
      if not skip_unreadable:
        raise
      logging.warning("Skipping %s: %s: %s", source, error.reason, error.detail)
      elements = []
    else:
      if not elements:
        logging.warning("Skipping %s: shorter than one clip (%s s).", source, storage.clip_seconds)
    if not elements:
      skipped.append(source)
    for element in elements:
      if whole_video:
        _check_frames(len(element["video"]), source, preprocessor.spec, max_frames)
        element = {**element, "id": source}
      yield element
    bar.update()


# ----------------------------------------------------------------------------- embedding


def _embed_split(
  run: run_lib.Run, trained: run_lib.TrainedParams, export: config_dict.ConfigDict
) -> dict[str, np.ndarray]:
  """This process's rows of the prepared split `export.split` (per clip, or whole videos,
  as the config's `export` section says)."""
  split = export.split
  primary = jax.process_index() == 0
  if export.whole_video:
    preprocessor = run.preprocessor(trained.stats)
    count, elements = _split_videos(run, preprocessor, split, export.max_frames)
    with tqdm.tqdm(total=count, desc=f"Embedding {split} videos", disable=not primary) as bar:
      return _embed_whole(run, trained, _ticking(elements, bar), labelled=True)
  batch_size = _host_batch_size(run, export.batch_size)
  total = pipeline.num_eval_batches(len(run.dataset.source(split)), batch_size, jax.process_count())
  with (
    embedding.split_batches(run, trained.stats, split, batch_size=batch_size) as batches,
    tqdm.tqdm(
      total=total, desc=f"Embedding {split} clips", unit="batch", disable=not primary
    ) as bar,
  ):
    embedder = embedding.ClipEmbedder(run.model, run.mesh, run.spec)
    return embedder.embed(
      trained.params,
      _ticking(batches, bar),
      batch_size=batch_size,
      gather=False,
      metadata=_CLIP_KEYS + ("label",),
    )


def _embed_files(
  run: run_lib.Run,
  trained: run_lib.TrainedParams,
  export: config_dict.ConfigDict,
  video_files: Sequence[tuple[epath.Path, str]],
  *,
  skip_unreadable: bool,
) -> tuple[dict[str, np.ndarray], int]:
  """Rows of this process's video files (path, source), per clip or whole as the config's
  `export` section says; returns (rows, number of files skipped)."""
  skipped = []
  with tqdm.tqdm(
    total=len(video_files),
    desc="Embedding video files",
    unit="file",
    disable=jax.process_index() != 0,
  ) as bar:
    elements = _file_elements(
      video_files,
      run.preprocessor(trained.stats),
      run.dataset.storage,
      whole_video=export.whole_video,
      max_frames=export.max_frames,
      skip_unreadable=skip_unreadable,
      skipped=skipped,
      bar=bar,
    )
    if export.whole_video:
      rows = _embed_whole(run, trained, elements, labelled=False)
    else:
      batch_size = _host_batch_size(run, export.batch_size)
      embedder = embedding.ClipEmbedder(run.model, run.mesh, run.spec)
      rows = embedder.embed(
        trained.params,
        _batched(elements, batch_size, run.spec),
        batch_size=batch_size,
        gather=False,
        metadata=_CLIP_KEYS,
      )
  return rows, len(skipped)


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


def _embed_whole(
  run: run_lib.Run,
  trained: run_lib.TrainedParams,
  elements: Iterable[dict[str, Any]],
  *,
  labelled: bool,
) -> dict[str, np.ndarray]:
  """Rows of whole videos (`embedding.WholeVideoEmbedder`), with `num_frames`."""
  keys = _CLIP_KEYS + (("label",) if labelled else ())
  embedder = embedding.WholeVideoEmbedder(run.model, run.mesh, trained.params)
  dim = run.config.model.embed_dim
  rows = {key: [] for key in (*keys, "video", "audio", "num_frames")}
  for element in elements:
    rows["num_frames"].append(len(element["video"]))
    embedded = embedder.embed(element["video"], element["audio"])
    for key in keys:
      rows[key].append(element[key])
    rows["video"].append(embedded["video"][0])
    rows["audio"].append(embedded["audio"][0])
  types = {"id": str, "source": str, "start": np.float32, "label": np.int32, "num_frames": np.int32}
  result = {key: np.array(rows[key], dtype=types[key]) for key in types if key in rows}
  result.update(
    {key: np.array(rows[key], np.float32).reshape(-1, dim) for key in ("video", "audio")}
  )
  return result


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
  keys = ("video", "audio", "label", "mask", "id", "source", "start")
  return {key: np.stack([np.asarray(element[key]) for element in elements]) for key in keys}


def _ticking(iterable: Iterable, bar: tqdm.tqdm) -> Iterator:
  for item in iterable:
    yield item
    bar.update()


# ----------------------------------------------------------------------------- files


def _clear(folder: epath.Path) -> None:
  """Process 0 removes a previous export (manifest first); then every process may write."""
  if jax.process_index() == 0:
    folder.mkdir(parents=True, exist_ok=True)
    files.remove(folder / MANIFEST, kind="export-clear")
    for path in folder.glob("part-*"):
      files.remove(path, kind="export-clear")
  multihost_utils.sync_global_devices("cmvt_jax export: folder cleared")


def _write_part(folder: epath.Path, rows: dict[str, np.ndarray]) -> None:
  """This process's part, under a temporary name until it is complete."""
  path = folder / part_name(jax.process_index(), jax.process_count())
  with files.replacing(path, kind="export-part") as temporary, temporary.open("wb") as f:
    np.savez(f, **rows)


def _write_manifest(
  folder: epath.Path,
  config: config_dict.ConfigDict,
  trained: run_lib.TrainedParams,
  counts: np.ndarray,
  label_names: Sequence[str] | None,
) -> None:
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
    "skipped_files": int(counts[:, 1].sum()),
    "label_names": label_names,
  }
  files.write_json(folder / MANIFEST, manifest, kind="export-manifest")
