"""Longformer attention (sliding window, dilated, global) in O(T·window) time and memory.

`banded_attention(q, k, v, window=w, dilation=d, global_mask=g)` computes, for every query i,
softmax attention over the keys j with `|i - j| <= w·d` and `(i - j) % d == 0`, plus every
global key, and for every global query over all keys (the rule is spelled out in
`banded_attention`'s docstring). Nothing of size T×T is ever built:

* Chunking. The sequence is cut into query chunks of `c >= w` positions; chunk a only needs the
  keys in [a·c − w, a·c + c + w), which lie in chunks a−1, a and a+1 (the three "pieces"),
  taken with slices (no gathers). Scores are three [c, c] tiles per chunk; the band is a
  static [c, c] boolean pattern per piece, and key padding is fused into the same `where`.
  Chunks are processed a block at a time under `lax.fori_loop`, so the live scores stay a few
  MiB whatever T is. q, k and v stay in their `[B, T, H, D]` layout (chunking is a free
  reshape); each block is moved to `[B, H, block, c, D]` while it is in cache, because a
  whole-array transpose costs as much as a quarter of the kernel on a CPU. The backward
  pass is written by hand (`jax.custom_vjp`, flash-attention style): it keeps only q, k, v,
  the output and the per-row log-sum-exp, and recomputes each block's scores, so
  forward+backward memory is O(T·D) plus one block.
* Dilation. A dilated window is a plain window on interleaved sub-sequences: positions
  r, r+d, r+2d, … (r = 0 … d−1) only ever see each other, so the sequence is regrouped into
  d sub-sequences of length ⌈T/d⌉, folded into the batch, and the plain kernel runs with
  window w. Per-head dilation (a tuple) regroups each set of heads that shares a dilation.
* Global tokens. Their positions are gathered into a padded list of static length
  `max_global`. Every query attends to the global keys in a separate [T, max_global] block;
  global keys are masked out of the band so no key is counted twice; the two partial
  softmaxes are merged through their log-sum-exps (stable: each side is scaled by
  exp(lse_side − max)). Global queries attend to all T keys in a [max_global, T] block
  that replaces their rows.

Softmax statistics are float32 whatever the input dtype; a query with no valid key gets zeros.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Smallest query chunk. Below ~32 positions the per-chunk matmuls are too small to run well;
# chunks never shrink below the window either (the halo must fit in one neighbouring chunk).
_MIN_CHUNK = 32
# Scores live per loop step (elements, all pieces): ~8 MiB of float32, measured best on CPU.
_BLOCK_SCORE_ELEMENTS = 1 << 21


def banded_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  window: int,
  dilation: int | Sequence[int] = 1,
  global_mask: jax.Array | None = None,
  max_global: int | None = None,
  kv_mask: jax.Array | None = None,
  scale: float | None = None,
) -> jax.Array:
  """Sliding-window (optionally dilated) attention with Longformer global tokens.

  Args:
    q, k, v: `[batch, length, heads, head_dim]`, one dtype (float32, bfloat16 or float16).
    window: one-sided window w >= 1 (Longformer paper convention; Hugging Face's
      `attention_window` is the total, 2w).
    dilation: d >= 1, an int for all heads or a tuple of one int per head.
    global_mask: optional bool `[batch, length]`; True marks global positions.
    max_global: static bound on the number of global positions in any batch row. Needed when
      `global_mask` is traced (under jit); taken from the mask when it is concrete.
    kv_mask: optional bool `[batch, length]`; False marks padding keys nobody attends to.
    scale: score scale, default `head_dim ** -0.5`.

  Query i attends key j iff `kv_mask[b, j]` and (`|i - j| <= window * dilation` and
  `(i - j) % dilation == 0`, or `global_mask[b, i]`, or `global_mask[b, j]`).

  Returns:
    `[batch, length, heads, head_dim]` in the dtype of q; rows with no valid key are zero.
  """
  batch, length, heads, head_dim = _check_qkv(q, k, v)
  dilations = _check_dilation(dilation, heads)
  if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
    raise ValueError(f"window must be an int >= 1, got {window!r}.")
  window = int(window)
  kv_mask = _check_mask("kv_mask", kv_mask, batch, length)
  global_mask = _check_mask("global_mask", global_mask, batch, length)
  max_global = resolve_max_global(global_mask, max_global)
  scale = head_dim**-0.5 if scale is None else float(scale)

  key_valid = jnp.ones((batch, length), bool) if kv_mask is None else kv_mask
  band_keys = key_valid if global_mask is None else key_valid & ~global_mask

  out, lse = _dilated_band(q, k, v, band_keys, window, dilations, scale)
  if not max_global:
    return out.astype(q.dtype)

  positions, present = global_positions(global_mask, max_global)  # [B, G]
  k_global = take_rows(k, positions)  # [B, G, H, D]
  v_global = take_rows(v, positions)
  global_keys_valid = present & jnp.take_along_axis(key_valid, positions, axis=1)
  out_g, lse_g = _dense_part(q, k_global, v_global, global_keys_valid, scale)
  out = _merge(out, lse, out_g, lse_g)
  out = replace_global_rows(
    out, take_rows(q, positions), k, v, positions, present, key_valid=key_valid, scale=scale
  )
  return out.astype(q.dtype)


def band_rule(
  length: int, window: int, dilation: int, global_positions: Sequence[int]
) -> np.ndarray:
  """`[length, length]` bool: may query i attend key j by `banded_attention`'s rule (no
  padding), as a dense matrix for figures and small checks."""
  offset = np.arange(length)[:, None] - np.arange(length)[None, :]
  allowed = (np.abs(offset) <= window * dilation) & (offset % dilation == 0)
  is_global = np.isin(np.arange(length), global_positions)
  return allowed | is_global[:, None] | is_global[None, :]


def global_positions(global_mask: jax.Array, max_global: int) -> tuple[jax.Array, jax.Array]:
  """Positions of the global tokens, padded to `max_global`.

  global_mask `[B, T]` bool → (positions `[B, G]` int32, present `[B, G]` bool); absent slots
  hold position 0 and present=False.
  """
  positions = jax.vmap(lambda row: jnp.nonzero(row, size=max_global, fill_value=0)[0])(global_mask)
  present = jnp.arange(max_global)[None, :] < global_mask.sum(axis=1, keepdims=True)
  return positions.astype(jnp.int32), present


def take_rows(x: jax.Array, positions: jax.Array) -> jax.Array:
  """x `[B, T, ...]`, positions `[B, G]` → `[B, G, ...]`."""
  index = positions.reshape(positions.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, index, axis=1)


def replace_global_rows(out, q_rows, k, v, positions, present, *, key_valid, scale):
  """Overwrites the global rows of `out` with full attention over all keys.

  out `[B, T, H, D]`; q_rows `[B, G, H, D]` (the global queries); k, v `[B, T, H, D]`;
  positions, present `[B, G]` from `global_positions`; key_valid `[B, T]` bool.
  Longformer computes these rows with separate global projections; callers pass them here.
  """
  rows, _ = _dense_part(q_rows, k, v, key_valid, scale)
  scatter_at = jnp.where(present, positions, out.shape[1])  # absent slots fall off the end
  batch_index = jnp.arange(out.shape[0])[:, None]
  return out.at[batch_index, scatter_at].set(rows.astype(out.dtype), mode="drop")


# ----------------------------------------------------------------------------- argument checks


def _check_qkv(q, k, v) -> tuple[int, int, int, int]:
  for name, x in (("q", q), ("k", k), ("v", v)):
    if getattr(x, "ndim", None) != 4:
      raise ValueError(
        f"{name} must have rank 4 [batch, length, heads, head_dim]; got shape "
        f"{getattr(x, 'shape', type(x).__name__)}."
      )
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{name} must be a floating dtype; got {x.dtype}.")
  if k.shape != q.shape or v.shape != q.shape:
    raise ValueError(
      f"q, k and v must have the same shape [batch, length, heads, head_dim]; got "
      f"q {q.shape}, k {k.shape}, v {v.shape}."
    )
  if k.dtype != q.dtype or v.dtype != q.dtype:
    raise ValueError(f"q, k and v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}.")
  return q.shape


def _check_dilation(dilation, heads: int) -> tuple[int, ...]:
  per_head = (dilation,) * heads if isinstance(dilation, (int, np.integer)) else tuple(dilation)
  if len(per_head) != heads:
    raise ValueError(
      f"dilation must be an int or a tuple of one int per head ({heads} heads); got a "
      f"sequence of length {len(per_head)}: {dilation!r}."
    )
  for d in per_head:
    if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1:
      raise ValueError(f"dilation values must be ints >= 1; got {dilation!r}.")
  return tuple(int(d) for d in per_head)


def _check_mask(name: str, mask, batch: int, length: int):
  if mask is None:
    return None
  shape = getattr(mask, "shape", None)
  if shape != (batch, length):
    raise ValueError(f"{name} must have shape [batch, length] = {(batch, length)}; got {shape}.")
  if mask.dtype != jnp.bool_:
    raise ValueError(f"{name} must be a bool array; got dtype {mask.dtype}.")
  return jnp.asarray(mask)


def resolve_max_global(global_mask, max_global) -> int:
  if global_mask is None:
    return 0
  counts = _concrete_counts(global_mask)
  if max_global is None:
    if counts is None:
      raise ValueError(
        "global_mask is traced (inside jit/grad/vmap), so the number of global tokens is "
        "not known statically: pass max_global=<largest count of global positions in a row>."
      )
    return int(counts.max())
  is_int = isinstance(max_global, (int, np.integer)) and not isinstance(max_global, bool)
  if not is_int or max_global < 0:
    raise ValueError(f"max_global must be a static int >= 0; got {max_global!r}.")
  if counts is not None and counts.max() > max_global:
    raise ValueError(
      f"global_mask marks {int(counts.max())} positions in one row but max_global is "
      f"{max_global}; raise max_global to at least that count."
    )
  return int(max_global)


def _concrete_counts(global_mask) -> np.ndarray | None:
  """Global positions per row when the mask is concrete, None when it is traced."""
  try:
    return np.asarray(global_mask).sum(axis=1)
  except jax.errors.TracerArrayConversionError:
    return None


# ----------------------------------------------------------------------------- global tokens


def _dense_part(q, k, v, key_valid, scale):
  """Plain masked attention with its log-sum-exp, for the small global blocks.

  q `[B, S, H, D]`, k and v `[B, L, H, D]`, key_valid `[B, L]` →
  (out `[B, S, H, D]` float32, lse `[B, S, H]` float32, −inf where no key is valid).
  """
  scores = _matmul("bshd,blhd->bshl", q, k) * scale
  scores = jnp.where(key_valid[:, None, None, :], scores, -jnp.inf)
  row_max = jax.lax.stop_gradient(_finite_or_zero(scores.max(axis=-1, keepdims=True)))
  weights = jnp.exp(scores - row_max)
  total = weights.sum(axis=-1)
  out = _matmul("bshl,blhd->bshd", weights.astype(v.dtype), v)
  return out / jnp.where(total > 0, total, 1.0)[..., None], row_max[..., 0] + jnp.log(total)


def _merge(out_a, lse_a, out_b, lse_b):
  """Combines two softmaxes over disjoint key sets. out `[B, T, H, D]`, lse `[B, T, H]`."""
  top = jax.lax.stop_gradient(_finite_or_zero(jnp.maximum(lse_a, lse_b)))
  weight_a = jnp.exp(lse_a - top)
  weight_b = jnp.exp(lse_b - top)
  total = weight_a + weight_b
  merged = weight_a[..., None] * out_a + weight_b[..., None] * out_b
  return merged / jnp.where(total > 0, total, 1.0)[..., None]


def _matmul(equation: str, a: jax.Array, b: jax.Array) -> jax.Array:
  """einsum with float32 accumulation and result.

  XLA:CPU has no bfloat16 × bfloat16 → float32 dot for every shape, and a CPU gains nothing
  from half-precision matmuls, so there the operands are widened first. Decided by the
  platform the program is lowered for (a TPU program compiled ahead of time on a CPU keeps
  its bfloat16 matmuls), not the one this process runs on.
  """
  native = lambda a, b: jnp.einsum(equation, a, b, preferred_element_type=jnp.float32)
  if a.dtype == jnp.float32 and b.dtype == jnp.float32:
    return native(a, b)
  widened = lambda a, b: native(a.astype(jnp.float32), b.astype(jnp.float32))
  return jax.lax.platform_dependent(a, b, cpu=widened, default=native)


def _finite_or_zero(x):
  return jnp.where(jnp.isfinite(x), x, 0.0)


# ----------------------------------------------------------------------------- dilation


def _dilated_band(q, k, v, key_valid, window, dilations, scale):
  """Band part for every head, heads grouped by dilation.

  q, k, v `[B, T, H, D]`, key_valid `[B, T]` → (out `[B, T, H, D]` float32, lse `[B, T, H]`).
  """
  heads = q.shape[2]
  outs, lses, order = [], [], []
  for d in sorted(set(dilations)):
    head_ids = [h for h in range(heads) if dilations[h] == d]
    select = _head_selector(head_ids, heads)
    out, lse = _band_one_dilation(
      select(q), select(k), select(v), key_valid, window=window, dilation=d, scale=scale
    )
    outs.append(out)
    lses.append(lse)
    order.extend(head_ids)
  if len(outs) == 1:
    return outs[0], lses[0]
  inverse = np.argsort(order)
  return (
    jnp.concatenate(outs, axis=2)[:, :, inverse],
    jnp.concatenate(lses, axis=2)[:, :, inverse],
  )


def _head_selector(head_ids, heads):
  if head_ids == list(range(heads)):
    return lambda x: x
  if head_ids == list(range(head_ids[0], head_ids[-1] + 1)):
    return lambda x: x[:, :, head_ids[0] : head_ids[-1] + 1]
  return lambda x: x[:, :, np.asarray(head_ids)]


def _band_one_dilation(q, k, v, key_valid, *, window, dilation, scale):
  """Dilated band for heads sharing one dilation d, as a plain band on d sub-sequences.

  Position r + d·i becomes position i of sub-sequence r; sub-sequences are folded into the
  batch. The kernel reads the sequence-major layout `[B·d, chunks, c, H, D]`, which for d = 1
  is a free reshape of `[B, T, H, D]` (no copy of q, k or v). q, k, v `[B, T, H, D]`,
  key_valid `[B, T]` → (out `[B, T, H, D]` float32, lse `[B, T, H]` float32).
  """
  batch, length, heads, head_dim = q.shape
  d = dilation
  sub_length = -(-length // d)
  plan = _Plan(batch * d, heads, sub_length, window, scale)
  padded = plan.num_chunks * plan.chunk

  def regroup(x):  # [B, T, ...] → [B·d, padded, ...] with x[i·d + r] of row b at [b·d + r, i]
    if padded * d != length:
      x = jnp.pad(x, ((0, 0), (0, padded * d - length)) + ((0, 0),) * (x.ndim - 2))
    x = x.reshape(batch, padded, d, *x.shape[2:])
    if d > 1:
      x = jnp.moveaxis(x, 2, 1)
    return x.reshape(batch * d, plan.num_chunks, plan.chunk, *x.shape[3:])

  # One masked chunk on each side: the halo of the first and last query chunks.
  key_bias = jnp.pad(
    jnp.where(regroup(key_valid), 0.0, -jnp.inf), ((0, 0), (1, 1), (0, 0)), constant_values=-jnp.inf
  )
  out, lse = _band_core(plan, regroup(q), regroup(k), regroup(v), key_bias)

  def ungroup(x):  # [B·d, chunks, c, ...] → [B, T, ...]
    x = x.reshape(batch, d, padded, *x.shape[3:])
    if d > 1:
      x = jnp.moveaxis(x, 1, 2)
    return x.reshape(batch, padded * d, *x.shape[3:])[:, :length]

  return ungroup(out), ungroup(lse)


# ----------------------------------------------------------------------------- the band kernel


class _Plan:
  """Static tiling of one plain band problem: chunk size, chunks, chunks per loop step.

  Keys of query chunk a lie in chunks a−1, a, a+1 (chunk >= window), so each chunk meets
  three key chunks, called pieces (−1, 0, +1); with a single chunk only piece 0 exists.
  A loop step takes `block` consecutive query chunks; the last step is moved back to end at
  the last chunk (it recomputes a few chunks rather than padding q, k and v).
  """

  def __init__(self, batch, heads, length, window, scale):
    self.scale = scale
    self.window = min(window, max(length - 1, 1))
    chunk = max(self.window, _MIN_CHUNK)
    self.chunk = min(chunk, length)
    self.pieces = (0,) if self.chunk == length else (-1, 0, 1)
    self.num_chunks = -(-length // self.chunk)
    per_chunk = batch * heads * self.chunk * self.chunk * len(self.pieces)
    most_per_step = max(1, min(self.num_chunks, _BLOCK_SCORE_ELEMENTS // per_chunk))
    self.num_steps = -(-self.num_chunks // most_per_step)
    self.block = -(-self.num_chunks // self.num_steps)  # evens out the steps

  def band(self, piece: int) -> np.ndarray:
    """`[chunk, chunk]` bool: query i of chunk a may see key j of chunk a + piece."""
    offset = np.arange(self.chunk)[None, :] + piece * self.chunk - np.arange(self.chunk)[:, None]
    return np.abs(offset) <= self.window

  def block_start(self, step):
    """First query chunk of loop step `step` (traced int)."""
    return jnp.minimum(step * self.block, self.num_chunks - self.block)


def _heads_first(x):
  """`[B, m, c, H, ...]` → `[B, H, m, c, ...]`: one block, transposed while it is in cache."""
  return jnp.moveaxis(x, 3, 1)


def _heads_last(x):
  """Inverse of `_heads_first`."""
  return jnp.moveaxis(x, 1, 3)


def _key_span(plan, x, start):
  """Key chunks start−1 … start+block of x `[B, n, c, H, D]` as `[B, H, block + 2, c, D]`.

  At either end of the sequence the missing neighbour is replaced by a clamped copy of a
  real chunk; key_bias masks it (its padded chunks are −inf), so its values never count.
  """
  if plan.pieces == (0,):
    middle = jax.lax.dynamic_slice_in_dim(x, start, plan.block, axis=1)
    return _heads_first(jnp.pad(middle, ((0, 0), (1, 1)) + ((0, 0),) * (x.ndim - 2)))
  last = plan.num_chunks - 1
  parts = [
    jax.lax.dynamic_slice_in_dim(x, jnp.maximum(start - 1, 0), 1, axis=1),
    jax.lax.dynamic_slice_in_dim(x, start, plan.block, axis=1),
    jax.lax.dynamic_slice_in_dim(x, jnp.minimum(start + plan.block, last), 1, axis=1),
  ]
  return _heads_first(jnp.concatenate(parts, axis=1))


def _onto_span(x, piece: int):
  """A piece's key gradient `[B, H, block, c, D]` placed on the span of chunks start−1 …
  start+block: piece −1 (the chunk before) shifts it one chunk back, piece +1 one ahead."""
  return jnp.pad(x, ((0, 0), (0, 0), (1 + piece, 1 - piece), (0, 0), (0, 0)))


def _add_span(total, span, start, plan):
  """Adds span `[B, H, block + 2, c, D]` (chunks start−1 … start+block) into `[B, n, c, H, D]`.

  The clamped edge chunks of `_key_span` carry zero gradient, so adding them to the chunk
  they were clamped to changes nothing.
  """
  span = _heads_last(span)
  add_at = lambda total, part, at: jax.lax.dynamic_update_slice_in_dim(
    total, jax.lax.dynamic_slice_in_dim(total, at, part.shape[1], axis=1) + part, at, axis=1
  )
  total = add_at(total, span[:, 1:-1], start)
  if plan.pieces == (0,):
    return total
  total = add_at(total, span[:, :1], jnp.maximum(start - 1, 0))
  return add_at(total, span[:, -1:], jnp.minimum(start + plan.block, plan.num_chunks - 1))


def _block_inputs(plan, q, k, v, key_bias, start):
  """One loop step: scaled q `[B, H, block, c, D]` and, per piece, its key chunks."""
  q_block = _heads_first(jax.lax.dynamic_slice_in_dim(q, start, plan.block, axis=1))
  q_block = q_block * jnp.asarray(plan.scale, q.dtype)
  spans = (
    _key_span(plan, k, start),
    _key_span(plan, v, start),
    jax.lax.dynamic_slice_in_dim(key_bias, start, plan.block + 2, axis=1),
  )
  pieces = [
    tuple(
      span[(slice(None),) * axis + (slice(1 + p, 1 + p + plan.block),)]
      for span, axis in zip(spans, (2, 2, 1))
    )
    for p in plan.pieces
  ]
  return q_block, pieces


def _piece_scores(plan, piece, q_block, k_piece, bias_piece):
  """Masked scores of a block against one key piece: `[B, H, block, c, c]` float32."""
  scores = _matmul("bhncd,bhnkd->bhnck", q_block, k_piece)
  scores = scores + bias_piece[:, None, :, None, :]
  return jnp.where(jnp.asarray(plan.band(piece)), scores, -jnp.inf)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _band_core(plan, q, k, v, key_bias):
  """The plain band on chunked, sequence-major inputs.

  q, k, v `[B, n, c, H, D]` (unscaled), key_bias `[B, n + 2, c]` float32 (0 valid, −inf
  masked; one masked chunk at each end) → (out `[B, n, c, H, D]` f32, lse `[B, n, c, H]` f32).
  """
  return _band_forward(plan, q, k, v, key_bias)


def _band_forward(plan, q, k, v, key_bias):
  def step(index, carry):
    out, lse = carry
    start = plan.block_start(index)
    q_block, pieces = _block_inputs(plan, q, k, v, key_bias, start)
    scores = [
      _piece_scores(plan, p, q_block, k_piece, bias_piece)
      for p, (k_piece, _, bias_piece) in zip(plan.pieces, pieces)
    ]
    row_max = functools.reduce(jnp.maximum, [s.max(axis=-1) for s in scores])
    row_max = _finite_or_zero(row_max)[..., None]
    weights = [jnp.exp(s - row_max) for s in scores]
    total = sum(w.sum(axis=-1) for w in weights)
    acc = sum(
      _matmul("bhnck,bhnkd->bhncd", w.astype(v.dtype), vp) for w, (_, vp, _) in zip(weights, pieces)
    )
    out_block = acc / jnp.where(total > 0, total, 1.0)[..., None]
    lse_block = row_max[..., 0] + jnp.log(total)
    # A recomputed chunk (last step) is written again with the same values.
    return (
      jax.lax.dynamic_update_slice_in_dim(out, _heads_last(out_block), start, axis=1),
      jax.lax.dynamic_update_slice_in_dim(lse, _heads_last(lse_block), start, axis=1),
    )

  out = jnp.zeros(q.shape, jnp.float32)
  lse = jnp.zeros(q.shape[:-1], jnp.float32)
  return jax.lax.fori_loop(0, plan.num_steps, step, (out, lse))


def _band_core_fwd(plan, q, k, v, key_bias):
  out, lse = _band_forward(plan, q, k, v, key_bias)
  return (out, lse), (q, k, v, key_bias, out, lse)


def _band_core_bwd(plan, residuals, cotangents):
  """Flash-attention backward: recompute each block's probabilities from the saved lse.

  With p = softmax(s), o = p·v, lse = log Σ exp(s): ds = p ⊙ (do·vᵀ − Σ(do ⊙ o) + dlse).
  Gradients are accumulated, and the chunks the last step recomputes count zero there.
  """
  q, k, v, key_bias, out, lse = residuals
  d_out, d_lse = cotangents
  row_term = d_lse - jnp.sum(d_out * out, axis=-1)  # [B, n, c, H]
  lse = _finite_or_zero(lse)
  d_out = d_out.astype(v.dtype)

  def step(index, carry):
    d_q, d_k, d_v = carry
    start = plan.block_start(index)
    q_block, pieces = _block_inputs(plan, q, k, v, key_bias, start)
    fresh = (start + jnp.arange(plan.block) >= index * plan.block)[:, None]  # [block, 1]
    take = lambda x: _heads_first(jax.lax.dynamic_slice_in_dim(x, start, plan.block, axis=1))
    d_out_block = jnp.where(fresh[..., None], take(d_out), 0)
    row_block = jnp.where(fresh, take(row_term), 0)[..., None]
    lse_block = take(lse)[..., None]
    d_q_block = d_k_span = d_v_span = 0.0
    for p, (k_piece, v_piece, bias_piece) in zip(plan.pieces, pieces):
      probs = jnp.exp(_piece_scores(plan, p, q_block, k_piece, bias_piece) - lse_block)
      d_probs = _matmul("bhncd,bhnkd->bhnck", d_out_block, v_piece)
      d_scores = (probs * (d_probs + row_block)).astype(q.dtype)
      d_q_block += _matmul("bhnck,bhnkd->bhncd", d_scores, k_piece)
      d_k_span += _onto_span(_matmul("bhnck,bhncd->bhnkd", d_scores, q_block), p)
      d_v_span += _onto_span(_matmul("bhnck,bhncd->bhnkd", probs.astype(v.dtype), d_out_block), p)
    d_q_block = _heads_last(d_q_block * plan.scale)
    d_q = jax.lax.dynamic_update_slice_in_dim(
      d_q, jax.lax.dynamic_slice_in_dim(d_q, start, plan.block, axis=1) + d_q_block, start, axis=1
    )
    return d_q, _add_span(d_k, d_k_span, start, plan), _add_span(d_v, d_v_span, start, plan)

  zeros = lambda x: jnp.zeros(x.shape, jnp.float32)
  d_q, d_k, d_v = jax.lax.fori_loop(0, plan.num_steps, step, (zeros(q), zeros(k), zeros(v)))
  return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype), None


_band_core.defvjp(_band_core_fwd, _band_core_bwd)
