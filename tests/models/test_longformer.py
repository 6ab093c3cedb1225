"""LongformerEncoder: shapes, per-layer schedules, global projections, masks, remat."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmvt_jax.models.longformer import LongformerEncoder
from cmvt_jax.models.longformer import LongformerSelfAttention

WIDTH, HEADS, LENGTH = 16, 2, 24


def cls_mask(batch=2, length=LENGTH):
  return jnp.zeros((batch, length), bool).at[:, 0].set(True)


def encoder(**overrides):
  settings = dict(
    num_layers=2, num_heads=HEADS, mlp_dim=32, windows=[2, 4], dilations=[1, (1, 2)], max_global=1
  )
  settings.update(overrides)
  return LongformerEncoder(**settings)


def test_output_shape_and_per_layer_schedule():
  model = encoder()
  x = jax.random.normal(jax.random.key(0), (2, LENGTH, WIDTH))
  params = jax.jit(model.init)(jax.random.key(1), x, global_mask=cls_mask())
  out = jax.jit(lambda p, x: model.apply(p, x, global_mask=cls_mask()))(params, x)
  assert out.shape == (2, LENGTH, WIDTH)
  assert sorted(params["params"]) == ["final_norm", "layer_0", "layer_1"]


def test_attention_layer_matches_dense_multihead_attention():
  """The layer (no global tokens) equals projections + dense banded attention + output."""
  layer = LongformerSelfAttention(num_heads=HEADS, window=3)
  x = jax.random.normal(jax.random.key(2), (2, LENGTH, WIDTH))
  params = jax.jit(layer.init)(jax.random.key(3), x)["params"]
  project = lambda name: (
    jnp.einsum("btd,dhk->bthk", x, params[name]["kernel"]) + params[name].get("bias", 0.0)
  )
  assert "bias" not in params["key"]  # a key bias only shifts whole rows of scores
  q, k, v = project("query"), project("key"), project("value")
  offset = np.arange(LENGTH)[:, None] - np.arange(LENGTH)[None, :]
  scores = jnp.einsum("bihd,bjhd->bhij", q, k) / np.sqrt(WIDTH // HEADS)
  scores = jnp.where(np.abs(offset) <= 3, scores, -jnp.inf)
  mixed = jnp.einsum("bhij,bjhd->bihd", jax.nn.softmax(scores, axis=-1), v)
  want = jnp.einsum("bthk,hkd->btd", mixed, params["out"]["kernel"]) + params["out"]["bias"]
  got = jax.jit(lambda p: layer.apply({"params": p}, x))(params)
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_global_projections_change_only_global_rows():
  layer = LongformerSelfAttention(num_heads=HEADS, window=3, max_global=2)
  x = jax.random.normal(jax.random.key(4), (2, LENGTH, WIDTH))
  mask = jnp.zeros((2, LENGTH), bool).at[0, 0].set(True).at[0, 10].set(True).at[1, 23].set(True)
  params = jax.jit(layer.init)(jax.random.key(5), x, mask)["params"]
  # Perturb only the global projections.
  changed = dict(params)
  for name in ("query_global", "key_global", "value_global"):
    changed[name] = jax.tree.map(lambda p: p + 0.5, params[name])
  apply = jax.jit(lambda p: layer.apply({"params": p}, x, mask))
  before, after = np.asarray(apply(params)), np.asarray(apply(changed))
  differs = np.abs(before - after).max(axis=-1) > 1e-4  # [B, T]
  np.testing.assert_array_equal(differs, np.asarray(mask))


def test_without_global_projections_global_rows_use_shared_ones():
  layer = LongformerSelfAttention(num_heads=HEADS, window=3, max_global=1, global_projections=False)
  x = jnp.ones((1, LENGTH, WIDTH))
  params = jax.jit(layer.init)(jax.random.key(6), x, cls_mask(1))["params"]
  assert "query_global" not in params


def test_kv_mask_hides_padding_from_valid_rows():
  model = encoder()
  x = jax.random.normal(jax.random.key(7), (1, LENGTH, WIDTH))
  valid = jnp.arange(LENGTH)[None, :] < 16
  params = jax.jit(model.init)(jax.random.key(8), x, global_mask=cls_mask(1))
  apply = jax.jit(lambda x: model.apply(params, x, global_mask=cls_mask(1), kv_mask=valid))
  noisy = x.at[:, 16:].set(100.0)  # whatever sits in the padding must not matter
  np.testing.assert_allclose(apply(x)[:, :16], apply(noisy)[:, :16], atol=1e-5)


@pytest.mark.slow  # compiles gradients with and without remat
def test_remat_gives_the_same_gradients_and_dropout_needs_rng():
  x = jax.random.normal(jax.random.key(9), (2, LENGTH, WIDTH))
  plain, rematted = encoder(dropout_rate=0.1), encoder(dropout_rate=0.1, remat=True)
  params = jax.jit(plain.init)(jax.random.key(10), x, global_mask=cls_mask())
  grad = lambda model: jax.jit(
    jax.grad(
      lambda p: jnp.sum(
        model.apply(
          p, x, global_mask=cls_mask(), deterministic=False, rngs={"dropout": jax.random.key(11)}
        )
        ** 2
      )
    )
  )(params)
  for a, b in zip(jax.tree.leaves(grad(plain)), jax.tree.leaves(grad(rematted))):
    np.testing.assert_allclose(a, b, atol=1e-5)
  train = jax.jit(
    lambda key: plain.apply(
      params, x, global_mask=cls_mask(), deterministic=False, rngs={"dropout": key}
    )
  )
  assert not np.allclose(train(jax.random.key(0)), train(jax.random.key(1)))


def test_every_attention_implementation_gives_the_same_layers():
  """`attention_implementation` reaches every layer's `banded_attention`: "splash" (TPU
  interpret mode here) gives what "lax" gives, outputs and parameter gradients, with the
  global projections of the CLS row and padding."""
  x = jax.random.normal(jax.random.key(13), (2, LENGTH, WIDTH))
  kv_mask = jnp.arange(LENGTH)[None, :] < jnp.array([[LENGTH], [LENGTH - 5]])
  layers = dict(windows=[2, 3], dilations=[1, 1])  # one kernel shape per layer: fast to interpret
  params = jax.jit(encoder(**layers).init)(jax.random.key(14), x, global_mask=cls_mask())
  results = {}
  for implementation in ("lax", "splash"):
    model = encoder(**layers, attention_implementation=implementation)

    def loss(p, model=model):
      out = model.apply(p, x, global_mask=cls_mask(), kv_mask=kv_mask)
      return jnp.sum(jnp.sin(out)), out

    results[implementation] = jax.jit(jax.grad(loss, has_aux=True))(params)
  # Element by element: the summed loss cancels to ~0.1, so its relative error says nothing
  # (2e-5 on the CI machine from float32 summation order alone).
  (splash_grads, splash_out), (lax_grads, lax_out) = results["splash"], results["lax"]
  np.testing.assert_allclose(splash_out, lax_out, atol=1e-5)
  for a, b in zip(jax.tree.leaves(splash_grads), jax.tree.leaves(lax_grads)):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_bfloat16_compute_keeps_float32_params():
  model = encoder(dtype=jnp.bfloat16)
  x = jnp.ones((1, LENGTH, WIDTH))
  params = jax.jit(model.init)(jax.random.key(12), x, global_mask=cls_mask(1))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  out = jax.jit(lambda p: model.apply(p, x, global_mask=cls_mask(1)))(params)
  assert out.dtype == jnp.bfloat16


def test_wrong_schedule_lengths_and_widths_are_refused():
  x = jnp.ones((1, LENGTH, WIDTH))
  with pytest.raises(ValueError, match=r"windows needs one entry, or one per layer \(2\); got 3"):
    encoder(windows=[1, 2, 3]).init(jax.random.key(0), x)
  # One entry applies to every layer, like an int.
  one = encoder(windows=[2]).init(jax.random.key(0), x)
  assert jax.tree.structure(one) == jax.tree.structure(
    encoder(windows=2).init(jax.random.key(0), x)
  )
  with pytest.raises(ValueError, match="divisible by num_heads=3"):
    encoder(num_heads=3).init(jax.random.key(0), x)
