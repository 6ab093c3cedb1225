"""Frame encoders: ViT sizes, the ViT/AugReg `.npz` loader against a numpy ViT, the ResNet and
its time-masked map against each row's unpadded map."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from cmvt_jax.models import frame_encoder

POSEMB = "Transformer/posembed_input/pos_embedding"


def count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


# ----------------------------------------------------------------------------- ViT-B/16 size


def test_vit_b16_parameter_count():
  d, mlp, depth, patch, grid = 768, 3072, 12, 16, 14
  embedding = patch * patch * 3 * d + d
  block = 2 * (2 * d) + 4 * (d * d + d) + (d * mlp + mlp) + (mlp * d + d)
  by_hand = embedding + d + (1 + grid * grid) * d + depth * block + 2 * d  # + cls, posemb, norm
  assert by_hand == 85_798_656

  image = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
  vit = frame_encoder.ViT(patch_size=16, width=d, depth=depth, num_heads=12, mlp_dim=mlp)
  assert count(jax.eval_shape(vit.init, jax.random.key(0), image)) == by_hand
  with_head = frame_encoder.ViT(
    patch_size=16, width=d, depth=depth, num_heads=12, mlp_dim=mlp, num_classes=1000
  )
  params = jax.eval_shape(with_head.init, jax.random.key(0), image)
  assert count(params) == by_hand + d * 1000 + 1000 == 86_567_656
  assert jax.eval_shape(with_head.apply, params, image).shape == (1, 1000)


# ----------------------------------------------------------------------------- the .npz loader

WIDTH, HEADS, MLP, PATCH = 8, 2, 16, 4


def release_checkpoint(depth, grid, *, seed=0, extras=True):
  """A ViT checkpoint in the Google ViT/AugReg .npz layout, written out by hand."""
  rng = np.random.default_rng(seed)
  d, h = WIDTH, HEADS
  shapes = {
    "embedding/kernel": (PATCH, PATCH, 3, d),
    "embedding/bias": (d,),
    "cls": (1, 1, d),
    POSEMB: (1, 1 + grid * grid, d),
    "Transformer/encoder_norm/scale": (d,),
    "Transformer/encoder_norm/bias": (d,),
  }
  for i in range(depth):
    block = f"Transformer/encoderblock_{i}/"
    attention = block + "MultiHeadDotProductAttention_1/"
    for name in ("query", "key", "value"):
      shapes[f"{attention}{name}/kernel"] = (d, h, d // h)
      shapes[f"{attention}{name}/bias"] = (h, d // h)
    shapes[attention + "out/kernel"] = (h, d // h, d)
    shapes[attention + "out/bias"] = (d,)
    for norm in ("LayerNorm_0", "LayerNorm_2"):
      shapes[f"{block}{norm}/scale"] = shapes[f"{block}{norm}/bias"] = (d,)
    shapes[block + "MlpBlock_3/Dense_0/kernel"] = (d, MLP)
    shapes[block + "MlpBlock_3/Dense_0/bias"] = (MLP,)
    shapes[block + "MlpBlock_3/Dense_1/kernel"] = (MLP, d)
    shapes[block + "MlpBlock_3/Dense_1/bias"] = (d,)
  if extras:  # a classifier and a pre-logits layer, as in ImageNet-21k releases
    shapes.update(
      {
        "head/kernel": (d, 5),
        "head/bias": (5,),
        "pre_logits/kernel": (d, d),
        "pre_logits/bias": (d,),
      }
    )
  return {name: (rng.normal(size=shape) * 0.5).astype(np.float32) for name, shape in shapes.items()}


def numpy_vit(weights, image, depth):
  """The ViT forward written from the layout: features of one image [H, W, 3] → [D]."""

  def layer_norm(x, prefix):
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-6) * weights[prefix + "/scale"] + weights[prefix + "/bias"]

  def gelu(x):  # tanh approximation (flax's default, as in the released models)
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))

  rows, cols = image.shape[0] // PATCH, image.shape[1] // PATCH
  patches = image.reshape(rows, PATCH, cols, PATCH, 3).transpose(0, 2, 1, 3, 4)
  x = patches.reshape(rows * cols, -1) @ weights["embedding/kernel"].reshape(-1, WIDTH)
  x = np.concatenate([weights["cls"][0], x + weights["embedding/bias"]]) + weights[POSEMB][0]
  for i in range(depth):
    block = f"Transformer/encoderblock_{i}/"
    attention = block + "MultiHeadDotProductAttention_1/"
    y = layer_norm(x, block + "LayerNorm_0")
    q, k, v = (
      np.einsum("sd,dhk->shk", y, weights[f"{attention}{n}/kernel"])
      + weights[f"{attention}{n}/bias"]
      for n in ("query", "key", "value")
    )
    scores = np.einsum("shk,thk->hst", q, k) / np.sqrt(WIDTH // HEADS)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    o = np.einsum("hst,thk->shk", probs, v)
    x = (
      x
      + np.einsum("shk,hkd->sd", o, weights[attention + "out/kernel"])
      + weights[attention + "out/bias"]
    )
    y = layer_norm(x, block + "LayerNorm_2")
    y = gelu(
      y @ weights[block + "MlpBlock_3/Dense_0/kernel"] + weights[block + "MlpBlock_3/Dense_0/bias"]
    )
    x = (
      x
      + y @ weights[block + "MlpBlock_3/Dense_1/kernel"]
      + weights[block + "MlpBlock_3/Dense_1/bias"]
    )
  return layer_norm(x, "Transformer/encoder_norm")[0]


def small_vit(depth, image_size, **options):
  return frame_encoder.ViT(
    patch_size=PATCH,
    width=WIDTH,
    depth=depth,
    num_heads=HEADS,
    mlp_dim=MLP,
    image_size=image_size,
    **options,
  )


def target_params(vit, image_size):
  image = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  return jax.eval_shape(vit.init, jax.random.key(0), image)["params"]


def write(tmp_path, weights, name="vit.npz"):
  path = tmp_path / name
  np.savez(path, **weights)
  return str(path)


def stacked(weights, depth):
  """The release layout's blocks stacked on a layer axis (big_vision's scanned layout)."""
  stack = {}
  for name, value in weights.items():
    if name.startswith("Transformer/encoderblock_0/"):
      suffix = name.removeprefix("Transformer/encoderblock_0/")
      layers = [weights[f"Transformer/encoderblock_{i}/{suffix}"] for i in range(depth)]
      stack[f"Transformer/encoderblock/{suffix}"] = np.stack(layers)
    elif not name.startswith("Transformer/encoderblock_"):
      stack[name] = value
  return stack


@pytest.mark.parametrize(
  "layout, options",
  [
    ("per-layer", {}),
    ("per-layer", {"scan_layers": True}),
    ("per-layer", {"scan_layers": True, "remat": True}),
    ("stacked", {}),
    ("stacked", {"scan_layers": True}),
  ],
)
def test_checkpoint_loads_into_a_vit_that_matches_the_numpy_reference(tmp_path, layout, options):
  weights = release_checkpoint(depth=3, grid=2)
  written = stacked(weights, depth=3) if layout == "stacked" else weights
  vit = small_vit(depth=3, image_size=8, **options)
  params = frame_encoder.load_vit_checkpoint(
    write(tmp_path, written), target_params(vit, 8), grid=vit.table_grid()
  )
  if options.get("scan_layers"):
    block = params["Transformer"][frame_encoder.SCANNED_BLOCKS]
    assert block["MlpBlock_3"]["Dense_0"]["kernel"].shape == (3, WIDTH, MLP)
  images = np.random.default_rng(1).normal(size=(2, 8, 8, 3)).astype(np.float32)
  features = vit.apply({"params": params}, images)
  for image, feature in zip(images, features):
    np.testing.assert_allclose(feature, numpy_vit(weights, image, depth=3), atol=2e-4)


def test_a_scanned_vit_has_the_gradients_of_the_unrolled_one(tmp_path):
  path = write(tmp_path, release_checkpoint(depth=3, grid=2))
  images = np.random.default_rng(2).normal(size=(2, 8, 8, 3)).astype(np.float32)
  gradients = {}
  for scan in (False, True):
    vit = small_vit(depth=3, image_size=8, scan_layers=scan, remat=scan)
    params = frame_encoder.load_vit_checkpoint(path, target_params(vit, 8), grid=vit.table_grid())
    loss = lambda p, vit=vit: jnp.sum(vit.apply({"params": p}, images) ** 2)
    gradients[scan] = traverse_util.flatten_dict(jax.grad(loss)(params), sep="/")
  assert set(stacked(gradients[False], depth=3)) == set(gradients[True])
  for name, gradient in stacked(gradients[False], depth=3).items():
    np.testing.assert_allclose(gradients[True][name], gradient, rtol=1e-4, atol=1e-5, err_msg=name)


def test_a_checkpoint_of_another_depth_is_refused_in_either_layout(tmp_path):
  for options in ({}, {"scan_layers": True}):
    vit = small_vit(depth=2, image_size=8, **options)
    for weights in (release_checkpoint(depth=3, grid=2), stacked(release_checkpoint(3, 2), 3)):
      with pytest.raises(ValueError, match="does not match the model"):
        frame_encoder.load_vit_checkpoint(
          write(tmp_path, weights), target_params(vit, 8), grid=vit.table_grid()
        )


def test_checkpoint_position_grid_is_resized_to_the_model(tmp_path):
  weights = release_checkpoint(depth=1, grid=2)
  grid_entries = np.linspace(-1, 1, WIDTH, dtype=np.float32)  # constant over the grid
  weights[POSEMB][0, 1:] = grid_entries
  vit = small_vit(depth=1, image_size=12)  # a 3x3 grid
  params = frame_encoder.load_vit_checkpoint(
    write(tmp_path, weights), target_params(vit, 12), grid=vit.table_grid()
  )
  table = params["Transformer"]["posembed_input"]["pos_embedding"]
  assert table.shape == (1, 10, WIDTH)
  np.testing.assert_allclose(table[0, 0], weights[POSEMB][0, 0])  # the CLS entry is kept
  np.testing.assert_allclose(table[0, 1:], np.broadcast_to(grid_entries, (9, WIDTH)), atol=1e-6)

  image = np.random.default_rng(2).normal(size=(12, 12, 3)).astype(np.float32)
  reference_weights = dict(weights, **{POSEMB: np.asarray(table)})
  np.testing.assert_allclose(
    vit.apply({"params": params}, image[None])[0],
    numpy_vit(reference_weights, image, depth=1),
    atol=2e-4,
  )


def test_position_table_is_resized_for_other_frame_sizes_at_apply_time(tmp_path):
  """A model whose table is for 8x8 frames embeds 16x16 frames with the table resized."""
  weights = release_checkpoint(depth=1, grid=2)
  weights[POSEMB][0, 1:] = np.linspace(-1, 1, WIDTH, dtype=np.float32)  # grid-constant
  vit = small_vit(depth=1, image_size=8)
  params = frame_encoder.load_vit_checkpoint(
    write(tmp_path, weights), target_params(vit, 8), grid=vit.table_grid()
  )
  image = np.random.default_rng(3).normal(size=(16, 16, 3)).astype(np.float32)
  big_table = np.concatenate(
    [weights[POSEMB][:, :1], np.broadcast_to(weights[POSEMB][:, 1:2], (1, 16, WIDTH))], 1
  )
  np.testing.assert_allclose(
    vit.apply({"params": params}, image[None])[0],
    numpy_vit(dict(weights, **{POSEMB: big_table}), image, depth=1),
    atol=2e-4,
  )


def test_checkpoint_head_is_loaded_when_the_model_has_one(tmp_path):
  weights = release_checkpoint(depth=1, grid=2)
  vit = frame_encoder.ViT(
    patch_size=PATCH,
    width=WIDTH,
    depth=1,
    num_heads=HEADS,
    mlp_dim=MLP,
    image_size=8,
    num_classes=5,
  )
  params = frame_encoder.load_vit_checkpoint(
    write(tmp_path, weights), target_params(vit, 8), grid=vit.table_grid()
  )
  np.testing.assert_array_equal(params["head"]["kernel"], weights["head/kernel"])


@pytest.mark.parametrize(
  "change, expected",
  [
    ("drop", ["missing (1)", "Transformer/encoderblock_0/MlpBlock_3/Dense_0/bias"]),
    (
      "reshape",
      [
        "mis-shaped (1)",
        "Transformer/encoderblock_0/LayerNorm_2/scale",
        "checkpoint (7,)",
        "model (8,)",
      ],
    ),
    ("deeper", ["unexpected", "Transformer/encoderblock_1/LayerNorm_0/scale"]),
  ],
)
def test_checkpoint_errors_name_the_parameter(tmp_path, change, expected):
  weights = release_checkpoint(depth=2 if change == "deeper" else 1, grid=2)
  if change == "drop":
    del weights["Transformer/encoderblock_0/MlpBlock_3/Dense_0/bias"]
  if change == "reshape":
    weights["Transformer/encoderblock_0/LayerNorm_2/scale"] = np.ones(7, np.float32)
  vit = small_vit(depth=1, image_size=8)
  with pytest.raises(ValueError) as error:
    frame_encoder.load_vit_checkpoint(
      write(tmp_path, weights), target_params(vit, 8), grid=vit.table_grid()
    )
  for text in expected:
    assert text in str(error.value)


def test_checkpoint_errors_for_a_missing_file_and_a_non_square_table(tmp_path):
  vit = small_vit(depth=1, image_size=8)
  with pytest.raises(ValueError, match="does not exist"):
    frame_encoder.load_vit_checkpoint(
      str(tmp_path / "nope.npz"), target_params(vit, 8), grid=(2, 2)
    )
  weights = release_checkpoint(depth=1, grid=2)
  weights[POSEMB] = np.zeros((1, 1 + 6, WIDTH), np.float32)
  with pytest.raises(ValueError, match=r"1 \+ g·g"):
    frame_encoder.load_vit_checkpoint(write(tmp_path, weights), target_params(vit, 8), grid=(2, 2))


# ----------------------------------------------------------------------------- ResNet


def test_resnet_shapes_and_parameter_count():
  resnet = frame_encoder.ResNet(
    stem_width=8,
    stage_widths=(8, 16),
    blocks_per_stage=(1, 2),
    stage_strides=((1, 1), (2, 1)),
    norm_groups=4,
  )
  images = jnp.ones((3, 10, 6, 3))
  params = resnet.init(jax.random.key(0), images)
  assert resnet.apply(params, images).shape == (3, 16)
  assert resnet.apply(params, images, method=resnet.feature_map).shape == (3, 5, 6, 16)
  norm = lambda c: 2 * c
  stem = 9 * 3 * 8 + norm(8)
  block = lambda c_in, c: (
    9 * c_in * c + 9 * c * c + 2 * norm(c) + ((c_in * c + norm(c)) if (c_in != c) else 0)
  )
  stage_2_first = 9 * 8 * 16 + 9 * 16 * 16 + 2 * norm(16) + 8 * 16 + norm(16)  # strided
  assert count(params) == stem + block(8, 8) + stage_2_first + block(16, 16)


def test_resnet_rejects_widths_the_groups_do_not_divide():
  resnet = frame_encoder.ResNet(
    stem_width=6, stage_widths=(8,), blocks_per_stage=(1,), stage_strides=((1, 1),), norm_groups=4
  )
  with pytest.raises(ValueError, match="norm_groups=4"):
    resnet.init(jax.random.key(0), jnp.ones((1, 8, 8, 3)))


def test_frame_encoders_reject_unfolded_video():
  vit = small_vit(depth=1, image_size=8)
  with pytest.raises(ValueError, match=r"\[N, H, W, C\]"):
    vit.init(jax.random.key(0), jnp.ones((1, 2, 8, 8, 3)))


def test_sincos_grid_matches_its_formula():
  table = np.asarray(frame_encoder.sincos_position_grid((2, 3), 8))[0]  # [6, 8]
  frequencies = 1.0 / 10_000 ** (np.arange(2) / 2)
  row, col = 1, 2  # token 1 * 3 + 2
  expected = np.concatenate(
    [
      np.sin(row * frequencies),
      np.cos(row * frequencies),
      np.sin(col * frequencies),
      np.cos(col * frequencies),
    ]
  )
  np.testing.assert_allclose(table[5], expected, atol=1e-6)
  assert math.isclose(float(table[0, 2]), 1.0)  # cos(0)


# ----------------------------------------------------------------------------- masked ResNet


def random_params(module, *inputs, seed=0) -> dict:
  """Random `{'params': ...}` for `module.init(key, *inputs)`'s tree, drawn on the host (no
  init to compile). Kernels N(0, 1/fan_in), GroupNorm/LayerNorm scales around 1 and biases
  around 0, so unlike a fresh init (whose blocks end in a zero-scale norm) every conv and
  norm reaches the output."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(module.init, jax.random.key(0), *inputs)["params"]

  def draw(path, leaf):
    noise = rng.standard_normal(leaf.shape).astype(np.float32)
    if path[-1] == "scale":
      return 1 + 0.3 * noise
    if leaf.ndim == 1:
      return 0.3 * noise
    return noise / np.sqrt(math.prod(leaf.shape[:-1]))

  flat = traverse_util.flatten_dict(shapes)
  return {"params": traverse_util.unflatten_dict({k: draw(k, v) for k, v in flat.items()})}


def padded_batch(lengths, padded_length, mels, seed=0):
  """Spectrogram-like inputs `[N, padded_length, mels]`: each row's first lengths[n] frames
  real, the rest large garbage; the real frames alone (`[1, L, mels]` each); the time mask."""
  rng = np.random.default_rng(seed)
  shape = (len(lengths), padded_length, mels)
  real = rng.standard_normal(shape, np.float32)
  mask = np.arange(padded_length) < np.asarray(lengths)[:, None]
  padded = np.where(mask[..., None], real, 1e3 * rng.standard_normal(shape, np.float32))
  return padded, [real[n : n + 1, :length] for n, length in enumerate(lengths)], mask


AUDIO_CNN = dict(  # configs/default.py's audio CNN: time stride 1 · 2 · 2 · 2
  stem_width=8,
  stem_strides=(1, 2),
  stage_widths=(16, 32, 64),
  blocks_per_stage=(1, 1, 1),
  stage_strides=((2, 2),) * 3,
)
ODD_CNN = dict(  # kernel 5 at time stride 3 (three SAME phases), kernel 4 (even), two blocks
  stem_width=8,
  stem_kernel=(5, 3),
  stem_strides=(3, 2),
  stage_widths=(8, 16),
  blocks_per_stage=(2, 1),
  stage_strides=((1, 1), (2, 1)),
  norm_groups=4,
)


@pytest.mark.parametrize(
  "options, lengths, padded_length",
  [(AUDIO_CNN, (41, 30, 17), 75), (ODD_CNN, (29, 22, 13), 46)],
  ids=["default_audio_cnn", "odd_kernels_and_strides"],
)
def test_masked_resnet_gives_each_row_the_map_of_its_valid_rows(options, lengths, padded_length):
  resnet = frame_encoder.ResNet(**options)
  padded, rows, mask = padded_batch(lengths, padded_length, mels=16)
  padded, rows = padded[..., None], [row[..., None] for row in rows]  # one-channel images
  params = random_params(resnet, rows[0])
  masked = jax.jit(lambda p, x, m: resnet.apply(p, x, m, method=resnet.masked_feature_map))
  unmasked = jax.jit(lambda p, x: resnet.apply(p, x, method=resnet.feature_map))
  feature_map, map_mask = masked(params, padded, mask)
  assert map_mask.shape == feature_map.shape[:2]
  assert feature_map.shape[1] == -(-padded_length // resnet.time_stride)
  for n, (length, row) in enumerate(zip(lengths, rows)):
    expected = unmasked(params, row)[0]
    steps = -(-length // resnet.time_stride)
    assert expected.shape[0] == steps == int(map_mask[n].sum())
    assert bool(jnp.all(map_mask[n, :steps]))
    np.testing.assert_allclose(feature_map[n, :steps], expected, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(feature_map[n, steps:], 0)


def plain_resnet_map(resnet, params, images):
  """The ResNet written with flax's own Conv and GroupNorm, as `feature_map` was before masks."""
  conv = lambda p, x, strides: nn.Conv(
    p["kernel"].shape[-1], p["kernel"].shape[:2], strides, padding="SAME", use_bias=False
  ).apply({"params": p}, x)
  norm = lambda p, x: nn.GroupNorm(resnet.norm_groups).apply({"params": p}, x)
  x = nn.relu(norm(params["stem_norm"], conv(params["stem"], images, resnet.stem_strides)))
  for stage, (count_, strides) in enumerate(zip(resnet.blocks_per_stage, resnet.stage_strides)):
    for i in range(count_):
      p, strides = params[f"stage_{stage}_block_{i}"], strides if i == 0 else (1, 1)
      y = nn.relu(norm(p["norm_1"], conv(p["conv_1"], x, strides)))
      y = norm(p["norm_2"], conv(p["conv_2"], y, (1, 1)))
      if "shortcut_conv" in p:
        x = norm(p["shortcut_norm"], conv(p["shortcut_conv"], x, strides))
      x = nn.relu(x + y)
  return x


def test_unmasked_resnet_is_flax_conv_and_group_norm_bit_for_bit():
  resnet = frame_encoder.ResNet(**ODD_CNN)
  images = np.random.default_rng(0).standard_normal((2, 29, 16, 1), np.float32)
  params = random_params(resnet, images)
  plain = jax.jit(lambda p, x: plain_resnet_map(resnet, p, x))(params["params"], images)
  np.testing.assert_array_equal(
    jax.jit(lambda p, x: resnet.apply(p, x, method=resnet.feature_map))(params, images), plain
  )
  # An all-valid mask takes the masked path to the same numbers (up to rounding).
  masked, mask = jax.jit(lambda p, x, m: resnet.apply(p, x, m, method=resnet.masked_feature_map))(
    params, images, np.ones(images.shape[:2], bool)
  )
  assert bool(jnp.all(mask))
  np.testing.assert_allclose(masked, plain, atol=1e-5)


def test_masked_resnet_rejects_a_mask_of_another_shape_or_dtype():
  resnet = frame_encoder.ResNet(**ODD_CNN)
  images = jnp.ones((2, 12, 8, 1))
  params = random_params(resnet, images)
  for mask in (jnp.ones((2, 11), bool), jnp.ones((2, 12), jnp.int32)):
    with pytest.raises(ValueError, match=r"time_mask must be bool \[N, H\]"):
      resnet.apply(params, images, mask, method=resnet.masked_feature_map)
