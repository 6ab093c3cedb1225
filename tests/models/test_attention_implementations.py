"""`banded_attention`'s implementations: the splash kernel (TPU interpret mode on this CPU)
against the dense reference and the lax path, outputs and gradients; which one `None` picks.

Tolerance: float32 throughout, 1e-5 absolute on outputs and gradients of unit-scale inputs
(measured differences are below 4e-6: the kernels sum the same terms in another order).
Interpret mode runs the kernel's grid step by step, so sequences are short (T = 300, blocks of
128 keys: several blocks, T not a multiple of one) with two heads of 16.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmvt_jax.models import attention
from cmvt_jax.models.attention import banded_attention
from tests.models.test_attention import dense_reference
from tests.models.test_attention import global_mask_at
from tests.models.test_attention import random_qkv

ATOL = 1e-5
LENGTH = 300


def padding(batch, length, holes):
  """kv_mask `[batch, length]` with the given (row, start, stop) ranges masked."""
  mask = np.ones((batch, length), bool)
  for row, start, stop in holes:
    mask[row, start:stop] = False
  return jnp.asarray(mask)


def outputs_and_gradients(fn, q, k, v, cotangent):
  loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * cotangent)
  return jax.jit(fn)(q, k, v), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)


def assert_implementations_agree(shape, window, *, dilation=1, global_mask=None, kv_mask=None):
  """splash == dense reference == lax, outputs and q/k/v gradients."""
  q, k, v, cotangent = random_qkv(0, shape)
  run = lambda implementation: outputs_and_gradients(
    lambda q, k, v: banded_attention(
      q,
      k,
      v,
      window=window,
      dilation=dilation,
      global_mask=global_mask,
      max_global=None if global_mask is None else 4,
      kv_mask=kv_mask,
      implementation=implementation,
    ),
    q,
    k,
    v,
    cotangent,
  )
  dense = outputs_and_gradients(
    lambda q, k, v: dense_reference(q, k, v, window, dilation, global_mask, kv_mask),
    q,
    k,
    v,
    cotangent,
  )
  splash, lax = run("splash"), run("lax")
  for name, reference in (("dense", dense), ("lax", lax)):
    np.testing.assert_allclose(splash[0], reference[0], atol=ATOL, err_msg=f"output vs {name}")
    for axis, got, want in zip("qkv", splash[1], reference[1]):
      np.testing.assert_allclose(got, want, atol=ATOL, err_msg=f"d{axis} vs {name}")
  return splash


@pytest.mark.parametrize(
  "window,global_rows",
  [
    # Row 0 has no global token: past its padding its queries see no valid key (zero rows).
    (16, [[], [0]]),
    # Not only the CLS: global tokens at any positions, differing per row.
    (64, [[0, 77, LENGTH - 1], [150]]),
    (128, [[0], [0]]),
  ],
)
def test_splash_equals_dense_and_lax_with_global_tokens_and_padding(window, global_rows):
  global_mask = global_mask_at(2, LENGTH, global_rows)
  kv_mask = padding(2, LENGTH, [(0, 240, LENGTH), (1, 100, 150)])
  (out, grads) = assert_implementations_agree(
    (2, LENGTH, 2, 16), window, global_mask=global_mask, kv_mask=kv_mask
  )
  if not global_rows[0]:
    assert np.all(np.asarray(out[0, 241 + window :]) == 0)
  assert all(np.all(np.isfinite(g)) for g in grads)


def test_splash_equals_dense_and_lax_with_dilation_2_on_some_heads():
  """Per-head dilation: the dilation-2 heads regrouped into two sub-sequences, the others
  not, each set through its own kernel call, put back in head order."""
  assert_implementations_agree(
    (2, LENGTH, 3, 16),
    16,
    dilation=(2, 1, 2),
    global_mask=global_mask_at(2, LENGTH, [[0], [0]]),
    kv_mask=padding(2, LENGTH, [(0, 270, LENGTH)]),
  )


def test_splash_on_a_sequence_shorter_than_a_block():
  """A 16-frame clip and its CLS: the kernel pads it to one block."""
  assert_implementations_agree((2, 17, 2, 16), 4, global_mask=global_mask_at(2, 17, [[0], [0]]))


def test_splash_in_chunks_equals_dense_and_lax(monkeypatch):
  """A sequence longer than one kernel call's query blocks goes in chunks (each with a halo
  of keys on either side): here one block of 128 per call, so T = 300 is three chunks."""
  monkeypatch.setattr(attention, "_SPLASH_MAX_QUERY_BLOCKS", 1)
  assert attention._SplashLayout(LENGTH, 16, 1).chunks == 3
  assert_implementations_agree(
    (2, LENGTH, 2, 16),
    16,
    global_mask=global_mask_at(2, LENGTH, [[0], [0, 200]]),
    kv_mask=padding(2, LENGTH, [(0, 250, LENGTH), (1, 120, 140)]),
  )


@pytest.mark.parametrize(
  "length,window,slots,most_blocks",
  [
    (300, 16, 1, 512),
    (300, 128, 0, 512),
    (1000, 9, 3, 512),
    (4099, 64, 1, 512),
    (129, 200, 2, 512),
    (5, 1, 1, 512),
    (300, 16, 1, 1),
    (4099, 64, 2, 3),
    (1000, 200, 0, 2),
  ],
)
def test_splash_block_structure_covers_exactly_the_blocks_the_rule_needs(
  monkeypatch, length, window, slots, most_blocks
):
  """The block pairs written down from the window equal those a dense mask of the kernel's
  layout has any allowed entry in (computed here from positions, not from the layout's
  index arithmetic), in both orientations (forward/dq and dkv), for one call and in chunks."""
  monkeypatch.setattr(attention, "_SPLASH_MAX_QUERY_BLOCKS", most_blocks)
  layout = attention._SplashLayout(length, window, slots)
  block, stride = layout.block, layout.stride
  # Each key slot: its key-local position, or -1 for a global copy (with its block).
  key_block = np.arange(layout.key_blocks * block) // block
  offset = np.arange(layout.key_blocks * block) % block
  position = np.where(offset < slots, -1, key_block * stride + offset - slots)
  query = layout.halo + np.arange(layout.chunk)[:, None]  # key-local positions
  real = (position[None, :] >= 0) & (position[None, :] < layout.key_positions)
  allowed = real & (np.abs(query - position[None, :]) <= window)
  allowed |= (position[None, :] == -1) & (query // stride == key_block[None, :])
  pairs = allowed.reshape(layout.query_blocks, block, layout.key_blocks, block).any(axis=(1, 3))

  forward, backward = layout.mask_infos()
  np.testing.assert_array_equal(forward.q_sequence, query[:, 0])
  visited = np.zeros_like(pairs)
  rows = np.arange(layout.query_blocks)[:, None]
  on = np.asarray(forward.block_mask[0]) == 1
  visited[np.broadcast_to(rows, on.shape)[on], np.asarray(forward.data_next[0])[on]] = True
  np.testing.assert_array_equal(visited, pairs)

  visited = np.zeros_like(pairs)
  columns = np.arange(layout.key_blocks)[None, :]
  on = np.asarray(backward.block_mask[0]) == 1
  visited[np.asarray(backward.data_next[0])[on], np.broadcast_to(columns, on.shape)[on]] = True
  np.testing.assert_array_equal(visited, pairs)


def test_none_is_lax_when_the_program_runs_on_a_cpu():
  q, k, v, _ = random_qkv(1, (1, 1100, 2, 16))  # long enough for splash on a TPU
  mask = global_mask_at(1, 1100, [[0]])
  run = lambda implementation: jax.jit(
    lambda q: banded_attention(q, k, v, window=8, global_mask=mask, implementation=implementation)
  )(q)
  np.testing.assert_array_equal(run(None), run("lax"))
  lowered = jax.jit(lambda q: banded_attention(q, k, v, window=8)).lower(q).as_text()
  assert "splash" not in lowered and "tpu_custom_call" not in lowered


@pytest.mark.parametrize(
  "kwargs,match",
  [
    (dict(implementation="cudnn"), r"implementation must be None .*\('lax', 'splash'\).*'cudnn'"),
    (
      dict(implementation="splash", dtype=jnp.float16),
      "implementation='splash' cannot run this: the kernel takes float32 or bfloat16, not float16",
    ),
    (
      dict(implementation="splash", global_mask=jnp.ones((2, 40), bool)),
      r"cannot run this: max_global=40 global tokens: at most 32 fit .*implementation='lax'",
    ),
  ],
)
def test_bad_implementation_arguments_raise_clear_errors(kwargs, match):
  dtype = kwargs.pop("dtype", jnp.float32)
  x = jnp.zeros((2, 40, 2, 8), dtype)
  with pytest.raises(ValueError, match=match):
    banded_attention(x, x, x, window=4, **kwargs)
