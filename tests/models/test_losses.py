"""NT-Xent losses against optax and numpy references; the temperature; the objective."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cmvt_jax import losses
from cmvt_jax import run as run_lib
from cmvt_jax.data import pipeline
from cmvt_jax.models import cmvt
from configs import micro


def unit(x):
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def log_softmax(logits):
  shifted = logits - logits.max(axis=1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def numpy_cross_modal(video, audio, temperature):
  logits = unit(video.astype(np.float64)) @ unit(audio.astype(np.float64)).T / temperature
  n = len(video)
  v2a = -np.mean([log_softmax(logits)[i, i] for i in range(n)])
  a2v = -np.mean([log_softmax(logits.T)[i, i] for i in range(n)])
  return (v2a + a2v) / 2


def numpy_nt_xent(a, b, temperature):
  z = unit(np.concatenate([a, b]).astype(np.float64))
  n = len(a)
  total = 0.0
  for i in range(2 * n):
    positive = (i + n) % (2 * n)
    others = [j for j in range(2 * n) if j != i]
    scores = np.array([z[i] @ z[j] / temperature for j in others])
    total -= z[i] @ z[positive] / temperature - np.log(np.exp(scores).sum())
  return total / (2 * n)


def embeddings(n, d, seed):
  return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


@pytest.mark.parametrize("temperature", [0.07, 0.5])
def test_nt_xent_equals_optax_and_numpy(temperature):
  a, b = embeddings(6, 5, 0), embeddings(6, 5, 1)
  loss = losses.nt_xent(a, b, temperature)
  labels = jnp.concatenate([jnp.arange(6), jnp.arange(6)])
  np.testing.assert_allclose(
    loss, optax.losses.ntxent(jnp.concatenate([a, b]), labels, temperature), rtol=1e-5
  )
  np.testing.assert_allclose(loss, numpy_nt_xent(a, b, temperature), rtol=1e-5)


@pytest.mark.parametrize("temperature", [0.07, 0.5])
def test_cross_modal_nt_xent_equals_numpy(temperature):
  video, audio = embeddings(7, 4, 2), embeddings(7, 4, 3) * 3  # scale: normalised inside
  np.testing.assert_allclose(
    losses.cross_modal_nt_xent(video, audio, temperature),
    numpy_cross_modal(video, audio, temperature),
    rtol=1e-5,
  )


def test_losses_are_near_zero_for_identical_well_separated_pairs():
  z = np.eye(16, dtype=np.float32) * 5  # orthogonal: every negative has cosine 0
  assert float(losses.cross_modal_nt_xent(z, z, 0.05)) < 1e-6
  assert float(losses.nt_xent(z, z, 0.05)) < 1e-6


def test_losses_are_near_log_n_for_random_embeddings():
  n = 256
  video, audio = embeddings(n, 512, 4), embeddings(n, 512, 5)  # near-orthogonal in 512-D
  np.testing.assert_allclose(losses.cross_modal_nt_xent(video, audio, 1.0), math.log(n), rtol=0.02)
  np.testing.assert_allclose(losses.nt_xent(video, audio, 1.0), math.log(2 * n - 1), rtol=0.02)


def test_bfloat16_embeddings_give_float32_losses_and_finite_gradients():
  video = jnp.asarray(embeddings(32, 16, 6), jnp.bfloat16)
  audio = jnp.asarray(embeddings(32, 16, 7), jnp.bfloat16)
  for loss_fn in (losses.cross_modal_nt_xent, losses.nt_xent):
    loss, grads = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1)))(video, audio, 0.01)
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(
      loss, loss_fn(video.astype(jnp.float32), audio.astype(jnp.float32), 0.01), rtol=1e-5
    )
    for grad in grads:
      assert grad.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(grad)))
      assert float(jnp.abs(grad.astype(jnp.float32)).max()) > 0


def test_losses_reject_mismatched_shapes():
  with pytest.raises(ValueError, match=r"z_video and z_audio .* \(4, 3\) and \(5, 3\)"):
    losses.cross_modal_nt_xent(np.zeros((4, 3)), np.zeros((5, 3)), 0.1)
  with pytest.raises(ValueError, match="N >= 2"):
    losses.nt_xent(np.ones((1, 3)), np.ones((1, 3)), 0.1)


def test_learnable_temperature_gets_a_gradient_and_stays_in_range():
  temperature = losses.Temperature(initial=0.1, learnable=True, minimum=0.05, maximum=0.2)
  objective = losses.ContrastiveLoss(temperature=temperature)
  video, audio = embeddings(8, 4, 8), embeddings(8, 4, 9)
  grad_of = jax.jit(jax.grad(lambda log_t: objective(log_t, video, audio)[0]))
  log_t = temperature.init()
  assert math.isclose(float(temperature(log_t)), 0.1, rel_tol=1e-6)
  grad = grad_of(log_t)
  assert math.isfinite(float(grad)) and float(grad) != 0
  # Plain gradient descent with a large step, projected after every update as the trainer does.
  for _ in range(20):
    log_t = temperature.clamp(log_t - 10.0 * grad_of(log_t))
    assert 0.05 - 1e-7 <= float(temperature(log_t)) <= 0.2 + 1e-7
  assert math.isclose(float(temperature(log_t)), 0.2, rel_tol=1e-6)  # it ran into the bound...
  assert float(grad_of(log_t)) != 0  # ...and, projected onto it, can still move back
  # Whatever the parameter holds, the value is clipped into range.
  assert math.isclose(float(temperature(jnp.float32(5.0))), 0.2, rel_tol=1e-6)
  assert math.isclose(float(temperature(jnp.float32(-9.0))), 0.05, rel_tol=1e-6)


def test_fixed_temperature_has_no_gradient():
  temperature = losses.Temperature(initial=0.3, learnable=False)
  objective = losses.ContrastiveLoss(temperature=temperature)
  video, audio = embeddings(8, 4, 10), embeddings(8, 4, 11)
  grad = jax.grad(lambda log_t: objective(log_t, video, audio)[0])(jnp.float32(-1.0))
  assert float(grad) == 0
  np.testing.assert_allclose(
    objective(jnp.float32(-1.0), video, audio)[0], numpy_cross_modal(video, audio, 0.3), rtol=1e-5
  )


def test_temperature_range_is_checked():
  with pytest.raises(ValueError, match="min_temperature"):
    losses.Temperature(initial=0.5, minimum=0.01, maximum=0.2)


def test_objective_weights_both_terms_over_two_views():
  objective = losses.ContrastiveLoss(
    temperature=losses.Temperature(initial=0.2), cross_modal_weight=0.7, intra_modal_weight=0.3
  )
  v1, a1, v2, a2 = (embeddings(6, 4, seed) for seed in range(12, 16))
  loss, metrics = objective(jnp.log(0.2), v1, a1, z_video_view2=v2, z_audio_view2=a2)
  cross = (numpy_cross_modal(v1, a1, 0.2) + numpy_cross_modal(v2, a2, 0.2)) / 2
  intra = (numpy_nt_xent(v1, v2, 0.2) + numpy_nt_xent(a1, a2, 0.2)) / 2
  np.testing.assert_allclose(loss, 0.7 * cross + 0.3 * intra, rtol=1e-5)
  np.testing.assert_allclose(metrics["intra_modal_loss"], intra, rtol=1e-5)
  np.testing.assert_allclose(metrics["temperature"], 0.2, rtol=1e-6)
  with pytest.raises(ValueError, match="intra_modal_weight=0.3 needs a second"):
    objective(jnp.log(0.2), v1, a1)


# Clips 1, 4 and 5 have no audio: left out, the loss must be that of the other five.
HAS_AUDIO = np.array([True, False, True, True, False, False, True, True])


@pytest.mark.parametrize(
  "loss, reference",
  [(losses.cross_modal_nt_xent, numpy_cross_modal), (losses.nt_xent, numpy_nt_xent)],
)
def test_masked_losses_and_gradients_equal_those_of_the_batch_without_the_masked_rows(
  loss, reference
):
  video, audio = embeddings(8, 5, 10), embeddings(8, 5, 11)
  kept = HAS_AUDIO
  masked = lambda v, a: loss(v, a, 0.2, mask=jnp.asarray(kept))
  np.testing.assert_allclose(
    masked(video, audio), reference(video[kept], audio[kept], 0.2), rtol=1e-5
  )
  gradients = jax.grad(masked, argnums=(0, 1))(video, audio)
  reduced = jax.grad(lambda v, a: loss(v, a, 0.2), argnums=(0, 1))(video[kept], audio[kept])
  for full, small in zip(gradients, reduced):
    np.testing.assert_allclose(full[kept], small, rtol=1e-5, atol=1e-7)
    assert not np.asarray(full[~kept]).any()  # a left-out clip gets no gradient at all


def test_a_batch_with_one_or_no_audio_gives_zero_and_finite_gradients():
  video, audio = embeddings(4, 3, 12), embeddings(4, 3, 13)
  for mask in ([False] * 4, [False, True, False, False]):
    mask = jnp.asarray(mask)
    loss, grads = jax.value_and_grad(
      lambda v, mask=mask: losses.cross_modal_nt_xent(v, audio, 0.1, mask=mask)
    )(video)
    assert float(loss) == 0.0 and np.isfinite(grads).all()


def test_objective_leaves_audioless_clips_out_of_the_cross_modal_and_audio_terms_only():
  v1, v2, a1, a2 = (embeddings(8, 5, seed) for seed in (20, 21, 22, 23))
  objective = losses.ContrastiveLoss(
    temperature=losses.Temperature(0.2, learnable=False),
    cross_modal_weight=1.0,
    intra_modal_weight=0.5,
  )
  loss, metrics = objective(
    jnp.zeros(()), v1, a1, z_video_view2=v2, z_audio_view2=a2, has_audio=jnp.asarray(HAS_AUDIO)
  )
  k = HAS_AUDIO
  cross = (numpy_cross_modal(v1[k], a1[k], 0.2) + numpy_cross_modal(v2[k], a2[k], 0.2)) / 2
  # The video's intra-modal term still trains on every clip; the audio's on those with audio.
  intra = (numpy_nt_xent(v1, v2, 0.2) + numpy_nt_xent(a1[k], a2[k], 0.2)) / 2
  np.testing.assert_allclose(metrics["cross_modal_loss"], cross, rtol=1e-5)
  np.testing.assert_allclose(metrics["intra_modal_loss"], intra, rtol=1e-5)
  np.testing.assert_allclose(loss, cross + 0.5 * intra, rtol=1e-5)


def test_model_gradient_with_audioless_clips_equals_the_batch_without_them():
  """The micro model end to end: a batch with audioless clips gives the cross-modal loss
  and the parameter gradient of the same batch with those clips removed."""
  config = micro.get_config()
  model = cmvt.from_config(config)
  spec_video, spec_audio = run_lib.example_inputs(
    pipeline.InputSpec.from_config(config.input), batch=8
  )
  rng = np.random.default_rng(0)
  video = rng.normal(size=spec_video.shape).astype(np.float32)
  audio = rng.normal(size=spec_audio.shape).astype(np.float32)
  params = jax.jit(model.init)(jax.random.key(0), video[:1], audio[:1])["params"]
  objective = losses.ContrastiveLoss.from_config(config.loss)

  def loss(params, video, audio, has_audio):
    out = model.apply({"params": params}, video, audio)
    return objective(jnp.log(0.1), out["video"], out["audio"], has_audio=has_audio)[0]

  loss_and_grad = jax.jit(jax.value_and_grad(loss))
  with_audioless, grads = loss_and_grad(params, video, audio, jnp.asarray(HAS_AUDIO))
  without, reference = loss_and_grad(
    params, video[HAS_AUDIO], audio[HAS_AUDIO], jnp.ones(HAS_AUDIO.sum(), bool)
  )
  np.testing.assert_allclose(with_audioless, without, rtol=1e-5)
  for (path, ours), theirs in zip(
    jax.tree_util.tree_leaves_with_path(grads), jax.tree_util.tree_leaves(reference)
  ):
    np.testing.assert_allclose(
      ours, theirs, rtol=2e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path)
    )
