"""Contrastive losses (NT-Xent / InfoNCE) and the temperature.

* `cross_modal_nt_xent(z_video, z_audio, t)`: symmetric InfoNCE between the modalities. Row i
  of the `[N, N]` similarity matrix scores video i against every audio; audio i is its one
  positive, the other N−1 audios its negatives; the loss is the mean of the video→audio and
  audio→video cross-entropies.
* `nt_xent(z_a, z_b, t)`: SimCLR's loss over the 2N embeddings of two views; each has one
  positive (its other view) and 2N−2 negatives, same-view ones included. Equals
  `optax.losses.ntxent` on `concat([z_a, z_b])` with labels `[0 … N−1, 0 … N−1]`.
* `ContrastiveLoss`: the training objective, `cross_modal_weight · cross-modal term +
  intra_modal_weight · intra-modal term` (the latter, from two augmented views of each
  modality, `nt_xent(view1, view2)` averaged over the modalities).
* Masks: both losses take an optional `mask` `[N]` (False: leave example i out). A left-out
  example is neither a positive nor anyone's negative, and the mean is over the examples
  kept: the loss and the gradients of the kept rows are exactly those of the batch without
  the left-out rows (a clip without audio this way never enters the cross-modal term, or
  the audio's intra-modal term).
* `Temperature`: fixed or learnable, log-parameterised and kept in `[minimum, maximum]`.

Every loss L2-normalises its inputs and computes the similarities, logits and softmax in
float32 whatever the embeddings' dtype: in bfloat16 a cosine of 0.99 vs 1.0 at temperature
0.05 would be a logit error of ~0.3, enough to blur the positives.

Negatives over the GLOBAL batch. With the batch sharded over devices and hosts, the train
step is `jax.jit` over global `jax.Array`s (embeddings `[N_global, E]` sharded along N), and
these functions are called on those global arrays unchanged. `z_a @ z_b.T` then contracts
over E with N on both sides, so XLA's SPMD partitioner all-gathers the (small, N×E) operand
across the data axis and every device computes its rows of the `[N_global, N_global]`
logits: each example meets the negatives of every device and host, and the mean is over the
global batch, the same number as on one device. Nothing here needs `axis_name`s. Inside a
`shard_map` (per-device code) the equivalent is explicit: gather
`jax.lax.all_gather(z, axis, tiled=True)` to `[N_global, E]`, score the local rows against
it, and take the positive of local row i at column `jax.lax.axis_index(axis) · N_local + i`.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import optax

# Guards the L2 normalisation of an all-zero embedding (its direction is then arbitrary).
_NORM_EPSILON = 1e-12


def l2_normalize(z: jax.Array) -> jax.Array:
  """`[N, D]` → unit rows, float32."""
  z = z.astype(jnp.float32)
  return z * jax.lax.rsqrt(jnp.maximum(jnp.sum(z * z, axis=-1, keepdims=True), _NORM_EPSILON))


def cross_modal_nt_xent(
  z_video: jax.Array, z_audio: jax.Array, temperature, *, mask: jax.Array | None = None
) -> jax.Array:
  """Symmetric InfoNCE: pair i is positive; mean of video→audio and audio→video CE.

  Args:
    z_video, z_audio: `[N, D]` each (any float dtype; normalised here).
    temperature: a positive scalar.
    mask: optional bool `[N]`; pairs with False are left out (module docstring).

  Returns:
    The scalar loss, float32 (0 when fewer than one pair is kept).
  """
  _check_pair("z_video", z_video, "z_audio", z_audio)
  logits = l2_normalize(z_video) @ l2_normalize(z_audio).T / temperature  # [N, N]
  labels = jnp.arange(logits.shape[0])
  video_rows, weights = _masked(logits, mask)
  audio_rows, _ = _masked(logits.T, mask)
  video_to_audio = optax.softmax_cross_entropy_with_integer_labels(video_rows, labels)
  audio_to_video = optax.softmax_cross_entropy_with_integer_labels(audio_rows, labels)
  return (_mean(video_to_audio, weights) + _mean(audio_to_video, weights)) / 2


def nt_xent(
  z_a: jax.Array, z_b: jax.Array, temperature, *, mask: jax.Array | None = None
) -> jax.Array:
  """SimCLR NT-Xent over the 2N embeddings of two views (2N−2 negatives each).

  Args:
    z_a, z_b: `[N, D]` each, row i of both views of the same example (normalised here).
    temperature: a positive scalar.
    mask: optional bool `[N]`; examples with False are left out (module docstring).

  Returns:
    The scalar loss (mean over the 2N anchors kept), float32.
  """
  _check_pair("z_a", z_a, "z_b", z_b)
  n = z_a.shape[0]
  z = jnp.concatenate([l2_normalize(z_a), l2_normalize(z_b)], axis=0)  # [2N, D]
  logits = z @ z.T / temperature
  logits = jnp.where(jnp.eye(2 * n, dtype=bool), -jnp.inf, logits)  # never your own positive
  positives = jnp.concatenate([jnp.arange(n, 2 * n), jnp.arange(n)])
  logits, weights = _masked(logits, None if mask is None else jnp.concatenate([mask, mask]))
  return _mean(optax.softmax_cross_entropy_with_integer_labels(logits, positives), weights)


def _masked(logits: jax.Array, mask: jax.Array | None) -> tuple[jax.Array, jax.Array | None]:
  """Square `[M, M]` logits, row i scoring anchor i against every candidate, with left-out
  examples taken out of the softmax (their columns at -inf; their own rows, which then count
  for nothing, at 0 so that they stay finite), and the weight of each row (None: all count)."""
  if mask is None:
    return logits, None
  mask = mask.astype(bool)
  logits = jnp.where(mask[None, :], logits, -jnp.inf)
  return jnp.where(mask[:, None], logits, 0.0), mask.astype(jnp.float32)


def _mean(values: jax.Array, weights: jax.Array | None) -> jax.Array:
  if weights is None:
    return values.mean()
  return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def _check_pair(name_a: str, a, name_b: str, b) -> None:
  if a.ndim != 2 or a.shape != b.shape:
    raise ValueError(
      f"{name_a} and {name_b} must both be [N, D] with the same shape; got {a.shape} and {b.shape}."
    )
  if a.shape[0] < 2:
    raise ValueError(
      f"contrastive losses need N >= 2 examples (one positive, some negatives); "
      f"got {name_a} of shape {a.shape}."
    )


@dataclasses.dataclass(frozen=True)
class Temperature:
  """The softmax temperature: fixed, or learned as log t and kept in [minimum, maximum].

  The train state holds the scalar parameter `log_temperature` (from `init()`), optimises it
  with the model when `learnable` (exclude it from weight decay), and after every update
  replaces it with `clamp(log_temperature)` — the projection CLIP applies to its logit scale —
  so it can always move back from a bound. `__call__` also clips, so the value is in range
  whatever the parameter holds. When not learnable the value is `initial` and the parameter
  gets no gradient.
  """

  initial: float = 0.1
  learnable: bool = True
  minimum: float = 0.01
  maximum: float = 1.0

  def __post_init__(self):
    if not 0 < self.minimum <= self.initial <= self.maximum:
      raise ValueError(
        "the temperature needs 0 < min_temperature <= temperature <= max_temperature; got "
        f"{self.minimum}, {self.initial}, {self.maximum} (config.loss)."
      )

  @classmethod
  def from_config(cls, loss_config) -> Temperature:
    return cls(
      initial=float(loss_config.temperature),
      learnable=bool(loss_config.learn_temperature),
      minimum=float(loss_config.min_temperature),
      maximum=float(loss_config.max_temperature),
    )

  def init(self) -> jax.Array:
    """The initial parameter: log(initial), a float32 scalar."""
    return jnp.asarray(math.log(self.initial), jnp.float32)

  def clamp(self, log_temperature: jax.Array) -> jax.Array:
    """The parameter projected back into [log minimum, log maximum]."""
    return jnp.clip(log_temperature, math.log(self.minimum), math.log(self.maximum))

  def __call__(self, log_temperature: jax.Array) -> jax.Array:
    """The temperature value from the parameter (float32 scalar)."""
    if not self.learnable:
      return jnp.asarray(self.initial, jnp.float32)
    return jnp.exp(self.clamp(log_temperature.astype(jnp.float32)))


@dataclasses.dataclass(frozen=True)
class ContrastiveLoss:
  """The contrastive objective of a batch, weights and temperature from `config.loss`.

  loss = cross_modal_weight · mean over views of cross_modal_nt_xent(video, audio)
       + intra_modal_weight · mean over modalities of nt_xent(view 1, view 2)
  """

  temperature: Temperature = Temperature()
  cross_modal_weight: float = 1.0
  intra_modal_weight: float = 0.0

  @classmethod
  def from_config(cls, loss_config) -> ContrastiveLoss:
    return cls(
      temperature=Temperature.from_config(loss_config),
      cross_modal_weight=float(loss_config.cross_modal_weight),
      intra_modal_weight=float(loss_config.intra_modal_weight),
    )

  def __call__(
    self,
    log_temperature,
    z_video,
    z_audio,
    *,
    z_video_view2=None,
    z_audio_view2=None,
    has_audio=None,
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Embeddings `[N, E]` (global batch) → (loss, metrics).

    Args:
      log_temperature: the `Temperature` parameter.
      z_video, z_audio: the first view's embeddings.
      z_video_view2, z_audio_view2: a second augmented view's, needed when
        `intra_modal_weight > 0` (and then also entering the cross-modal term).
      has_audio: optional bool `[N]`: clips without audio (False) are left out of the
        cross-modal term and of the audio's intra-modal term; the video's intra-modal term
        still trains on them.

    Returns:
      The scalar loss and {'cross_modal_loss', 'intra_modal_loss' (with two views),
      'temperature'}, float32 scalars.
    """
    two_views = z_video_view2 is not None
    if two_views != (z_audio_view2 is not None):
      raise ValueError("give both z_video_view2 and z_audio_view2, or neither.")
    if self.intra_modal_weight and not two_views:
      raise ValueError(
        f"config.loss.intra_modal_weight={self.intra_modal_weight} needs a second augmented "
        "view of each modality (z_video_view2, z_audio_view2); set it to 0 or feed two views."
      )
    temperature = self.temperature(log_temperature)
    cross = cross_modal_nt_xent(z_video, z_audio, temperature, mask=has_audio)
    if not two_views:
      loss = self.cross_modal_weight * cross
      return loss, {"cross_modal_loss": cross, "temperature": temperature}
    second = cross_modal_nt_xent(z_video_view2, z_audio_view2, temperature, mask=has_audio)
    cross = (cross + second) / 2
    intra = (
      nt_xent(z_video, z_video_view2, temperature)
      + nt_xent(z_audio, z_audio_view2, temperature, mask=has_audio)
    ) / 2
    loss = self.cross_modal_weight * cross + self.intra_modal_weight * intra
    metrics = {"cross_modal_loss": cross, "intra_modal_loss": intra, "temperature": temperature}
    return loss, metrics
