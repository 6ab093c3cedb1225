"""The temporal encoder and the video tower: any length, padding masks, order sensitivity."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmvt_jax.models import cmvt
from cmvt_jax.models import frame_encoder
from cmvt_jax.models import temporal_encoder


def test_time_embedding_matches_the_sinusoid():
  table = np.asarray(temporal_encoder.time_embedding(600, 16))
  for t in (0, 7, 511, 599):
    for i in range(8):
      angle = t / 10_000 ** (2 * i / 16)
      np.testing.assert_allclose(
        table[t, 2 * i : 2 * i + 2], [np.sin(angle), np.cos(angle)], atol=1e-5
      )


@pytest.fixture(scope="module")
def video_tower():
  """A micro video tower (4x4 frames) and its parameters, initialised on 16-frame clips."""
  tower = cmvt.VideoEncoder(
    frame_encoder=frame_encoder.ViT(
      patch_size=2, width=16, depth=1, num_heads=2, mlp_dim=32, image_size=4
    ),
    temporal=temporal_encoder.TemporalEncoder(
      width=32, num_layers=2, num_heads=2, mlp_dim=64, windows=(3, 3)
    ),
  )
  params = jax.jit(tower.init)(jax.random.key(0), jnp.zeros((1, 16, 4, 4, 3)))
  return tower, params


@functools.cache
def jitted_apply(tower):
  return jax.jit(tower.apply)


def embed(tower, params, video, mask=None):
  return jitted_apply(tower)(params, video, mask)


def videos(num_frames, batch=1, seed=0):
  return jax.random.normal(jax.random.key(seed), (batch, num_frames, 4, 4, 3))


@pytest.mark.parametrize("num_frames", [8, 16, 128, 512])
def test_same_parameters_embed_any_number_of_frames(video_tower, num_frames):
  tower, params = video_tower
  video = videos(num_frames)
  out = embed(tower, params, video)
  assert out.shape == (1, 32) and bool(jnp.all(jnp.isfinite(out)))
  # The clip is read in order: swapping its first and last frames changes the embedding.
  ends = jnp.array([0, num_frames - 1])
  swapped = video.at[:, ends].set(video[:, ends[::-1]])
  assert float(jnp.abs(embed(tower, params, swapped) - out).max()) > 1e-3


@pytest.mark.parametrize("valid, slots", [(10, 16), (100, 512)])
def test_padding_frames_do_not_change_the_embedding(video_tower, valid, slots):
  """A short video in a longer slot, padding masked, embeds as the short video alone."""
  tower, params = video_tower
  short = videos(valid, seed=1)
  padded = jnp.concatenate([short, jnp.full((1, slots - valid, 4, 4, 3), 7.0)], axis=1)
  mask = jnp.arange(slots)[None] < valid
  np.testing.assert_allclose(
    embed(tower, params, padded, mask), embed(tower, params, short), atol=1e-5
  )


def test_frame_mask_must_match_the_video(video_tower):
  tower, params = video_tower
  with pytest.raises(ValueError, match="frame_mask"):
    tower.apply(params, videos(8), jnp.ones((1, 7), bool))


def test_mean_pooling_without_layers_is_the_masked_mean():
  encoder = temporal_encoder.TemporalEncoder(width=8, num_layers=0)
  features = jax.random.normal(jax.random.key(0), (2, 6, 5))
  mask = jnp.array([[True] * 6, [True] * 3 + [False] * 3])
  params = encoder.init(jax.random.key(1), features)
  kernel = np.asarray(params["params"]["input_projection"]["kernel"])
  bias = np.asarray(params["params"]["input_projection"]["bias"])
  steps = np.asarray(features) @ kernel + bias + np.asarray(temporal_encoder.time_embedding(6, 8))
  expected = np.stack([steps[0].mean(0), steps[1, :3].mean(0)])
  np.testing.assert_allclose(encoder.apply(params, features, mask), expected, atol=1e-5)
  assert "cls" not in params["params"]
