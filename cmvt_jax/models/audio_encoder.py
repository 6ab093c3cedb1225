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

Training clips are fixed-length windows and run without a mask. Whole-video export pads a
spectrogram to a length bucket and passes a time mask `[B, F]`: the CNN then gives each row
the map of its valid frames alone (`ResNet.masked_feature_map`), and the temporal encoder
masks the padded steps, so a padded row embeds as its unpadded spectrogram does. The patch
transformer has no mask.
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

  def output_length(self, frames: int) -> int:
    """Time steps the CNN leaves of `frames` spectrogram frames: ⌈frames / time_stride⌉."""
    self._check_cnn("output_length")
    return frame_encoder.strided_lengths(frames, self.backbone.time_stride)

  def __call__(
    self, log_mel: jax.Array, mask: jax.Array | None = None, *, deterministic: bool = True
  ) -> jax.Array:
    """log_mel `[B, F, M]`, mask bool `[B, F]` (True = a real frame; a prefix) or None → `[B, D]`.

    With a mask, frames past each row's valid length may hold anything: the row embeds as its
    valid frames alone would (up to float rounding).
    """
    if log_mel.ndim != 3:
      raise ValueError(f"log_mel must be [B, frames, n_mels]; got shape {log_mel.shape}.")
    image = log_mel[..., None]
    if isinstance(self.backbone, frame_encoder.ResNet):
      if self.temporal is None:
        raise ValueError(
          "the CNN audio backbone needs a temporal encoder (num_layers=0 for a mean over time)."
        )
      if mask is None:
        feature_map, steps_mask = self.backbone.feature_map(image), None  # [B, F', M', C]
      else:
        feature_map, steps_mask = self.backbone.masked_feature_map(image, mask)
      sequence = feature_map.reshape(feature_map.shape[:2] + (-1,))  # [B, F', M'·C]
      return self.temporal(sequence, steps_mask, deterministic=deterministic)
    if self.temporal is not None:
      raise ValueError(
        "the patch-transformer audio backbone has no temporal encoder; pass temporal=None."
      )
    if mask is not None:
      self._check_cnn("an audio mask")
    return self.backbone(image, deterministic=deterministic)

  def _check_cnn(self, what: str) -> None:
    if not isinstance(self.backbone, frame_encoder.ResNet):
      raise ValueError(
        f"{what} needs the CNN audio backbone (model.audio.backbone='cnn'); the patch "
        "transformer has no padding mask."
      )
