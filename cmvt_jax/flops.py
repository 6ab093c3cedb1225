"""Analytic FLOPs per clip of a `CMVT`, for MFU.

Counted: every matmul and convolution, at 2 FLOPs per multiply-add (XLA's convention).
Not counted: normalisations, activations, softmax, residual adds and the contrastive loss's
`[N, N]` similarities (together well under 5% of the total at the configured sizes).

Attention is counted as the scores the model asks for, not what a kernel pads to: a banded
layer over L tokens pays for the P query-key pairs with `|i - j| <= w·d` and
`(i - j) % d == 0` (P = L + 2 Σ_{k=1..w} max(0, L − k·d)), plus every query against the
global keys and the global queries against every key. The banded kernel computes whole
chunks (`[c, 3c]` scores per chunk of c queries), so at large windows relative to the chunk
it does more arithmetic than this; like padding, that does not count towards MFU.

`train_step` = 3 × forward (forward, and a backward of twice its cost: gradients with respect
to activations and to weights), the model-FLOPs convention MFU uses (PaLM, appendix B).
`train_step_executed` adds the recomputation `nn.remat` performs (one more forward) when the
model was built with `remat`; that is the hardware-FLOPs count, not the one for MFU.

`peak_flops_per_device` is MFU's denominator: a datasheet figure for accelerators, a measured
float32 matmul rate for CPUs.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from absl import logging

from cmvt_jax.models import audio_encoder as audio_lib
from cmvt_jax.models import cmvt as cmvt_lib
from cmvt_jax.models import frame_encoder as frame_lib
from cmvt_jax.models import longformer
from cmvt_jax.models import temporal_encoder as temporal_lib

# Device peak FLOP/s for MFU (dense bf16 datasheet figures, per chip). A CPU's peak is
# measured instead (a float32 matmul), since CPUs differ too much to tabulate.
DEVICE_PEAK_FLOPS = {
  "H100": 989e12,
  "H200": 989e12,
  "TPU v4": 275e12,
  "TPU v5 lite": 197e12,
  "TPU v5e": 197e12,
  "TPU v5p": 459e12,
  "TPU v5": 459e12,
  "TPU v6 lite": 918e12,
  "TPU v6e": 918e12,
}


def peak_flops_of(device_kind: str) -> float | None:
  """The datasheet peak of a device kind (e.g. "TPU v5 lite"), None when not tabulated."""
  for name, peak in DEVICE_PEAK_FLOPS.items():
    if name.lower() in device_kind.lower():
      return peak
  return None


def peak_flops_per_device() -> float:
  """Datasheet peak for accelerators; a measured float32 matmul rate for CPUs."""
  kind = jax.devices()[0].device_kind
  peak = peak_flops_of(kind)
  if peak is not None:
    return peak
  if jax.devices()[0].platform != "cpu":
    logging.warning("No peak FLOP/s known for %r; MFU is reported against a measured matmul.", kind)
  size = 2048
  x = jnp.ones((size, size), jnp.float32)
  matmul = jax.jit(lambda a: a @ a)
  jax.block_until_ready(matmul(x))
  start = time.perf_counter()
  for _ in range(3):
    jax.block_until_ready(matmul(x))
  return 3 * 2 * size**3 / (time.perf_counter() - start) / jax.local_device_count()


@dataclasses.dataclass(frozen=True)
class ModelFlops:
  """Forward FLOPs of one clip, by part, and the training-step totals derived from them."""

  frame_encoder: float
  video_temporal: float
  audio: float
  heads: float
  remat: bool

  @property
  def forward(self) -> float:
    return self.frame_encoder + self.video_temporal + self.audio + self.heads

  @property
  def train_step(self) -> float:
    """Model FLOPs of one training step per clip (3 × forward): the MFU numerator."""
    return 3 * self.forward

  @property
  def train_step_executed(self) -> float:
    """FLOPs executed per clip, with `nn.remat`'s recomputed forward when it is on."""
    return (4 if self.remat else 3) * self.forward


def count(
  model: cmvt_lib.CMVT, *, video_shape: Sequence[int], audio_shape: Sequence[int]
) -> ModelFlops:
  """FLOPs of one clip through `model` (as built by `cmvt.from_config`).

  Args:
    model: the `CMVT`.
    video_shape: one clip's frames `(T, H, W, C)`.
    audio_shape: one clip's log-mel `(F, M)`.
  """
  if len(video_shape) != 4 or len(audio_shape) != 2:
    raise ValueError(
      f"video_shape must be (T, H, W, C) and audio_shape (F, M); got "
      f"{tuple(video_shape)} and {tuple(audio_shape)}."
    )
  frames, height, width, channels = video_shape
  video = model.video_encoder
  frame_flops, frame_features = _image_encoder(video.frame_encoder, height, width, channels)
  temporal_flops, video_features = temporal(video.temporal, frames, frame_features)
  audio_flops, audio_features = _audio(model.audio_encoder, *audio_shape)
  heads = sum(
    _dense(1, features, model.projection_hidden_dim)
    + _dense(1, model.projection_hidden_dim, model.embed_dim)
    for features in (video_features, audio_features)
  )
  if model.num_classes:
    heads += _dense(1, video_features, model.classifier_hidden_dim) + _dense(
      1, model.classifier_hidden_dim, model.num_classes
    )
  modules = (
    video.frame_encoder,
    video.temporal,
    model.audio_encoder.backbone,
    model.audio_encoder.temporal,
  )
  return ModelFlops(
    frame_encoder=frames * frame_flops,
    video_temporal=temporal_flops,
    audio=audio_flops,
    heads=heads,
    remat=any(getattr(m, "remat", False) for m in modules),
  )


def vit(module: frame_lib.ViT, height: int, width: int, channels: int) -> float:
  """One image `[H, W, C]` through a `frame_encoder.ViT`."""
  patch_h, patch_w = frame_lib.as_pair(module.patch_size, "patch_size")
  grid = (height // patch_h) * (width // patch_w)
  tokens = grid + 1
  total = grid * 2 * patch_h * patch_w * channels * module.width
  per_block = (
    4 * _dense(tokens, module.width, module.width)
    + 2 * 2 * tokens * tokens * module.width
    + _dense(tokens, module.width, module.mlp_dim)
    + _dense(tokens, module.mlp_dim, module.width)
  )
  total += module.depth * per_block
  if module.num_classes:
    total += _dense(1, module.width, module.num_classes)
  return total


def resnet_feature_map(
  module: frame_lib.ResNet, height: int, width: int, channels: int
) -> tuple[float, tuple[int, int, int]]:
  """One image through `ResNet.feature_map` → (FLOPs, output map (H', W', C'))."""
  height, width = _strided(height, width, module.stem_strides)
  total = _conv(height, width, module.stem_kernel, channels, module.stem_width)
  channels = module.stem_width
  for stage_width, blocks, strides in zip(
    module.stage_widths, module.blocks_per_stage, module.stage_strides
  ):
    for i in range(blocks):
      block_strides = tuple(strides) if i == 0 else (1, 1)
      height, width = _strided(height, width, block_strides)
      total += _conv(height, width, (3, 3), channels, stage_width)
      total += _conv(height, width, (3, 3), stage_width, stage_width)
      if channels != stage_width or block_strides != (1, 1):
        total += _conv(height, width, (1, 1), channels, stage_width)
      channels = stage_width
  return total, (height, width, channels)


def temporal(
  module: temporal_lib.TemporalEncoder, length: int, in_features: int
) -> tuple[float, int]:
  """A `[length, in_features]` sequence through a `TemporalEncoder` → (FLOPs, output width)."""
  total = _dense(length, in_features, module.width)
  if not module.num_layers:
    return total, module.width
  tokens = length + 1  # the CLS token, the one global position
  windows = longformer.per_layer("windows", module.windows, module.num_layers)
  dilations = longformer.per_layer("dilations", module.dilations, module.num_layers)
  for window, dilation in zip(windows, dilations):
    total += longformer_layer(
      tokens,
      module.width,
      module.num_heads,
      module.mlp_dim,
      window,
      dilation,
      num_global=1,
      global_projections=module.global_projections,
    )
  return total, module.width


def longformer_layer(
  tokens: int,
  width: int,
  num_heads: int,
  mlp_dim: int,
  window: int,
  dilation: int | Sequence[int],
  *,
  num_global: int,
  global_projections: bool,
) -> float:
  """One `longformer.EncoderBlock` over `tokens` positions, `num_global` of them global."""
  head_dim = width // num_heads
  dilations = (dilation,) * num_heads if isinstance(dilation, int) else tuple(dilation)
  total = 4 * _dense(tokens, width, width)  # query, key, value, out
  if global_projections and num_global:
    total += _dense(num_global, width, width) + 2 * _dense(tokens, width, width)
  total += sum(2 * 2 * band_pairs(tokens, window, d) * head_dim for d in dilations)
  total += 2 * 2 * tokens * num_global * width  # every query against the global keys
  total += 2 * 2 * num_global * tokens * width  # the global queries against every key
  total += _dense(tokens, width, mlp_dim) + _dense(tokens, mlp_dim, width)
  return total


def band_pairs(length: int, window: int, dilation: int) -> int:
  """Query-key pairs (i, j) with |i − j| <= window·dilation and (i − j) % dilation == 0."""
  return length + 2 * sum(max(0, length - k * dilation) for k in range(1, window + 1))


def _image_encoder(module, height: int, width: int, channels: int) -> tuple[float, int]:
  """One frame through the frame encoder → (FLOPs, feature width)."""
  if isinstance(module, frame_lib.ViT):
    return vit(module, height, width, channels), module.num_classes or module.width
  flops, (_, _, features) = resnet_feature_map(module, height, width, channels)
  return flops, features


def _audio(module: audio_lib.AudioEncoder, frames: int, mels: int) -> tuple[float, int]:
  """One log-mel `[F, M]` through the audio tower → (FLOPs, feature width)."""
  if isinstance(module.backbone, frame_lib.ViT):
    return vit(module.backbone, frames, mels, 1), module.backbone.width
  cnn_flops, (steps, bins, channels) = resnet_feature_map(module.backbone, frames, mels, 1)
  temporal_flops, features = temporal(module.temporal, steps, bins * channels)
  return cnn_flops + temporal_flops, features


def _dense(rows: int, fan_in: int, fan_out: int) -> float:
  return 2 * rows * fan_in * fan_out


def _conv(height: int, width: int, kernel: Sequence[int], fan_in: int, fan_out: int) -> float:
  """A 'SAME' convolution producing an `[height, width, fan_out]` map."""
  return 2 * height * width * kernel[0] * kernel[1] * fan_in * fan_out


def _strided(height: int, width: int, strides: Sequence[int]) -> tuple[int, int]:
  return math.ceil(height / strides[0]), math.ceil(width / strides[1])
