"""CMVT from the configs: shapes (tiny for real, base abstractly), heads, precision, remat."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cmvt_jax import losses
from cmvt_jax.models import cmvt
from configs import default
from configs import vtn_base
from tests.models.test_frame_encoder import padded_batch
from tests.models.test_frame_encoder import random_params
from tests.models.test_frame_encoder import release_checkpoint


def input_shapes(config, batch):
  """Video `[B, T, S, S, 3]` and log-mel `[B, F, M]` as the input pipeline makes them."""
  inputs = config.input
  audio_frames = round(inputs.num_frames / inputs.fps * inputs.sample_rate) // inputs.hop_length
  return (
    (batch, inputs.num_frames, inputs.frame_size, inputs.frame_size, 3),
    (batch, audio_frames, inputs.n_mels),
  )


def random_inputs(config, batch, seed=0):
  video_shape, audio_shape = input_shapes(config, batch)
  video_key, audio_key = jax.random.split(jax.random.key(seed))
  return jax.random.normal(video_key, video_shape), jax.random.normal(audio_key, audio_shape)


def count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.fixture(scope="module")
def tiny():
  """The default config's model (with a 5-class head), its parameters and a small batch."""
  config = default.get_config()
  config.model.num_classes = 5
  model = cmvt.from_config(config)
  video, audio = random_inputs(config, batch=2)
  params = jax.jit(model.init)(jax.random.key(0), video, audio)["params"]
  return config, model, params, video, audio


def test_tiny_default_shapes(tiny):
  config, model, params, video, audio = tiny
  out = jax.jit(model.apply)({"params": params}, video, audio)
  embed, width = config.model.embed_dim, config.model.video.temporal.width
  assert {k: (v.shape, v.dtype) for k, v in out.items()} == {
    "video": ((2, embed), jnp.float32),
    "audio": ((2, embed), jnp.float32),
    "video_features": ((2, width), jnp.float32),
    "audio_features": ((2, config.model.audio.temporal.width), jnp.float32),
    "logits": ((2, 5), jnp.float32),
  }
  # The single-modality methods give the same numbers.
  embed_video = jax.jit(lambda p, v: model.apply(p, v, method=cmvt.CMVT.embed_video))
  np.testing.assert_allclose(
    embed_video({"params": params}, video)["embedding"], out["video"], atol=1e-5
  )
  embed_audio = jax.jit(lambda p, a: model.apply(p, a, method=cmvt.CMVT.embed_audio))
  np.testing.assert_allclose(
    embed_audio({"params": params}, audio)["embedding"], out["audio"], atol=1e-5
  )
  classify = jax.jit(lambda p, v: model.apply(p, v, method=cmvt.CMVT.classify))
  np.testing.assert_allclose(classify({"params": params}, video), out["logits"], atol=1e-5)
  # Whole videos, many times the clip length, embed with the same parameters.
  whole = embed_video({"params": params}, jnp.concatenate([video] * 8, axis=1))
  assert whole["embedding"].shape == (2, embed)


def test_padding_masks_give_the_embeddings_of_the_unpadded_inputs():
  config = default.get_config()
  model = cmvt.from_config(config)
  video_shape, audio_shape = input_shapes(config, batch=2)
  params = random_params(model, jnp.zeros(video_shape), jnp.zeros(audio_shape))
  # Row 0 a whole clip, row 1 shorter (an odd number of log-mel frames); both padded with
  # garbage, video to 11 frames, audio to 83 log-mel frames.
  frames, audio_frames = (8, 5), (64, 37)
  rng = np.random.default_rng(2)
  video = rng.standard_normal((2, 11) + video_shape[2:], np.float32)
  frame_mask = np.arange(11) < np.asarray(frames)[:, None]
  padded_video = np.where(frame_mask[:, :, None, None, None], video, 1e3 * video[:, ::-1])
  padded_audio, audio_rows, audio_mask = padded_batch(audio_frames, 83, config.input.n_mels)
  apply = jax.jit(model.apply)
  out = apply(params, padded_video, padded_audio, frame_mask=frame_mask, audio_mask=audio_mask)
  for n in range(2):
    alone = apply(params, video[n : n + 1, : frames[n]], audio_rows[n])
    for key in ("video", "audio", "video_features", "audio_features"):
      np.testing.assert_allclose(out[key][n], alone[key][0], atol=1e-5, rtol=1e-5, err_msg=key)


def test_classify_needs_a_head(tiny):
  config, _, params, video, _ = tiny
  config = default.get_config()
  with pytest.raises(ValueError, match="num_classes > 0"):
    cmvt.from_config(config).apply({"params": params}, video, method=cmvt.CMVT.classify)


def test_vtn_base_shapes_and_temporal_parameter_count():
  config = vtn_base.get_config()
  model = cmvt.from_config(config)
  video, audio = (jax.ShapeDtypeStruct(s, jnp.float32) for s in input_shapes(config, 2))
  params = jax.eval_shape(model.init, jax.random.key(0), video, audio)["params"]
  out = jax.eval_shape(lambda p, v, a: model.apply({"params": p}, v, a), params, video, audio)
  assert out["video"].shape == out["audio"].shape == (2, 512)
  assert out["video_features"].shape == (2, 768)

  assert count(params["video_encoder"]["frame_encoder"]) == 85_798_656  # ViT-B/16, no head
  d, mlp, layers = 768, 3072, 3
  block = (
    2 * d  # attention LayerNorm
    + 4 * d * d
    + 3 * d  # query, key, value, out; keys have no bias
    + 3 * d * d
    + 2 * d  # Longformer's separate global query, key, value
    + 2 * d  # MLP LayerNorm
    + (d * mlp + mlp)
    + (mlp * d + d)
  )
  by_hand = (d * d + d) + d + layers * block + 2 * d  # input projection, CLS, blocks, norm
  assert by_hand == 27_167_232
  assert count(params["video_encoder"]["temporal"]) == by_hand


def test_classifier_head_fits_a_separable_set():
  rng = np.random.default_rng(0)
  centres = rng.normal(size=(4, 16)) * 3
  labels = np.repeat(np.arange(4), 32)
  features = jnp.asarray(centres[labels] + rng.normal(size=(128, 16)), jnp.float32)
  head = cmvt.ClassifierHead(num_classes=4, hidden_dim=32, dropout_rate=0.5)
  params = head.init(jax.random.key(0), features)
  optimizer = optax.adam(1e-2)

  @jax.jit
  def step(params, opt_state, key):
    def loss(params):
      logits = head.apply(params, features, deterministic=False, rngs={"dropout": key})
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    updates, opt_state = optimizer.update(jax.grad(loss)(params), opt_state)
    return optax.apply_updates(params, updates), opt_state

  opt_state = optimizer.init(params)
  for i in range(200):
    params, opt_state = step(params, opt_state, jax.random.key(i))
  predictions = head.apply(params, features).argmax(axis=1)
  assert float((predictions == labels).mean()) == 1.0


def contrastive_grads(model, params, video, audio):
  objective = losses.ContrastiveLoss()

  def loss(params):
    out = model.apply(
      {"params": params}, video, audio, train=True, rngs={"dropout": jax.random.key(1)}
    )
    return objective(jnp.log(0.1), out["video"], out["audio"])[0]

  return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.slow  # compiles the default model's gradients twice
def test_bfloat16_compute_gives_finite_gradients_of_float32_params(tiny):
  config = default.get_config()
  config.model.dtype = "bfloat16"
  # XLA:CPU cannot run the banded attention's bf16 x bf16 -> f32 dots under jit
  # ("Unsupported element type for DotThunk"), so on CPU the towers pool over time here.
  config.model.video.temporal.num_layers = config.model.audio.temporal.num_layers = 0
  model = cmvt.from_config(config)
  _, _, params, video, audio = tiny  # float32; pooling leaves the Longformer's unused
  out = jax.jit(model.apply)({"params": params}, video, audio)
  assert out["video"].dtype == jnp.float32
  loss, grads = contrastive_grads(model, params, video, audio)
  assert np.isfinite(float(loss))
  leaves = jax.tree.leaves(grads)
  assert all(g.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(g))) for g in leaves)
  assert sum(float(jnp.abs(g).sum()) for g in leaves) > 0


@pytest.mark.slow  # compiles the default model's gradients twice
def test_remat_changes_nothing_but_memory(tiny):
  _, model, params, video, audio = tiny
  config = default.get_config()
  config.model.remat = True
  loss, grads = contrastive_grads(model, params, video, audio)
  remat_loss, remat_grads = contrastive_grads(cmvt.from_config(config), params, video, audio)
  np.testing.assert_allclose(remat_loss, loss, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(remat_grads), jax.tree.leaves(grads)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_dropout_draws_only_in_training(tiny):
  _, _, params, video, audio = tiny
  config = default.get_config()
  config.model.video.vit.dropout_rate = 0.2
  config.model.video.temporal.dropout_rate = 0.2
  model = cmvt.from_config(config)
  apply = jax.jit(
    lambda key, train: model.apply(
      {"params": params}, video, audio, train=train, rngs={"dropout": jax.random.key(key)}
    )["video"],
    static_argnums=1,
  )
  np.testing.assert_array_equal(apply(0, False), apply(1, False))
  assert float(jnp.abs(apply(0, True) - apply(1, True)).max()) > 1e-3


def test_load_pretrained_puts_the_checkpoint_into_the_frame_encoder(tmp_path):
  config = default.get_config()
  config.input.frame_size = 12  # a 3x3 grid; the checkpoint's is 2x2
  vit = config.model.video.vit
  vit.patch_size, vit.width, vit.depth, vit.num_heads, vit.mlp_dim = 4, 8, 1, 2, 16
  weights = release_checkpoint(depth=1, grid=2)
  vit.checkpoint = str(tmp_path / "vit.npz")
  np.savez(vit.checkpoint, **weights)
  model = cmvt.from_config(config)
  video, audio = (jax.ShapeDtypeStruct(s, jnp.float32) for s in input_shapes(config, 1))
  params = jax.eval_shape(model.init, jax.random.key(0), video, audio)["params"]
  loaded = cmvt.load_pretrained(params, config)
  attention = loaded["video_encoder"]["frame_encoder"]["Transformer"]["encoderblock_0"][
    "MultiHeadDotProductAttention_1"
  ]
  np.testing.assert_array_equal(
    attention["value"]["kernel"],
    weights["Transformer/encoderblock_0/MultiHeadDotProductAttention_1/value/kernel"],
  )
  assert loaded["video_encoder"]["frame_encoder"]["Transformer"]["posembed_input"][
    "pos_embedding"
  ].shape == (1, 10, 8)
  assert loaded["audio_encoder"] is params["audio_encoder"]  # the rest is untouched

  config.model.video.frame_encoder = "resnet"
  with pytest.raises(ValueError, match="needs frame_encoder='vit'"):
    cmvt.load_pretrained(params, config)


@pytest.mark.parametrize(
  "key, value, message",
  [
    ("model.dtype", "float8", "config.model.dtype"),
    ("model.video.frame_encoder", "swin", "config.model.video.frame_encoder"),
    ("model.audio.backbone", "rnn", "config.model.audio.backbone"),
    ("input.frame_size", 36, "multiple of config.model.video.vit.patch_size"),
    ("model.video.temporal.windows", (4, 4, 4), r"windows needs one entry, or one per layer"),
  ],
)
def test_from_config_rejects_bad_settings(key, value, message):
  config = default.get_config()
  section, name = key.rsplit(".", 1)
  node = config
  for part in section.split("."):
    node = node[part]
  setattr(node, name, value)
  with pytest.raises(ValueError, match=message):
    cmvt.from_config(config)
