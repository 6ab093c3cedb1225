"""The audio tower: a log-mel spectrogram `[B, F, M]` (time first) → a clip feature `[B, D]`.

Two backbones, both reading the spectrogram as a one-channel image `[B, F, M, 1]`:

* 'cnn' (default): the frame encoder's GroupNorm `ResNet` stack with per-axis strides, so it
  can pool frequency harder than time. Its last map `[B, F', M', C]` keeps time; the few
  frequency bins left are folded into the channels, `[B, F', M'·C]`, rather than averaged
  (which bins sound is the pitch; a mean over them would throw it away), and the
  `TemporalEncoder` (Longformer with a CLS token, or a masked mean when it has no layers)
  turns the sequence into the clip feature.
* 'patch_transformer' (AST-like): the spectrogram cut into time×mel patches, through the
  frame `ViT` with fixed 2D sine-cosine positions (no table, so any clip length works); the
  CLS output is the clip feature and there is no separate temporal encoder.

Audio clips are fixed-length windows, so there is no padding mask here.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from cmvt_jax.models import frame_encoder


class AudioEncoder(nn.Module):
  """Log-mel spectrogram → clip feature, through a CNN (+ temporal encoder) or a patch ViT.

  Attributes:
    backbone: a `frame_encoder.ResNet` ('cnn') or a `frame_encoder.ViT` with
      `posemb='sincos2d'` and one input channel ('patch_transformer').
    temporal: the `TemporalEncoder` over the CNN's time steps; None with a patch transformer.
  """

  backbone: nn.Module
  temporal: nn.Module | None = None

  def __call__(self, log_mel: jax.Array, *, deterministic: bool = True) -> jax.Array:
    """log_mel `[B, F, M]` → `[B, D]`."""
    if log_mel.ndim != 3:
      raise ValueError(f"log_mel must be [B, frames, n_mels]; got shape {log_mel.shape}.")
    image = log_mel[..., None]
    if isinstance(self.backbone, frame_encoder.ResNet):
      if self.temporal is None:
        raise ValueError(
          "the CNN audio backbone needs a temporal encoder (num_layers=0 for a mean over time)."
        )
      feature_map = self.backbone.feature_map(image)  # [B, F', M', C]
      sequence = feature_map.reshape(feature_map.shape[:2] + (-1,))  # [B, F', M'·C]
      return self.temporal(sequence, deterministic=deterministic)
    if self.temporal is not None:
      raise ValueError(
        "the patch-transformer audio backbone has no temporal encoder; pass temporal=None."
      )
    return self.backbone(image, deterministic=deterministic)
