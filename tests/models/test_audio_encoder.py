"""The audio tower: CNN + temporal encoder over time, and the AST-like patch transformer; padded
spectrograms with a time mask against their unpadded frames."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmvt_jax.models import audio_encoder
from cmvt_jax.models import cmvt
from cmvt_jax.models import frame_encoder
from cmvt_jax.models import temporal_encoder
from configs import default
from tests.models.test_frame_encoder import padded_batch
from tests.models.test_frame_encoder import random_params


def cnn_tower(num_layers=1):
  return audio_encoder.AudioEncoder(
    backbone=frame_encoder.ResNet(
      stem_width=8, stage_widths=(8,), blocks_per_stage=(1,), stage_strides=((2, 4),), norm_groups=4
    ),
    temporal=temporal_encoder.TemporalEncoder(
      width=16, num_layers=num_layers, num_heads=2, mlp_dim=32, windows=(2,)
    ),
  )


def test_cnn_tower_keeps_time_and_folds_the_remaining_frequency_bins():
  tower = cnn_tower()
  log_mel = jax.random.normal(jax.random.key(0), (2, 16, 16))
  params = jax.jit(tower.init)(jax.random.key(1), log_mel)["params"]
  # Frequency 16 → 4 bins of 8 channels, folded into 32 inputs per time step (16 → 8 steps).
  assert params["temporal"]["input_projection"]["kernel"].shape == (4 * 8, 16)
  apply = jax.jit(tower.apply)
  out = apply({"params": params}, log_mel)
  assert out.shape == (2, 16)
  # A note moved to another mel bin (same time, same energy) changes the embedding.
  moved = log_mel.at[:, 4:6].set(jnp.roll(log_mel[:, 4:6], 6, axis=-1))
  assert float(jnp.abs(apply({"params": params}, moved) - out).max()) > 1e-4


def test_patch_transformer_embeds_clips_of_any_length():
  tower = audio_encoder.AudioEncoder(
    backbone=frame_encoder.ViT(
      patch_size=(4, 8), width=16, depth=1, num_heads=2, mlp_dim=32, posemb="sincos2d"
    )
  )
  params = jax.jit(tower.init)(jax.random.key(0), jnp.zeros((1, 16, 16)))
  assert "posembed_input" not in params["params"]["backbone"]["Transformer"]  # no table
  for frames in (16, 40):
    out = tower.apply(params, jax.random.normal(jax.random.key(frames), (2, frames, 16)))
    assert out.shape == (2, 16) and bool(jnp.all(jnp.isfinite(out)))


def test_audio_tower_rejects_bad_input_and_wiring():
  with pytest.raises(ValueError, match=r"\[B, frames, n_mels\]"):
    cnn_tower().init(jax.random.key(0), jnp.zeros((16, 16)))
  no_temporal = audio_encoder.AudioEncoder(backbone=cnn_tower().backbone)
  with pytest.raises(ValueError, match="needs a temporal encoder"):
    no_temporal.init(jax.random.key(0), jnp.zeros((1, 16, 16)))
  vit_with_temporal = audio_encoder.AudioEncoder(
    backbone=frame_encoder.ViT(
      patch_size=4, width=8, depth=1, num_heads=2, mlp_dim=8, posemb="sincos2d"
    ),
    temporal=cnn_tower().temporal,
  )
  with pytest.raises(ValueError, match="no temporal encoder"):
    vit_with_temporal.init(jax.random.key(0), jnp.zeros((1, 16, 16)))


@pytest.fixture(scope="module")
def default_tower():
  """The audio tower as configs/default.py builds it, with random parameters, and its apply."""
  config = default.get_config()
  tower = cmvt.from_config(config).audio_encoder
  mels = config.input.n_mels
  return tower, random_params(tower, jnp.zeros((1, 64, mels))), mels, jax.jit(tower.apply)


def test_padded_spectrograms_embed_as_their_unpadded_frames(default_tower):
  tower, params, mels, apply = default_tower
  # A 64-frame training clip and odd and even lengths that are not multiples of the time
  # stride 8, padded to 75 frames of garbage.
  lengths = (64, 41, 30)
  padded, rows, mask = padded_batch(lengths, 75, mels)
  out = apply(params, padded, mask)
  for n, row in enumerate(rows):
    np.testing.assert_allclose(out[n], apply(params, row)[0], atol=1e-5, rtol=1e-5)
  assert tower.backbone.time_stride == 8
  assert [tower.output_length(frames) for frames in (64, 75, 41, 17, 1)] == [8, 10, 6, 3, 1]


def test_an_all_valid_mask_gives_the_unmasked_numbers(default_tower):
  _, params, mels, apply = default_tower
  log_mel = np.random.default_rng(1).standard_normal((1, 64, mels), np.float32)
  np.testing.assert_allclose(
    apply(params, log_mel, np.ones((1, 64), bool)), apply(params, log_mel), atol=1e-5, rtol=1e-5
  )


def test_audio_masks_need_the_cnn_backbone_and_a_bool_mask():
  patches = audio_encoder.AudioEncoder(
    backbone=frame_encoder.ViT(
      patch_size=4, width=8, depth=1, num_heads=2, mlp_dim=8, posemb="sincos2d"
    )
  )
  log_mel, mask = jnp.zeros((1, 16, 16)), jnp.ones((1, 16), bool)
  with pytest.raises(ValueError, match=r"model\.audio\.backbone='cnn'"):
    patches.init(jax.random.key(0), log_mel, mask)
  with pytest.raises(ValueError, match=r"model\.audio\.backbone='cnn'"):
    patches.output_length(16)
  tower = cnn_tower()
  params = random_params(tower, log_mel)
  with pytest.raises(ValueError, match=r"time_mask must be bool"):
    tower.apply(params, log_mel, mask.astype(jnp.float32))
