"""Figures: each PNG is written at its size; the attention figure shows the layer's real weights."""

import jax
import numpy as np
from matplotlib import image as mpimg

from cmvt_jax import plots
from cmvt_jax.models import attention
from cmvt_jax.models import cmvt
from cmvt_jax.models import longformer
from tests.evaluate.conftest import micro_config

# FIGURE_SIZES (inches) at 100 dpi.
EXPECTED_PIXELS = {
  "training_curves": (1500, 400),
  "similarity_matrix": (700, 600),
  "embeddings_pca": (900, 700),
  "attention": (1500, 400),
}


def test_every_figure_is_a_png_of_its_size(workdir, run, micro_data_dir):
  written = plots.make_plots(micro_config(micro_data_dir), str(workdir), run=run)
  assert sorted(path.name for path in written) == sorted(f"{name}.png" for name in EXPECTED_PIXELS)
  for name, (width, height) in EXPECTED_PIXELS.items():
    path = workdir / "plots" / f"{name}.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    pixels = mpimg.imread(path, format="png")  # decodes the whole file
    assert pixels.shape == (height, width, 4), name


def test_band_rule_of_a_dilated_window_with_a_global_token():
  expected = np.array(
    [
      [1, 1, 1, 1, 1, 1],
      [1, 1, 0, 1, 0, 0],
      [1, 0, 1, 0, 1, 0],
      [1, 1, 0, 1, 0, 1],
      [1, 0, 1, 0, 1, 0],
      [1, 0, 0, 1, 0, 1],
    ],
    bool,
  )
  np.testing.assert_array_equal(
    attention.band_rule(6, window=1, dilation=2, global_positions=[0]), expected
  )


def test_dense_attention_weights_reproduce_the_layer_output(run, direct):
  """weights @ values, through the output projection, equals what the layer computed."""
  params = direct.params(5)
  video = np.random.default_rng(0).normal(size=(1, 4, 16, 16, 3)).astype(np.float32)
  temporal = run.model.video_encoder.temporal
  rules = np.stack([attention.band_rule(5, temporal.windows[0], 1, [0])] * temporal.num_heads)

  _, state = jax.jit(
    lambda params, video: run.model.apply(
      {"params": params},
      video,
      method=cmvt.CMVT.embed_video,
      mutable=["intermediates"],
      capture_intermediates=lambda module, method: module.name in ("attention_norm", "attention"),
    )
  )(params, video)
  layer = state["intermediates"]["video_encoder"]["temporal"]["encoder"]["layer_0"]
  x = np.asarray(layer["attention_norm"]["__call__"][0][0])  # [L, D]
  layer_out = np.asarray(layer["attention"]["__call__"][0][0])
  p = jax.tree.map(
    np.asarray, params["video_encoder"]["temporal"]["encoder"]["layer_0"]["attention"]
  )
  weights = np.asarray(
    longformer.dense_attention_weights(p, x, rules, global_projections=temporal.global_projections)
  )
  np.testing.assert_allclose(weights.sum(-1), 1, atol=1e-5)
  assert (weights[~rules] == 0).all()
  values = np.einsum("ld,dhk->hlk", x, p["value"]["kernel"]) + p["value"]["bias"][:, None]
  values_global = (
    np.einsum("ld,dhk->hlk", x, p["value_global"]["kernel"]) + p["value_global"]["bias"][:, None]
  )
  context = np.einsum("hql,hlk->qhk", weights, values)
  context[0] = np.einsum("hl,hlk->hk", weights[:, 0], values_global)  # the CLS row
  out = np.einsum("qhk,hkd->qd", context, p["out"]["kernel"]) + p["out"]["bias"]
  np.testing.assert_allclose(out, layer_out, atol=1e-4)
