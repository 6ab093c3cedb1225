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
a time on its first local device, with no collective (hosts with videos of different lengths
never wait on each other). The frame encoder works frame by frame, so frames go through it in
fixed-size chunks (one program); the temporal encoder and the audio tower then take the whole
sequence in one pass, padded with a mask to a length bucket (`bucket_tokens`), so that videos
of similar length share one program and a folder of any lengths compiles a handful.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterable
from collections.abc import Iterator
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cmvt_jax import losses
from cmvt_jax import run as run_lib
from cmvt_jax import sharding
from cmvt_jax.data import normalization
from cmvt_jax.data import pipeline
from cmvt_jax.models import cmvt
from cmvt_jax.models import frame_encoder

# Sequence buckets are multiples of this many tokens (the block size accelerator attention
# kernels tile by) ...
TOKEN_BLOCK = 128
# ... every multiple up to this many blocks, then 4, 5, 6 or 7 × a power of two blocks: at
# most 25% padding, and each doubling of length adds four programs.
_DENSE_BLOCKS = 8


@functools.cache
def clip_embedding_step(model: cmvt.CMVT, mesh: jax.sharding.Mesh, *, logits: bool = False):
  """The jitted (params, video `[B, T, S, S, 3]`, audio `[B, F, M]`) → `video`, `audio`
  `[B, E]` (and with `logits`, the classifier's `logits` `[B, C]`) over the mesh, rows split
  like the batch (also what `--mode compile` compiles). One per (model, mesh): the
  evaluation, export and plots of a run share its compiled programs."""

  def step(params, video, audio):
    out = model.apply({"params": params}, video, audio)
    result = {key: losses.l2_normalize(out[key]) for key in ("video", "audio")}
    if logits:
      result["logits"] = out["logits"]
    return result

  return jax.jit(sharding.traced_over(mesh, step), out_shardings=sharding.batch_sharding(mesh))


def whole_video_step(model: cmvt.CMVT):
  """The jitted (params, features `[1, T, D_f]`, frame_mask `[1, T]`, log_mel `[1, F, M]`,
  audio_mask `[1, F]`) → `video`, `audio` `[1, E]` of one whole video whose frames are
  already encoded (`frame_step`): the two long-sequence passes, on the device its inputs are on
  (also what `--mode compile` compiles as `whole_video`)."""
  video, audio = video_features_step(model), audio_step(model)
  return jax.jit(
    lambda params, features, frame_mask, log_mel, audio_mask: {
      **video(params, features, frame_mask),
      **audio(params, log_mel, audio_mask),
    }
  )


def frame_step(model: cmvt.CMVT):
  """The jitted (params, frames `[N, S, S, 3]`) → per-frame features `[N, D_f]`."""
  return jax.jit(
    lambda params, frames: model.apply(
      {"params": params}, frames, method=cmvt.CMVT.encode_frames
    ).astype(jnp.float32)
  )


def video_features_step(model: cmvt.CMVT):
  """The jitted (params, features `[B, T, D_f]`, frame_mask `[B, T]`) → `video` `[B, E]`."""

  def step(params, features, frame_mask):
    out = model.apply(
      {"params": params}, features, frame_mask=frame_mask, method=cmvt.CMVT.embed_frame_features
    )
    return {"video": losses.l2_normalize(out["embedding"])}

  return jax.jit(step)


def audio_step(model: cmvt.CMVT):
  """The jitted (params, log_mel `[B, F, M]`, audio_mask `[B, F]`) → `audio` `[B, E]`; a
  backbone without padding masks (`masks_audio` False) gets no mask, and unpadded input."""
  masked = masks_audio(model)

  def step(params, log_mel, audio_mask):
    out = model.apply(
      {"params": params},
      log_mel,
      audio_mask=audio_mask if masked else None,
      method=cmvt.CMVT.embed_audio,
    )
    return {"audio": losses.l2_normalize(out["embedding"])}

  return jax.jit(step)


class ClipEmbedder:
  """Embeds host-local clip batches over the mesh (see the module docstring); with `logits`,
  also returns the classifier's logits `[N, C]` (a model with a classifier head)."""

  def __init__(
    self,
    model: cmvt.CMVT,
    mesh: jax.sharding.Mesh,
    spec: pipeline.InputSpec,
    *,
    logits: bool = False,
  ):
    self.mesh, self.spec = mesh, spec
    self.embed_dim, self.num_classes = model.embed_dim, model.num_classes
    self.outputs = ("video", "audio") + (("logits",) if logits else ())
    self._embed = clip_embedding_step(model, mesh, logits=logits)

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
        **(
          {"logits": np.zeros((0, self.num_classes), np.float32)}
          if "logits" in self.outputs
          else {}
        ),
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
      return {key: np.asarray(rows[key])[keep] for key in (*self.outputs, *metadata)}
    rows = sharding.local_rows({"row": arrays["row"], **out})
    keep = np.asarray(batch["mask"])[rows["row"]]
    kept = rows["row"][keep]
    part = {key: np.asarray(batch[key])[kept] for key in metadata}
    return {**{key: rows[key][keep] for key in self.outputs}, **part}


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
  processes stop, and the batches' shared memory is released, when the block ends, not
  whenever the iterator is collected.
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
    multi_hot_classes=run.dataset.multi_hot_classes,
  )
  batches = iter(dataset)
  try:
    yield batches
  finally:
    pipeline.close(batches)


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


def masks_audio(model: cmvt.CMVT) -> bool:
  """Whether the audio tower takes a padding mask (the CNN backbone does)."""
  return isinstance(model.audio_encoder.backbone, frame_encoder.ResNet)


class WholeVideoEmbedder:
  """Embeds whole videos and their moment windows on this process's first local device.

  Programs are compiled ahead of time per shape (`programs` counts them) and reused: one for
  frame chunks, one per (frame bucket, audio bucket) of whole videos, one for batches of
  moment windows.
  """

  def __init__(
    self,
    model: cmvt.CMVT,
    mesh: jax.sharding.Mesh,
    params,
    *,
    chunk_frames: int,
    window_batch: int,
  ):
    """Every process must construct it at the same point: gathering sharded parameters onto
    one device is a collective.

    Args:
      model: the model.
      mesh: the mesh `params` are sharded over.
      params: the model's parameters.
      chunk_frames: frames per frame-encoder call.
      window_batch: moment windows per call.
    """
    if chunk_frames < 1 or window_batch < 1:
      raise ValueError(
        f"chunk_frames and window_batch must be >= 1; got {chunk_frames}, {window_batch}."
      )
    self.model, self.chunk_frames, self.window_batch = model, chunk_frames, window_batch
    self.device = jax.local_devices()[0]
    whole = sharding.replicate(params, mesh)
    self._params = jax.device_put(jax.tree.map(lambda x: x.addressable_data(0), whole), self.device)
    self._steps = {
      "frames": frame_step(model),
      "whole": whole_video_step(model),
      "video": video_features_step(model),
      "audio": audio_step(model),
    }
    self._compiled: dict[tuple, jax.stages.Compiled] = {}

  @property
  def programs(self) -> int:
    """Programs compiled so far."""
    return len(self._compiled)

  def _run(self, name: str, *inputs):
    """Step `name` on host inputs, compiled once per shape."""
    key = (name,) + tuple((x.shape, x.dtype.name) for x in inputs)
    if key not in self._compiled:
      self._compiled[key] = self._lower(name, *inputs).compile()
    return jax.device_get(self._compiled[key](self._params, *jax.device_put(inputs, self.device)))

  def _lower(self, name: str, *inputs) -> jax.stages.Lowered:
    on_device = jax.sharding.SingleDeviceSharding(self.device)
    shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=on_device) for x in inputs]
    return self._steps[name].lower(self._params, *shapes)

  def encode_frames(self, frames: np.ndarray) -> np.ndarray:
    """Frames `[N, S, S, 3]` float32 (N <= chunk_frames) → features `[N, D_f]` float32."""
    if len(frames) > self.chunk_frames:
      raise ValueError(f"at most {self.chunk_frames} frames per call; got {len(frames)}.")
    padded = np.zeros((self.chunk_frames, *frames.shape[1:]), np.float32)
    padded[: len(frames)] = frames
    return self._run("frames", padded)[: len(frames)]

  def whole_inputs(self, frames: int, audio_frames: int, n_mels: int, feature_dim: int):
    """Zero inputs of the whole-video program for a video of `frames` input frames and
    `audio_frames` log-mel frames, padded to their buckets."""
    frames_padded = bucket_tokens(frames + 1) - 1
    audio_padded = audio_bucket(self.model, audio_frames)
    return (
      np.zeros((1, frames_padded, feature_dim), np.float32),
      np.zeros((1, frames_padded), bool),
      np.zeros((1, audio_padded, n_mels), np.float32),
      np.zeros((1, audio_padded), bool),
    )

  def whole_video_bytes(self, frames: int, audio_frames: int, n_mels: int, feature_dim: int) -> int:
    """Device bytes the whole-video program needs for such a video (XLA's buffer assignment
    of the compiled program: arguments, outputs, temporaries), compiling it if needed."""
    inputs = self.whole_inputs(frames, audio_frames, n_mels, feature_dim)
    key = ("whole",) + tuple((x.shape, x.dtype.name) for x in inputs)
    if key not in self._compiled:
      self._compiled[key] = self._lower("whole", *inputs).compile()
    memory = self._compiled[key].memory_analysis()
    return int(
      memory.argument_size_in_bytes
      + memory.output_size_in_bytes
      - memory.alias_size_in_bytes
      + memory.temp_size_in_bytes
    )

  def embed_whole(self, features: np.ndarray, log_mel: np.ndarray) -> dict[str, np.ndarray]:
    """A whole video's frame features `[T, D_f]` and log-mel `[F, M]` → `video`, `audio`
    `[E]`, each sequence in one pass (padded to its bucket; equal to the unpadded pass)."""
    inputs = self.whole_inputs(len(features), len(log_mel), log_mel.shape[1], features.shape[1])
    padded_features, frame_mask, padded_log_mel, audio_mask = inputs
    padded_features[0, : len(features)] = features
    frame_mask[0, : len(features)] = True
    padded_log_mel[0, : len(log_mel)] = log_mel
    audio_mask[0, : len(log_mel)] = True
    out = self._run("whole", *inputs)
    return {key: out[key][0] for key in ("video", "audio")}

  def embed_windows(
    self,
    features: np.ndarray,
    frame_mask: np.ndarray,
    log_mel: np.ndarray,
    audio_mask: np.ndarray,
  ) -> dict[str, np.ndarray]:
    """Moment windows, each embedded as a clip: features `[W, T, D_f]`, frame_mask `[W, T]`,
    log_mel `[W, F, M]`, audio_mask `[W, F]` → `video`, `audio` `[W, E]`, in batches of
    `window_batch` (the last one padded)."""
    count = len(features)
    rows = -(-count // self.window_batch) * self.window_batch
    pad = lambda x: np.concatenate([x, np.zeros((rows - count, *x.shape[1:]), x.dtype)])
    features, frame_mask, log_mel, audio_mask = map(
      pad, (features, frame_mask, log_mel, audio_mask)
    )
    frame_mask[count:, 0] = audio_mask[count:, 0] = True  # padding rows: one valid step each
    parts = []
    for first in range(0, rows, self.window_batch):
      batch = slice(first, first + self.window_batch)
      parts.append(
        {
          **self._run("video", features[batch], frame_mask[batch]),
          **self._run("audio", log_mel[batch], audio_mask[batch]),
        }
      )
    return {
      key: np.concatenate([part[key] for part in parts])[:count] for key in ("video", "audio")
    }

  def embed_video_features(self, features: np.ndarray) -> np.ndarray:
    """Frame features `[T, D_f]` → the video embedding `[E]` (one pass, bucketed)."""
    padded = bucket_tokens(len(features) + 1) - 1
    batch = np.zeros((1, padded, features.shape[1]), np.float32)
    batch[0, : len(features)] = features
    return self._run("video", batch, np.arange(padded)[None] < len(features))["video"][0]

  def embed_log_mel(self, log_mel: np.ndarray) -> np.ndarray:
    """A log-mel `[F, M]` → the audio embedding `[E]` (one pass, bucketed)."""
    padded = audio_bucket(self.model, len(log_mel))
    batch = np.zeros((1, padded, log_mel.shape[1]), np.float32)
    batch[0, : len(log_mel)] = log_mel
    return self._run("audio", batch, np.arange(padded)[None] < len(log_mel))["audio"][0]


def bucket_tokens(tokens: int) -> int:
  """The sequence length (CLS included) a sequence of `tokens` is padded to: a multiple of
  TOKEN_BLOCK, at most 25% above `tokens` beyond _DENSE_BLOCKS blocks."""
  blocks = -(-tokens // TOKEN_BLOCK)
  if blocks <= _DENSE_BLOCKS:
    return max(blocks, 1) * TOKEN_BLOCK
  scale = 2 ** (math.floor(math.log2(blocks)) - 2)  # blocks lies in [4·scale, 8·scale)
  return -(-blocks // scale) * scale * TOKEN_BLOCK


def audio_bucket(model: cmvt.CMVT, audio_frames: int) -> int:
  """The log-mel length the audio tower pads `audio_frames` to: its tokens after the CNN
  (⌈F / stride⌉), plus the CLS, fill a bucket (no padding for a backbone without masks)."""
  if not masks_audio(model):
    return audio_frames
  stride = model.audio_encoder.backbone.time_stride
  return stride * (bucket_tokens(-(-audio_frames // stride) + 1) - 1)
