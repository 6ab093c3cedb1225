"""`Run`: the mesh, model, optimiser and dataset of one config, and its checkpoints.

Every mode starts here (maxtext's `setup_train_loop` serves every trainer the same way):
training builds a `Run` and restores the whole `TrainState` to resume; evaluation, export,
plots and search build one and restore only the parameters (`Run.restore_params`), never
the optimiser moments.

A checkpoint is resumed or read only by a model whose parameters have the same shapes
(`check_compatible`): keys that do not change parameter shapes (a dtype, remat, dropout, an
attention window, a key added after the checkpoint was written) may differ freely.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from absl import logging
from etils import epath
from ml_collections import config_dict

from cmvt_jax import checkpoints
from cmvt_jax import flops as flops_lib
from cmvt_jax import losses
from cmvt_jax import sharding
from cmvt_jax.data import dataset_writer
from cmvt_jax.data import datasets
from cmvt_jax.data import normalization
from cmvt_jax.data import pipeline
from cmvt_jax.models import cmvt
from cmvt_jax.models import frame_encoder

# Config sections whose keys can set parameter shapes; named in a mismatch message.
_MODEL_SECTIONS = ("model.", "input.")


class ConfigMismatchError(ValueError):
  """The workdir's checkpoint was written by a model of another shape."""


# ----------------------------------------------------------------------------- outputs


def config_digest(config: config_dict.ConfigDict) -> str:
  """SHA-256 of the resolved config: which config an output folder was written with."""
  return hashlib.sha256(config.to_json_best_effort(sort_keys=True).encode("utf-8")).hexdigest()


def output_is_current(
  manifest_path: epath.Path, config: config_dict.ConfigDict, step: int, listed: str
) -> bool:
  """Whether an output folder's manifest (written last, by process 0) says that the folder
  holds this config's outputs of checkpoint `step`, with every file its `listed` entry
  names present. Process 0 decides; every process gets its answer (call on all)."""
  current = False
  if jax.process_index() == 0 and manifest_path.exists():
    try:
      manifest = json.loads(manifest_path.read_text())
    except ValueError:
      manifest = {}
    current = (
      manifest.get("step") == step
      and manifest.get("config_sha256") == config_digest(config)
      and all((manifest_path.parent / name).exists() for name in manifest.get(listed, ()))
    )
  return bool(sharding.from_process_zero([current])[0])


# ----------------------------------------------------------------------------- train state


@flax.struct.dataclass
class TrainState:
  """Everything a step changes. `params` = {"model": ..., "log_temperature": scalar}."""

  step: jax.Array  # int32 scalar: optimiser updates completed
  params: Any
  opt_state: Any
  rng: jax.Array  # uint32 key data; the step's randomness is fold_in(rng, step)
  skipped_batches: jax.Array  # int32 scalar: batches skipped for a non-finite loss

  @property
  def log_temperature(self) -> jax.Array:
    return self.params["log_temperature"]


@dataclasses.dataclass(frozen=True)
class TrainedParams:
  """What evaluation, export and plots need of a checkpoint: the model's parameters at
  `step` and the normalisation statistics they were trained with."""

  step: int
  params: Any
  stats: normalization.NormalizationStats


def learning_rate_schedule(config: config_dict.ConfigDict) -> optax.Schedule:
  optim = config.optim
  warmup = min(int(optim.warmup_steps), max(int(config.total_steps) - 1, 0))
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=optim.learning_rate,
    warmup_steps=warmup,
    decay_steps=max(int(config.total_steps), warmup + 1),
    end_value=optim.learning_rate * optim.end_learning_rate_factor,
  )


def optimizer(config: config_dict.ConfigDict) -> optax.GradientTransformation:
  """AdamW with warmup-cosine, global-norm clipping; no decay on biases, norms, temperature.

  Attention key biases (the frame ViT's; the Longformer's keys have none) are frozen:
  softmax ignores a shift shared by a whole row of scores, so their true gradient is zero and
  what arrives is rounding noise, which Adam would scale up to full-size updates (and which
  differs between device layouts).
  """
  optim = config.optim
  keyed = lambda fn: (
    lambda params: jax.tree_util.tree_map_with_path(
      lambda path, p: fn(jax.tree_util.keystr(path), p), params
    )
  )
  decay = keyed(lambda path, p: p.ndim >= 2 and "log_temperature" not in path)
  frozen = keyed(lambda path, p: "frozen" if "['key']['bias']" in path else "trained")
  adamw = optax.chain(
    optax.clip_by_global_norm(optim.grad_clip_norm),
    optax.adamw(
      learning_rate_schedule(config),
      b1=optim.b1,
      b2=optim.b2,
      eps=optim.eps,
      weight_decay=optim.weight_decay,
      mask=decay,
    ),
  )
  return optax.multi_transform({"trained": adamw, "frozen": optax.set_to_zero()}, frozen)


# ----------------------------------------------------------------------------- compatibility


def flatten(config: config_dict.ConfigDict | dict, prefix: str = "") -> dict[str, Any]:
  """`{"model.video.vit.width": 96, ...}` of a (nested) config or dict; tuples as lists."""
  items = config.items() if hasattr(config, "items") else config
  flat = {}
  for key, value in items:
    if isinstance(value, (config_dict.ConfigDict, dict)):
      flat.update(flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
  return flat


def parameter_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """`{"['video_encoder']['temporal']...": shape}` of every array (or array metadata)."""
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  return {jax.tree_util.keystr(path): tuple(leaf.shape) for path, leaf in leaves}


def check_compatible(
  saved_config: dict,
  saved_shapes: dict[str, tuple[int, ...]],
  config: config_dict.ConfigDict,
  shapes: dict[str, tuple[int, ...]],
  workdir: epath.PathLike,
) -> None:
  """Refuses a checkpoint whose parameter shapes differ from the config's model.

  The shapes decide, so only keys that change a parameter's shape matter (mel settings
  included, through the audio projection); the message names the `model.*` and `input.*`
  keys whose values differ. A key missing from the saved config (written by an older
  version) counts as unchanged.
  """
  if saved_shapes == shapes:
    return
  saved, current = flatten(saved_config), json.loads(json.dumps(flatten(config)))
  differ = sorted(
    key
    for key in saved.keys() & current.keys()
    if key.startswith(_MODEL_SECTIONS) and saved[key] != current[key]
  )
  keys = "\n".join(f"  {key}: checkpoint {saved[key]!r}, now {current[key]!r}" for key in differ)
  params = sorted(
    name
    for name in saved_shapes.keys() | shapes.keys()
    if saved_shapes.get(name) != shapes.get(name)
  )
  examples = "\n".join(
    f"  {name}: checkpoint {saved_shapes.get(name)}, now {shapes.get(name)}" for name in params[:3]
  )
  raise ConfigMismatchError(
    f"The checkpoints in {workdir} were written by a model of another shape; "
    f"{len(params)} parameters differ, e.g.\n{examples}\n"
    + (f"These config keys differ:\n{keys}\n" if keys else "")
    + _block_layout_hint(saved_shapes, shapes)
    + "Use the checkpoint's values, or a new --workdir for the new model."
  )


def _block_layout_hint(saved_shapes: dict, shapes: dict) -> str:
  """The key to set when only the ViT's block layout (scanned or unrolled) tells them apart
  (a checkpoint written before the key existed has no value for it)."""
  stacked = f"['{frame_encoder.SCANNED_BLOCKS}']"
  saved, now = (any(stacked in name for name in tree) for tree in (saved_shapes, shapes))
  if saved == now:
    return ""
  layout = "scanned" if saved else "unrolled"
  return (
    f"The checkpoint's ViT blocks are {layout}: set --config.model.video.vit.scan_layers={saved}.\n"
  )


# ----------------------------------------------------------------------------- the run


@dataclasses.dataclass
class Run:
  """Mesh, model, optimiser and data of one config: what every mode shares."""

  config: config_dict.ConfigDict
  workdir: epath.Path
  mesh: jax.sharding.Mesh
  spec: pipeline.InputSpec
  model: cmvt.CMVT
  loss: losses.ContrastiveLoss
  tx: optax.GradientTransformation
  abstract_state: TrainState  # ShapeDtypeStructs with the target shardings
  state_shardings: TrainState  # of NamedShardings

  @classmethod
  def create(
    cls, config: config_dict.ConfigDict, workdir: epath.PathLike, devices: Sequence | None = None
  ) -> Run:
    """Checks the mesh and the batch split; builds everything but the dataset (lazy).

    `devices`: the mesh's (default: every process's); `--mode compile` passes a TPU
    topology's devices, which have no chips behind them.
    """
    mesh = sharding.create_mesh(config.mesh, devices)
    sharding.check_batch_size(config.batch_size, mesh)
    model = cmvt.from_config(config)
    loss = losses.ContrastiveLoss.from_config(config.loss)
    tx = optimizer(config)
    spec = pipeline.InputSpec.from_config(config.input)
    abstract = jax.eval_shape(
      functools.partial(_init_state, model, loss, tx, spec), jax.random.key(0)
    )
    shardings = sharding.tree_shardings(mesh, abstract)
    return cls(
      config=config,
      workdir=epath.Path(workdir),
      mesh=mesh,
      spec=spec,
      model=model,
      loss=loss,
      tx=tx,
      abstract_state=jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings
      ),
      state_shardings=shardings,
    )

  @functools.cached_property
  def dataset(self) -> datasets.PreparedDataset:
    """The prepared dataset (made first when it is the synthetic one), opened on first use.

    The synthetic dataset is made once, by process 0, when every process sees the same
    `dataset.data_dir`; on hosts with separate disks (the default cache folder on a pod)
    each host makes its own, identical copy (the generator is seeded).
    """
    maker = jax.process_index()
    if (
      self.config.dataset.name == datasets.SYNTHETIC_NAME
      and jax.process_count() > 1
      and not sharding.folder_is_shared(self.config.dataset.data_dir or datasets.default_data_dir())
    ):
      logging.info(
        "dataset.data_dir is not shared between the hosts: each host makes its "
        "own copy of the synthetic dataset."
      )
      maker = 0
    return datasets.open_from_config(
      self.config.dataset, self.config.input, process_index=maker, log=logging.info
    )

  @functools.cached_property
  def train_components(self) -> list[tuple[datasets.PreparedDataset, float]]:
    """The datasets training draws from and their weights: `dataset.mixture`, or the
    dataset alone."""
    if not self.config.dataset.mixture:
      return [(self.dataset, 1.0)]
    return datasets.open_mixture(
      self.config.dataset, self.config.input, process_index=jax.process_index(), log=logging.info
    )

  def flops(self) -> flops_lib.ModelFlops:
    video, audio = example_inputs(self.spec)
    return flops_lib.count(self.model, video_shape=video.shape[1:], audio_shape=audio.shape[1:])

  @property
  def train_multi_hot_classes(self) -> int:
    """C when the train step takes multi-hot `labels` `[B, C]` (the supervised objective on
    multi-label data), else 0."""
    supervised = self.config.objective == "supervised"
    return self.dataset.multi_hot_classes if supervised and self.dataset.multi_label else 0

  def init_state(self) -> TrainState:
    """A fresh state, created directly in its shardings; pretrained frames loaded if set."""
    init = functools.partial(_init_state, self.model, self.loss, self.tx, self.spec)
    # The initialisers' random numbers, unrolled per parameter, make a large program that
    # runs once: on a CPU, LLVM's level 1 compiles it in half the time of the default 3
    # (6.2 s instead of 12.4 s for the default config on a 2-core Xeon; the parameters came
    # out bit-identical there). Other backends keep their defaults.
    on_cpu = self.mesh.devices.flat[0].platform == "cpu"
    state = jax.jit(
      init,
      out_shardings=self.state_shardings,
      compiler_options={"xla_backend_optimization_level": 1} if on_cpu else None,
    )(jax.random.key(self.config.seed))
    pretrained = cmvt.load_pretrained(state.params["model"], self.config)
    if pretrained is not state.params["model"]:
      params = {**state.params, "model": pretrained}
      state = state.replace(params=jax.device_put(params, self.state_shardings.params))
    return state

  def stats(self) -> normalization.NormalizationStats:
    """The training data's normalisation statistics (a new run's; a resumed one keeps its
    own): the dataset's, or the mixture's."""
    if self.config.dataset.mixture:
      return datasets.mixture_stats(self.train_components, self.spec.mel, log=logging.info)
    return self.dataset.normalization_stats(self.spec.mel, log=logging.info)

  def preprocessor(
    self,
    stats: normalization.NormalizationStats,
    dataset: datasets.PreparedDataset | None = None,
    *,
    storage: dataset_writer.StorageSpec | None = None,
  ) -> pipeline.Preprocessor:
    """Stored clips → model inputs, at the storage rates of `storage`, else of `dataset`
    (default: the run's; a search passes the settings its collection recorded, so it opens
    no dataset)."""
    storage = storage or (dataset or self.dataset).storage
    return pipeline.Preprocessor(self.spec, stats, storage.fps, storage.sample_rate)

  # --- checkpoints

  def check_checkpoint(self, meta: dict, saved_state: Any) -> None:
    """`check_compatible` of a checkpoint's metadata and its saved state's tree metadata
    (the `check` of `checkpoints.restore_latest`)."""
    check_compatible(
      meta["config"],
      parameter_shapes(saved_state["params"]),
      self.config,
      parameter_shapes(self.abstract_state.params),
      self.workdir,
    )

  def restore_params(self, *, step: int | None = None) -> TrainedParams:
    """The model parameters and statistics of the newest usable checkpoint (or `step`).

    Reads only `params["model"]`: no optimiser moments, temperature or counters.
    """
    reader = checkpoints.reader(self.workdir)
    try:
      restored = checkpoints.restore_latest(
        reader,
        {"params": {"model": self.abstract_state.params["model"]}},
        check=self.check_checkpoint,
        step=step,
        partial=True,
      )
    finally:
      reader.close()
    if restored is None:
      raise FileNotFoundError(
        f"No checkpoint in {checkpoints.checkpoint_dir(self.workdir)}: train first "
        "(--mode train) with this --workdir."
      )
    return TrainedParams(
      step=restored.step,
      params=restored.state["params"]["model"],
      stats=normalization.NormalizationStats.from_dict(restored.meta["stats"]),
    )


def abstract_clips(
  spec: pipeline.InputSpec,
  rows: int,
  sharding_: jax.sharding.Sharding,
  *,
  two_views: bool = False,
  multi_hot_classes: int = 0,
) -> dict[str, jax.ShapeDtypeStruct]:
  """A global batch of `rows` clips as the train step and the clip embedding take it
  (`train.model_inputs`), abstract, each field with `sharding_`: video `[rows, T, S, S, 3]`
  and audio `[rows, F, M]` float32, label int32 `[rows]`, has_audio bool `[rows]`; with
  `two_views` video_view2 and audio_view2; with `multi_hot_classes` C, labels uint8
  `[rows, C]`."""

  def abstract(shape, dtype):
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype), sharding=sharding_)

  video, audio = example_inputs(spec)
  batch = {
    "video": abstract((rows, *video.shape[1:]), jnp.float32),
    "audio": abstract((rows, *audio.shape[1:]), jnp.float32),
    "label": abstract((rows,), jnp.int32),
    "has_audio": abstract((rows,), jnp.bool_),
  }
  if two_views:
    batch.update(video_view2=batch["video"], audio_view2=batch["audio"])
  if multi_hot_classes:
    batch["labels"] = abstract((rows, multi_hot_classes), jnp.uint8)
  return batch


def example_inputs(spec: pipeline.InputSpec, batch: int = 1) -> tuple[jax.Array, jax.Array]:
  """Zero video `[B, T, S, S, 3]` and audio `[B, F, M]` of the configured input."""
  video = jnp.zeros((batch, spec.num_frames, spec.frame_size, spec.frame_size, 3))
  audio = jnp.zeros((batch, spec.audio_frames, spec.mel.n_mels))
  return video, audio


def _init_state(
  model: cmvt.CMVT,
  loss: losses.ContrastiveLoss,
  tx: optax.GradientTransformation,
  spec: pipeline.InputSpec,
  rng: jax.Array,
) -> TrainState:
  params_rng, state_rng = jax.random.split(rng)
  model_params = model.init(params_rng, *example_inputs(spec))["params"]
  params = {"model": model_params, "log_temperature": loss.temperature.init()}
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    opt_state=tx.init(params),
    rng=jax.random.key_data(state_rng),
    skipped_batches=jnp.zeros((), jnp.int32),
  )
