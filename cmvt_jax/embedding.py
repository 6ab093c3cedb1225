"""The one way to embed: clips in global batches over the mesh, whole videos one at a time.

Embeddings are the model's video and audio outputs, L2-normalised: float32 `[N, E]`.

Clips (`ClipEmbedder`): host-local batches (the eval pipeline's keys: `video`, `audio`,
`mask`, and metadata such as `id`, `source`, `start`, `label`) become global arrays over the
mesh. Two ways to get the rows back:
  * gathered: every process gets every row (evaluation needs all of them to rank); the
    metadata that travels must be numeric;
  * local: each process reads back only the rows on its own devices, and takes their
    metadata (strings too) from its own host batch by a `row` index that travels with the
    batch (export: each process writes its own part; nothing crosses hosts).
Padding rows (`mask` False) are dropped. Every process runs the same number of batches (a
process out of batches contributes padding batches until all are done), or the jitted
collectives would not pair up.

Whole videos (`WholeVideoEmbedder`) differ in length, so each process embeds its own, one at
a time on its first local device, with no collective: frames are padded to a bucket of
lengths (`FRAME_BUCKET`) with a frame mask, so videos of similar length share one program.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
from collections.abc import Iterator
from collections.abc import Sequence

import jax
import numpy as np

from cmvt_jax import losses
from cmvt_jax import run as run_lib
from cmvt_jax import sharding
from cmvt_jax.data import normalization
from cmvt_jax.data import pipeline
from cmvt_jax.models import cmvt

# Whole videos are padded (with a frame mask) to a power of two of input frames up to this
# many, and to a multiple of it beyond, so that videos of similar length share one compiled
# program and padding costs at most 2x (short videos) or this many frames (long ones).
FRAME_BUCKET = 64


def _normalised(model: cmvt.CMVT, params, video, audio, frame_mask=None) -> dict[str, jax.Array]:
  out = model.apply({"params": params}, video, audio, frame_mask=frame_mask)
  return {key: losses.l2_normalize(out[key]) for key in ("video", "audio")}


def clip_embedding_step(model: cmvt.CMVT, mesh: jax.sharding.Mesh):
  """The jitted (params, video `[B, T, S, S, 3]`, audio `[B, F, M]`) → `video`, `audio`
  `[B, E]` over the mesh, rows split like the batch (also what `--mode compile` compiles)."""
  return jax.jit(
    sharding.traced_over(
      mesh, lambda params, video, audio: _normalised(model, params, video, audio)
    ),
    out_shardings=sharding.batch_sharding(mesh),
  )


def whole_video_step(model: cmvt.CMVT):
  """The jitted (params, video `[1, T, S, S, 3]`, frame_mask `[1, T]`, audio `[1, F, M]`)
  → `video`, `audio` `[1, E]` of one whole video, on the device its inputs are on."""
  return jax.jit(
    lambda params, video, frame_mask, audio: _normalised(model, params, video, audio, frame_mask)
  )


class ClipEmbedder:
  """Embeds host-local clip batches over the mesh (see the module docstring)."""

  def __init__(self, model: cmvt.CMVT, mesh: jax.sharding.Mesh, spec: pipeline.InputSpec):
    self.mesh, self.spec = mesh, spec
    self.embed_dim = model.embed_dim
    self._embed = clip_embedding_step(model, mesh)

  def embed(
    self,
    params,
    batches: Iterable[dict[str, np.ndarray]],
    *,
    batch_size: int,
    gather: bool,
    metadata: Sequence[str] = (),
  ) -> dict[str, np.ndarray]:
    """`video`, `audio` `[N, E]` and the `metadata` keys of every real row of `batches`.

    Args:
      params: the model's parameters (on the mesh).
      batches: this process's host batches of `batch_size` rows.
      batch_size: rows per host batch (the size of a padding batch).
      gather: every process returns every process's rows (in the order of the global
        batches, host-major within each); otherwise its own rows only.
      metadata: keys of the batches to return with the embeddings (numeric when `gather`).
    """
    parts = []
    last = None
    batches = iter(batches)
    while True:
      batch = next(batches, None)
      if not sharding.any_process(batch is not None):
        break
      if batch is None:
        batch = self._padding_like(last, batch_size)
      parts.append(self._embed_batch(params, batch, gather=gather, metadata=metadata))
      last = batch
    if not parts:  # nothing to embed on any process: zero rows of every key
      empty = pipeline.padding_rows(self.spec, 0)
      return {
        "video": np.zeros((0, self.embed_dim), np.float32),
        "audio": np.zeros((0, self.embed_dim), np.float32),
        **{key: empty.get(key, np.zeros(0, np.int32)) for key in metadata},
      }
    return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}

  def _padding_like(self, batch: dict[str, np.ndarray] | None, rows: int) -> dict[str, np.ndarray]:
    """A batch of padding rows with the keys of `batch` (the eval batch keys if None)."""
    padding = pipeline.padding_rows(self.spec, rows)
    for key, value in (batch or {}).items():
      padding.setdefault(key, np.zeros_like(value))
    return padding

  def _embed_batch(self, params, batch, *, gather: bool, metadata: Sequence[str]):
    host = {"video": batch["video"], "audio": batch["audio"], "mask": batch["mask"]}
    if gather:
      host.update({key: batch[key] for key in metadata})
    else:
      host["row"] = np.arange(len(batch["mask"]), dtype=np.int32)
    arrays = sharding.global_batch(host, self.mesh)
    out = self._embed(params, arrays["video"], arrays["audio"])
    if gather:
      travelling = {key: value for key, value in arrays.items() if key not in ("video", "audio")}
      rows = jax.device_get(sharding.replicate({**out, **travelling}, self.mesh))
      keep = np.asarray(rows["mask"])
      return {key: np.asarray(rows[key])[keep] for key in ("video", "audio", *metadata)}
    rows = sharding.local_rows({"row": arrays["row"], **out})
    keep = np.asarray(batch["mask"])[rows["row"]]
    kept = rows["row"][keep]
    part = {key: np.asarray(batch[key])[kept] for key in metadata}
    return {"video": rows["video"][keep], "audio": rows["audio"][keep], **part}


@contextlib.contextmanager
def split_batches(
  run: run_lib.Run,
  stats: normalization.NormalizationStats,
  split: str,
  *,
  batch_size: int,
  limit: int | None = None,
) -> Iterator[Iterator[dict[str, np.ndarray]]]:
  """This process's padded eval batches of a prepared split (or of its first `limit` clips).

  Every process gets the same number of batches (`pipeline.eval_dataset`). grain's worker
  processes stop when the block ends, not whenever the iterator is collected.
  """
  source = run.dataset.source(split)
  if limit is not None and limit < len(source):
    source = _Prefix(source, limit)
  dataset = pipeline.eval_dataset(
    source,
    run.preprocessor(stats),
    batch_size=batch_size,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  batches = iter(dataset)
  try:
    yield batches
  finally:
    batches.close()


class _Prefix:
  """The first `count` examples of a random-access source."""

  def __init__(self, source, count: int):
    self._source, self._count = source, count

  def __len__(self):
    return self._count

  def __getitem__(self, index):
    if not 0 <= index < self._count:
      raise IndexError(index)
    return self._source[index]


class WholeVideoEmbedder:
  """Embeds whole videos, one at a time, on this process's first local device."""

  def __init__(self, model: cmvt.CMVT, mesh: jax.sharding.Mesh, params):
    """Every process must construct it at the same point: gathering sharded parameters onto
    one device is a collective."""
    self.device = jax.local_devices()[0]
    whole = sharding.replicate(params, mesh)
    self._params = jax.device_put(jax.tree.map(lambda x: x.addressable_data(0), whole), self.device)
    self._embed = whole_video_step(model)

  def embed(self, video: np.ndarray, audio: np.ndarray) -> dict[str, np.ndarray]:
    """One video's frames `[T, S, S, 3]` and its log-mel `[F, M]` → `video`, `audio` `[1, E]`.

    The audio keeps its exact length (the audio tower has no padding mask).
    """
    frames = len(video)
    padded = padded_frames(frames)
    batch = np.zeros((1, padded, *video.shape[1:]), np.float32)
    batch[0, :frames] = video
    inputs = jax.device_put((batch, np.arange(padded)[None] < frames, audio[None]), self.device)
    return jax.device_get(self._embed(self._params, *inputs))


def padded_frames(frames: int) -> int:
  """The bucket a video of `frames` input frames is padded to (see FRAME_BUCKET)."""
  if frames <= FRAME_BUCKET:
    return 2 ** math.ceil(math.log2(frames))
  return FRAME_BUCKET * math.ceil(frames / FRAME_BUCKET)
