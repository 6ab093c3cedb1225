"""Longformer attention (sliding window, dilated, global) in O(T·window) time and memory.

`banded_attention(q, k, v, window=w, dilation=d, global_mask=g)` computes, for every query i,
softmax attention over the keys j with `|i - j| <= w·d` and `(i - j) % d == 0`, plus every
global key, and for every global query over all keys (the rule is spelled out in
`banded_attention`'s docstring). Nothing of size T×T is ever built. Two implementations
compute it, with the same semantics and gradients:

"lax", the reference, pure jax.lax/jnp, tuned for CPU caches (and what runs on GPUs):

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
* Global tokens. Their positions are gathered into a padded list of static length
  `max_global`. Every query attends to the global keys in a separate [T, max_global] block;
  global keys are masked out of the band so no key is counted twice; the two partial
  softmaxes are merged through their log-sum-exps (stable: each side is scaled by
  exp(lse_side − max)).

"splash", jax's Pallas TPU kernel (`jax.experimental.pallas.ops.tpu.splash_attention`), with
its own backward kernels; on a CPU it runs in TPU interpret mode (how the tests check it):

* The band is the kernel's mask function, and its block structure (which query block meets
  which key block: O(T / block) pairs) is written down directly rather than found by
  splash's mask processing, which visits every block pair in Python.
* Global keys go through the kernel too, without a second pass to merge: the key sequence
  is laid out in blocks of `block` slots, the first `max_global` of which hold copies of
  the global keys and the rest the next positions of the sequence. A query sees the copies
  in the block that holds its own position and no other, so each global key counts once,
  and every key block still meets only the query blocks near it (a global column in the
  mask would make every query block meet the first key block: a quadratic backward grid).
* Padding and absent global slots are segment ids (0 masked, 1 valid); the score scale is
  applied to q first; queries with no valid key are set to zero afterwards (the kernel
  would average the masked values). Sequences longer than 512 query blocks go to the kernel
  in chunks folded into the batch, each with `window` extra keys per side (the block lists
  live in the TPU's small scalar memory). Under a jit traced for a mesh the kernel runs in
  `shard_map` over the batch (a `pallas_call` has no partitioning rule of its own).

Shared by both:

* Dilation. A dilated window is a plain window on interleaved sub-sequences: positions
  r, r+d, r+2d, … (r = 0 … d−1) only ever see each other, so the sequence is regrouped into
  d sub-sequences of length ⌈T/d⌉, folded into the batch, and the plain kernel runs with
  window w. Per-head dilation (a tuple) regroups each set of heads that shares a dilation.
* Global queries attend to all T keys in a [max_global, T] block that replaces their rows.

Softmax statistics are float32 whatever the input dtype; a query with no valid key gets zeros.
`implementation=None` picks "splash" when the program is compiled for a TPU (also ahead of
time, from a CPU) and the kernel can express the case, else "lax".
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask_info as mask_info

# The implementations `banded_attention` can be asked for (None: chosen per platform).
IMPLEMENTATIONS = ("lax", "splash")

# Smallest query chunk. Below ~32 positions the per-chunk matmuls are too small to run well;
# chunks never shrink below the window either (the halo must fit in one neighbouring chunk).
_MIN_CHUNK = 32
# Scores live per loop step (elements, all pieces): ~8 MiB of float32, measured best on CPU.
_BLOCK_SCORE_ELEMENTS = 1 << 21

# Splash blocks (queries and keys alike) are powers of two from 128 (a TPU vector's lanes;
# the kernel's smallest) to 512 (splash's default), the smallest one of at least 2·window:
# a query block then meets two or three key blocks. Without a TPU to time them on, these
# follow the kernel's constraints and defaults, not measurements.
_SPLASH_BLOCKS = (128, 256, 512)
# `implementation=None` keeps shorter sequences on "lax": a clip of 16 frames would be one
# mostly padded block of the kernel.
_SPLASH_MIN_LENGTH = 1024
# Global key copies may take at most this share of a key block (the rest holds the band).
_SPLASH_MAX_SLOT_SHARE = 4
# Query blocks per kernel call; longer sequences are cut into chunks (see `_SplashLayout`).
_SPLASH_MAX_QUERY_BLOCKS = 512
_SPLASH_DTYPES = (jnp.float32, jnp.bfloat16)


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
  implementation: str | None = None,
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
    implementation: None (the best for the platform the program is compiled for, and the
      shapes), "lax" (the reference, jax.lax/jnp) or "splash" (jax's Pallas TPU kernel; TPU
      interpret mode when the program runs elsewhere, which is slow: for tests).

  Query i attends key j iff `kv_mask[b, j]` and (`|i - j| <= window * dilation` and
  `(i - j) % dilation == 0`, or `global_mask[b, i]`, or `global_mask[b, j]`).

  Returns:
    `[batch, length, heads, head_dim]` in the dtype of q; rows with no valid key are zero.
  """
  batch, length, heads, head_dim = _check_qkv(q, k, v)
  dilations = _check_dilation(dilation, heads)
  if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
    raise ValueError(f"window must be an int >= 1, got {window!r}.")
  if implementation is not None and implementation not in IMPLEMENTATIONS:
    raise ValueError(
      f"implementation must be None (chosen by the platform compiled for) or one of "
      f"{IMPLEMENTATIONS}; got {implementation!r}."
    )
  window = int(window)
  kv_mask = _check_mask("kv_mask", kv_mask, batch, length)
  global_mask = _check_mask("global_mask", global_mask, batch, length)
  max_global = resolve_max_global(global_mask, max_global)
  scale = head_dim**-0.5 if scale is None else float(scale)

  problem = _Problem(
    key_valid=jnp.ones((batch, length), bool) if kv_mask is None else kv_mask,
    global_mask=global_mask,
    max_global=max_global,
    window=window,
    dilations=dilations,
    scale=scale,
  )
  lax_path = functools.partial(_lax_attention, problem)
  splash_path = lambda interpret: functools.partial(_splash_attention, problem, interpret)
  unsupported = _splash_unsupported(q, max_global, window)
  if implementation == "lax":
    return lax_path(q, k, v)
  if implementation == "splash":
    if unsupported:
      raise ValueError(f"implementation='splash' cannot run this: {unsupported}.")
    return jax.lax.platform_dependent(q, k, v, tpu=splash_path(False), default=splash_path(True))
  if unsupported or length < _SPLASH_MIN_LENGTH:
    return lax_path(q, k, v)
  return jax.lax.platform_dependent(q, k, v, tpu=splash_path(False), default=lax_path)


def _splash_unsupported(q: jax.Array, max_global: int, window: int) -> str | None:
  """Why the splash kernel cannot compute `banded_attention` for q `[B, T, H, D]` with
  `max_global` global tokens (traced under the current abstract mesh), or None if it can."""
  if q.dtype not in _SPLASH_DTYPES:
    return f"the kernel takes float32 or bfloat16, not {q.dtype}"
  most = _splash_block(window) // _SPLASH_MAX_SLOT_SHARE
  if max_global > most:
    return (
      f"max_global={max_global} global tokens: at most {most} fit beside a window of "
      f"{window} (use implementation='lax')"
    )
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty and q.shape[0] % mesh.size:
    return (
      f"the batch of {q.shape[0]} rows does not split evenly over the {mesh.size} devices "
      "of the mesh being traced for"
    )
  return None


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


@dataclasses.dataclass(frozen=True)
class _Problem:
  """One `banded_attention` call's checked arguments, except q, k and v."""

  key_valid: jax.Array  # [B, T] bool
  global_mask: jax.Array | None  # [B, T] bool
  max_global: int
  window: int
  dilations: tuple[int, ...]
  scale: float

  @property
  def band_keys(self) -> jax.Array:
    """`[B, T]` bool: the keys the band may see (global keys are attended separately)."""
    if self.global_mask is None:
      return self.key_valid
    return self.key_valid & ~self.global_mask

  def global_keys(self, k, v):
    """(k, v of the global positions `[B, G, H, D]`, valid `[B, G]`, positions, present)."""
    positions, present = global_positions(self.global_mask, self.max_global)
    valid = present & jnp.take_along_axis(self.key_valid, positions, axis=1)
    return take_rows(k, positions), take_rows(v, positions), valid, positions, present

  def with_global_rows(self, out, q, k, v, positions, present):
    """`out` with its global rows replaced by full attention (`replace_global_rows`)."""
    q_rows = take_rows(q, positions)
    return replace_global_rows(
      out, q_rows, k, v, positions, present, key_valid=self.key_valid, scale=self.scale
    )


def _lax_attention(problem: _Problem, q, k, v):
  """`banded_attention` by the lax loop; `[B, T, H, D]` in q's dtype."""
  out, lse = _per_dilation(
    problem.dilations,
    lambda d, q, k, v: _band_one_dilation(
      q, k, v, problem.band_keys, window=problem.window, dilation=d, scale=problem.scale
    ),
    q,
    k,
    v,
  )
  if not problem.max_global:
    return out.astype(q.dtype)
  k_global, v_global, global_valid, positions, present = problem.global_keys(k, v)
  out_g, lse_g = _dense_part(q, k_global, v_global, global_valid, problem.scale)
  out = _merge(out, lse, out_g, lse_g)
  return problem.with_global_rows(out, q, k, v, positions, present).astype(q.dtype)


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


def _per_dilation(dilations, group, *arrays):
  """`group(d, *arrays_of_those_heads)` for each set of heads sharing a dilation d.

  arrays: `[B, *, H, ...]` (heads on axis 2). `group` returns a tuple of `[B, T, H_d, ...]`
  arrays; the groups' results are put back in head order.
  """
  heads = arrays[0].shape[2]
  results, order = [], []
  for d in sorted(set(dilations)):
    head_ids = [h for h in range(heads) if dilations[h] == d]
    select = _head_selector(head_ids, heads)
    results.append(group(d, *(select(x) for x in arrays)))
    order.extend(head_ids)
  if len(results) == 1:
    return results[0]
  inverse = np.argsort(order)
  return tuple(jnp.concatenate(parts, axis=2)[:, :, inverse] for parts in zip(*results))


def _head_selector(head_ids, heads):
  if head_ids == list(range(heads)):
    return lambda x: x
  if head_ids == list(range(head_ids[0], head_ids[-1] + 1)):
    return lambda x: x[:, :, head_ids[0] : head_ids[-1] + 1]
  return lambda x: x[:, :, np.asarray(head_ids)]


def _regroup(x, d: int, sub_length: int):
  """`[B, T, ...]` → `[B·d, sub_length, ...]`: position i·d + r of row b goes to row b·d + r,
  position i (zero-padded to sub_length·d positions first). A free reshape when d = 1."""
  batch, length = x.shape[:2]
  if sub_length * d != length:
    x = jnp.pad(x, ((0, 0), (0, sub_length * d - length)) + ((0, 0),) * (x.ndim - 2))
  x = x.reshape(batch, sub_length, d, *x.shape[2:])
  if d > 1:
    x = jnp.moveaxis(x, 2, 1)
  return x.reshape(batch * d, sub_length, *x.shape[3:])


def _ungroup(x, d: int, length: int):
  """Inverse of `_regroup`: `[B·d, n, ...]` → `[B, length, ...]`."""
  rows, sub_length = x.shape[0] // d, x.shape[1]
  x = x.reshape(rows, d, *x.shape[1:])
  if d > 1:
    x = jnp.moveaxis(x, 1, 2)
  return x.reshape(rows, sub_length * d, *x.shape[3:])[:, :length]


def _band_one_dilation(q, k, v, key_valid, *, window, dilation, scale):
  """Dilated band for heads sharing one dilation d, as a plain band on d sub-sequences.

  Position r + d·i becomes position i of sub-sequence r; sub-sequences are folded into the
  batch. The kernel reads the sequence-major layout `[B·d, chunks, c, H, D]`, which for d = 1
  is a free reshape of `[B, T, H, D]` (no copy of q, k or v). q, k, v `[B, T, H, D]`,
  key_valid `[B, T]` → (out `[B, T, H, D]` float32, lse `[B, T, H]` float32).
  """
  batch, length, heads, head_dim = q.shape
  d = dilation
  plan = _Plan(batch * d, heads, -(-length // d), window, scale)
  padded = plan.num_chunks * plan.chunk

  def regroup(x):  # [B, T, ...] → [B·d, chunks, c, ...]
    x = _regroup(x, d, padded)
    return x.reshape(batch * d, plan.num_chunks, plan.chunk, *x.shape[2:])

  # One masked chunk on each side: the halo of the first and last query chunks.
  key_bias = jnp.pad(
    jnp.where(regroup(key_valid), 0.0, -jnp.inf), ((0, 0), (1, 1), (0, 0)), constant_values=-jnp.inf
  )
  out, lse = _band_core(plan, regroup(q), regroup(k), regroup(v), key_bias)
  ungroup = lambda x: _ungroup(x.reshape(batch * d, padded, *x.shape[3:]), d, length)
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


# ----------------------------------------------------------------------------- splash (TPU)


def _splash_attention(problem: _Problem, interpret: bool, q, k, v):
  """`banded_attention` by the splash kernel (`interpret`: TPU interpret mode, for a program
  that does not run on a TPU); `[B, T, H, D]` in q's dtype."""
  batch, length = q.shape[:2]
  if problem.max_global:
    k_global, v_global, global_valid, positions, present = problem.global_keys(k, v)
  else:
    k_global, v_global, global_valid = k[:, :0], v[:, :0], jnp.zeros((batch, 0), bool)

  def rows(q, k, v, k_global, v_global, band_keys, global_valid):
    group = lambda d, q, k, v, k_global, v_global: (
      _splash_one_dilation(
        q,
        k,
        v,
        k_global,
        v_global,
        band_keys,
        global_valid,
        window=problem.window,
        dilation=d,
        scale=problem.scale,
        interpret=interpret,
      ),
    )
    return _per_dilation(problem.dilations, group, q, k, v, k_global, v_global)[0]

  out = _over_batch_shards(rows, q, k, v, k_global, v_global, problem.band_keys, global_valid)
  if problem.max_global:
    out = problem.with_global_rows(out, q, k, v, positions, present)
  return out.astype(q.dtype)


def _over_batch_shards(fn, *args):
  """`fn(*args)`, each argument `[B, ...]`, on each device's rows of the batch when traced
  for a mesh (`jax.sharding.use_abstract_mesh`, as the train and embed steps are): the batch
  is split over every mesh axis there, and a `pallas_call` cannot be partitioned by GSPMD."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return fn(*args)
  rows = jax.sharding.PartitionSpec(mesh.axis_names)
  return jax.shard_map(fn, mesh=mesh, in_specs=rows, out_specs=rows, check_vma=False)(*args)


def _splash_one_dilation(
  q, k, v, k_global, v_global, band_keys, global_valid, *, window, dilation, scale, interpret
):
  """Heads sharing one dilation d: regrouped into d sub-sequences (as the lax path does),
  the band and the global keys in one kernel call, rows with no valid key zeroed.

  q, k, v `[B, T, H, D]`; k_global, v_global `[B, G, H, D]`; band_keys `[B, T]` and
  global_valid `[B, G]` bool → `[B, T, H, D]` in q's dtype.
  """
  batch, length = q.shape[:2]
  sub_length = -(-length // dilation)
  regroup = lambda x: _regroup(x, dilation, sub_length)
  each_sub_sequence = lambda x: jnp.repeat(x, dilation, axis=0)  # [B, ...] → [B·d, ...]
  band_valid = regroup(band_keys)
  global_valid = each_sub_sequence(global_valid)
  layout = _SplashLayout(sub_length, window, k_global.shape[1])
  out = layout.attention(
    layout.queries(regroup(q) * jnp.asarray(scale, q.dtype)),
    layout.keys(regroup(k), each_sub_sequence(k_global)),
    layout.keys(regroup(v), each_sub_sequence(v_global)),
    layout.keys(band_valid, global_valid),
    interpret=interpret,
  )
  out = layout.outputs(out)
  reach = _keys_in_reach(band_valid, window) | global_valid.any(axis=1, keepdims=True)
  out = jnp.where(reach[:, :, None, None], out, jnp.zeros((), out.dtype))
  return _ungroup(out, dilation, length)


def _keys_in_reach(valid: jax.Array, window: int) -> jax.Array:
  """valid `[N, n]` bool → `[N, n]` bool: is any valid key within ±window of each position
  (prefix sums: O(n) whatever the window)."""
  length = valid.shape[1]
  before = jnp.pad(jnp.cumsum(valid, axis=1, dtype=jnp.int32), ((0, 0), (1, 0)))
  position = np.arange(length)
  return (
    before[:, np.minimum(position + window + 1, length)]
    > before[:, np.maximum(position - window, 0)]
  )


def _splash_block(window: int) -> int:
  """The kernel's query and key block size for a window (see `_SPLASH_BLOCKS`)."""
  return next((b for b in _SPLASH_BLOCKS if b >= 2 * window), _SPLASH_BLOCKS[-1])


@dataclasses.dataclass(frozen=True)
class _BandMask:
  """The kernel's mask function: may query i see key slot j of `_SplashLayout`'s key layout.

  Key block b (slots b·block … b·block + block − 1) holds `slots` copies of the global keys,
  then positions b·stride … b·stride + stride − 1 (stride = block − slots). Query i sees a
  position p when |i − p| <= window, and the global copies of the block that holds position
  i. Called by the kernel on int32 index tiles: only shifts, masks and compares (block is a
  power of two), which the TPU's vector units have.
  """

  window: int
  block: int
  slots: int

  def __call__(self, query: jax.Array, key: jax.Array) -> jax.Array:
    block_index = key >> (self.block.bit_length() - 1)
    offset = key & (self.block - 1)
    stride = self.block - self.slots
    first = block_index * stride
    in_band = jnp.abs(query - (first + offset - self.slots)) <= self.window
    if not self.slots:
      return in_band
    is_copy = offset < self.slots
    own_block = (query >= first) & (query < first + stride)
    # Boolean and/or, not a select: Mosaic has no select on boolean vectors.
    return (is_copy & own_block) | (~is_copy & in_band)


@dataclasses.dataclass(frozen=True)
class _SplashLayout:
  """One plain band problem for the splash kernel: n positions, a window, G global slots.

  The sequence goes to the kernel in chunks of at most `_SPLASH_MAX_QUERY_BLOCKS` query
  blocks, folded into the batch: each chunk's keys are its own positions plus `halo` =
  window positions on either side. A TPU keeps the kernel's block lists in its scalar memory
  (1 MiB on a v5e), one 512-byte row per query block: unchunked, 524,288 positions in blocks
  of 256 needed 1.25 MiB and did not compile. Queries are padded to whole blocks; keys are
  laid out as `_BandMask` describes, in key-local positions (a chunk's first key is position
  0, its first query position `halo`). The block structure (which query block meets which
  key block) follows from the window and the layout, so it is computed directly: O(chunk /
  block) arrays, the same for every chunk.
  """

  length: int
  window: int
  slots: int

  @property
  def block(self) -> int:
    return _splash_block(self.window)

  @property
  def stride(self) -> int:
    """Positions per key block."""
    return self.block - self.slots

  @property
  def chunk(self) -> int:
    """Queries per kernel call (a whole number of blocks)."""
    return min(-(-self.length // self.block), _SPLASH_MAX_QUERY_BLOCKS) * self.block

  @property
  def chunks(self) -> int:
    return -(-self.length // self.chunk)

  @property
  def halo(self) -> int:
    """Key positions before and after a chunk's queries (none when there is one chunk)."""
    return self.window if self.chunks > 1 else 0

  @property
  def key_positions(self) -> int:
    return self.chunk + 2 * self.halo if self.chunks > 1 else self.length

  @property
  def query_blocks(self) -> int:
    return self.chunk // self.block

  @property
  def key_blocks(self) -> int:
    return -(-self.key_positions // self.stride)

  def queries(self, x: jax.Array) -> jax.Array:
    """`[N, n, ...]` → the chunks `[N·chunks, chunk, ...]` (zero-padded)."""
    x = _pad_positions(x, 0, self.chunks * self.chunk - self.length)
    return x.reshape(x.shape[0] * self.chunks, self.chunk, *x.shape[2:])

  def outputs(self, x: jax.Array) -> jax.Array:
    """Inverse of `queries`: `[N·chunks, chunk, ...]` → `[N, n, ...]`."""
    return x.reshape(-1, self.chunks * self.chunk, *x.shape[2:])[:, : self.length]

  def keys(self, x: jax.Array, global_rows: jax.Array) -> jax.Array:
    """x `[N, n, ...]`, global_rows `[N, G, ...]` → the key layout of each chunk
    `[N·chunks, key_blocks·block, ...]` (positions outside the sequence are zero: False for
    a validity mask)."""
    rows, chunk, halo, chunks = x.shape[0], self.chunk, self.halo, self.chunks
    if chunks > 1:
      # Position p at index p + halo; chunk c's keys are indices [c·chunk, (c+1)·chunk + 2·halo).
      x = _pad_positions(x, halo, (chunks + 1) * chunk - self.length)
      part = lambda start: x[:, start : start + chunks * chunk].reshape(
        rows, chunks, chunk, *x.shape[2:]
      )
      x = jnp.concatenate([part(0)[:, :, :halo], part(halo), part(halo + chunk)[:, :, :halo]], 2)
      x = x.reshape(rows * chunks, self.key_positions, *x.shape[3:])
      global_rows = jnp.repeat(global_rows, chunks, axis=0)
    x = _pad_positions(x, 0, self.key_blocks * self.stride - self.key_positions)
    x = x.reshape(x.shape[0], self.key_blocks, self.stride, *x.shape[2:])
    if self.slots:
      copies = jnp.broadcast_to(
        global_rows[:, None], (x.shape[0], self.key_blocks, *global_rows.shape[1:])
      )
      x = jnp.concatenate([copies, x], axis=2)
    return x.reshape(x.shape[0], self.key_blocks * self.block, *x.shape[3:])

  def block_pairs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(first, last key block of each query block; first, last query block of each key
    block): the block pairs where some query may see some key, as ranges."""
    block, stride, window, halo = self.block, self.stride, self.window, self.halo
    last_key_position, last_query = self.key_positions - 1, self.chunk - 1
    query_block = np.arange(self.query_blocks)
    key_block = np.arange(self.key_blocks)
    # Query block i covers key-local positions [halo + i·block, halo + (i+1)·block) and sees
    # ±window around them; key block j holds positions [j·stride, (j+1)·stride) (its global
    # copies are seen by the queries of those positions, a subset).
    first_key = np.maximum(halo + query_block * block - window, 0) // stride
    last_key = np.minimum(halo + (query_block + 1) * block - 1 + window, last_key_position)
    first_query = np.maximum(key_block * stride - window - halo, 0) // block
    last_query = np.minimum(
      np.minimum((key_block + 1) * stride - 1, last_key_position) + window - halo, last_query
    )
    return first_key, last_key // stride, first_query, last_query // block

  def mask_infos(self) -> tuple[mask_info.MaskInfo, mask_info.MaskInfo]:
    """The kernel's (forward and dq, dkv) `MaskInfo`s: for each row of the grid the blocks to
    visit (`data_next`) and whether to visit them (`block_mask`), padded to the widest row.
    Every visited block gets the mask function (block_mask 1)."""
    first_key, last_key, first_query, last_query = self.block_pairs()
    queries = self.halo + jnp.arange(self.chunk, dtype=jnp.int32)  # key-local positions
    forward = _visits(first_key, last_key, pad_front=False)
    # dkv's grid runs over key blocks, then the query blocks of each (its arrays are
    # [1, query visits, key blocks]); splash pads those lists at the front.
    backward = tuple(x.transpose(0, 2, 1) for x in _visits(first_query, last_query, pad_front=True))
    make = lambda visits: mask_info.MaskInfo(
      data_next=jnp.asarray(visits[0]),
      mask_next=None,
      block_mask=jnp.asarray(visits[1]),
      partial_mask_blocks=None,
      q_sequence=queries,
    )
    return make(forward), make(backward)

  def attention(self, q, k, v, key_valid, *, interpret: bool) -> jax.Array:
    """q `[N·chunks, chunk, H, D]` (`queries`, scaled); k, v `[N·chunks, L, H, D]` and
    key_valid `[N·chunks, L]` (`keys`) → `[N·chunks, chunk, H, D]` in q's dtype (a row with
    no valid key: unspecified values)."""
    forward, backward = self.mask_infos()
    block = self.block
    sizes = splash.BlockSizes(
      block_q=block,
      block_kv=block,
      block_kv_compute=block,
      block_q_dkv=block,
      block_kv_dkv=block,
      block_kv_dkv_compute=block,
      block_q_dq=block,
      block_kv_dq=block,
    )
    kernel = splash.SplashAttentionKernel(
      forward,
      forward,
      backward,
      block_sizes=sizes,
      is_mqa=False,
      save_residuals=False,
      mask_value=splash.DEFAULT_MASK_VALUE,
      attn_logits_soft_cap=None,
      residual_checkpoint_name=None,
      mask_function=_BandMask(self.window, block, self.slots),
      interpret=interpret,
    )
    segments = splash.SegmentIds(q=jnp.ones(q.shape[:2], jnp.int32), kv=key_valid.astype(jnp.int32))
    heads_first = lambda x: jnp.moveaxis(x, 2, 1)  # the kernel's [heads, length, head_dim]
    out = jax.vmap(kernel)(heads_first(q), heads_first(k), heads_first(v), segments)
    return jnp.moveaxis(out, 1, 2)


def _pad_positions(x: jax.Array, before: int, after: int) -> jax.Array:
  """`[N, n, ...]` zero-padded along the positions."""
  return jnp.pad(x, ((0, 0), (before, after)) + ((0, 0),) * (x.ndim - 2))


def _visits(first: np.ndarray, last: np.ndarray, *, pad_front: bool):
  """Grid rows visiting blocks first[r] … last[r] → (data_next int32, block_mask int8), each
  `[1, rows, width]`. Padding entries repeat a visited block (no new copy is fetched) and
  are not computed (block_mask 0)."""
  count = (last - first + 1)[:, None]
  width = int(count.max())
  column = np.arange(width)[None, :]
  step = column - (width - count) if pad_front else column
  visited = (step >= 0) & (step < count)
  data_next = first[:, None] + np.clip(step, 0, count - 1)
  return data_next[None].astype(np.int32), visited[None].astype(np.int8)
