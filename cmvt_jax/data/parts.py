"""Preparing one dataset on many machines: each worker writes a part, one merge joins them.

  worker i of N:  prepare_part(..., worker_index=i, num_workers=N)
      lists the whole video folder or reads the whole annotation list (the same entries on
      every worker), decodes entries i, i + N, i + 2N, ... of it, lets TFDS write their
      clips as ArrayRecord shards in a local scratch folder, and copies them to
      `DATA_DIR/NAME/VERSION.parts/worker-I-of-N/` with `outcomes.json` (every entry's
      outcome and statistics sums) written last, which marks the part complete.
  then, once:     merge_parts(data_dir, name, num_workers=N)
      moves every part's shards into `DATA_DIR/NAME/VERSION/` under the dataset's own shard
      names, writes one `dataset_info.json` that lists them all, and the metadata (summary,
      normalisation statistics) recomputed from all outcomes in the folder's file order, so
      it is bit-identical to a one-machine `dataset_writer.prepare`. The info file is written
      last: the dataset reads as complete only when everything is in place. An interrupted
      merge can be run again.

The merged dataset has the same examples as a one-machine preparation of the same folder;
only their order differs (each part's shards hold its own examples in TFDS's key-hash
order), and so do the training batches drawn from it for a given seed.

Every access to `data_dir` goes through `epath`, so it may be a `gs://` folder (workers need
no shared file system). ArrayRecord files can only be written to and read from POSIX paths,
which is why each worker writes locally first; training reads a `gs://` dataset through a
Cloud Storage FUSE mount (see docs/scaling.md).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from cmvt_jax import console
from cmvt_jax import files
from cmvt_jax.data import dataset_writer
from cmvt_jax.data import normalization
from cmvt_jax.data import spectrogram

# Written last into a worker's part: the part is complete when it exists.
OUTCOMES_FILE = "outcomes.json"


def parts_dir(data_dir: epath.PathLike, name: str) -> epath.Path:
  """`DATA_DIR/NAME/VERSION.parts`: where workers put their parts until the merge."""
  target = dataset_writer.dataset_dir(data_dir, name)
  return target.parent / f"{target.name}.parts"


def part_dir(
  data_dir: epath.PathLike, name: str, worker_index: int, num_workers: int
) -> epath.Path:
  return parts_dir(data_dir, name) / f"worker-{worker_index:05d}-of-{num_workers:05d}"


def check_worker(worker_index: int, num_workers: int) -> None:
  if num_workers < 1 or not 0 <= worker_index < num_workers:
    raise ValueError(
      f"worker_index={worker_index} must be in [0, num_workers) with "
      f"num_workers >= 1; got num_workers={num_workers}."
    )


def prepare_part(
  video_dir: epath.PathLike,
  data_dir: epath.PathLike,
  name: str,
  *,
  worker_index: int,
  num_workers: int,
  storage: dataset_writer.StorageSpec = dataset_writer.StorageSpec(),
  mel: spectrogram.MelSettings,
  hash_split: Mapping[str, float] | None = None,
  unlabelled: bool = False,
  listing: dataset_writer.Listing | None = None,
  processes: int = 0,
  progress: bool = True,
  log: Callable[[str], None] = print,
) -> epath.Path:
  """Worker `worker_index` of `num_workers`: decodes its share and writes its part.

  Args:
    video_dir: the folder of videos (see `dataset_writer`); every worker must see the same one.
    data_dir: the TFDS data folder (local or `gs://`); the part lands in
      `part_dir(data_dir, name, worker_index, num_workers)`.
    name: the dataset name.
    worker_index: this worker, in [0, num_workers).
    num_workers: how many workers share the files.
    storage, mel, hash_split, unlabelled, listing: as for `dataset_writer.prepare` (the
      same on every worker: each reads the whole folder or list and takes its share).
    processes: decoding processes on this machine (0: one per CPU core).
    progress: show the stage's progress line (`console.Stage`).
    log: where notices go.

  Returns:
    The part's folder.
  """
  check_worker(worker_index, num_workers)
  dataset_writer.check_name(name)
  if dataset_writer.is_prepared(dataset_writer.dataset_dir(data_dir, name)):
    log(f"Dataset {name} is already prepared in {data_dir}; nothing to do.")
    return dataset_writer.dataset_dir(data_dir, name)
  part = part_dir(data_dir, name, worker_index, num_workers)
  if (part / OUTCOMES_FILE).exists():
    log(f"Part {part} is already complete; nothing to do.")
    return part
  listing = listing or dataset_writer.scan_video_dir(video_dir, hash_split, unlabelled=unlabelled)
  dataset_writer.check_listing(listing, video_dir)
  video_files = listing.files
  indices = list(range(worker_index, len(video_files), num_workers))
  log(
    f"Worker {worker_index} of {num_workers}: decoding {len(indices)} of the "
    f"{len(video_files)} video files."
  )
  if part.exists():  # an earlier, interrupted attempt
    files.remove(part, kind="part-clear")
  part.mkdir(parents=True)
  with (
    tempfile.TemporaryDirectory(prefix="cmvt_prepare_part_") as scratch,
    console.Stage("prepare", len(indices), "videos", enabled=progress) as stage,
  ):
    outcomes = dataset_writer.decode_all(
      [video_files[i] for i in indices],
      storage,
      mel,
      scratch,
      num_workers=processes or os.cpu_count() or 1,
      stage=stage,
    )
    if any(outcome.num_clips for outcome in outcomes):
      local_data = os.path.join(scratch, "data")
      dataset_writer.write_dataset(
        name,
        local_data,
        outcomes,
        listing.label_names,
        {dataset_writer.STORAGE_KEY: dataclasses.asdict(storage)},
        scratch_dir=scratch,
        stage=stage,
      )
      _copy_folder(dataset_writer.dataset_dir(local_data, name), part)
  record = {
    "worker_index": worker_index,
    "num_workers": num_workers,
    "format_version": dataset_writer.FORMAT_VERSION,
    "num_files": len(video_files),
    "ignored_non_video": listing.ignored,
    "label_names": listing.label_names,
    "multi_label": listing.multi_label,
    "kind": listing.kind,
    "storage": dataclasses.asdict(storage),
    "mel": dataclasses.asdict(mel),
    "outcomes": [_outcome_record(index, outcome) for index, outcome in zip(indices, outcomes)],
  }
  files.write_json(part / OUTCOMES_FILE, record, kind="part-outcomes", indent=None)
  clips = sum(outcome.num_clips for outcome in outcomes)
  log(f"Worker {worker_index} of {num_workers} wrote {clips} clips to {part}.")
  return part


def merge_parts(
  data_dir: epath.PathLike, name: str, *, num_workers: int, log: Callable[[str], None] = print
) -> epath.Path:
  """Joins the `num_workers` complete parts into `DATA_DIR/NAME/VERSION` (see module doc).

  Raises:
    FileNotFoundError: some worker has not finished its part.
    ValueError: the parts do not belong together, or no file gave a single clip.
  """
  target = dataset_writer.dataset_dir(data_dir, name)
  if dataset_writer.is_prepared(target):
    if parts_dir(data_dir, name).exists():  # an interrupted merge left them
      files.remove(parts_dir(data_dir, name), kind="merge-clean")
      log(f"Removed the parts that an interrupted merge left in {parts_dir(data_dir, name)}.")
    log(f"Dataset {name} is already prepared at {target}; nothing to do.")
    return target
  parts = [part_dir(data_dir, name, i, num_workers) for i in range(num_workers)]
  missing = [i for i, part in enumerate(parts) if not (part / OUTCOMES_FILE).exists()]
  if missing:
    raise FileNotFoundError(
      f"Workers {missing} of {num_workers} have not finished their part under "
      f"{parts_dir(data_dir, name)} (a part is complete once its {OUTCOMES_FILE} is "
      "written). Run `python -m cmvt_jax.prepare ... --num_workers "
      f"{num_workers} --worker_index I` for each of them, then merge again."
    )
  records = [json.loads((part / OUTCOMES_FILE).read_text()) for part in parts]
  _check_format(records, parts, data_dir, name, num_workers)
  mel = spectrogram.MelSettings(**records[0]["mel"])
  storage = dataset_writer.StorageSpec(**records[0]["storage"])
  outcomes, ignored = _joined_outcomes(records, mel, parts)
  summary = dataset_writer.summarize(outcomes, ignored=ignored, kind=records[0]["kind"])
  if not summary.clips:
    raise ValueError(
      f"No usable clip in any part under {parts_dir(data_dir, name)}:\n{summary.format()}"
    )
  metadata = dataset_writer.dataset_metadata(
    summary, outcomes, storage, mel, multi_label=records[0]["multi_label"]
  )
  written = [part for part in parts if (part / dataset_writer.INFO_FILE).exists()]
  infos = [tfds.builder_from_directory(os.fspath(part)).info for part in written]
  target.mkdir(parents=True, exist_ok=True)
  split_infos = [
    _move_split_shards(split, written, infos, target)
    for split in dataset_writer.SPLITS
    if any(split in info.splits for info in infos)
  ]
  info = infos[0]
  info.set_splits(tfds.core.SplitDict(split_infos))
  info.metadata.clear()
  info.metadata.update(metadata)
  _write_info(info, target)
  files.remove(parts_dir(data_dir, name), kind="merge-clean")
  log(f"Merged {num_workers} parts into dataset {name} at {target}\n{summary.format()}")
  return target


# What every part of one dataset must agree on.
_SHARED_KEYS = (
  "num_workers",
  "num_files",
  "ignored_non_video",
  "label_names",
  "multi_label",
  "kind",
  "storage",
  "mel",
)


def _check_format(
  records: Sequence[dict[str, Any]],
  parts: Sequence[epath.Path],
  data_dir: epath.PathLike,
  name: str,
  num_workers: int,
) -> None:
  """Refuses parts written by another version of prepare, saying what to run again."""
  for part, record in zip(parts, records):
    version = record.get("format_version", 1)
    if version != dataset_writer.FORMAT_VERSION:
      raise ValueError(
        f"Part {part} was written by a version of cmvt_jax.prepare with dataset format "
        f"{version}; this one writes format {dataset_writer.FORMAT_VERSION}, and parts of "
        f"different formats cannot be merged. Delete {parts_dir(data_dir, name)}, run every "
        f"worker again (python -m cmvt_jax.prepare ... --num_workers {num_workers} "
        "--worker_index I), then merge."
      )


def _joined_outcomes(
  records: Sequence[dict[str, Any]], mel: spectrogram.MelSettings, parts: Sequence[epath.Path]
) -> tuple[list[dataset_writer.FileOutcome], int]:
  """Every file's outcome in the folder's order, checking that the parts belong together."""
  first = records[0]
  for part, record in zip(parts, records):
    differ = [key for key in _SHARED_KEYS if record[key] != first[key]]
    if differ:
      raise ValueError(
        f"Part {part} differs from {parts[0]} in {', '.join(differ)}: the workers saw "
        "different video folders or settings. Prepare every part with the same "
        "arguments (delete the parts folder to start over)."
      )
  outcomes = sorted(
    (
      (item["index"], _outcome_from_record(item, mel))
      for record in records
      for item in record["outcomes"]
    ),
    key=lambda pair: pair[0],
  )
  if [index for index, _ in outcomes] != list(range(first["num_files"])):
    raise ValueError(
      f"The parts under {parts[0].parent} do not cover the "
      f"{first['num_files']} video files exactly once."
    )
  return [outcome for _, outcome in outcomes], first["ignored_non_video"]


def _move_split_shards(split: str, parts: Sequence[epath.Path], infos, target: epath.Path):
  """Moves `split`'s shards of every part to `target`, numbered across parts (in order).

  Returns the merged split's `SplitInfo`. A shard already moved by an interrupted merge is
  found at its destination and left there.
  """
  pieces = [(part, info.splits[split]) for part, info in zip(parts, infos) if split in info.splits]
  template = pieces[0][1].filename_template.replace(data_dir=target)
  destinations = template.sharded_filepaths(sum(piece.num_shards for _, piece in pieces))
  sources = [
    source
    for part, piece in pieces
    for source in piece.filename_template.replace(data_dir=part).sharded_filepaths(piece.num_shards)
  ]
  for source, destination in zip(sources, destinations):
    if source.exists():
      files.move(source, destination, kind="merge-move")
    elif not destination.exists():
      raise FileNotFoundError(
        f"Shard {source} is missing (and not yet moved to "
        f"{destination}); prepare that worker's part again."
      )
  return dataclasses.replace(
    pieces[0][1],
    filename_template=template,
    shard_lengths=[length for _, piece in pieces for length in piece.shard_lengths],
    num_bytes=sum(int(piece.num_bytes) for _, piece in pieces),
  )


def _write_info(info, target: epath.Path) -> None:
  """Writes the merged dataset's info files into `target`, each atomically, dataset_info.json
  last: then the dataset reads as complete. (TFDS writes them in place, so a crash in the
  middle of its write would leave a torn dataset_info.json that reads as complete.)"""
  with tempfile.TemporaryDirectory(prefix="cmvt_merge_info_") as scratch:
    info.write_to_directory(scratch)
    written = sorted(
      epath.Path(scratch).iterdir(), key=lambda p: p.name == dataset_writer.INFO_FILE
    )
    for path in written:
      files.copy(path, target / path.name, kind="merge-info")


def _copy_folder(source: epath.Path, destination: epath.Path) -> None:
  """Copies a flat local folder's files to `destination` (any epath; streamed)."""
  destination.mkdir(parents=True, exist_ok=True)
  for path in source.iterdir():
    files.copy(path, destination / path.name, kind="part-copy")


def _outcome_record(index: int, outcome: dataset_writer.FileOutcome) -> dict[str, Any]:
  """A JSON-able outcome; floats survive JSON exactly, so merged statistics match."""
  stats = None
  if outcome.stats is not None:
    stats = {
      "pixel_count": outcome.stats.pixel_count,
      "pixel_sum": outcome.stats.pixel_sum.tolist(),
      "pixel_square_sum": outcome.stats.pixel_square_sum.tolist(),
      "mel_count": outcome.stats.mel_count,
      "mel_sum": outcome.stats.mel_sum,
      "mel_square_sum": outcome.stats.mel_square_sum,
    }
  return {
    "index": index,
    "file": dataclasses.asdict(outcome.file),
    "num_clips": outcome.num_clips,
    "seconds": outcome.seconds,
    "skip_reason": outcome.skip_reason,
    "skip_detail": outcome.skip_detail,
    "truncation_detail": outcome.truncation_detail,
    "cut_detail": outcome.cut_detail,
    "has_audio": outcome.has_audio,
    "stats": stats,
  }


def _outcome_from_record(
  item: Mapping[str, Any], mel: spectrogram.MelSettings
) -> dataset_writer.FileOutcome:
  stats = None
  if item["stats"] is not None:
    values = item["stats"]
    stats = normalization.StatsAccumulator(
      mel,
      pixel_count=values["pixel_count"],
      pixel_sum=np.array(values["pixel_sum"]),
      pixel_square_sum=np.array(values["pixel_square_sum"]),
      mel_count=values["mel_count"],
      mel_sum=values["mel_sum"],
      mel_square_sum=values["mel_square_sum"],
    )
  return dataset_writer.FileOutcome(
    file=dataset_writer.VideoFile.from_dict(item["file"]),
    num_clips=item["num_clips"],
    seconds=item["seconds"],
    skip_reason=item["skip_reason"],
    skip_detail=item["skip_detail"],
    truncation_detail=item["truncation_detail"],
    cut_detail=item["cut_detail"],
    has_audio=item["has_audio"],
    stats=stats,
  )
