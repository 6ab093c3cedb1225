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
split (the eval pipeline's shard), or every P-th video file or source video. Clips go through
the mesh in global batches whose output stays sharded: each process keeps the rows on its own
devices, nothing is gathered. Every process runs the same number of batches (a process out
of clips contributes a padding batch until all are done), so the jitted collectives pair up.
Whole videos differ in length, so they are embedded one at a time on each process's first
local device, with no collective at all.

Interruption. Process 0 first removes the folder's manifest and parts; each part is written
under a temporary name and renamed when complete; process 0 writes the manifest (step, config
hash, counts, embedding dim) only after every process has finished its part. A folder
without a manifest is an incomplete export, and `load_embeddings` refuses it.
"""

from __future__ import annotations

import dataclasses
import hashlib
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

from cmvt_jax import losses
from cmvt_jax import sharding
from cmvt_jax.data import builder
from cmvt_jax.data import normalization
from cmvt_jax.data import pipeline
from cmvt_jax.data import video_io

MANIFEST = "manifest.json"
_TEMPORARY_SUFFIX = ".tmp"
# Whole videos are padded (with a frame mask) to a power of two of input frames up to this
# many, and to a multiple of it beyond, so that videos of similar length share one compiled
# program and padding costs at most 2x (short videos) or this many frames (long ones).
FRAME_BUCKET = 64
_TEXT_KEYS = ("id", "source")


@dataclasses.dataclass(frozen=True)
class Model:
  """A checkpoint's model parameters and the normalisation statistics it was trained with."""

  step: int
  params: Any
  stats: normalization.NormalizationStats


def load_model(run, *, step: int | None = None, state=None, stats=None) -> Model:
  """The model of `state` (training's, with its `stats`), or of checkpoint `step` (None:
  the latest) of the run's workdir."""
  if state is None or (step is not None and step != int(state.step)):
    restored = run.restore(step=step)
    state = restored.state
    stats = normalization.NormalizationStats.from_dict(restored.meta["stats"])
  return Model(step=int(state.step), params=state.params["model"], stats=stats)


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


# ----------------------------------------------------------------------------- export


def export_embeddings(
  config: config_dict.ConfigDict, workdir: str, *, run=None, state=None, stats=None
) -> epath.Path:
  """`--mode export`: embeddings of `export.split` (or `export.video_dir`) into the workdir.

  Every process must call this (training does, with its `run`, final `state` and `stats`).

  Returns:
    The export folder `WORKDIR/embeddings/NAME`.
  """
  from cmvt_jax import train

  export = config.export
  run = run or train.Run.create(config, workdir)
  model = load_model(run, step=export.step, state=state, stats=stats)
  folder = epath.Path(workdir) / "embeddings" / export_name(export)
  # Bad settings are refused before the previous export is removed.
  _host_batch_size(run, export.batch_size)
  if export.video_dir:
    files = _video_files(epath.Path(export.video_dir))
  else:
    run.dataset.source(export.split)  # names the splits there are when there is no such one
  _clear(folder)
  started = time.perf_counter()
  if export.video_dir:
    rows, skipped = _embed_files(run, model, export, _share(files), skip_unreadable=True)
    label_names = None
  else:
    rows, skipped = _embed_split(run, model, export), 0
    label_names = list(run.dataset.label_names)
  _write_part(folder, rows)
  counts = _gather_ints([len(rows["id"]), skipped])
  if jax.process_index() == 0:
    _write_manifest(folder, config, model, counts, label_names)
  multihost_utils.sync_global_devices("cmvt_jax export: manifest written")
  seconds = time.perf_counter() - started
  total = int(counts[:, 0].sum())
  logging.info(
    "Exported %d %s (checkpoint step %d) to %s in %.1f s (%.1f per s on this process).",
    total,
    "videos" if export.whole_video else "clips",
    model.step,
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
  from cmvt_jax import train

  config = config or workdir_config(workdir)
  run = train.Run.create(config, workdir)
  model = load_model(run, step=config.export.step)
  files = [(epath.Path(path), os.fspath(path)) for path in paths]
  rows, _ = _embed_files(run, model, config.export, _share(files), skip_unreadable=False)
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


def load_embeddings(workdir_or_embeddings_dir: epath.PathLike, split: str) -> dict[str, np.ndarray]:
  """A complete export's rows, every part merged, sorted by `id`.

  Args:
    workdir_or_embeddings_dir: a workdir, or its `embeddings/` folder.
    split: the export's folder name (`export_name`: the split, by default).

  Returns:
    The keys of the module docstring, each with one row per clip (or video).

  Raises:
    FileNotFoundError: no complete export of that name (none, or interrupted: no manifest).
    ValueError: a part does not hold the rows the manifest counts.
  """
  folder, manifest = read_manifest(workdir_or_embeddings_dir, split)
  parts = []
  for name, count in manifest["parts"].items():
    with (folder / name).open("rb") as f:
      part = dict(np.load(f, allow_pickle=False))
    if len(part["id"]) != count:
      raise ValueError(
        f"{folder / name} holds {len(part['id'])} rows, the manifest counts {count}; export again."
      )
    parts.append(part)
  rows = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
  order = np.argsort(rows["id"], kind="stable")
  return {key: value[order] for key, value in rows.items()}


def read_manifest(
  workdir_or_embeddings_dir: epath.PathLike, split: str
) -> tuple[epath.Path, dict[str, Any]]:
  """(export folder, its manifest) of a complete export; arguments as `load_embeddings`.

  Raises:
    FileNotFoundError: no complete export of that name (none, or interrupted: no manifest).
  """
  root = epath.Path(workdir_or_embeddings_dir)
  folder = root / "embeddings" / split
  if not folder.exists():
    folder = root / split
  path = folder / MANIFEST
  if not path.exists():
    found = sorted(part.name for part in folder.glob("part-*")) if folder.exists() else []
    raise FileNotFoundError(
      f"No complete export {split!r} under {root}: {path} is missing"
      + (f" (the folder holds {', '.join(found)}: an interrupted export)" if found else "")
      + ". Export with `python -m cmvt_jax.main --mode export --config ... --workdir ...`."
    )
  return folder, json.loads(path.read_text())


# ----------------------------------------------------------------------------- sources


def _share(items: Sequence) -> list:
  """This process's share: items p, p + P, ..."""
  return list(items[jax.process_index() :: jax.process_count()])


def _video_files(video_dir: epath.Path) -> list[tuple[epath.Path, str]]:
  """(path, path relative to `video_dir`) of every video file under it, sorted."""
  if not video_dir.is_dir():
    raise FileNotFoundError(f"export.video_dir {video_dir} does not exist or is not a folder.")
  files = []
  for parent, _, names in video_dir.walk():  # walk, not rglob: rglob is refused on gs://
    for name in names:
      path = epath.Path(parent) / name
      if path.suffix.lower() in builder.VIDEO_EXTENSIONS:
        files.append((path, "/".join(path.relative_to(video_dir).parts)))
  if not files:
    raise FileNotFoundError(
      f"No video file ({', '.join(builder.VIDEO_EXTENSIONS)}) under export.video_dir {video_dir}."
    )
  return sorted(files, key=lambda file: file[1])


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
  run, preprocessor: pipeline.Preprocessor, split: str, max_frames: int
) -> tuple[int, Iterator[dict[str, Any]]]:
  """(count, elements) of this process's source videos of a prepared split, each rebuilt
  from its clips on one timeline and preprocessed whole.

  Every process reads the whole split once to find which clips belong to which video.
  """
  source = run.dataset.source(split)
  clips: dict[str, list[tuple[float, int]]] = {}
  for index in range(len(source)):
    example = source[index]
    clips.setdefault(_text(example["source"]), []).append((float(example["start"]), index))
  videos = _share(sorted(clips))

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
  examples: Sequence[dict[str, Any]], storage: builder.StorageSpec, video: str, split: str
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
  files: Iterable[tuple[epath.Path, str]],
  preprocessor,
  storage,
  *,
  whole_video: bool,
  max_frames: int,
  skip_unreadable: bool,
  skipped: list[str],
  bar,
) -> Iterator[dict[str, Any]]:
  """Eval elements of each file in turn (whole, or per clip); unreadable files are skipped
  (and their sources appended to `skipped`) or raise."""
  for path, source in files:
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


def _embed_split(run, model: Model, export) -> dict[str, np.ndarray]:
  """This process's rows of the prepared split `export.split` (per clip, or whole videos,
  as the config's `export` section says)."""
  split = export.split
  preprocessor = run.preprocessor(model.stats)
  primary = jax.process_index() == 0
  if export.whole_video:
    count, elements = _split_videos(run, preprocessor, split, export.max_frames)
    with tqdm.tqdm(total=count, desc=f"Embedding {split} videos", disable=not primary) as bar:
      return _embed_whole(run, model, _ticking(elements, bar), labelled=True)
  source = run.dataset.source(split)
  batch_size = _host_batch_size(run, export.batch_size)
  batches = iter(
    pipeline.eval_dataset(
      source,
      preprocessor,
      batch_size=batch_size,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
    )
  )
  total = pipeline.num_eval_batches(len(source), batch_size, jax.process_count())
  try:
    with tqdm.tqdm(
      total=total, desc=f"Embedding {split} clips", unit="batch", disable=not primary
    ) as bar:
      return _embed_clips(run, model, _ticking(batches, bar), batch_size, labelled=True)
  finally:
    batches.close()  # stops grain's worker processes now, not whenever it is collected


def _embed_files(
  run, model: Model, export, files: Sequence[tuple[epath.Path, str]], *, skip_unreadable: bool
) -> tuple[dict[str, np.ndarray], int]:
  """Rows of this process's video files (path, source), per clip or whole as the config's
  `export` section says; returns (rows, number of files skipped)."""
  skipped = []
  with tqdm.tqdm(
    total=len(files), desc="Embedding video files", unit="file", disable=jax.process_index() != 0
  ) as bar:
    elements = _file_elements(
      files,
      run.preprocessor(model.stats),
      run.dataset.storage,
      whole_video=export.whole_video,
      max_frames=export.max_frames,
      skip_unreadable=skip_unreadable,
      skipped=skipped,
      bar=bar,
    )
    if export.whole_video:
      rows = _embed_whole(run, model, elements, labelled=False)
    else:
      batch_size = _host_batch_size(run, export.batch_size)
      rows = _embed_clips(
        run, model, _batched(elements, batch_size, run.spec), batch_size, labelled=False
      )
  return rows, len(skipped)


def _host_batch_size(run, size: int) -> int:
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


def _embed_clips(
  run, model: Model, batches: Iterable[dict[str, np.ndarray]], batch_size: int, *, labelled: bool
) -> dict[str, np.ndarray]:
  """This process's rows of its eval batches, embedded in global batches over the mesh.

  The output keeps the batch sharding: each process reads back only the rows on its own
  devices. A `row` index travels with the batch to tell which host row each one is.
  """

  def embed(params, video, audio):
    out = run.model.apply({"params": params}, video, audio)
    return {key: losses.l2_normalize(out[key]) for key in ("video", "audio")}

  embed = jax.jit(embed, out_shardings=sharding.batch_sharding(run.mesh))
  parts = [_empty_rows(run, labelled=labelled, whole_video=False)]
  batches = iter(batches)
  while True:
    batch = next(batches, None)
    # Every process runs the same number of batches, or the collectives would not pair up.
    if not _any_process(batch is not None):
      break
    if batch is None:
      batch = _padding_batch(batch_size, run.spec)
    host_rows = np.arange(len(batch["mask"]), dtype=np.int32)
    arrays = sharding.global_batch(
      {"video": batch["video"], "audio": batch["audio"], "row": host_rows}, run.mesh
    )
    out = _local_rows(
      {"row": arrays["row"], **embed(model.params, arrays["video"], arrays["audio"])}
    )
    keep = np.asarray(batch["mask"])[out["row"]]
    kept_rows = out["row"][keep]
    part = {key: np.asarray(batch[key])[kept_rows] for key in ("id", "source", "start")}
    part.update(video=out["video"][keep], audio=out["audio"][keep])
    if labelled:
      part["label"] = np.asarray(batch["label"], np.int32)[kept_rows]
    parts.append(part)
  return _concatenate(parts)


def _embed_whole(
  run, model: Model, elements: Iterable[dict[str, Any]], *, labelled: bool
) -> dict[str, np.ndarray]:
  """Whole videos, one at a time on this process's first local device (no collectives).

  Frames are padded (see FRAME_BUCKET) with a frame mask, so nobody attends to the padding;
  the audio keeps its exact length (the audio tower has no mask).
  """
  device = jax.local_devices()[0]
  params = _on_device(model.params, run.mesh, device)

  @jax.jit
  def embed(params, video, frame_mask, audio):
    out = run.model.apply({"params": params}, video, audio, frame_mask=frame_mask)
    return {key: losses.l2_normalize(out[key]) for key in ("video", "audio")}

  parts = [_empty_rows(run, labelled=labelled, whole_video=True)]
  for element in elements:
    frames = len(element["video"])
    padded = (
      2 ** math.ceil(math.log2(frames))
      if frames <= FRAME_BUCKET
      else FRAME_BUCKET * math.ceil(frames / FRAME_BUCKET)
    )
    video = np.zeros((1, padded) + element["video"].shape[1:], np.float32)
    video[0, :frames] = element["video"]
    inputs = jax.device_put(
      (video, np.arange(padded)[None] < frames, element["audio"][None]), device
    )
    out = jax.device_get(embed(params, *inputs))
    part = {
      "id": np.array([element["id"]]),
      "source": np.array([element["source"]]),
      "start": np.array([element["start"]], np.float32),
      "video": out["video"],
      "audio": out["audio"],
      "num_frames": np.array([frames], np.int32),
    }
    if labelled:
      part["label"] = np.array([element["label"]], np.int32)
    parts.append(part)
  return _concatenate(parts)


def _on_device(params, mesh, device):
  """A whole copy of the (possibly sharded) parameters on one local device.

  Every process must call it: gathering sharded parameters is a collective.
  """
  whole = jax.jit(lambda tree: tree, out_shardings=sharding.replicated(mesh))(params)
  return jax.device_put(jax.tree.map(lambda x: x.addressable_data(0), whole), device)


def _local_rows(arrays: dict[str, jax.Array]) -> dict[str, np.ndarray]:
  """The rows of batch-sharded global arrays that live on this process's devices, in
  global order."""

  def rows(x):
    shards = sorted(x.addressable_shards, key=lambda shard: shard.index[0].start or 0)
    return np.concatenate([np.asarray(shard.data) for shard in shards])

  return {key: rows(value) for key, value in arrays.items()}


def _any_process(flag: bool) -> bool:
  if jax.process_count() == 1:
    return flag
  return bool(multihost_utils.process_allgather(np.int32(flag)).max())


def _gather_ints(values: Sequence[int]) -> np.ndarray:
  """`[process_count, len(values)]`: every process's values (process order)."""
  values = np.asarray(values, np.int32)
  if jax.process_count() == 1:
    return values[None]
  return np.asarray(multihost_utils.process_allgather(values)).reshape(jax.process_count(), -1)


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
    padding = _padding_batch(batch_size - len(pending), spec)
    yield {key: np.concatenate([_stack(pending)[key], padding[key]]) for key in padding}


def _stack(elements: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
  keys = ("video", "audio", "label", "mask", "id", "source", "start")
  return {key: np.stack([np.asarray(element[key]) for element in elements]) for key in keys}


def _padding_batch(rows: int, spec: pipeline.InputSpec) -> dict[str, np.ndarray]:
  """`rows` padding rows of an eval batch (mask False)."""
  return {
    "video": np.zeros((rows, spec.num_frames, spec.frame_size, spec.frame_size, 3), np.float32),
    "audio": np.zeros((rows, spec.audio_frames, spec.mel.n_mels), np.float32),
    "label": np.full(rows, -1, np.int32),
    "mask": np.zeros(rows, bool),
    "id": np.full(rows, ""),
    "source": np.full(rows, ""),
    "start": np.zeros(rows, np.float32),
  }


def _ticking(iterable: Iterable, bar) -> Iterator:
  for item in iterable:
    yield item
    bar.update()


def _empty_rows(run, *, labelled: bool, whole_video: bool) -> dict[str, np.ndarray]:
  """Zero rows of every key (so that a process with nothing to embed writes a valid part)."""
  dim = run.config.model.embed_dim
  rows = {
    "id": np.array([], str),
    "source": np.array([], str),
    "start": np.zeros(0, np.float32),
    "video": np.zeros((0, dim), np.float32),
    "audio": np.zeros((0, dim), np.float32),
  }
  if labelled:
    rows["label"] = np.zeros(0, np.int32)
  if whole_video:
    rows["num_frames"] = np.zeros(0, np.int32)
  return rows


def _concatenate(parts: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}


def _text(value: bytes | str) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


# ----------------------------------------------------------------------------- files


def _clear(folder: epath.Path) -> None:
  """Process 0 removes a previous export (manifest first); then every process may write."""
  if jax.process_index() == 0:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST).unlink(missing_ok=True)
    for path in folder.glob("part-*"):
      path.unlink()
  multihost_utils.sync_global_devices("cmvt_jax export: folder cleared")


def _write_part(folder: epath.Path, rows: dict[str, np.ndarray]) -> None:
  """This process's part, under a temporary name until it is complete."""
  path = folder / part_name(jax.process_index(), jax.process_count())
  temporary = folder / (path.name + _TEMPORARY_SUFFIX)
  with temporary.open("wb") as f:
    np.savez(f, **rows)
  temporary.rename(path)


def _write_manifest(
  folder: epath.Path, config, model: Model, counts: np.ndarray, label_names: Sequence[str] | None
) -> None:
  export = config.export
  config_json = config.to_json_best_effort(sort_keys=True)
  manifest = {
    "split": None if export.video_dir else export.split,
    "video_dir": export.video_dir,
    "whole_video": bool(export.whole_video),
    "step": model.step,
    "config_sha256": hashlib.sha256(config_json.encode("utf-8")).hexdigest(),
    "embed_dim": int(config.model.embed_dim),
    "count": int(counts[:, 0].sum()),
    "parts": {
      part_name(index, len(counts)): int(count) for index, count in enumerate(counts[:, 0])
    },
    "skipped_files": int(counts[:, 1].sum()),
    "label_names": label_names,
  }
  temporary = folder / (MANIFEST + _TEMPORARY_SUFFIX)
  temporary.write_text(json.dumps(manifest, indent=2) + "\n")
  temporary.rename(folder / MANIFEST)
