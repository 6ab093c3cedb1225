"""The Contrastive Multi-modal Video Transformer: both towers, projection and classifier heads.

  video [B, T, H, W, C] → frames folded into the batch → frame encoder (ViT | ResNet) →
      [B, T, D_f] → TemporalEncoder (Dense + time embedding, CLS global, Longformer) →
      video features [B, D_v] → ProjectionHead → video embedding [B, E]
  log-mel [B, F, M] → AudioEncoder (CNN + TemporalEncoder | patch ViT) →
      audio features [B, D_a] → ProjectionHead → audio embedding [B, E]

Embeddings come out un-normalised, in float32: the losses L2-normalise inside, export
normalises what it writes. Parameters are float32 (`param_dtype`); the compute dtype comes
from `config.model.dtype` (bfloat16 on accelerators); heads return float32.

Building, initialising and applying (what the trainer does):

  model = cmvt.from_config(config)                 # reads config.model and config.input
  variables = model.init(rng, video, audio)        # {'params': ...}; video/audio as above
  params = cmvt.load_pretrained(variables['params'], config)   # ViT checkpoint, if set
  out = model.apply({'params': params}, video, audio, frame_mask=mask, train=True,
                    rngs={'dropout': dropout_rng})  # dropout only draws with train=True
  out['video'], out['audio']                       # [B, E] for the contrastive loss
  model.apply({'params': params}, video, method=cmvt.CMVT.classify, train=True, rngs=...)
  model.apply({'params': params}, video, frame_mask=mask, method=cmvt.CMVT.embed_video)
  model.apply({'params': params}, log_mel, audio_mask=mask, method=cmvt.CMVT.embed_audio)
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from ml_collections import config_dict

from cmvt_jax.models import attention
from cmvt_jax.models import audio_encoder
from cmvt_jax.models import frame_encoder
from cmvt_jax.models import longformer
from cmvt_jax.models import temporal_encoder

Dtype = Any

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class VideoEncoder(nn.Module):
  """Frames `[B, T, H, W, C]` → per-frame features `[B, T, D_f]` → clip feature `[B, D_v]`.

  Attributes:
    frame_encoder: `frame_encoder.ViT` or `frame_encoder.ResNet`, `[N, H, W, C]` → `[N, D_f]`.
    temporal: the `temporal_encoder.TemporalEncoder` over frame time.
  """

  frame_encoder: nn.Module
  temporal: nn.Module

  def __call__(self, video, frame_mask=None, *, deterministic: bool = True):
    """video `[B, T, H, W, C]`, frame_mask `[B, T]` bool (False = padding frame) → `[B, D_v]`.

    Padding frames are still encoded (shapes stay static) but nobody attends to them.
    """
    if video.ndim != 5:
      raise ValueError(f"video must be [B, T, H, W, C]; got shape {video.shape}.")
    batch, frames = video.shape[:2]
    if frame_mask is not None and (
      frame_mask.shape != (batch, frames) or frame_mask.dtype != jnp.bool_
    ):
      raise ValueError(
        f"frame_mask must be bool [B, T] = {(batch, frames)}; got "
        f"{frame_mask.dtype} {frame_mask.shape}."
      )
    features = self.encode_frames(
      video.reshape((batch * frames,) + video.shape[2:]), deterministic=deterministic
    )
    return self.encode_features(
      features.reshape(batch, frames, -1), frame_mask, deterministic=deterministic
    )

  def encode_frames(self, frames, *, deterministic: bool = True):
    """frames `[N, H, W, C]` → per-frame features `[N, D_f]` (frame by frame, so a long video
    can go through in chunks and give the same features)."""
    return self.frame_encoder(frames, deterministic=deterministic)

  def encode_features(self, features, frame_mask=None, *, deterministic: bool = True):
    """per-frame features `[B, T, D_f]`, frame_mask `[B, T]` → clip feature `[B, D_v]`."""
    return self.temporal(features, frame_mask, deterministic=deterministic)


class ProjectionHead(nn.Module):
  """Dense → GELU → Dense into the shared space: `[B, D]` → `[B, embed_dim]` float32."""

  hidden_dim: int
  embed_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, features):
    x = nn.Dense(self.hidden_dim, dtype=self.dtype, param_dtype=self.param_dtype, name="hidden")(
      features
    )
    x = nn.Dense(self.embed_dim, dtype=self.dtype, param_dtype=self.param_dtype, name="output")(
      nn.gelu(x)
    )
    return x.astype(jnp.float32)


class ClassifierHead(nn.Module):
  """VTN's head: LayerNorm → Dense → GELU → Dropout → Dense, `[B, D]` → logits `[B, C]` f32."""

  num_classes: int
  hidden_dim: int
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, features, *, deterministic: bool = True):
    x = nn.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="norm")(features)
    x = nn.Dense(self.hidden_dim, dtype=self.dtype, param_dtype=self.param_dtype, name="hidden")(x)
    x = nn.Dropout(self.dropout_rate)(nn.gelu(x), deterministic=deterministic)
    x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype, name="logits")(x)
    return x.astype(jnp.float32)


class CMVT(nn.Module):
  """Video and audio towers with projection heads into one space, and an optional classifier.

  Attributes:
    video_encoder: a `VideoEncoder`.
    audio_encoder: an `audio_encoder.AudioEncoder`.
    embed_dim: dimension E of the shared embedding space.
    projection_hidden_dim: hidden width of both projection heads.
    num_classes: > 0 adds a `ClassifierHead` on the video features (supervised objective).
    classifier_hidden_dim: hidden width of the classifier head.
    classifier_dropout: dropout inside the classifier head.
  """

  video_encoder: nn.Module
  audio_encoder: nn.Module
  embed_dim: int
  projection_hidden_dim: int
  num_classes: int = 0
  classifier_hidden_dim: int = 0
  classifier_dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    head = lambda: ProjectionHead(
      self.projection_hidden_dim, self.embed_dim, dtype=self.dtype, param_dtype=self.param_dtype
    )
    self.video_projection = head()
    self.audio_projection = head()
    if self.num_classes:
      self.classifier = ClassifierHead(
        self.num_classes,
        self.classifier_hidden_dim,
        self.classifier_dropout,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
      )

  def __call__(
    self, video, audio, *, frame_mask=None, audio_mask=None, train: bool = False
  ) -> dict:
    """Both modalities.

    Args:
      video: `[B, T, H, W, C]` float frames.
      audio: `[B, F, M]` log-mel (time first).
      frame_mask: optional bool `[B, T]`, False for padding frames.
      audio_mask: optional bool `[B, F]`, False for padding log-mel frames (a suffix of each
        row; needs the CNN audio backbone).
      train: enables dropout (then `rngs={'dropout': key}` is needed).

    Returns:
      'video', 'audio': `[B, E]` float32 embeddings, un-normalised;
      'video_features', 'audio_features': `[B, D_v]`, `[B, D_a]` float32 tower outputs
        before projection;
      'logits': `[B, num_classes]` float32, only when `num_classes > 0`.
    """
    video_out = self.embed_video(video, frame_mask=frame_mask, train=train)
    audio_out = self.embed_audio(audio, audio_mask=audio_mask, train=train)
    out = {
      "video": video_out["embedding"],
      "audio": audio_out["embedding"],
      "video_features": video_out["features"],
      "audio_features": audio_out["features"],
    }
    if self.num_classes:
      out["logits"] = self.classifier(video_out["features"], deterministic=not train)
    return out

  def embed_video(self, video, *, frame_mask=None, train: bool = False) -> dict:
    """video `[B, T, H, W, C]` (any T: 16-frame clips or whole videos) →
    {'embedding': `[B, E]`, 'features': `[B, D_v]`}, float32."""
    features = self.video_encoder(video, frame_mask, deterministic=not train)
    return {"embedding": self.video_projection(features), "features": features.astype(jnp.float32)}

  def encode_frames(self, frames) -> jax.Array:
    """frames `[N, H, W, C]` → the frame encoder's features `[N, D_f]` (inference)."""
    return self.video_encoder.encode_frames(frames)

  def embed_frame_features(self, features, *, frame_mask=None) -> dict:
    """`encode_frames`' features `[B, T, D_f]` (mask `[B, T]`) → {'embedding': `[B, E]`,
    'features': `[B, D_v]`}, float32: `embed_video` from frames already encoded (inference)."""
    features = self.video_encoder.encode_features(features, frame_mask)
    return {"embedding": self.video_projection(features), "features": features.astype(jnp.float32)}

  def embed_audio(self, audio, *, audio_mask=None, train: bool = False) -> dict:
    """audio `[B, F, M]` (any F), audio_mask bool `[B, F]` (False = padding) or None →
    {'embedding': `[B, E]`, 'features': `[B, D_a]`}, float32."""
    features = self.audio_encoder(audio, audio_mask, deterministic=not train)
    return {"embedding": self.audio_projection(features), "features": features.astype(jnp.float32)}

  def classify(self, video, *, frame_mask=None, train: bool = False) -> jax.Array:
    """video `[B, T, H, W, C]` → logits `[B, num_classes]` float32 (VTN's supervised path)."""
    if not self.num_classes:
      raise ValueError("classify needs a classifier head: set config.model.num_classes > 0.")
    features = self.video_encoder(video, frame_mask, deterministic=not train)
    return self.classifier(features, deterministic=not train)


# ----------------------------------------------------------------------------- from config


def compute_dtype(name: str) -> Dtype:
  """'float32' | 'bfloat16' | 'float16' → the jnp dtype."""
  if name not in _DTYPES:
    raise ValueError(f"config.model.dtype must be one of {sorted(_DTYPES)}; got {name!r}.")
  return _DTYPES[name]


def attention_implementation(name: str | None) -> str | None:
  """`config.model.attention_implementation`, checked: None (chosen for the platform the
  program is compiled for) or one of `attention.IMPLEMENTATIONS`."""
  if name is not None and name not in attention.IMPLEMENTATIONS:
    raise ValueError(
      f"config.model.attention_implementation must be unset (chosen for the platform) or one "
      f"of {attention.IMPLEMENTATIONS}; got {name!r}."
    )
  return name


def from_config(config: config_dict.ConfigDict) -> CMVT:
  """The model described by `config.model`, sized for `config.input.frame_size` frames."""
  model = config.model
  dtype = compute_dtype(model.dtype)
  temporal = functools.partial(
    _temporal,
    remat=model.remat,
    dtype=dtype,
    implementation=attention_implementation(model.attention_implementation),
  )
  video = VideoEncoder(
    frame_encoder=_frame_encoder(model.video, int(config.input.frame_size), model.remat, dtype),
    temporal=temporal(model.video.temporal, "model.video.temporal"),
  )
  return CMVT(
    video_encoder=video,
    audio_encoder=_audio_encoder(model.audio, temporal, model.remat, dtype),
    embed_dim=model.embed_dim,
    projection_hidden_dim=model.projection_hidden_dim,
    num_classes=model.num_classes,
    classifier_hidden_dim=model.classifier_hidden_dim,
    classifier_dropout=model.classifier_dropout,
    dtype=dtype,
  )


def load_pretrained(params: dict, config: config_dict.ConfigDict) -> dict:
  """`params` with the frame ViT replaced by `config.model.video.vit.checkpoint`, when set.

  `params` is `variables['params']` of the model (arrays, or `jax.ShapeDtypeStruct`s from
  `jax.eval_shape`); the loaded subtree is numpy, for the caller to place on devices.
  """
  video = config.model.video
  if not video.vit.checkpoint:
    return params
  if video.frame_encoder != "vit":
    raise ValueError(
      f"config.model.video.vit.checkpoint is set but config.model.video.frame_encoder is "
      f"{video.frame_encoder!r}; a ViT checkpoint needs frame_encoder='vit'."
    )
  vit = from_config(config).video_encoder.frame_encoder
  loaded = frame_encoder.load_vit_checkpoint(
    video.vit.checkpoint, params["video_encoder"]["frame_encoder"], grid=vit.table_grid()
  )
  return {**params, "video_encoder": {**params["video_encoder"], "frame_encoder": loaded}}


def _frame_encoder(video, frame_size: int, remat: bool, dtype) -> nn.Module:
  if video.frame_encoder == "vit":
    vit = video.vit
    if frame_size % vit.patch_size:
      raise ValueError(
        f"config.input.frame_size={frame_size} must be a multiple of "
        f"config.model.video.vit.patch_size={vit.patch_size}."
      )
    return frame_encoder.ViT(
      patch_size=vit.patch_size,
      width=vit.width,
      depth=vit.depth,
      num_heads=vit.num_heads,
      mlp_dim=vit.mlp_dim,
      image_size=frame_size,
      dropout_rate=vit.dropout_rate,
      remat=remat,
      scan_layers=vit.scan_layers,
      dtype=dtype,
    )
  if video.frame_encoder == "resnet":
    return _resnet(video.resnet, remat, dtype)
  raise ValueError(
    f"config.model.video.frame_encoder must be 'vit' or 'resnet'; got {video.frame_encoder!r}."
  )


def _audio_encoder(audio, temporal, remat: bool, dtype) -> audio_encoder.AudioEncoder:
  """`temporal(section, name)` builds the temporal encoder (`_temporal`, partly applied)."""
  if audio.backbone == "cnn":
    return audio_encoder.AudioEncoder(
      backbone=_resnet(audio.cnn, remat, dtype),
      temporal=temporal(audio.temporal, "model.audio.temporal"),
    )
  if audio.backbone == "patch_transformer":
    patches = audio.patch_transformer
    return audio_encoder.AudioEncoder(
      backbone=frame_encoder.ViT(
        patch_size=tuple(patches.patch_size),
        width=patches.width,
        depth=patches.depth,
        num_heads=patches.num_heads,
        mlp_dim=patches.mlp_dim,
        posemb="sincos2d",
        dropout_rate=patches.dropout_rate,
        remat=remat,
        dtype=dtype,
      )
    )
  raise ValueError(
    f"config.model.audio.backbone must be 'cnn' or 'patch_transformer'; got {audio.backbone!r}."
  )


def _resnet(cnn, remat: bool, dtype) -> frame_encoder.ResNet:
  return frame_encoder.ResNet(
    stem_width=cnn.stem_width,
    stem_kernel=tuple(cnn.stem_kernel),
    stem_strides=tuple(cnn.stem_strides),
    stage_widths=tuple(cnn.stage_widths),
    blocks_per_stage=tuple(cnn.blocks_per_stage),
    stage_strides=tuple(tuple(s) for s in cnn.stage_strides),
    norm_groups=cnn.norm_groups,
    remat=remat,
    dtype=dtype,
  )


def _temporal(
  temporal, name: str, *, remat: bool, dtype, implementation: str | None
) -> temporal_encoder.TemporalEncoder:
  """A TemporalEncoder; one-entry `windows`/`dilations` apply to every layer."""
  per_layer = lambda key: tuple(
    longformer.per_layer(f"config.{name}.{key}", temporal[key], temporal.num_layers)
  )
  return temporal_encoder.TemporalEncoder(
    width=temporal.width,
    num_layers=temporal.num_layers,
    num_heads=temporal.num_heads,
    mlp_dim=temporal.mlp_dim,
    windows=per_layer("windows"),
    dilations=per_layer("dilations"),
    global_projections=temporal.global_projections,
    attention_implementation=implementation,
    dropout_rate=temporal.dropout_rate,
    remat=remat,
    dtype=dtype,
  )
