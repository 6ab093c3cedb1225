"""Per-frame 2D encoders: a ViT and a GroupNorm ResNet, both `[N, H, W, C]` → `[N, D]`.

The video tower folds frames into the batch (`[B, T, H, W, C]` → `[B·T, H, W, C]`) and runs
one of these on every frame, as VTN does.

ViT. Module and parameter names follow the `.npz` checkpoints of Google's ViT / AugReg
releases (google-research/vision_transformer; the layout big_vision and timm read), so a
pretrained ViT-B/16 loads path for path with `load_vit_checkpoint`:

  embedding/{kernel [p, p, 3, D], bias}            patch embedding (a strided conv)
  cls [1, 1, D]                                    class token
  Transformer/posembed_input/pos_embedding [1, 1 + g·g, D]   (CLS entry first, then the grid)
  Transformer/encoderblock_{i}/LayerNorm_0, LayerNorm_2/{scale, bias}
  Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/{query,key,value}/kernel [D, H, D/H]
  Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/out/kernel [H, D/H, D]
  Transformer/encoderblock_{i}/MlpBlock_3/Dense_0, Dense_1/{kernel, bias}
  Transformer/encoder_norm/{scale, bias}
  head/{kernel, bias}                              only with `num_classes > 0`

With `scan_layers` the blocks are one scanned module, `Transformer/encoderblock/...`, each
parameter with a leading `[depth]` axis (big_vision's scanned layout); the loader reads either
layout into either.

The learned position table has the grid of `image_size`; frames of another size get it
resized (bilinear, the CLS entry kept), as in ViT's high-resolution fine-tuning.

ResNet. Basic residual blocks (two 3×3 convs) with GroupNorm rather than BatchNorm: no batch
statistics to carry through the train state, and no way for the normalisation to leak
information between the clips of a contrastive batch (the reason MoCo shuffles BN). Strides
are per stage and per axis, so the audio tower reuses the same stack on a spectrogram with
time kept and frequency pooled (`ResNet.feature_map`). `ResNet.masked_feature_map` runs it on
a batch padded along time (axis 1) and gives every row the map of its valid part alone:
GroupNorm statistics over valid rows, zeros past them, and SAME padding of each row's own
length in the time-strided convs.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import traverse_util

Dtype = Any

# The released ViTs use LayerNorm epsilon 1e-6; pretrained weights assume it.
_VIT_LAYER_NORM_EPSILON = 1e-6
# Checkpoint entries a frame encoder never uses: the classifier of a checkpoint loaded
# without one, and the pre-logits layer of the original ImageNet-21k releases.
_IGNORED_CHECKPOINT_PREFIXES = ("head/", "pre_logits/")
_POSEMB_PATH = "Transformer/posembed_input/pos_embedding"
# The module name of the blocks of a ViT with `scan_layers`: one module whose parameters
# carry a leading layer axis (`Transformer/encoderblock/...`, big_vision's scanned layout).
SCANNED_BLOCKS = "encoderblock"
_STACKED_PREFIX = f"Transformer/{SCANNED_BLOCKS}/"
_PER_LAYER_BLOCK = re.compile(r"^Transformer/encoderblock_(\d+)/(.+)$")


def as_pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
  """An int or a pair of ints → (height, width)."""
  pair = (value, value) if isinstance(value, (int, np.integer)) else tuple(value)
  if len(pair) != 2 or not all(isinstance(v, (int, np.integer)) and v >= 1 for v in pair):
    raise ValueError(f"{name} must be an int >= 1 or a pair of them; got {value!r}.")
  return int(pair[0]), int(pair[1])


def check_images(images: jax.Array) -> None:
  if images.ndim != 4:
    raise ValueError(
      f"images must be [N, H, W, C]; got shape {images.shape}. Fold frames into the batch "
      "first ([B, T, H, W, C] → [B·T, H, W, C])."
    )


# ----------------------------------------------------------------------------- ViT


def resize_position_grid(
  posemb: jax.Array, old_grid: tuple[int, int], new_grid: tuple[int, int]
) -> jax.Array:
  """Bilinear resize of a learned position table `[1, 1 + gh·gw, D]` (CLS entry first)."""
  if old_grid == new_grid:
    return posemb
  cls, grid = posemb[:, :1], posemb[:, 1:]
  grid = grid.reshape(old_grid + (posemb.shape[-1],))
  grid = jax.image.resize(grid, new_grid + (posemb.shape[-1],), method="bilinear")
  return jnp.concatenate([cls, grid.reshape(1, -1, posemb.shape[-1]).astype(cls.dtype)], axis=1)


def sincos_position_grid(grid: tuple[int, int], width: int) -> jax.Array:
  """Fixed 2D sine-cosine positions `[1, gh·gw, width]` (a quarter of the channels per sin/cos
  of each axis); needs no table, so any grid size works."""
  if width % 4:
    raise ValueError(f"sincos position embedding needs a width divisible by 4; got {width}.")
  rows, cols = np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), indexing="ij")
  frequencies = 1.0 / 10_000 ** (np.arange(width // 4) / (width // 4))
  angles = [np.outer(axis.reshape(-1), frequencies) for axis in (rows, cols)]
  table = np.concatenate([f(a) for a in angles for f in (np.sin, np.cos)], axis=1)
  return jnp.asarray(table[None], jnp.float32)


def split_over_mesh(x: jax.Array) -> jax.Array:
  """`x` `[N, ...]` constrained to be split by rows over every axis of the mesh being traced
  for (`jax.sharding.use_abstract_mesh`; as the batch is), or `x` itself when none is set.

  Inside a scanned loop GSPMD does not carry the batch split of the input through: for a
  ViT-L over FSDP-split weights it split the activations by width instead and gathered them
  every layer (measured for a v5e-256: 309 GiB of all-gathers per chip per step, 7.2 GiB of
  temporaries at 4 clips per chip); the constraint keeps the rows split.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(mesh.axis_names))


class MlpBlock(nn.Module):
  """Dense → GELU → Dropout → Dense → Dropout, `[..., D]` → `[..., D]`."""

  mlp_dim: int
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, deterministic: bool):
    width = x.shape[-1]
    y = nn.Dense(self.mlp_dim, dtype=self.dtype, param_dtype=self.param_dtype, name="Dense_0")(x)
    y = nn.Dropout(self.dropout_rate)(nn.gelu(y), deterministic=deterministic)
    y = nn.Dense(width, dtype=self.dtype, param_dtype=self.param_dtype, name="Dense_1")(y)
    return nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)


class ViTBlock(nn.Module):
  """Pre-LN transformer block over all tokens, `[N, S, D]` → `[N, S, D]`."""

  num_heads: int
  mlp_dim: int
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool):
    norm = lambda name: nn.LayerNorm(
      epsilon=_VIT_LAYER_NORM_EPSILON, dtype=self.dtype, param_dtype=self.param_dtype, name=name
    )
    y = nn.MultiHeadDotProductAttention(
      num_heads=self.num_heads,
      dropout_rate=self.dropout_rate,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="MultiHeadDotProductAttention_1",
    )(norm("LayerNorm_0")(x), deterministic=deterministic)
    x = x + nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
    y = MlpBlock(
      self.mlp_dim,
      self.dropout_rate,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="MlpBlock_3",
    )(norm("LayerNorm_2")(x), deterministic=deterministic)
    return x + y


class PositionTable(nn.Module):
  """The learned position table (CLS entry first), resized to the grid of the input."""

  grid: tuple[int, int]
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens, grid: tuple[int, int]):
    """tokens `[N, 1 + gh·gw, D]` (CLS first) → tokens + positions."""
    table = self.param(
      "pos_embedding",
      nn.initializers.normal(stddev=0.02),
      (1, 1 + self.grid[0] * self.grid[1], tokens.shape[-1]),
      self.param_dtype,
    )
    return tokens + resize_position_grid(table, self.grid, grid).astype(tokens.dtype)


class Transformer(nn.Module):
  """Position embedding, dropout, pre-LN blocks and the final LayerNorm (`encoder_norm`)."""

  depth: int
  num_heads: int
  mlp_dim: int
  posemb: str
  posemb_grid: tuple[int, int]
  dropout_rate: float = 0.0
  remat: bool = False
  scan_layers: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens, grid: tuple[int, int], *, deterministic: bool):
    """tokens `[N, 1 + gh·gw, D]` (CLS first) → `[N, 1 + gh·gw, D]`."""
    if self.posemb == "learn":
      tokens = PositionTable(self.posemb_grid, self.param_dtype, name="posembed_input")(
        tokens, grid
      )
    else:
      grid_positions = sincos_position_grid(grid, tokens.shape[-1])
      tokens = tokens.at[:, 1:].add(grid_positions.astype(tokens.dtype))
    x = nn.Dropout(self.dropout_rate)(tokens, deterministic=deterministic)
    # prevent_cse=False inside a scan: the loop already keeps XLA from merging the recompute.
    block_cls = (
      nn.remat(ViTBlock, static_argnums=(2,), prevent_cse=not self.scan_layers)
      if self.remat
      else ViTBlock
    )
    block = lambda name: block_cls(
      self.num_heads,
      self.mlp_dim,
      self.dropout_rate,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name=name,
    )
    if self.scan_layers:
      # One block's program looped `depth` times over parameters stacked on a leading
      # layer axis: the compiler sees one layer instead of `depth` (big_vision's scan layout).
      layers = nn.scan(
        lambda module, carry, _: (module(split_over_mesh(carry), deterministic), None),
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        length=self.depth,
      )
      x, _ = layers(block(SCANNED_BLOCKS), x, None)
    else:
      for i in range(self.depth):
        x = block(f"encoderblock_{i}")(x, deterministic)
    return nn.LayerNorm(
      epsilon=_VIT_LAYER_NORM_EPSILON,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="encoder_norm",
    )(x)


class ViT(nn.Module):
  """Vision Transformer on single images; the CLS token's final state is the feature.

  Attributes:
    patch_size: patch height and width (an int for square patches).
    width: model width D.
    depth: transformer blocks.
    num_heads: attention heads (D must divide by it).
    mlp_dim: hidden width of each block's MLP.
    image_size: the image size the learned position table is laid out for (an int for
      square images); other sizes get the table resized. Unused with `posemb='sincos2d'`.
    posemb: 'learn' (a table, ViT) or 'sincos2d' (fixed, any grid, no table).
    num_classes: 0 returns the feature `[N, D]`; > 0 adds the release's linear `head`
      and returns logits `[N, num_classes]`.
    dropout_rate: dropout on embeddings, attention probabilities, MLPs and residual branches.
    remat: recompute each block in the backward pass.
    scan_layers: run the blocks as one `nn.scan` over parameters stacked on a leading layer
      axis (`Transformer/encoderblock/...`, each `[depth, ...]`) rather than `depth` unrolled
      blocks (`encoderblock_{i}`): the same function, compiled once per step instead of
      `depth` times. Checkpoints of one layout do not restore into the other.
  """

  patch_size: int | tuple[int, int]
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  image_size: int | tuple[int, int] = 224
  posemb: str = "learn"
  num_classes: int = 0
  dropout_rate: float = 0.0
  remat: bool = False
  scan_layers: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def table_grid(self) -> tuple[int, int]:
    """The patch grid of `image_size`: the grid the learned position table is stored in."""
    patch = as_pair(self.patch_size, "patch_size")
    size = as_pair(self.image_size, "image_size")
    return size[0] // patch[0], size[1] // patch[1]

  @nn.compact
  def __call__(self, images, *, deterministic: bool = True):
    """images `[N, H, W, C]` → features `[N, width]` (or logits `[N, num_classes]`)."""
    check_images(images)
    if self.posemb not in ("learn", "sincos2d"):
      raise ValueError(f"posemb must be 'learn' or 'sincos2d'; got {self.posemb!r}.")
    patch = as_pair(self.patch_size, "patch_size")
    if images.shape[1] < patch[0] or images.shape[2] < patch[1]:
      raise ValueError(
        f"images [N, H, W, C] = {images.shape} are smaller than one patch {patch}; use "
        "larger images or a smaller patch_size."
      )
    x = nn.Conv(
      self.width,
      patch,
      strides=patch,
      padding="VALID",
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="embedding",
    )(images)
    batch, grid_h, grid_w, _ = x.shape
    x = x.reshape(batch, grid_h * grid_w, self.width)
    cls = self.param("cls", nn.initializers.zeros, (1, 1, self.width), self.param_dtype)
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (batch, 1, self.width)), x], 1)
    x = Transformer(
      self.depth,
      self.num_heads,
      self.mlp_dim,
      self.posemb,
      self.table_grid(),
      self.dropout_rate,
      self.remat,
      self.scan_layers,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="Transformer",
    )(x, (grid_h, grid_w), deterministic=deterministic)
    features = x[:, 0]
    if not self.num_classes:
      return features
    return nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype, name="head")(
      features
    )


def load_vit_checkpoint(path: str, target: Any, *, grid: tuple[int, int]) -> dict:
  """Reads a ViT `.npz` checkpoint (Google ViT / AugReg layout) into the tree of `target`.

  Args:
    path: a local (or `gs://`) `.npz` file; nothing is downloaded.
    target: the ViT's parameter tree (arrays, or `jax.ShapeDtypeStruct`s from
      `jax.eval_shape`): names, shapes and dtypes to fill.
    grid: the patch grid of the target's position table (`ViT.table_grid()`); a checkpoint
      with another (square) grid has its table resized to it.

  Returns:
    A nested dict shaped like `target`, of numpy arrays in the target's dtypes. The
    checkpoint's `head` and `pre_logits` are ignored unless `target` has them.

  Raises:
    ValueError naming every missing, unexpected or mis-shaped parameter at once.
  """
  path = epath.Path(path)
  if not path.exists():
    raise ValueError(
      f"ViT checkpoint {path} does not exist; give the path of a local .npz file "
      "(nothing is downloaded)."
    )
  with path.open("rb") as f, np.load(f) as npz:
    checkpoint = {name: np.asarray(npz[name]) for name in npz.files}
  wanted = traverse_util.flatten_dict(target, sep="/")
  checkpoint = _in_block_layout_of(checkpoint, wanted)

  if _POSEMB_PATH in checkpoint and _POSEMB_PATH in wanted:
    checkpoint[_POSEMB_PATH] = _resize_checkpoint_table(checkpoint[_POSEMB_PATH], grid, path)

  missing = sorted(set(wanted) - set(checkpoint))
  unexpected = sorted(
    name
    for name in set(checkpoint) - set(wanted)
    if not name.startswith(_IGNORED_CHECKPOINT_PREFIXES)
  )
  misshaped = sorted(
    f"{name}: checkpoint {checkpoint[name].shape}, model {wanted[name].shape}"
    for name in set(wanted) & set(checkpoint)
    if checkpoint[name].shape != tuple(wanted[name].shape)
  )
  problems = [
    f"{title} ({len(names)}): " + ", ".join(names)
    for title, names in (
      ("missing", missing),
      ("unexpected", unexpected),
      ("mis-shaped", misshaped),
    )
    if names
  ]
  if problems:
    raise ValueError(
      f"ViT checkpoint {path} does not match the model (expected the Google ViT/AugReg "
      "layout with the configured patch size, width, depth and heads):\n  " + "\n  ".join(problems)
    )
  loaded = {name: checkpoint[name].astype(wanted[name].dtype) for name in wanted}
  return traverse_util.unflatten_dict(loaded, sep="/")


def _in_block_layout_of(checkpoint: dict, wanted: dict) -> dict:
  """The checkpoint's blocks in the target's layout: per-layer `encoderblock_{i}` entries
  (the ViT/AugReg releases) stacked on a leading layer axis for a ViT with `scan_layers`, or a
  stacked checkpoint (big_vision's scanned layout) split per layer for one without."""
  wants_stacked = any(name.startswith(_STACKED_PREFIX) for name in wanted)
  has_stacked = any(name.startswith(_STACKED_PREFIX) for name in checkpoint)
  if wants_stacked and not has_stacked:
    layers: dict[str, dict[int, np.ndarray]] = {}
    converted = {}
    for name, value in checkpoint.items():
      match = _PER_LAYER_BLOCK.match(name)
      if match:
        layers.setdefault(match[2], {})[int(match[1])] = value
      else:
        converted[name] = value
    for suffix, by_layer in layers.items():
      if sorted(by_layer) == list(range(len(by_layer))):
        converted[_STACKED_PREFIX + suffix] = np.stack([by_layer[i] for i in sorted(by_layer)])
      else:  # a layer is missing: keep the names, so the mismatch report lists them
        converted.update({f"Transformer/encoderblock_{i}/{suffix}": v for i, v in by_layer.items()})
    return converted
  if has_stacked and not wants_stacked:
    converted = {}
    for name, value in checkpoint.items():
      if name.startswith(_STACKED_PREFIX):
        suffix = name[len(_STACKED_PREFIX) :]
        converted.update({f"Transformer/encoderblock_{i}/{suffix}": v for i, v in enumerate(value)})
      else:
        converted[name] = value
    return converted
  return checkpoint


def _resize_checkpoint_table(table: np.ndarray, grid: tuple[int, int], path) -> np.ndarray:
  """A checkpoint's `[1, 1 + g·g, D]` table resized to `grid` (tables are stored square)."""
  if table.ndim != 3 or table.shape[0] != 1:
    return table  # reported as mis-shaped by the caller
  side = math.isqrt(table.shape[1] - 1)
  if side * side + 1 != table.shape[1]:
    raise ValueError(
      f"{_POSEMB_PATH} in {path} has {table.shape[1]} entries; expected a CLS entry plus a "
      "square grid (1 + g·g), as in the ViT/AugReg releases."
    )
  return np.asarray(resize_position_grid(jnp.asarray(table), (side, side), grid))


# ----------------------------------------------------------------------------- ResNet


def strided_lengths(lengths, stride: int):
  """Valid lengths (an int or `[N]`) after a SAME conv of `stride`: ⌈L / stride⌉. Strides
  compose: ⌈⌈L/a⌉/b⌉ = ⌈L/(a·b)⌉."""
  return -(-lengths // stride)


def prefix_mask(lengths: jax.Array, size: int) -> jax.Array:
  """`[N]` valid lengths → bool `[N, size]`, True on each row's first `lengths[n]` entries."""
  return jnp.arange(size) < lengths[:, None]


def _zero_padding(x: jax.Array, lengths: jax.Array | None) -> jax.Array:
  """x `[N, H, W, C]` with rows H ≥ lengths[n] set to zero (as SAME's zero padding would be)."""
  if lengths is None:
    return x
  return jnp.where(prefix_mask(lengths, x.shape[1])[:, :, None, None], x, 0)


def _norm_mask(x: jax.Array, lengths: jax.Array | None) -> jax.Array | None:
  """GroupNorm's `mask` (x's shape) selecting rows below `lengths`; None for all rows."""
  if lengths is None:
    return None
  return jnp.broadcast_to(prefix_mask(lengths, x.shape[1])[:, :, None, None], x.shape)


def _same_conv_per_row(lengths: jax.Array):
  """A `lax.conv_general_dilated` for `nn.Conv(padding='SAME')` whose padding along axis 1 is
  SAME for each row's true length `lengths` `[N]` rather than for the padded buffer.

  SAME over length L with kernel k and stride s pads total = max((⌈L/s⌉ − 1)·s + k − L, 0),
  lo = total // 2 in front, so output i reads inputs s·i − lo … s·i − lo + k − 1. lo depends on
  L (for k=3, s=2 it is 1 for odd L, 0 for even), so a buffer padded to another length would
  sample the wrong phase. Here every row is padded by p = (k − 1)//2 in front, shifted by its
  own p − lo ∈ [0, p] (lo ≤ (k−1)//2 always) and convolved VALID: the same windows, at the
  strided cost. With s = 1 (lo = p) or k = 1 (lo = 0) lo does not depend on L and the plain
  conv is already exact. Axis 2 keeps the buffer's SAME padding (its size is never padded).
  Inputs past each row's length must be zero, as SAME's padding is. No dilation (the ResNet
  has none).
  """

  def conv(inputs, kernel, window_strides, padding, **kwargs):
    if padding != "SAME":
      raise ValueError(f"per-row padding is SAME padding; got padding={padding!r}.")
    k, s = kernel.shape[0], window_strides[0]
    if s == 1 or k == 1:
      return jax.lax.conv_general_dilated(inputs, kernel, window_strides, padding, **kwargs)
    p = (k - 1) // 2
    out_rows = -(-inputs.shape[1] // s)
    window_rows = (out_rows - 1) * s + k
    total = jnp.maximum((strided_lengths(lengths, s) - 1) * s + k - lengths, 0)
    shift = p - total // 2
    padded = jnp.pad(inputs, ((0, 0), (p, max(window_rows - inputs.shape[1], 0)), (0, 0), (0, 0)))
    rows = shift[:, None] + jnp.arange(window_rows)
    shifted = jnp.take_along_axis(padded, rows[:, :, None, None], axis=1)
    width_pads = jax.lax.padtype_to_pads(
      inputs.shape[2:3], kernel.shape[1:2], window_strides[1:], "SAME"
    )
    return jax.lax.conv_general_dilated(
      shifted, kernel, window_strides, [(0, 0), *width_pads], **kwargs
    )

  return conv


class ResidualBlock(nn.Module):
  """Basic residual block: 3×3 conv → GN → ReLU → 3×3 conv → GN, plus shortcut, → ReLU.

  `[N, H, W, C]` → `[N, ⌈H/sh⌉, ⌈W/sw⌉, width]`. The last GroupNorm starts at zero scale, so
  every block starts as (almost) the identity.
  """

  width: int
  strides: tuple[int, int] = (1, 1)
  norm_groups: int = 8
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, lengths=None):
    """x `[N, H, W, C]`; lengths `[N]` int (rows past them zero) or None (every row valid).

    With lengths, each row's valid part comes out as that part alone would (per-row SAME
    padding, GroupNorm statistics over valid rows) and the rows past ⌈lengths/sh⌉ are zero.
    """
    conv_fn = None if lengths is None else _same_conv_per_row(lengths)
    out_lengths = None if lengths is None else strided_lengths(lengths, self.strides[0])
    conv = lambda kernel, strides, name: nn.Conv(
      self.width,
      kernel,
      strides=strides,
      padding="SAME",
      use_bias=False,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      conv_general_dilated=conv_fn,
      name=name,
    )
    norm = lambda name, y, scale_init=nn.initializers.ones: nn.GroupNorm(
      num_groups=self.norm_groups,
      scale_init=scale_init,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name=name,
    )(y, mask=_norm_mask(y, out_lengths))
    y = _zero_padding(nn.relu(norm("norm_1", conv((3, 3), self.strides, "conv_1")(x))), out_lengths)
    y = norm("norm_2", conv((3, 3), (1, 1), "conv_2")(y), nn.initializers.zeros)
    if x.shape[-1] != self.width or self.strides != (1, 1):
      x = norm("shortcut_norm", conv((1, 1), self.strides, "shortcut_conv")(x))
    return _zero_padding(nn.relu(x + y), out_lengths)


class ResNet(nn.Module):
  """Stem conv and stages of `ResidualBlock`s; features are the spatial mean of the last map.

  Attributes:
    stem_width: channels of the stem conv.
    stem_kernel: stem conv kernel (height, width).
    stem_strides: stem conv strides (height, width).
    stage_widths: channels of each stage.
    blocks_per_stage: residual blocks in each stage.
    stage_strides: (height, width) strides of each stage's first block.
    norm_groups: GroupNorm groups (every width must divide by it).
    remat: recompute each block in the backward pass.
  """

  stem_width: int
  stage_widths: Sequence[int]
  blocks_per_stage: Sequence[int]
  stage_strides: Sequence[tuple[int, int]]
  stem_kernel: tuple[int, int] = (3, 3)
  stem_strides: tuple[int, int] = (1, 1)
  norm_groups: int = 8
  remat: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def time_stride(self) -> int:
    """How many input rows (axis 1: time, for the audio tower) make one row of the map: an
    input of H rows gives ⌈H / time_stride⌉."""
    return math.prod(int(s[0]) for s in (self.stem_strides, *self.stage_strides))

  @nn.compact
  def _map(self, images, lengths):
    """images `[N, H, W, C]`, lengths `[N]` or None → (map `[N, H', W', C']`, lengths' or None)."""
    check_images(images)
    stages = (len(self.stage_widths), len(self.blocks_per_stage), len(self.stage_strides))
    if len(set(stages)) != 1:
      raise ValueError(
        "stage_widths, blocks_per_stage and stage_strides need one entry per stage; got "
        f"{self.stage_widths}, {self.blocks_per_stage}, {self.stage_strides}."
      )
    for width in (self.stem_width, *self.stage_widths):
      if width % self.norm_groups:
        raise ValueError(
          f"ResNet widths must divide by norm_groups={self.norm_groups}; got "
          f"stem {self.stem_width}, stages {tuple(self.stage_widths)}."
        )
    x = nn.Conv(
      self.stem_width,
      tuple(self.stem_kernel),
      strides=tuple(self.stem_strides),
      padding="SAME",
      use_bias=False,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      conv_general_dilated=None if lengths is None else _same_conv_per_row(lengths),
      name="stem",
    )(_zero_padding(images, lengths))
    if lengths is not None:
      lengths = strided_lengths(lengths, self.stem_strides[0])
    x = nn.GroupNorm(
      num_groups=self.norm_groups, dtype=self.dtype, param_dtype=self.param_dtype, name="stem_norm"
    )(x, mask=_norm_mask(x, lengths))
    x = _zero_padding(nn.relu(x), lengths)
    block_cls = nn.remat(ResidualBlock) if self.remat else ResidualBlock
    for stage, (width, count, strides) in enumerate(
      zip(self.stage_widths, self.blocks_per_stage, self.stage_strides)
    ):
      for i in range(count):
        block_strides = tuple(strides) if i == 0 else (1, 1)
        x = block_cls(
          width,
          block_strides,
          self.norm_groups,
          dtype=self.dtype,
          param_dtype=self.param_dtype,
          name=f"stage_{stage}_block_{i}",
        )(x, lengths)
        if lengths is not None:
          lengths = strided_lengths(lengths, block_strides[0])
    return x, lengths

  def feature_map(self, images):
    """images `[N, H, W, C]` → the last stage's map `[N, H', W', stage_widths[-1]]`."""
    return self._map(images, None)[0]

  def masked_feature_map(self, images, time_mask):
    """The map of each row's valid part along axis 1 (time), padded back to one shape.

    Args:
      images: `[N, H, W, C]`; rows past each row's valid length may hold anything.
      time_mask: bool `[N, H]`, True on the valid rows, which must be a prefix (only the
        count of True entries is read).

    Returns:
      map `[N, H', W', C']` (H' = ⌈H / time_stride⌉) whose first ⌈L / time_stride⌉ rows equal
      `feature_map(images[n : n + 1, :L])` for the row's length L, and zeros after them;
      the map's mask, bool `[N, H']`. Time-strided convs first copy their input row-shifted
      (`_same_conv_per_row`); the convs themselves cost what they cost in `feature_map`.
    """
    if time_mask.shape != images.shape[:2] or time_mask.dtype != jnp.bool_:
      raise ValueError(
        f"time_mask must be bool [N, H] = {images.shape[:2]}; got "
        f"{time_mask.dtype} {time_mask.shape}."
      )
    x, lengths = self._map(images, time_mask.sum(axis=1))
    return x, prefix_mask(lengths, x.shape[1])

  def __call__(self, images, *, deterministic: bool = True):
    """images `[N, H, W, C]` → features `[N, stage_widths[-1]]`.

    `deterministic` is accepted for the frame-encoder interface; the ResNet has no dropout.
    """
    del deterministic
    return self.feature_map(images).mean(axis=(1, 2))
