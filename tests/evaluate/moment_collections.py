"""Synthetic whole-video exports with moments, written directly (np.savez + a manifest), in the
format of export.py: for the search tests and benchmarks/search.py."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib

import numpy as np

from cmvt_jax.data import dataset_writer

MODEL_SHA256 = "0123456789abcdef" * 4


def write_collection(
  workdir,
  name: str,
  moments_per_video: list[int],
  *,
  parts: int = 1,
  embed_dim: int = 8,
  seed: int = 0,
  moment_seconds: float = 1.0,
  window_seconds: float = 2.0,
  model_sha256: str = MODEL_SHA256,
  return_moments: bool = True,
  part_digests: bool = True,
) -> dict[str, np.ndarray] | None:
  """Writes `WORKDIR/embeddings/NAME/` with one video per entry of `moments_per_video`
  (video i in part i % parts, as a multi-process export shares them) and random unit
  embeddings; `part_digests`: the manifest names each part's SHA-256 (False: as manifests
  written before it did).

  Returns:
    (None unless `return_moments`) the moments in search order (parts in manifest order,
    moments in part order): `video`, `audio` `[M, E]`, `time` `[M]`, `source` `[M]` (str).
  """
  folder = pathlib.Path(workdir) / "embeddings" / name
  folder.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  manifest_parts, digests = {}, {}
  merged = {"video": [], "audio": [], "time": [], "source": []}
  for part in range(parts):
    videos = list(range(part, len(moments_per_video), parts))
    counts = np.asarray([moments_per_video[v] for v in videos], np.int64)
    sources = np.asarray([f"videos/{v:05d}.mp4" for v in videos])
    size = int(counts.sum())
    row = np.repeat(np.arange(len(videos), dtype=np.int32), counts)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    time = ((np.arange(size) - np.repeat(first, counts)) * moment_seconds).astype(np.float32)
    video, audio = (_unit(rng, size, embed_dim) for _ in range(2))
    file = f"part-{part:05d}-of-{parts:05d}.npz"
    np.savez(
      folder / file,
      id=sources,
      source=sources,
      start=np.zeros(len(videos), np.float32),
      video=_unit(rng, len(videos), embed_dim),
      audio=_unit(rng, len(videos), embed_dim),
      num_frames=(counts * 4).astype(np.int32),
      moment_video=video,
      moment_audio=audio,
      moment_time=time,
      moment_row=row,
    )
    manifest_parts[file] = len(videos)
    digests[file] = hashlib.sha256((folder / file).read_bytes()).hexdigest()
    if not return_moments:
      continue
    for key, value in (
      ("video", video),
      ("audio", audio),
      ("time", time),
      ("source", sources[row]),
    ):
      merged[key].append(value)
  manifest = {
    "split": None,
    "video_dir": "videos",
    "whole_video": True,
    "step": 100,
    "config_sha256": "c" * 64,
    "model_sha256": model_sha256,
    "embed_dim": embed_dim,
    "count": len(moments_per_video),
    "parts": manifest_parts,
    "skipped_files": 0,
    "label_names": None,
    "storage": dataclasses.asdict(dataset_writer.StorageSpec()),
    "moments": {
      "count": int(sum(moments_per_video)),
      "moment_seconds": moment_seconds,
      "window_seconds": window_seconds,
    },
  }
  if part_digests:
    manifest["part_sha256"] = digests
  (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
  if return_moments:
    return {key: np.concatenate(values) for key, values in merged.items()}
  return None


def _unit(rng: np.random.Generator, count: int, dim: int) -> np.ndarray:
  """`[count, dim]` float32 random unit vectors."""
  x = rng.standard_normal((count, dim), dtype=np.float32)
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  return x
