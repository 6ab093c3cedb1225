"""The temporal encoder both towers share: a sequence of features → one clip feature.

`[B, T, D_in]` → Dense → + time embedding → a CLS token in front, marked global →
`LongformerEncoder` (banded attention) → the CLS token's output `[B, width]`. With
`num_layers=0` it is the masked mean of the projected features instead (the mean-pooling
baseline that shows what the temporal encoder adds).

Time embedding: a FIXED sinusoid of the frame index (0 … T−1), not a learned table. The same
parameters must embed 16-frame training clips and 512-frame whole videos, sampled at the same
frame rate. With a sinusoid, one frame step means the same thing at any length:
PE(i + k) is a fixed linear map of PE(i), so what the banded layers learn about their ±w
neighbours over 16 frames applies unchanged at frame 400, and positions past the training
length are defined without a table to extrapolate. Interpolating a learned table instead
would squeeze 512 frames into the positions of 16, making neighbouring frames 32× closer in
embedding than in training. The CLS token gets no time embedding: it is global and stands
for the whole clip.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cmvt_jax.models import longformer

Dtype = Any

_MAX_PERIOD = 10_000.0


def time_embedding(length: int, width: int) -> jax.Array:
  """Sinusoidal embedding of positions 0 … length−1: `[length, width]` float32.

  Channel 2i is sin(t / 10000^(2i/width)) and channel 2i+1 the matching cosine.
  """
  if width % 2:
    raise ValueError(f"the time embedding needs an even width; got {width}.")
  frequencies = 1.0 / _MAX_PERIOD ** (np.arange(0, width, 2) / width)
  angles = np.arange(length)[:, None] * frequencies[None, :]
  table = np.stack([np.sin(angles), np.cos(angles)], axis=-1).reshape(length, width)
  return jnp.asarray(table, jnp.float32)


class TemporalEncoder(nn.Module):
  """Features over time → one feature per sequence (CLS output, or masked mean).

  Attributes:
    width: model width D of the encoder and of its output.
    num_layers: Longformer blocks; 0 means masked mean pooling after the projection.
    num_heads: attention heads.
    mlp_dim: hidden width of each block's MLP.
    windows: one-sided attention window per layer (an int for all layers), in time steps.
    dilations: per layer, an int or a per-head tuple.
    global_projections: separate q/k/v projections for the CLS token (Longformer).
    attention_implementation: `banded_attention`'s (None: chosen for the platform compiled
      for; "lax" or "splash" to force one).
    dropout_rate: dropout inside the blocks.
    remat: recompute each block in the backward pass.
  """

  width: int
  num_layers: int
  num_heads: int = 1
  mlp_dim: int = 0
  windows: int | Sequence[int] = 1
  dilations: int | Sequence[int | Sequence[int]] = 1
  global_projections: bool = True
  attention_implementation: str | None = None
  dropout_rate: float = 0.0
  remat: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, features, mask=None, *, deterministic: bool = True):
    """features `[B, T, D_in]`, mask `[B, T]` bool (True = a real step) or None → `[B, width]`."""
    if features.ndim != 3:
      raise ValueError(f"features must be [B, T, D]; got shape {features.shape}.")
    batch, length, _ = features.shape
    if mask is not None and mask.shape != (batch, length):
      raise ValueError(
        f"the mask must be [B, T] = {(batch, length)} to match the features; got {mask.shape}."
      )
    x = nn.Dense(
      self.width, dtype=self.dtype, param_dtype=self.param_dtype, name="input_projection"
    )(features)
    x = x + time_embedding(length, self.width).astype(x.dtype)
    if self.num_layers == 0:
      return _masked_mean(x, mask)

    cls = self.param(
      "cls", nn.initializers.normal(stddev=0.02), (1, 1, self.width), self.param_dtype
    )
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (batch, 1, self.width)), x], 1)
    global_mask = jnp.zeros((batch, length + 1), bool).at[:, 0].set(True)
    kv_mask = None
    if mask is not None:
      kv_mask = jnp.concatenate([jnp.ones((batch, 1), bool), mask.astype(bool)], axis=1)
    x = longformer.LongformerEncoder(
      num_layers=self.num_layers,
      num_heads=self.num_heads,
      mlp_dim=self.mlp_dim,
      windows=self.windows,
      dilations=self.dilations,
      max_global=1,
      global_projections=self.global_projections,
      attention_implementation=self.attention_implementation,
      dropout_rate=self.dropout_rate,
      remat=self.remat,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="encoder",
    )(x, global_mask=global_mask, kv_mask=kv_mask, deterministic=deterministic)
    return x[:, 0]


def _masked_mean(x, mask):
  """x `[B, T, D]`, mask `[B, T]` or None → mean over the valid steps `[B, D]`."""
  if mask is None:
    return x.mean(axis=1)
  weights = mask.astype(x.dtype)[..., None]
  return (x * weights).sum(axis=1) / jnp.maximum(weights.sum(axis=1), 1)
