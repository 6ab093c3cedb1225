"""Longformer encoder: pre-LayerNorm transformer blocks over `banded_attention`.

Each layer has its own one-sided window and dilation (the Longformer paper's scheme: small
windows in low layers, larger ones higher up, dilation on some heads of the upper layers).
Global tokens (e.g. a CLS token) attend to, and are attended by, every position; as in
Longformer, their rows can use separate query/key/value projections (`global_projections`),
which leaves every non-global row untouched.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cmvt_jax.models import attention

Dtype = Any


class LongformerSelfAttention(nn.Module):
  """Multi-head banded self-attention with optional separate global projections.

  Attributes:
    num_heads: heads; the model width must divide by it.
    window: one-sided window (Longformer paper convention).
    dilation: an int, or one int per head.
    max_global: static bound on global tokens per row (None: read from a concrete mask).
    global_projections: give global rows their own query/key/value projections.
    implementation: `banded_attention`'s (None: chosen for the platform compiled for).
  """

  num_heads: int
  window: int
  dilation: int | Sequence[int] = 1
  max_global: int | None = None
  global_projections: bool = True
  implementation: str | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, global_mask=None, kv_mask=None):
    """x `[B, T, D]`, global_mask and kv_mask `[B, T]` bool or None → `[B, T, D]`."""
    width = x.shape[-1]
    if width % self.num_heads:
      raise ValueError(f"model width {width} must be divisible by num_heads={self.num_heads}.")
    head_dim = width // self.num_heads
    # Keys get no bias: it would add the same q·b to every score of a row, which softmax
    # ignores, so its gradient is rounding noise that Adam would amplify into updates.
    project = lambda name: nn.DenseGeneral(
      (self.num_heads, head_dim),
      use_bias=not name.startswith("key"),
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name=name,
    )
    q, k, v = (project(name)(x) for name in ("query", "key", "value"))
    dilation = self.dilation if isinstance(self.dilation, int) else tuple(self.dilation)
    out = attention.banded_attention(
      q,
      k,
      v,
      window=self.window,
      dilation=dilation,
      global_mask=global_mask,
      max_global=self.max_global,
      kv_mask=kv_mask,
      implementation=self.implementation,
    )

    if self.global_projections and global_mask is not None:
      max_global = self.max_global
      if max_global is None:
        max_global = attention.resolve_max_global(global_mask, None)
      positions, present = attention.global_positions(global_mask, max_global)
      q_global = project("query_global")(attention.take_rows(x, positions))
      k_global, v_global = project("key_global")(x), project("value_global")(x)
      key_valid = jnp.ones(x.shape[:2], bool) if kv_mask is None else kv_mask
      out = attention.replace_global_rows(
        out,
        q_global,
        k_global,
        v_global,
        positions,
        present,
        key_valid=key_valid,
        scale=head_dim**-0.5,
      )

    return nn.DenseGeneral(
      width, axis=(-2, -1), dtype=self.dtype, param_dtype=self.param_dtype, name="out"
    )(out)


def dense_attention_weights(
  attention_params: dict, x: jax.Array, rules: jax.Array, *, global_projections: bool
) -> jax.Array:
  """A `LongformerSelfAttention`'s weights as dense matrices (figures, inspection).

  Recomputes what the layer does without `banded_attention`'s blocking: query/key
  projections, scaled scores over the keys `rules` allows, softmax. Global rows (position 0,
  the CLS token) use the global projections when the layer has them.

  Args:
    attention_params: the layer's parameters (DenseGeneral kernels `[D, heads, head_dim]`).
    x: `[L, D]` the layer's input (after its block's `attention_norm`), one sequence.
    rules: `[heads, L, L]` bool, `attention.band_rule` per head.

  Returns:
    `[heads, L, L]` float32; row i is query i's distribution over keys.
  """
  x = x.astype(jnp.float32)

  def project(name):
    out = jnp.einsum("ld,dhk->hlk", x, attention_params[name]["kernel"])
    return (
      out + attention_params[name]["bias"][:, None] if "bias" in attention_params[name] else out
    )

  scale = attention_params["query"]["kernel"].shape[-1] ** -0.5
  scores = jnp.einsum("hqk,hlk->hql", project("query"), project("key")) * scale
  if global_projections:
    global_scores = (
      jnp.einsum("hk,hlk->hl", project("query_global")[:, 0], project("key_global")) * scale
    )
    scores = scores.at[:, 0].set(global_scores)
  scores = jnp.where(rules, scores, -jnp.inf)
  return jax.nn.softmax(scores, axis=-1)


class EncoderBlock(nn.Module):
  """Pre-LN block: x + Dropout(Attention(LN(x))), then x + Dropout(MLP(LN(x)))."""

  num_heads: int
  mlp_dim: int
  window: int
  dilation: int | Sequence[int] = 1
  max_global: int | None = None
  global_projections: bool = True
  attention_implementation: str | None = None
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, global_mask, kv_mask, deterministic):
    """x `[B, T, D]` → `[B, T, D]`."""
    norm = lambda name: nn.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    dense = lambda features, name: nn.Dense(
      features, dtype=self.dtype, param_dtype=self.param_dtype, name=name
    )
    dropout = nn.Dropout(self.dropout_rate)

    y = LongformerSelfAttention(
      num_heads=self.num_heads,
      window=self.window,
      dilation=self.dilation,
      max_global=self.max_global,
      global_projections=self.global_projections,
      implementation=self.attention_implementation,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="attention",
    )(norm("attention_norm")(x), global_mask, kv_mask)
    x = x + dropout(y, deterministic=deterministic)

    y = dense(self.mlp_dim, "mlp_in")(norm("mlp_norm")(x))
    y = dropout(nn.gelu(y), deterministic=deterministic)
    y = dense(x.shape[-1], "mlp_out")(y)
    return x + dropout(y, deterministic=deterministic)


class LongformerEncoder(nn.Module):
  """A stack of `EncoderBlock`s with per-layer windows and dilations, then a final LayerNorm.

  Attributes:
    num_layers: blocks.
    num_heads: attention heads per block.
    mlp_dim: hidden width of each block's MLP.
    windows: one-sided window per layer (a single int, or one entry, applies to all layers).
    dilations: per layer, an int or a per-head tuple (a single int applies to all layers).
    max_global: static bound on global tokens per row, needed under jit with a global mask.
    global_projections: separate q/k/v projections for global rows (Longformer).
    attention_implementation: `banded_attention`'s for every layer (None: chosen for the
      platform compiled for; "lax" or "splash" to force one).
    dropout_rate: dropout after attention and in the MLP (the banded kernel has no dropout
      on attention probabilities).
    remat: recompute each block's activations in the backward pass (`nn.remat`).
  """

  num_layers: int
  num_heads: int
  mlp_dim: int
  windows: int | Sequence[int]
  dilations: int | Sequence[int | Sequence[int]] = 1
  max_global: int | None = None
  global_projections: bool = True
  attention_implementation: str | None = None
  dropout_rate: float = 0.0
  remat: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, global_mask=None, kv_mask=None, deterministic=True):
    """x `[B, T, D]`, global_mask and kv_mask `[B, T]` bool (or None) → `[B, T, D]`."""
    windows = per_layer("windows", self.windows, self.num_layers)
    dilations = per_layer("dilations", self.dilations, self.num_layers)
    block_cls = nn.remat(EncoderBlock, static_argnums=(4,)) if self.remat else EncoderBlock
    for layer, (window, dilation) in enumerate(zip(windows, dilations)):
      x = block_cls(
        num_heads=self.num_heads,
        mlp_dim=self.mlp_dim,
        window=window,
        dilation=dilation,
        max_global=self.max_global,
        global_projections=self.global_projections,
        attention_implementation=self.attention_implementation,
        dropout_rate=self.dropout_rate,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name=f"layer_{layer}",
      )(x, global_mask, kv_mask, deterministic)
    return nn.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="final_norm")(x)


def per_layer(name: str, value, num_layers: int) -> list:
  """`value` for each of `num_layers` layers: an int, or a sequence of one entry, applies to
  every layer; otherwise one entry per layer. Entries are ints (or per-head tuples, for
  dilations). `name` is what an error calls the setting."""
  if isinstance(value, int):
    return [value] * num_layers
  value = [v if isinstance(v, int) else tuple(v) for v in value]
  if len(value) == 1:
    return value * num_layers
  if len(value) != num_layers:
    raise ValueError(
      f"{name} needs one entry, or one per layer ({num_layers}); got {len(value)}: {value!r}."
    )
  return value
