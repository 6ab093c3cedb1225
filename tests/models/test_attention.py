"""banded_attention against a dense attention written plainly here, plus its O(T·w) claims."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmvt_jax.models import attention
from cmvt_jax.models.attention import banded_attention


def dense_reference(q, k, v, window, dilation=1, global_mask=None, kv_mask=None):
  """The rule of `banded_attention`'s docstring as a T×T mask, softmax, matmul (small T)."""
  batch, length, heads, head_dim = q.shape
  per_head = np.broadcast_to(np.asarray(dilation), (heads,))[:, None, None]
  offset = np.arange(length)[:, None] - np.arange(length)[None, :]
  allowed = (np.abs(offset) <= window * per_head) & (offset % per_head == 0)  # [H, T, T]
  allowed = jnp.asarray(allowed)[None]
  if global_mask is not None:
    allowed = allowed | global_mask[:, None, :, None] | global_mask[:, None, None, :]
  if kv_mask is not None:
    allowed = allowed & kv_mask[:, None, None, :]
  scores = jnp.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(head_dim)
  scores = jnp.where(allowed, scores, -jnp.inf)
  row_max = jax.lax.stop_gradient(scores.max(-1, keepdims=True))
  weights = jnp.exp(scores - jnp.where(jnp.isfinite(row_max), row_max, 0.0))
  total = weights.sum(-1, keepdims=True)
  probs = weights / jnp.where(total > 0, total, 1.0)
  return jnp.einsum("bhij,bjhd->bihd", probs, v)


def random_qkv(seed, shape, dtype=jnp.float32):
  keys = jax.random.split(jax.random.key(seed), 4)
  return tuple(jax.random.normal(key, shape, dtype) for key in keys)


def global_mask_at(batch, length, rows):
  mask = np.zeros((batch, length), bool)
  for b, positions in enumerate(rows):
    mask[b, positions] = True
  return jnp.asarray(mask)


def assert_matches_dense(
  shape, window, dilation=1, global_mask=None, kv_mask=None, max_global=None, atol=1e-5
):
  """Outputs and q/k/v gradients of banded_attention equal the dense reference."""
  q, k, v, cotangent = random_qkv(0, shape)
  banded = lambda q, k, v: banded_attention(
    q,
    k,
    v,
    window=window,
    dilation=dilation,
    global_mask=global_mask,
    max_global=max_global,
    kv_mask=kv_mask,
  )
  dense = lambda q, k, v: dense_reference(q, k, v, window, dilation, global_mask, kv_mask)
  np.testing.assert_allclose(jax.jit(banded)(q, k, v), dense(q, k, v), atol=atol)
  loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v) * cotangent)
  got = jax.jit(jax.grad(loss(banded), argnums=(0, 1, 2)))(q, k, v)
  want = jax.jit(jax.grad(loss(dense), argnums=(0, 1, 2)))(q, k, v)
  for name, g, w in zip("qkv", got, want):
    np.testing.assert_allclose(g, w, atol=atol, err_msg=f"gradient of {name}")


@pytest.mark.parametrize("length,window", [(64, 4), (200, 40), (257, 32), (100, 7), (33, 1)])
def test_plain_window_matches_dense(length, window):
  assert_matches_dense((2, length, 2, 8), window)


@pytest.mark.parametrize("dilation", [2, 4])
def test_dilation_matches_dense(dilation):
  assert_matches_dense((2, 150, 2, 8), window=5, dilation=dilation)


def test_per_head_dilation_matches_dense():
  assert_matches_dense((1, 121, 4, 8), window=6, dilation=(1, 2, 4, 2))


def test_global_tokens_first_last_arbitrary_differing_per_row():
  length = 90
  rows = [[0, length - 1, 37], [5], [0, 1, 2]]  # several per row, different per batch row
  assert_matches_dense((3, length, 2, 8), window=4, global_mask=global_mask_at(3, length, rows))


def test_global_tokens_with_dilation_and_padding():
  length = 77
  kv_mask = np.ones((2, length), bool)
  kv_mask[0, 60:] = False
  kv_mask[1, [3, 10, 11]] = False
  assert_matches_dense(
    (2, length, 4, 8),
    window=3,
    dilation=(1, 2, 3, 4),
    global_mask=global_mask_at(2, length, [[0, 40], [76]]),
    kv_mask=jnp.asarray(kv_mask),
  )


def test_kv_padding_matches_dense():
  kv_mask = np.ones((2, 130), bool)
  kv_mask[0, 100:] = False
  kv_mask[1, ::7] = False
  assert_matches_dense((2, 130, 2, 8), window=16, kv_mask=jnp.asarray(kv_mask))


def test_kv_padding_changes_the_output():
  q, k, v, _ = random_qkv(1, (1, 50, 1, 8))
  kv_mask = jnp.arange(50)[None, :] < 45
  plain = jax.jit(lambda q: banded_attention(q, k, v, window=8))(q)
  padded = jax.jit(lambda q: banded_attention(q, k, v, window=8, kv_mask=kv_mask))(q)
  assert not np.allclose(plain[0, 40:], padded[0, 40:])
  np.testing.assert_allclose(plain[0, :30], padded[0, :30], atol=1e-6)


@pytest.mark.parametrize("length,window", [(50, 50), (50, 200), (1, 3), (2, 1)])
def test_window_at_least_length_is_full_attention(length, window):
  assert_matches_dense((2, length, 2, 8), window)
  q, k, v, _ = random_qkv(2, (2, length, 2, 8))
  full = jax.nn.dot_product_attention(q, k, v)
  got = jax.jit(lambda q: banded_attention(q, k, v, window=window))(q)
  np.testing.assert_allclose(got, full, atol=1e-5)


def test_all_masked_rows_are_zero_and_gradients_finite():
  length = 70
  kv_mask = np.ones((2, length), bool)
  kv_mask[0, :] = False  # every key of row 0 masked
  kv_mask[1, 20:50] = False  # queries 30..39 see no key within window 5
  kv_mask = jnp.asarray(kv_mask)
  q, k, v, _ = random_qkv(3, (2, length, 2, 8))
  f = lambda q, k, v: banded_attention(q, k, v, window=5, kv_mask=kv_mask)
  out = jax.jit(f)(q, k, v)
  assert np.all(np.asarray(out[0]) == 0)
  assert np.all(np.asarray(out[1, 30:40]) == 0)
  grads = jax.jit(jax.grad(lambda *a: f(*a).sum(), argnums=(0, 1, 2)))(q, k, v)
  assert all(np.all(np.isfinite(g)) for g in grads)
  assert_matches_dense((2, length, 2, 8), window=5, kv_mask=kv_mask)


@pytest.mark.slow  # a long sequence against the dense reference
def test_many_loop_steps_match_dense(monkeypatch):
  # A small live-score budget forces one chunk per loop step (exercises the step edges).
  monkeypatch.setattr(attention, "_BLOCK_SCORE_ELEMENTS", 1)
  assert_matches_dense((1, 300, 2, 8), window=32, global_mask=global_mask_at(1, 300, [[150]]))
  monkeypatch.setattr(attention, "_BLOCK_SCORE_ELEMENTS", 3 * 2 * 2 * 32 * 32 * 3)
  # 11 chunks in steps of 3: the last step is moved back and recomputes one chunk.
  assert_matches_dense(
    (2, 333, 2, 8), window=32, kv_mask=jnp.broadcast_to(jnp.arange(333) < 320, (2, 333))
  )
  assert_matches_dense((1, 333, 2, 8), window=16, dilation=(1, 3))


@pytest.mark.parametrize("dtype,atol", [(jnp.bfloat16, 3e-2), (jnp.float16, 5e-3)])
def test_half_precision_inputs_within_tolerance(dtype, atol):
  """bf16 has an 8-bit mantissa: outputs of unit-scale attention agree to ~2^-6."""
  q, k, v, _ = random_qkv(4, (2, 160, 2, 16))
  mask = global_mask_at(2, 160, [[0], [80]])
  got = jax.jit(lambda q, k, v: banded_attention(q, k, v, window=12, global_mask=mask))(
    *(x.astype(dtype) for x in (q, k, v))
  )
  assert got.dtype == dtype
  want = dense_reference(q, k, v, 12, global_mask=mask)
  np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=atol)
  grads = jax.jit(
    jax.grad(lambda q: banded_attention(q, q, q, window=12).astype(jnp.float32).sum())
  )(q.astype(dtype))
  assert np.all(np.isfinite(np.asarray(grads, np.float32)))


@pytest.mark.parametrize("shape", [(8, 5, 2, 16), (2, 300, 2, 16)])
def test_bfloat16_runs_jitted_with_gradients(shape):
  """Every kernel size compiles and runs in bf16 (XLA:CPU lacks some bf16→f32 dots)."""
  q = jax.random.normal(jax.random.key(10), shape).astype(jnp.bfloat16)
  mask = jnp.zeros(shape[:2], bool).at[:, 0].set(True)
  f = lambda q: banded_attention(q, q, q, window=4, global_mask=mask, max_global=1)
  grads = jax.jit(jax.grad(lambda q: f(q).astype(jnp.float32).sum()))(q)
  assert grads.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(grads, np.float32)))


def test_large_scores_stay_finite():
  q, k, v, _ = random_qkv(5, (1, 100, 1, 8))
  got = jax.jit(lambda q, k: banded_attention(q, k, v, window=10, scale=1.0))(q * 300.0, k * 300.0)
  want = dense_reference(q * 300.0 / math.sqrt(8), k * 300.0, v, 10)
  np.testing.assert_allclose(got, want, atol=1e-4)


def test_agrees_with_jax_local_window_attention():
  q, k, v, _ = random_qkv(6, (2, 256, 4, 16))
  want = jax.nn.dot_product_attention(q, k, v, local_window_size=(24, 24))
  got = jax.jit(lambda q: banded_attention(q, k, v, window=24))(q)
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_jit_with_traced_global_mask_needs_max_global():
  q, k, v, _ = random_qkv(7, (2, 60, 2, 8))
  mask = global_mask_at(2, 60, [[0, 59], [30]])
  jitted = jax.jit(lambda q, m: banded_attention(q, k, v, window=4, global_mask=m, max_global=2))
  np.testing.assert_allclose(
    jitted(q, mask), dense_reference(q, k, v, 4, global_mask=mask), atol=1e-5
  )
  with pytest.raises(ValueError, match="max_global"):
    jax.jit(lambda q, m: banded_attention(q, k, v, window=4, global_mask=m))(q, mask)


def test_padding_global_slots_beyond_the_count():
  """max_global larger than the rows' counts: absent slots change nothing."""
  q, k, v, _ = random_qkv(8, (2, 40, 2, 8))
  mask = global_mask_at(2, 40, [[3], []])
  got = jax.jit(lambda q: banded_attention(q, k, v, window=3, global_mask=mask, max_global=4))(q)
  np.testing.assert_allclose(got, dense_reference(q, k, v, 3, global_mask=mask), atol=1e-5)


def test_vmap_and_remat():
  q, k, v, _ = random_qkv(9, (2, 1, 40, 2, 8))  # an extra leading axis for vmap
  mask = jnp.zeros((2, 1, 40), bool).at[:, :, 0].set(True)
  f = lambda q, k, v, m: banded_attention(q, k, v, window=6, global_mask=m, max_global=1)
  got = jax.jit(jax.vmap(f))(q, k, v, mask)
  want = jax.vmap(lambda q, k, v, m: dense_reference(q, k, v, 6, global_mask=m))(q, k, v, mask)
  np.testing.assert_allclose(got, want, atol=1e-5)
  loss = lambda q: jnp.sum(jax.checkpoint(f)(q, k[0], v[0], mask[0]) ** 2)
  plain = lambda q: jnp.sum(f(q, k[0], v[0], mask[0]) ** 2)
  np.testing.assert_allclose(
    jax.jit(jax.grad(loss))(q[0]), jax.jit(jax.grad(plain))(q[0]), atol=1e-6
  )


# ----------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
  "kwargs,match",
  [
    (dict(q=jnp.zeros((2, 10, 8))), r"q must have rank 4.*\(2, 10, 8\)"),
    (dict(k=jnp.zeros((2, 11, 2, 4))), r"same shape.*k \(2, 11, 2, 4\)"),
    (dict(v=jnp.zeros((2, 10, 2, 4), jnp.bfloat16)), "share a dtype"),
    (dict(window=0), "window must be an int >= 1"),
    (dict(window=2.5), "window must be an int >= 1"),
    (dict(dilation=0), "dilation values must be ints >= 1"),
    (dict(dilation=(1, 2, 3)), r"one int per head \(2 heads\).*length 3"),
    (dict(kv_mask=jnp.ones((2, 9), bool)), r"kv_mask must have shape.*\(2, 10\).*\(2, 9\)"),
    (dict(kv_mask=jnp.ones((2, 10), jnp.int32)), "kv_mask must be a bool array.*int32"),
    (dict(global_mask=jnp.ones((10,), bool)), r"global_mask must have shape.*\(10,\)"),
    (dict(global_mask=jnp.ones((2, 10), bool), max_global=3), "raise max_global to at least"),
    (dict(global_mask=jnp.ones((2, 10), bool), max_global=-1), "max_global must be"),
  ],
)
def test_bad_arguments_raise_clear_errors(kwargs, match):
  args = dict(
    q=jnp.zeros((2, 10, 2, 4)), k=jnp.zeros((2, 10, 2, 4)), v=jnp.zeros((2, 10, 2, 4)), window=2
  )
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    banded_attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)


# ----------------------------------------------------------------------------- O(T·w), no timing


def _walk(jaxpr, multiplier=1):
  """Yields (equation, how many times it runs) through every sub-jaxpr, scans unrolled."""
  for eqn in jaxpr.eqns:
    yield eqn, multiplier
    if eqn.primitive.name == "while":
      raise AssertionError("a while loop has no static trip count; cannot count its cost")
    inner = multiplier * eqn.params.get("length", 1)
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        if hasattr(sub, "eqns"):
          yield from _walk(sub, inner)
        elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
          yield from _walk(sub.jaxpr, inner)


def _forward_backward_jaxpr(length, window=128, heads=8, head_dim=64):
  x = jax.ShapeDtypeStruct((1, length, heads, head_dim), jnp.float32)
  mask = jax.ShapeDtypeStruct((1, length), jnp.bool_)

  def loss(q, k, v, global_mask):
    out = banded_attention(q, k, v, window=window, global_mask=global_mask, max_global=2)
    return jnp.sum(out * out)

  return jax.make_jaxpr(jax.value_and_grad(loss, argnums=(0, 1, 2)))(x, x, x, mask).jaxpr


def _dot_flops(jaxpr) -> int:
  total = 0
  for eqn, times in _walk(jaxpr):
    if eqn.primitive.name == "dot_general":
      (contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      out_size = math.prod(eqn.outvars[0].aval.shape)
      total += times * 2 * out_size * math.prod(lhs[d] for d in contract)
  return total


def test_no_intermediate_grows_as_length_squared():
  length = 16384
  jaxpr = _forward_backward_jaxpr(length)
  biggest = max(
    math.prod(getattr(var.aval, "shape", ())) for eqn, _ in _walk(jaxpr) for var in eqn.outvars
  )
  # Linear tensors ([T, heads, head_dim] ≈ T·512 here) stay far below T²/8; one T×T score
  # matrix of a single head would not.
  assert biggest < length**2 // 8, f"an intermediate has {biggest} elements"

  x = jax.ShapeDtypeStruct((1, length, 8, 64), jnp.float32)
  mask = jax.ShapeDtypeStruct((1, length), jnp.bool_)
  hlo = (
    jax.jit(
      jax.grad(
        lambda q, k, v, g: jnp.sum(
          banded_attention(q, k, v, window=128, global_mask=g, max_global=2) ** 2
        ),
        argnums=(0, 1, 2),
      )
    )
    .lower(x, x, x, mask)
    .compile()
    .as_text()
  )
  sizes = [
    math.prod(int(d) for d in dims.split(",") if d)
    for dims in re.findall(r"(?:f32|bf16|f16|s32|pred|u8|s8|u32)\[([0-9,]*)\]", hlo)
  ]
  assert max(sizes) < length**2 // 8, f"a compiled buffer has {max(sizes)} elements"


def test_dot_flops_grow_linearly_with_length():
  at_t = _dot_flops(_forward_backward_jaxpr(8192))
  at_2t = _dot_flops(_forward_backward_jaxpr(16384))
  assert at_t > 0
  assert abs(at_2t / (2 * at_t) - 1) < 0.15, (at_t, at_2t)
  # The band's forward+backward is 8 chunk-sized products of 2·T·(3w)·D per head; a dense
  # T×T forward alone would be 4·T²·D per head.
  band_estimate = 8 * 2 * 16384 * 3 * 128 * 64 * 8
  assert abs(at_2t / band_estimate - 1) < 0.15, (at_2t, band_estimate)
