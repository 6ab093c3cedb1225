"""Moment search speed: loading a collection and answering one query, exactly, on this CPU.

Writes synthetic whole-video collections (E = 128, one-hour videos of a moment per second,
one export part per 100 hours) to a temporary folder and times, per size:
  cold        the first `load_collection` (it builds the search cache from the parts) + search;
  warm        `load_collection` (memory-maps the cache) + one search, the files in the page
              cache (median of --repeats);
  uncached    the same after the cache's files are dropped from the page cache
              (posix_fadvise DONTNEED: a collection not searched for a while);
  search      the search alone on an open collection (median).

  python -m benchmarks.search [--moments 360000 3600000] [--repeats 5] [--dir DIR]
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import statistics
import tempfile
import time

import numpy as np

from benchmarks import quality
from cmvt_jax import search
from tests.evaluate import moment_collections

EMBED_DIM = 128
VIDEO_MOMENTS = 3600  # one hour at one moment per second
PART_MOMENTS = 360_000  # one part per 100 hours


def _timed(fn) -> tuple[float, object]:
  started = time.perf_counter()
  value = fn()
  return time.perf_counter() - started, value


def _drop_page_cache(folder: pathlib.Path) -> None:
  for path in folder.iterdir():
    descriptor = os.open(path, os.O_RDONLY)
    try:
      os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
      os.close(descriptor)


def measure(root: pathlib.Path, moments: int, repeats: int, top_k: int) -> dict:
  name = f"m{moments}"
  videos = [VIDEO_MOMENTS] * (moments // VIDEO_MOMENTS)
  parts = max(1, round(moments / PART_MOMENTS))
  written, _ = _timed(
    lambda: moment_collections.write_collection(
      root,
      name,
      videos,
      parts=parts,
      embed_dim=EMBED_DIM,
      moment_seconds=1.0,
      return_moments=False,
    )
  )
  query = np.random.default_rng(0).standard_normal(EMBED_DIM).astype(np.float32)
  query /= np.linalg.norm(query)
  one = lambda: search.search(
    search.load_collection(root, name), query, modality="video", top_k=top_k
  )
  cold, _ = _timed(one)
  warm = [_timed(one)[0] for _ in range(repeats)]
  cache = root / "embeddings" / name / search.CACHE_DIR
  uncached = []
  for _ in range(repeats):
    _drop_page_cache(cache)
    uncached.append(_timed(one)[0])
  collection = search.load_collection(root, name)
  alone = [
    _timed(lambda: search.search(collection, query, modality="video", top_k=top_k))[0]
    for _ in range(repeats)
  ]
  return {
    "moments": len(collection),
    "hours": len(collection) / 3600,
    "parts": parts,
    "bytes": sum(p.stat().st_size for p in cache.iterdir()),
    "write_s": written,
    "cold_s": cold,
    "warm_s": statistics.median(warm),
    "uncached_s": statistics.median(uncached),
    "search_s": statistics.median(alone),
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--moments", nargs="+", type=int, default=[360_000, 3_600_000])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--top_k", type=int, default=10)
  parser.add_argument("--dir", default=None, help="default: a temporary folder")
  args = parser.parse_args()
  with tempfile.TemporaryDirectory(dir=args.dir) as scratch:
    rows = [measure(pathlib.Path(scratch), m, args.repeats, args.top_k) for m in args.moments]
  print(
    f"{datetime.date.today()}, {quality.cpu_name()}, {os.cpu_count()} cores, E={EMBED_DIM}, "
    f"top_k={args.top_k}, chunks of {search.CHUNK_MOMENTS} moments, median of {args.repeats}"
  )
  print(
    "| moments (hours) | parts | cache GB | cold: build cache + search s | warm: load + search s "
    "| page cache dropped: load + search s | search alone s |"
  )
  print("| --- | --- | --- | --- | --- | --- | --- |")
  for r in rows:
    print(
      f"| {r['moments']:,} ({r['hours']:,.0f} h) | {r['parts']} | {r['bytes'] / 1e9:.2f} | "
      f"{r['cold_s']:.2f} | {r['warm_s']:.3f} | {r['uncached_s']:.2f} | {r['search_s']:.3f} |"
    )


if __name__ == "__main__":
  main()
