"""Analytic FLOPs against XLA's count of the compiled forward.

XLA's `cost_analysis()` counts a loop body once, whatever its trip count. The models here have
no `scan` over layers, and the banded attention's `fori_loop` runs a single step when the
sequence fits one chunk (at most 32 positions), which every temporal sequence here does; the
windows are also set to cover the whole sequence, where the band the kernel computes and the
pairs `flops.py` counts coincide. XLA also counts element-wise work (norms, softmax, GELU)
that `flops.py` leaves out, hence the 15% tolerance.
"""

import itertools

import jax
import jax.numpy as jnp
import pytest

from cmvt_jax import flops
from cmvt_jax.models import cmvt
from configs import default
from configs import vtn_base


def shapes(config):
  inputs = config.input
  audio_frames = round(inputs.num_frames / inputs.fps * inputs.sample_rate) // inputs.hop_length
  return (
    (inputs.num_frames, inputs.frame_size, inputs.frame_size, 3),
    (audio_frames, inputs.n_mels),
  )


def xla_forward_flops_per_clip(config, batch=2):
  """XLA's FLOPs of the jitted forward, compiled on abstract inputs (nothing allocated)."""
  model = cmvt.from_config(config)
  video_shape, audio_shape = shapes(config)
  video = jax.ShapeDtypeStruct((batch,) + video_shape, jnp.float32)
  audio = jax.ShapeDtypeStruct((batch,) + audio_shape, jnp.float32)
  params = jax.eval_shape(model.init, jax.random.key(0), video, audio)
  compiled = jax.jit(model.apply).lower(params, video, audio).compile()
  return compiled.cost_analysis()["flops"] / batch


def analytic(config):
  video_shape, audio_shape = shapes(config)
  return flops.count(cmvt.from_config(config), video_shape=video_shape, audio_shape=audio_shape)


def whole_sequence_windows(config):
  config.model.video.temporal.windows = (config.input.num_frames,)
  config.model.audio.temporal.windows = (32,)
  return config


def vit_frames_cnn_audio():
  return whole_sequence_windows(default.get_config())


def resnet_frames_patch_audio_with_classifier():
  config = default.get_config()
  config.model.video.frame_encoder = "resnet"
  config.model.audio.backbone = "patch_transformer"
  config.model.num_classes = 7
  return whole_sequence_windows(config)


def base_sized():
  config = vtn_base.get_config()
  config.model.dtype = "float32"
  config.input.num_frames = 2  # the frame encoder dominates; two frames keep the compile small
  # XLA's cost analysis counts a loop's body once: compare against the unrolled blocks (the
  # scanned ones compute the same, test_frame_encoder).
  config.model.video.vit.scan_layers = False
  return whole_sequence_windows(config)


@pytest.mark.parametrize(
  "make_config", [vit_frames_cnn_audio, resnet_frames_patch_audio_with_classifier, base_sized]
)
def test_forward_flops_match_xla_within_15_percent(make_config):
  config = make_config()
  expected = xla_forward_flops_per_clip(config)
  assert analytic(config).forward == pytest.approx(expected, rel=0.15)


def test_train_step_counts_three_forwards_and_remat_one_more():
  config = default.get_config()
  counted = analytic(config)
  assert counted.train_step == 3 * counted.forward
  assert counted.train_step_executed == 3 * counted.forward
  config.model.remat = True
  assert analytic(config).train_step_executed == 4 * counted.forward


def test_vit_b16_frame_is_35_gflops():
  """ViT-B/16 at 224 px: 17.6 G multiply-adds per image, as its papers report."""
  config = vtn_base.get_config()
  per_frame = analytic(config).frame_encoder / config.input.num_frames
  assert per_frame == pytest.approx(2 * 17.56e9, rel=0.01)


@pytest.mark.parametrize("length, window, dilation", [(9, 4, 1), (17, 9, 1), (40, 3, 2), (5, 8, 3)])
def test_band_pairs_match_a_brute_force_count(length, window, dilation):
  brute = sum(
    1
    for i, j in itertools.product(range(length), repeat=2)
    if abs(i - j) <= window * dilation and (i - j) % dilation == 0
  )
  assert flops.band_pairs(length, window, dilation) == brute
