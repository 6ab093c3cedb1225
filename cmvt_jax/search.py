"""Moment search: the moments of an exported collection nearest to a query, exactly.

  python -m cmvt_jax.search --workdir DIR --collection NAME --query FILE[@START-END]
      [--query_modality audio|video] [--same_modality] [--top_k K] [--json]

A collection is a whole-video export (`--mode export --config.export.whole_video=True`),
`WORKDIR/embeddings/NAME/`: its parts hold per-moment embeddings of both modalities on one
time grid (`moment_video`, `moment_audio` `[M, E]`, L2-normalised; `moment_time`, `moment_row`;
export.py). A query (a file, or `[START, END)` seconds of it) is embedded by the same model
(`export.segment_embedder`, the checkpoint and stored data's settings the manifest records:
no dataset is read) and scored against every moment by cosine similarity: by default
cross-modal (an audio query against the video moments, a video query against the audio
moments), with `--same_modality` against its own modality.

The search is exact: chunked matrix products over the whole collection, the top K of each
chunk kept (`np.argpartition`), then merged. Results are sorted by score, ties by moment
order (parts in manifest order, moments in part order), so a search is deterministic.

Search cache. `np.load` of an .npz reads it whole; the first search of a collection writes
its moments as plain .npy files beside the parts (`NAME/search-cache/`), which later
searches memory-map: opening a collection reads two small JSON files. `cache.json`, written
last and removed first on a rebuild, names the export the cache was built from: the
manifest's SHA-256, which covers each part's SHA-256 (computed once, when the export wrote
the part), and the parts' sizes; for a manifest written before it recorded part digests, the
parts' modification times too. A cache without it, or built from another export, is rebuilt,
and an export removes the cache of the export it replaces.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import sys
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import app
from absl import flags
from absl import logging
from etils import epath
from ml_collections import config_dict

from cmvt_jax import checkpoints
from cmvt_jax import console
from cmvt_jax import export
from cmvt_jax import files
from cmvt_jax import sharding
from cmvt_jax.data import dataset_writer
from cmvt_jax.data import datasets
from cmvt_jax.data import video_io

CACHE_DIR = export.SEARCH_CACHE
CACHE_INFO = "cache.json"
CACHE_KIND = "search-cache"
CACHE_VERSION = 2
MODALITIES = ("audio", "video")
# Moments scored per matrix product (x queries): 64k x 128 float32 is 32 MiB of embeddings.
CHUNK_MOMENTS = 1 << 16
# The [queries, chunk] score block stays under this many floats however many queries.
_MAX_SCORE_BLOCK = 1 << 24
# Files that hold no video stream however they are probed (an .mp3 or .m4a with cover art
# has a one-picture "video" stream); any other file is probed for one.
AUDIO_EXTENSIONS = (".wav", ".mp3", ".flac", ".m4a", ".aac", ".ogg", ".oga", ".opus", ".wma")
_EXPORT_COMMAND = (
  "`python -m cmvt_jax.main --mode export --config ... --workdir ... "
  "--config.export.whole_video=True`"
)
_EXPORT_AGAIN = f"Export the collection again: {_EXPORT_COMMAND}."
# The arrays of the cache (Collection fields): file, dtype. Modalities are [M, E], the rest [M].
_ARRAYS = {
  "video": ("moment_video.npy", np.float32),
  "audio": ("moment_audio.npy", np.float32),
  "time": ("moment_time.npy", np.float32),
  "source_index": ("moment_source_index.npy", np.int32),
}
_SOURCES = "sources.json"


class SearchError(Exception):
  """A problem with the collection, the query or the flags; the message says what to do."""


# ----------------------------------------------------------------------------- collection


@dataclasses.dataclass(frozen=True)
class Collection:
  """A collection's moments (memory-mapped when local).

  Attributes:
    name: the export's folder name.
    folder: `WORKDIR/embeddings/NAME`.
    manifest: the export's manifest.
    video, audio: `[M, E]` float32, L2-normalised moment embeddings.
    time: `[M]` float32 seconds from the start of its video to the moment's start.
    source_index: `[M]` int32 index into `sources` of each moment's video.
    sources: the videos' `source` paths (sorted).
    window_seconds: a moment at t covers [t, t + window_seconds).
  """

  name: str
  folder: epath.Path
  manifest: dict[str, Any]
  video: np.ndarray
  audio: np.ndarray
  time: np.ndarray
  source_index: np.ndarray
  sources: list[str]
  window_seconds: float

  def __len__(self) -> int:
    return len(self.time)

  def moments(self, modality: str) -> np.ndarray:
    """The `[M, E]` embeddings of `modality` ("audio" or "video")."""
    if modality not in MODALITIES:
      raise ValueError(f"modality must be one of {MODALITIES}; got {modality!r}.")
    return self.video if modality == "video" else self.audio


def load_collection(workdir: epath.PathLike, name: str) -> Collection:
  """Opens collection `name` of `workdir` (its `embeddings/` folder also works), building
  its search cache first if it has none that matches the export.

  Raises:
    SearchError: no complete export of that name, one without moments, or a cache that
      cannot be written.
    files.DiskFullError: no room for the cache.
  """
  folder, manifest, fingerprint = _read_export(workdir, name)
  cache = folder / CACHE_DIR
  opened = _open_cache(cache, fingerprint)
  if opened is None:
    logging.info("Building the search cache of %s (once per export) in %s.", name, cache)
    try:
      _build_cache(folder, manifest, fingerprint)
    except PermissionError as error:
      raise SearchError(
        f"Cannot write the search cache {cache} ({error}): make the collection's folder "
        "writable for its first search, or search a copy of it."
      ) from None
    opened = _open_cache(cache, fingerprint)
    if opened is None:
      raise SearchError(f"The search cache just written to {cache} cannot be read back.")
  arrays, sources = opened
  return Collection(
    name=name,
    folder=folder,
    manifest=manifest,
    sources=sources,
    window_seconds=float(manifest["moments"]["window_seconds"]),
    **arrays,
  )


def check_compatible(collection: Collection, config: config_dict.ConfigDict) -> None:
  """Refuses a collection that the model of `config` did not embed, or embedded with a
  moment window other than the model's input window.

  Raises:
    SearchError: naming what differs and what to do.
  """
  expected = export.model_digest(config)
  found = collection.manifest.get("model_sha256")
  if found != expected:
    raise SearchError(
      f"Collection {collection.name!r} was embedded by another model (model_sha256 "
      f"{str(found)[:12]}, the workdir's model is {expected[:12]}): its moments and the "
      "query would not share an embedding space. Export the collection again with this "
      f"workdir's model: {_EXPORT_COMMAND}."
    )
  window = config.input.num_frames / config.input.fps
  if not math.isclose(collection.window_seconds, window, rel_tol=1e-6, abs_tol=1e-6):
    raise SearchError(
      f"Collection {collection.name!r} has {collection.window_seconds:g} s moments, the "
      f"workdir's model a {window:g} s input window (input.num_frames / input.fps). Export "
      f"the collection again with this config: {_EXPORT_COMMAND}."
    )


def _read_export(workdir: epath.PathLike, name: str) -> tuple[epath.Path, dict, dict]:
  """(folder, manifest, fingerprint) of a complete export with moments."""
  try:
    folder, manifest = export.read_manifest(workdir, name)
  except FileNotFoundError as error:
    # Its advice to export lacks what moments need.
    found = str(error).split(" Export with")[0]
    names = sorted(
      p.parent.name for p in epath.Path(workdir).glob(f"embeddings/*/{export.MANIFEST}")
    )
    listed = f" Collections there: {', '.join(names)}." if names else ""
    raise SearchError(f"{found}{listed} Export one with {_EXPORT_COMMAND}.") from None
  moments = manifest.get("moments")
  if not manifest.get("whole_video"):
    raise SearchError(
      f"Collection {name!r} ({folder}) holds per-clip embeddings, no moments to search. "
      f"Export whole videos with moments: {_EXPORT_COMMAND}."
    )
  if not moments:
    raise SearchError(
      f"Collection {name!r} ({folder}) was exported without moments "
      "(export.moment_seconds=0, or by a version that had none). Export it again with a "
      f"moment grid: {_EXPORT_COMMAND[:-1]} --config.export.moment_seconds=S` (S > 0 "
      "seconds between moments, e.g. 1)."
    )
  if not moments.get("count"):
    raise SearchError(
      f"Collection {name!r} ({folder}) holds no moments: no video of it was embedded "
      f"(skipped, by reason: {manifest.get('skipped') or 'none'}). Export videos that can be "
      f"used: {_EXPORT_COMMAND}."
    )
  parts = {}
  for part_file in manifest["parts"]:
    path = folder / part_file
    if not path.exists():
      raise SearchError(f"Collection {name!r} is incomplete: {path} is missing. {_EXPORT_AGAIN}")
    parts[part_file] = _part_stamp(path, with_time="part_sha256" not in manifest)
  fingerprint = {
    "version": CACHE_VERSION,
    "manifest_sha256": hashlib.sha256((folder / export.MANIFEST).read_bytes()).hexdigest(),
    "parts": parts,
    "count": int(moments["count"]),
    "embed_dim": int(manifest["embed_dim"]),
  }
  return folder, manifest, fingerprint


def _part_stamp(path: epath.Path, *, with_time: bool) -> list[int]:
  """A part's size in bytes and, `with_time`, its modification time (ns; a part written
  again gets a new one): what tells an older manifest's parts apart without reading them."""
  if not with_time:
    return [path.stat().length]
  if "://" in str(path):  # an object store's time, in seconds
    stat = path.stat()
    return [stat.length, stat.mtime * 10**9]
  stat = os.stat(path)
  return [stat.st_size, stat.st_mtime_ns]


def _open_cache(cache: epath.Path, fingerprint: dict) -> tuple[dict, list[str]] | None:
  """The cache's arrays and sources, or None when it is missing, partial or stale."""
  info = cache / CACHE_INFO
  try:
    if json.loads(info.read_text()) != fingerprint:
      return None
    arrays = {key: _open_array(cache / file) for key, (file, _) in _ARRAYS.items()}
    sources = json.loads((cache / _SOURCES).read_text())
  except (OSError, ValueError, EOFError):  # missing, torn or not an array
    return None
  count, dim = fingerprint["count"], fingerprint["embed_dim"]
  for key, (_, dtype) in _ARRAYS.items():
    shape = (count, dim) if key in MODALITIES else (count,)
    if arrays[key].shape != shape or arrays[key].dtype != dtype:
      return None
  return arrays, sources


def _open_array(path: epath.Path) -> np.ndarray:
  if "://" in str(path):  # an object store cannot be memory-mapped: read it
    with path.open("rb") as f:
      return np.load(f, allow_pickle=False)
  return np.load(path, mmap_mode="r", allow_pickle=False)


def _build_cache(folder: epath.Path, manifest: dict, fingerprint: dict) -> None:
  """Writes the cache from the parts, one part in memory at a time; `cache.json` last."""
  cache = folder / CACHE_DIR
  files.remove(cache / CACHE_INFO, kind=CACHE_KIND)
  cache.mkdir(parents=True, exist_ok=True)
  count, dim = fingerprint["count"], fingerprint["embed_dim"]
  sources = sorted({str(s) for part in _parts(folder, manifest, ("source",)) for s in part[0]})
  lookup = np.asarray(sources)
  with contextlib.ExitStack() as stack:
    out = {}
    for key, (file, dtype) in _ARRAYS.items():
      temporary = stack.enter_context(files.replacing(cache / file, kind=CACHE_KIND))
      shape = (count, dim) if key in MODALITIES else (count,)
      out[key] = np.lib.format.open_memmap(temporary, mode="w+", dtype=dtype, shape=shape)
    at = 0
    keys = ("source", "moment_video", "moment_audio", "moment_time", "moment_row")
    for part_file, (source, video, audio, time, row) in zip(
      manifest["parts"], _parts(folder, manifest, keys)
    ):
      size = len(time)
      if (
        video.shape != (size, dim)
        or audio.shape != (size, dim)
        or row.shape != (size,)
        or (size and not 0 <= row.min() <= row.max() < len(source))
        or at + size > count
      ):
        raise SearchError(
          f"{folder / part_file} does not hold the moments its manifest describes (manifest: "
          f"{count} moments of dimension {dim}). {_EXPORT_AGAIN}"
        )
      out["video"][at : at + size] = video
      out["audio"][at : at + size] = audio
      out["time"][at : at + size] = time
      out["source_index"][at : at + size] = np.searchsorted(lookup, source.astype(str))[row]
      at += size
    if at != count:
      raise SearchError(
        f"The parts of {folder} hold {at} moments, its manifest counts {count}. " + _EXPORT_AGAIN
      )
    for array in out.values():
      array.flush()
    del out, array  # the memory maps are closed before the files are moved into place
  files.write_json(cache / _SOURCES, sources, kind=CACHE_KIND, indent=None)
  files.write_json(cache / CACHE_INFO, fingerprint, kind=CACHE_KIND)


def _parts(folder: epath.Path, manifest: dict, keys: Sequence[str]):
  """For each part in manifest order: its arrays `keys` (read one part at a time)."""
  for part_file, rows in manifest["parts"].items():
    with (folder / part_file).open("rb") as f, np.load(f, allow_pickle=False) as part:
      missing = [key for key in (*keys, "id") if key not in part.files]
      if missing:
        raise SearchError(f"{folder / part_file} has no {', '.join(missing)}. " + _EXPORT_AGAIN)
      if len(part["id"]) != rows:
        raise SearchError(
          f"{folder / part_file} holds {len(part['id'])} rows, the manifest counts {rows}. "
          f"{_EXPORT_AGAIN}"
        )
      yield tuple(part[key] for key in keys)


# ----------------------------------------------------------------------------- search


@dataclasses.dataclass(frozen=True)
class Result:
  """One found moment: `source` seconds [start, end), cosine similarity `score`."""

  rank: int
  source: str
  start: float
  end: float
  score: float

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self))


def nearest(
  matrix: np.ndarray, queries: np.ndarray, *, top_k: int, chunk_size: int = CHUNK_MOMENTS
) -> tuple[np.ndarray, np.ndarray]:
  """The rows of `matrix` with the largest dot products with each query, exactly.

  Args:
    matrix: `[M, E]` (a memory map is read chunk by chunk).
    queries: `[Q, E]`.
    top_k: results per query (at most M are returned).
    chunk_size: rows scored per matrix product (fewer when Q is large).

  Returns:
    (indices `[Q, K]` int64, scores `[Q, K]` float32) with K = min(top_k, M), each row by
    descending score, equal scores by ascending index: `np.argsort(-scores, kind="stable")`
    of the full score vector, without ever holding it.
  """
  if top_k < 1:
    raise ValueError(f"top_k must be at least 1; got {top_k}.")
  queries = np.asarray(queries, np.float32)
  count = len(matrix)
  chunk_size = max(1, min(chunk_size, _MAX_SCORE_BLOCK // max(len(queries), 1)))
  found = [[] for _ in queries]  # per query: (indices, scores) of each chunk's best
  for begin in range(0, count, chunk_size):
    block = np.asarray(matrix[begin : begin + chunk_size], np.float32)
    scores = queries @ block.T  # [Q, C]
    for found_q, row in zip(found, scores):
      best = _best(row, top_k)
      found_q.append((best + begin, row[best]))
  size = min(top_k, count)
  indices = np.zeros((len(queries), size), np.int64)
  values = np.zeros((len(queries), size), np.float32)
  for q, found_q in enumerate(found):
    if not found_q:
      continue
    index = np.concatenate([i for i, _ in found_q])
    score = np.concatenate([s for _, s in found_q])
    order = np.lexsort((index, -score))[:size]
    indices[q], values[q] = index[order], score[order]
  return indices, values


def _best(scores: np.ndarray, k: int) -> np.ndarray:
  """Indices of the k largest `scores` (ties: the lowest indices), in no particular order."""
  if k >= len(scores):
    return np.arange(len(scores))
  threshold = len(scores) - k
  kth = scores[np.argpartition(scores, threshold)[threshold]]  # the k-th largest value
  above = np.flatnonzero(scores > kth)
  tied = np.flatnonzero(scores == kth)[: k - len(above)]
  return np.concatenate([above, tied])


def search(
  collection: Collection,
  query: np.ndarray,
  *,
  modality: str,
  top_k: int = 10,
  chunk_size: int = CHUNK_MOMENTS,
) -> list[Result] | list[list[Result]]:
  """The `top_k` moments of `collection` nearest to `query`.

  Args:
    collection: from `load_collection`.
    query: `[E]` or `[Q, E]` embeddings (L2-normalised, as `export.embed_segment` returns).
    modality: which of the collection's moments to search, "audio" or "video" (cross-modal
      search of an audio query: "video"; see `target_modality`).
    top_k: results per query.
    chunk_size: as `nearest`'s.

  Returns:
    For an `[E]` query its results by rank (1 = best); for `[Q, E]` one such list per query.
  """
  query = np.asarray(query, np.float32)
  matrix = collection.moments(modality)
  if query.ndim not in (1, 2) or query.shape[-1] != matrix.shape[1]:
    raise ValueError(
      f"query must be [E] or [Q, E] with E = {matrix.shape[1]} (the collection's embedding "
      f"dimension); got shape {query.shape}."
    )
  if not np.isfinite(query).all():
    raise ValueError("The query embedding is not finite.")
  queries = query[None] if query.ndim == 1 else query
  indices, scores = nearest(matrix, queries, top_k=top_k, chunk_size=chunk_size)
  results = [
    [
      Result(
        rank=rank,
        source=collection.sources[int(collection.source_index[i])],
        start=float(collection.time[i]),
        end=float(collection.time[i]) + collection.window_seconds,
        score=float(score),
      )
      for rank, (i, score) in enumerate(zip(row_indices, row_scores), start=1)
    ]
    for row_indices, row_scores in zip(indices, scores)
  ]
  return results[0] if query.ndim == 1 else results


def target_modality(query_modality: str, same_modality: bool = False) -> str:
  """The collection modality a query of `query_modality` searches."""
  if query_modality not in MODALITIES:
    raise ValueError(f"modality must be one of {MODALITIES}; got {query_modality!r}.")
  if same_modality:
    return query_modality
  return "video" if query_modality == "audio" else "audio"


# ----------------------------------------------------------------------------- queries

_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
_RANGE = re.compile(rf"({_NUMBER})-({_NUMBER})")


@dataclasses.dataclass(frozen=True)
class Query:
  """A query file and the seconds [start, end) of it to embed (None, None: all of it)."""

  path: str
  start: float | None = None
  end: float | None = None


def parse_query(text: str) -> Query:
  """`FILE` or `FILE@START-END` (seconds, e.g. `talk.wav@12.5-20`).

  A path may contain '@': the text names the whole file when such a file exists, else its
  last '@' starts the range.

  Raises:
    SearchError: a bad range (syntax, or end <= start).
  """
  if "@" not in text or epath.Path(text).exists():
    return Query(text)
  path, _, span = text.rpartition("@")
  match = _RANGE.fullmatch(span.strip())
  if not path or match is None:
    raise SearchError(
      f"--query={text!r}: after '@' comes a range START-END in seconds, e.g. FILE@12.5-20 "
      "(no such file either)."
    )
  start, end = float(match.group(1)), float(match.group(2))
  if end <= start:
    raise SearchError(f"--query={text!r}: the range ends at {end:g} s, not after its start.")
  return Query(path, start, end)


def file_modality(path: epath.PathLike) -> str:
  """ "audio" for a file without a video stream (wav, mp3, ...), else "video".

  Raises:
    video_io.VideoReadError: the file cannot be opened.
  """
  path = epath.Path(path)
  if path.suffix.lower() in AUDIO_EXTENSIONS:
    return "audio"
  try:
    with video_io.VideoStream(path, fps=1.0, short_side=1, sample_rate=8000, require_audio=False):
      return "video"
  except video_io.NoVideoStreamError:
    return "audio"


# ----------------------------------------------------------------------------- command line

_WORKDIR = flags.DEFINE_string("workdir", None, "The training workdir (its model and exports).")
_COLLECTION = flags.DEFINE_string(
  "collection", None, "A whole-video export's name (the folder under WORKDIR/embeddings/)."
)
_QUERY = flags.DEFINE_string(
  "query", None, "FILE or FILE@START-END (seconds): the audio or video to search for."
)
_QUERY_MODALITY = flags.DEFINE_enum(
  "query_modality",
  None,
  list(MODALITIES),
  "The query's modality; default: audio for a file without a video stream, else video "
  "(audio: a video file's soundtrack).",
)
_SAME_MODALITY = flags.DEFINE_bool(
  "same_modality", False, "Search the query's own modality (default: the other one)."
)
_TOP_K = flags.DEFINE_integer("top_k", 10, "Results to show.")
_JSON = flags.DEFINE_bool("json", False, "One JSON object per result line.")
flags.mark_flags_as_required(["workdir", "collection", "query"])


@dataclasses.dataclass(frozen=True)
class Answer:
  """A search from the command line: the query, its modality, the modality searched, the
  collection and the results."""

  query: Query
  modality: str
  target: str
  collection: Collection
  results: list[Result]

  def table(self) -> str:
    """A heading line, then rank, score, start and end (H:MM:SS.s) and source."""
    query = self.query
    span = "" if query.start is None else f" [{query.start:g}-{query.end:g} s]"
    lines = [
      f"{query.path}{span} ({self.modality}) vs the {self.target} of "
      f"{len(self.collection):,} moments of {self.collection.name!r}:",
      f"{'rank':>4}  {'score':>7}  {'start':>10}  {'end':>10}  source",
    ]
    for r in self.results:
      lines.append(
        f"{r.rank:>4}  {r.score:>7.4f}  {_clock(r.start):>10}  {_clock(r.end):>10}  {r.source}"
      )
    return "\n".join(lines)


def run_search(
  workdir: str,
  name: str,
  query_text: str,
  *,
  query_modality: str | None = None,
  same_modality: bool = False,
  top_k: int = 10,
) -> Answer:
  """What the command line does, cheap checks first, the query's embedding last.

  Raises:
    SearchError: any problem with the flags, the collection or the query file.
  """
  if top_k < 1:
    raise SearchError(f"--top_k must be at least 1; got {top_k}.")
  query = parse_query(query_text)
  if epath.Path(query.path).is_dir():
    raise SearchError(
      f"The query {query.path} is a directory: give one audio or video file (FILE, or "
      "FILE@START-END in seconds)."
    )
  if not epath.Path(query.path).is_file():
    raise SearchError(f"The query file {query.path} does not exist.")
  collection = load_collection(workdir, name)
  try:
    config = export.workdir_config(workdir)
  except FileNotFoundError as error:
    raise SearchError(str(error)) from None
  check_compatible(collection, config)
  try:
    modality = query_modality or file_modality(query.path)
  except video_io.VideoReadError as error:
    raise SearchError(f"Cannot read the query file: {error}") from None
  embed = _collection_model(workdir, collection, config)
  try:
    embedding = embed(query.path, modality=modality, start=query.start, end=query.end)
  except video_io.VideoReadError as error:
    raise SearchError(f"Cannot read the query file: {error}") from None
  except ValueError as error:  # a range outside the file
    raise SearchError(f"--query={query_text!r}: {error}") from None
  target = target_modality(modality, same_modality)
  results = search(collection, embedding, modality=target, top_k=top_k)
  return Answer(query, modality, target, collection, results)


def collection_storage(
  collection: Collection, config: config_dict.ConfigDict
) -> dataset_writer.StorageSpec:
  """The stored data's settings that the collection's moments were made from (and so its
  queries are): those its manifest records; for a manifest written before it recorded them,
  the config's when its dataset is the synthetic one (generated with them), else the
  prepared dataset's.

  Raises:
    SearchError: an older manifest, and the prepared dataset is not there.
  """
  recorded = collection.manifest.get("storage")
  if recorded is not None:
    return dataset_writer.StorageSpec(**recorded)
  if config.dataset.name == datasets.SYNTHETIC_NAME:
    return datasets.storage_from_config(config.dataset)
  try:
    return datasets.open_from_config(config.dataset, config.input).storage
  except FileNotFoundError:
    data_dir = config.dataset.data_dir or datasets.default_data_dir()
    raise SearchError(
      f"Collection {collection.name!r} was exported before manifests recorded the stored "
      f"data's settings, and the dataset they are read from ({config.dataset.name!r} in "
      f"{data_dir}) is not there. Export the collection again (its manifest will record "
      f"them): {_EXPORT_COMMAND}."
    ) from None


def _collection_model(
  workdir: str, collection: Collection, config: config_dict.ConfigDict
) -> Callable[..., np.ndarray]:
  """`export.segment_embedder` of the checkpoint that embedded the collection.

  Raises:
    SearchError: that checkpoint cannot be read from the workdir.
  """
  step = collection.manifest["step"]
  storage = collection_storage(collection, config)
  try:
    return export.segment_embedder(workdir, step=step, config=config, storage=storage)
  except (FileNotFoundError, ValueError, checkpoints.NoUsableCheckpointError) as error:
    raise SearchError(
      f"Cannot load the model that embedded collection {collection.name!r} (checkpoint step "
      f"{step} of workdir {workdir}): {error} A collection is searched with the checkpoint "
      f"that embedded it; if that one is gone, export the collection again: {_EXPORT_COMMAND}."
    ) from None


def _clock(seconds: float) -> str:
  """H:MM:SS.s"""
  minutes, rest = divmod(seconds, 60)
  hours, minutes = divmod(int(minutes), 60)
  return f"{hours}:{minutes:02d}:{rest:04.1f}"


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  if flags.FLAGS.verbosity < 1:  # --verbosity=1 shows the libraries' INFO logs too
    console.plain_logs()
  sharding.choose_platforms()
  try:
    answer = run_search(
      _WORKDIR.value,
      _COLLECTION.value,
      _QUERY.value,
      query_modality=_QUERY_MODALITY.value,
      same_modality=_SAME_MODALITY.value,
      top_k=_TOP_K.value,
    )
  except (SearchError, files.DiskFullError) as error:
    # The message says what to do; a traceback would only bury it.
    sys.stderr.write(f"search: {' '.join(str(error).split())}\n")
    sys.exit(1)
  if _JSON.value:
    print("\n".join(result.to_json() for result in answer.results))
  else:
    print(answer.table())


if __name__ == "__main__":
  app.run(main)
