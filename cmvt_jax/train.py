"""Training: the sharded contrastive (or supervised) step, checkpoints, resume, the loop.

Sections, in the order the run meets them: run setup (config checks, config.json), mesh,
input, model, shard & init, update step, checkpoint, evals, loop. `train_and_evaluate` is
`--mode train`; `Run.create` is also how evaluate.py and export.py build a model and restore
its parameters.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import json
import signal
import subprocess
import time
from collections.abc import Callable
from collections.abc import Iterator
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from ml_collections import config_dict

from cmvt_jax import checkpoints
from cmvt_jax import flops as flops_lib
from cmvt_jax import losses
from cmvt_jax import metrics as metrics_lib
from cmvt_jax import sharding
from cmvt_jax.data import normalization
from cmvt_jax.data import pipeline
from cmvt_jax.data import prepared
from cmvt_jax.models import cmvt

# Device peak FLOP/s for MFU (dense bf16 datasheet figures, per chip). A CPU's peak is
# measured at start-up instead (a float32 matmul), since CPUs differ too much to tabulate.
DEVICE_PEAK_FLOPS = {
  "H100": 989e12,
  "H200": 989e12,
  "TPU v4": 275e12,
  "TPU v5 lite": 197e12,
  "TPU v5e": 197e12,
  "TPU v5p": 459e12,
  "TPU v5": 459e12,
  "TPU v6 lite": 918e12,
  "TPU v6e": 918e12,
}
# Config keys that change parameter shapes: a checkpoint is only resumed when they match.
_SHAPE_PREFIXES = ("model.",)
_SHAPE_KEYS = ("input.frame_size",)
_SHAPE_EXEMPT = ("model.dtype", "model.remat")


class ConfigMismatchError(ValueError):
  """The workdir's checkpoint was written by a model of another shape."""


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or Inf."""


# ----------------------------------------------------------------------------- run setup


def flatten(config: config_dict.ConfigDict, prefix: str = "") -> dict[str, Any]:
  """`{"model.video.vit.width": 96, ...}` of a (nested) config or dict."""
  items = config.items() if hasattr(config, "items") else config
  flat = {}
  for key, value in items:
    if isinstance(value, (config_dict.ConfigDict, dict)):
      flat.update(flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
  return flat


def check_same_model(saved_config: dict, config: config_dict.ConfigDict, workdir) -> None:
  """Refuses to resume a checkpoint whose model shape keys differ from the config's."""
  saved = json.loads(json.dumps(flatten(saved_config)))
  current = json.loads(json.dumps(flatten(config)))
  shape_key = lambda key: (
    (key.startswith(_SHAPE_PREFIXES) or key in _SHAPE_KEYS) and key not in _SHAPE_EXEMPT
  )
  differ = sorted(
    key
    for key in set(saved) | set(current)
    if shape_key(key) and saved.get(key) != current.get(key)
  )
  if differ:
    lines = "\n".join(
      f"  {key}: checkpoint {saved.get(key)!r}, now {current.get(key)!r}" for key in differ
    )
    raise ConfigMismatchError(
      f"The checkpoints in {workdir} were written by a model of another shape; these keys "
      f"differ:\n{lines}\nUse the checkpoint's values, or a new --workdir for the new model."
    )


def write_config_json(workdir: epath.Path, config: config_dict.ConfigDict) -> None:
  """WORKDIR/config.json: the resolved config, package versions and git revision."""
  packages = [
    "jax",
    "jaxlib",
    "flax",
    "optax",
    "orbax-checkpoint",
    "grain",
    "tensorflow-datasets",
    "numpy",
    "librosa",
    "av",
  ]
  record = {
    "config": json.loads(config.to_json_best_effort()),
    "packages": {name: _version(name) for name in packages},
    "git_revision": _git_revision(),
    "devices": f"{jax.device_count()} × {jax.devices()[0].device_kind}",
    "processes": jax.process_count(),
  }
  (workdir / "config.json").write_text(json.dumps(record, indent=2) + "\n")


def _version(package: str) -> str | None:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return None


def _git_revision() -> str | None:
  try:
    result = subprocess.run(
      ["git", "rev-parse", "HEAD"],
      capture_output=True,
      text=True,
      cwd=epath.Path(__file__).parent,
      timeout=10,
      check=True,
    )
    return result.stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return None


def check_workdir_writable(workdir: epath.Path) -> None:
  """Writes and removes a probe file in the workdir, or in the folder that would hold it."""
  folder = workdir
  while not folder.exists() and folder.parent != folder:
    folder = folder.parent
  probe = folder / f".cmvt_write_probe_{jax.process_index()}"
  try:
    probe.write_text("ok")
    probe.unlink()
  except OSError as error:
    raise PermissionError(
      f"--workdir {workdir} is not writable ({type(error).__name__}: {error}); choose a "
      "folder you can write to."
    ) from error


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


def learning_rate_schedule(config) -> optax.Schedule:
  optim = config.optim
  warmup = min(int(optim.warmup_steps), max(int(config.total_steps) - 1, 0))
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=optim.learning_rate,
    warmup_steps=warmup,
    decay_steps=max(int(config.total_steps), warmup + 1),
    end_value=optim.learning_rate * optim.end_learning_rate_factor,
  )


def optimizer(config) -> optax.GradientTransformation:
  """AdamW with warmup-cosine, global-norm clipping; no decay on biases, norms, temperature.

  Attention key biases are frozen: softmax ignores a shift shared by a whole row of scores,
  so their true gradient is zero and what arrives is rounding noise, which Adam would scale
  up to full-size updates (and which differs between device layouts).
  """
  optim = config.optim
  keyed = lambda fn: (
    lambda params: jax.tree_util.tree_map_with_path(
      lambda path, p: fn(jax.tree_util.keystr(path), p), params
    )
  )
  decay = keyed(lambda path, p: p.ndim >= 2 and "log_temperature" not in path)
  frozen = keyed(lambda path, p: "frozen" if _is_key_bias(path) else "trained")
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


def _is_key_bias(path: str) -> bool:
  return "['key']['bias']" in path or "['key_global']['bias']" in path


# ----------------------------------------------------------------------------- the run


@dataclasses.dataclass
class Run:
  """Mesh, model, optimiser and data of one config: what train, eval and export share."""

  config: config_dict.ConfigDict
  workdir: epath.Path
  mesh: jax.sharding.Mesh
  spec: pipeline.InputSpec
  model: cmvt.CMVT
  loss: losses.ContrastiveLoss
  tx: optax.GradientTransformation
  abstract_state: TrainState  # ShapeDtypeStructs with the target shardings
  state_shardings: Any

  @classmethod
  def create(cls, config, workdir) -> Run:
    workdir = epath.Path(workdir)
    mesh = sharding.create_mesh(config.mesh)
    sharding.check_batch_size(config.batch_size, mesh)
    spec = pipeline.InputSpec.from_config(config.input)
    model = cmvt.from_config(config)
    tx = optimizer(config)
    loss = losses.ContrastiveLoss.from_config(config.loss)
    run = cls(
      config=config,
      workdir=workdir,
      mesh=mesh,
      spec=spec,
      model=model,
      loss=loss,
      tx=tx,
      abstract_state=None,
      state_shardings=None,
    )
    abstract = jax.eval_shape(run._init_state, jax.random.key(0))
    run.state_shardings = _state_shardings(mesh, abstract)
    run.abstract_state = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, run.state_shardings
    )
    return run

  @functools.cached_property
  def dataset(self) -> prepared.PreparedDataset:
    """The prepared dataset (made first when it is the synthetic one), opened on first use.

    The synthetic dataset is made once, by process 0, when every process sees the same
    `dataset.data_dir`; on hosts with separate disks (the default cache folder on a pod)
    each host makes its own, identical copy (the generator is seeded).
    """
    maker = jax.process_index()
    if (
      self.config.dataset.name == prepared.SYNTHETIC_NAME
      and jax.process_count() > 1
      and not folder_is_shared(self.config.dataset.data_dir or prepared.default_data_dir())
    ):
      logging.info(
        "dataset.data_dir is not shared between the hosts: each host makes its "
        "own copy of the synthetic dataset."
      )
      maker = 0
    return prepared.open_from_config(
      self.config.dataset, self.config.input, process_index=maker, log=logging.info
    )

  # --- model inputs

  def example_inputs(self, batch: int = 1):
    """Zero video `[B, T, S, S, 3]` and audio `[B, F, M]` of the configured input."""
    spec = self.spec
    video = jnp.zeros((batch, spec.num_frames, spec.frame_size, spec.frame_size, 3))
    audio = jnp.zeros((batch, spec.audio_frames, spec.mel.n_mels))
    return video, audio

  def flops(self) -> flops_lib.ModelFlops:
    video, audio = self.example_inputs()
    return flops_lib.count(self.model, video_shape=video.shape[1:], audio_shape=audio.shape[1:])

  # --- shard & init

  def _init_state(self, rng) -> TrainState:
    params_rng, state_rng = jax.random.split(rng)
    model_params = self.model.init(params_rng, *self.example_inputs())["params"]
    params = {"model": model_params, "log_temperature": self.loss.temperature.init()}
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=self.tx.init(params),
      rng=jax.random.key_data(state_rng),
      skipped_batches=jnp.zeros((), jnp.int32),
    )

  def init_state(self) -> TrainState:
    """A fresh state, created directly in its shardings; pretrained frames loaded if set."""
    init = jax.jit(self._init_state, out_shardings=self.state_shardings)
    state = init(jax.random.key(self.config.seed))
    pretrained = cmvt.load_pretrained(state.params["model"], self.config)
    if pretrained is not state.params["model"]:
      params = {**state.params, "model": pretrained}
      state = state.replace(params=jax.device_put(params, self.state_shardings.params))
    return state

  def stats(self) -> normalization.NormalizationStats:
    return self.dataset.normalization_stats(self.spec.mel, log=logging.info)

  def preprocessor(self, stats: normalization.NormalizationStats) -> pipeline.Preprocessor:
    return pipeline.Preprocessor(
      self.spec, stats, self.dataset.storage.fps, self.dataset.storage.sample_rate
    )

  def restore(self, *, step: int | None = None) -> checkpoints.Restored:
    """The newest usable checkpoint of the workdir (or `step`); an error if there is none."""
    manager = checkpoints.manager(
      self.workdir, max_to_keep=self.config.checkpoint.keep, create=False
    )
    restored = checkpoints.restore_latest(
      manager,
      self.abstract_state,
      step=step,
      check_meta=lambda meta: check_same_model(meta["config"], self.config, self.workdir),
    )
    manager.close()
    if restored is None:
      raise FileNotFoundError(
        f"No checkpoint in {checkpoints.checkpoint_dir(self.workdir)}: train first "
        f"(--mode train) with this --workdir."
      )
    return restored


def folder_is_shared(folder) -> bool:
  """Whether every process sees the same `folder`: process 0 writes a token the others read."""
  folder = epath.Path(folder)
  token = int(multihost_utils.broadcast_one_to_all(np.int32(time.time_ns() % 2**31)))
  probe = folder / f".cmvt_shared_probe_{token}"
  if jax.process_index() == 0:
    folder.mkdir(parents=True, exist_ok=True)
    probe.write_text(str(token))
  multihost_utils.sync_global_devices("cmvt_jax: shared-folder probe written")
  sees = probe.exists() and probe.read_text() == str(token)
  every = bool(np.all(multihost_utils.process_allgather(np.int32(sees))))
  multihost_utils.sync_global_devices("cmvt_jax: shared-folder probe read")
  if jax.process_index() == 0:
    probe.unlink()
  return every


def _state_shardings(mesh, abstract: TrainState):
  """Parameters and optimiser moments by the FSDP rule; counters and rng replicated."""
  return jax.tree.map(lambda x: sharding.parameter_sharding(mesh, x.shape), abstract)


# ----------------------------------------------------------------------------- update step


def make_train_step(run: Run) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """The jitted, donated, sharded update: (state, global batch) → (state, metrics).

  Contrastive negatives come from the whole global batch: the loss is computed on the global
  `[B, E]` embeddings (see losses.py). With `optim.grad_accum_steps = k > 1` the batch is
  split into k micro-batches GradCache-style: embeddings of all micro-batches first (no
  gradient), the loss and its gradient w.r.t. those embeddings over the full batch, then each
  micro-batch's backward pass fed that gradient — so negatives still span the full batch and
  activation memory is one micro-batch's.
  """
  config, model, loss_fn = run.config, run.model, run.loss
  accumulate = int(config.optim.grad_accum_steps)
  supervised = config.objective == "supervised"
  two_views = bool(config.input.two_views)
  schedule = learning_rate_schedule(config)
  skip_nonfinite = bool(config.skip_nonfinite_batches)

  def outputs(model_params, batch, rng):
    """Per-example outputs of a (micro-)batch: embeddings, or logits when supervised."""
    apply = functools.partial(
      model.apply, {"params": model_params}, train=True, rngs={"dropout": rng}
    )
    if supervised:
      return {"logits": apply(batch["video"], method=cmvt.CMVT.classify)}
    out = apply(batch["video"], batch["audio"])
    result = {"video": out["video"], "audio": out["audio"]}
    if two_views:
      second = apply(batch["video_view2"], batch["audio_view2"])
      result.update(video_view2=second["video"], audio_view2=second["audio"])
    return result

  def objective(log_temperature, outs, batch):
    if supervised:
      labels = batch["label"]
      loss = optax.softmax_cross_entropy_with_integer_labels(outs["logits"], labels).mean()
      accuracy = jnp.mean(jnp.argmax(outs["logits"], -1) == labels)
      return loss, {"accuracy": accuracy}
    views = {"z_video_view2": outs.get("video_view2"), "z_audio_view2": outs.get("audio_view2")}
    return loss_fn(log_temperature, outs["video"], outs["audio"], **views)

  def loss_and_grads(params, batch, rng):
    if accumulate == 1:

      def full(params):
        return objective(params["log_temperature"], outputs(params["model"], batch, rng), batch)

      return jax.value_and_grad(full, has_aux=True)(params)
    micro = jax.tree.map(lambda x: _micro_batches(x, accumulate), batch)
    rngs = jax.random.split(rng, accumulate)
    outs = jax.lax.map(lambda args: outputs(params["model"], *args), (micro, rngs))
    outs = jax.tree.map(_merge_micro_batches, outs)
    (loss, aux), (d_temperature, d_outs) = jax.value_and_grad(
      objective, argnums=(0, 1), has_aux=True
    )(params["log_temperature"], outs, batch)
    d_micro = jax.tree.map(lambda x: _micro_batches(x, accumulate), d_outs)

    def backward(total, args):
      micro_batch, micro_rng, cotangent = args
      _, pullback = jax.vjp(lambda p: outputs(p, micro_batch, micro_rng), params["model"])
      return jax.tree.map(jnp.add, total, pullback(cotangent)[0]), None

    zeros = jax.tree.map(jnp.zeros_like, params["model"])
    model_grads, _ = jax.lax.scan(backward, zeros, (micro, rngs, d_micro))
    return (loss, aux), {"model": model_grads, "log_temperature": d_temperature}

  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    (loss, aux), grads = loss_and_grads(state.params, batch, rng)
    updates, opt_state = run.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    params["log_temperature"] = run.loss.temperature.clamp(params["log_temperature"])
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # A non-finite step never reaches the parameters: the state keeps its last good values
    # (the loop then stops, or counts the skip when config.skip_nonfinite_batches).
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = state.replace(
      step=state.step + 1,
      params=keep(params, state.params),
      opt_state=keep(opt_state, state.opt_state),
      skipped_batches=state.skipped_batches + (~finite).astype(jnp.int32),
    )
    metrics = {
      "loss": loss,
      "grad_norm": grad_norm,
      "learning_rate": schedule(state.step),
      "finite": finite,
      **aux,
    }
    if "temperature" not in metrics:
      metrics["temperature"] = run.loss.temperature(new_state.log_temperature)
    if skip_nonfinite:
      metrics["skipped_batches"] = new_state.skipped_batches
    return new_state, metrics

  batch_sharding = sharding.batch_sharding(run.mesh)
  return jax.jit(
    train_step,
    in_shardings=(run.state_shardings, batch_sharding),
    out_shardings=(run.state_shardings, sharding.replicated(run.mesh)),
    donate_argnums=(0,),
  )


def _micro_batches(x: jax.Array, count: int) -> jax.Array:
  """`[B, ...]` → `[count, B / count, ...]`, micro-batch i = rows i, i + count, ...

  Interleaving keeps each device's rows on that device (the batch axis is split in
  contiguous blocks), so forming micro-batches moves no data.
  """
  return jnp.moveaxis(x.reshape((x.shape[0] // count, count) + x.shape[1:]), 1, 0)


def _merge_micro_batches(x: jax.Array) -> jax.Array:
  """Inverse of `_micro_batches`."""
  return jnp.moveaxis(x, 0, 1).reshape((-1,) + x.shape[2:])


def model_inputs(host_batch: dict, *, two_views: bool) -> dict:
  """The numeric fields the step needs (ids and paths stay on the host)."""
  keys = ["video", "audio", "label"] + (["video_view2", "audio_view2"] if two_views else [])
  return {key: host_batch[key] for key in keys}


# ----------------------------------------------------------------------------- timing


def peak_flops_per_device() -> float:
  """Datasheet peak for accelerators; a measured float32 matmul rate for CPUs."""
  kind = jax.devices()[0].device_kind
  for name, peak in DEVICE_PEAK_FLOPS.items():
    if name.lower() in kind.lower():
      return peak
  if jax.devices()[0].platform != "cpu":
    logging.warning("No peak FLOP/s known for %r; MFU is reported against a measured matmul.", kind)
  size = 2048
  x = jnp.ones((size, size), jnp.float32)
  matmul = jax.jit(lambda a: a @ a)
  jax.block_until_ready(matmul(x))
  start = time.perf_counter()
  for _ in range(3):
    jax.block_until_ready(matmul(x))
  return 3 * 2 * size**3 / (time.perf_counter() - start) / jax.local_device_count()


# ----------------------------------------------------------------------------- preemption


class StopSignal:
  """Records SIGTERM (preemption); every process agrees on stopping at the same step."""

  def __init__(self):
    self.received = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint at the end of this step, then exiting.")
    self.received = True

  def should_stop(self) -> bool:
    if jax.process_count() == 1:
      return self.received
    votes = multihost_utils.process_allgather(np.int32(self.received))
    return bool(np.max(votes))

  def restore_handler(self) -> None:
    signal.signal(signal.SIGTERM, self._previous)


# ----------------------------------------------------------------------------- the loop


def train_and_evaluate(config: config_dict.ConfigDict, workdir: str) -> TrainState:
  """`--mode train`: trains to `config.total_steps` (resuming), evaluates, exports, plots."""
  from cmvt_jax import evaluate

  workdir = epath.Path(workdir)
  _check_config(config)
  is_primary = jax.process_index() == 0
  check_workdir_writable(workdir)
  run = Run.create(config, workdir)  # checks the mesh and the batch split
  # Opening the dataset (making it, when synthetic) is the last check before any write.
  logging.info("Dataset %s: %s clips.", run.dataset.directory, run.dataset.num_examples)
  workdir.mkdir(parents=True, exist_ok=True)
  holds_run = checkpoints.holds_run(workdir)

  manager = checkpoints.manager(workdir, max_to_keep=config.checkpoint.keep)
  stop = StopSignal()
  writer = metrics_lib.MetricsWriter(workdir, is_primary=is_primary)
  data_iterator = None
  try:
    state, data_iterator, stats, first_step = _start_or_resume(run, manager, holds_run, writer)
    if is_primary:
      write_config_json(workdir, config)
    train_step = make_train_step(run)
    evaluator = evaluate.Evaluator(run, stats)
    state = _loop(
      run, state, data_iterator, stats, first_step, train_step, manager, writer, stop, evaluator
    )
  finally:
    if data_iterator is not None:
      data_iterator.close()  # stops grain's worker processes
    manager.wait_until_finished()
    manager.close()
    writer.close()
    stop.restore_handler()
  if stop.received:
    return state
  if config.export.at_end:
    from cmvt_jax import export

    export.export_embeddings(config, str(workdir), run=run, state=state, stats=stats)
  if config.plots.at_end:
    from cmvt_jax import plots

    plots.make_plots(config, str(workdir), run=run, state=state, stats=stats)
  return state


def _check_config(config) -> None:
  if config.total_steps < 1:
    raise ValueError(f"total_steps must be >= 1; got {config.total_steps}.")
  if config.objective not in ("contrastive", "supervised"):
    raise ValueError(f"objective must be 'contrastive' or 'supervised'; got {config.objective!r}.")
  if config.objective == "supervised" and config.model.num_classes < 1:
    raise ValueError(
      "objective='supervised' needs config.model.num_classes > 0 (the "
      "classifier head); set it to the number of labels."
    )
  accumulate = config.optim.grad_accum_steps
  if accumulate < 1 or config.batch_size % accumulate:
    raise ValueError(
      f"optim.grad_accum_steps={accumulate} must be >= 1 and divide batch_size={config.batch_size}."
    )
  for key in ("log_every_steps", "checkpoint_every_steps", "eval_every_steps"):
    if config[key] < 0:
      raise ValueError(f"{key} must be >= 0 (0 = only at the end); got {config[key]}.")


def _start_or_resume(run: Run, manager, holds_run: bool, writer):
  """(state, data iterator, normalisation stats, first step) — restored when possible."""
  config = run.config
  host_batch = config.batch_size // jax.process_count()

  def train_iterator(stats, start_step=0) -> Iterator:
    dataset = pipeline.train_dataset(
      run.dataset.source("train"),
      run.preprocessor(stats),
      batch_size=host_batch,
      seed=config.seed,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      start_step=start_step,
    )
    return iter(dataset)

  if not holds_run:
    stats = run.stats()
    logging.info("Starting a new run in %s.", run.workdir)
    writer.drop_after(0)
    return run.init_state(), train_iterator(stats), stats, 0

  try:
    restored = checkpoints.restore_latest(
      manager,
      run.abstract_state,
      check_meta=lambda meta: check_same_model(meta["config"], config, run.workdir),
    )
  except checkpoints.NoUsableCheckpointError:
    if not config.checkpoint.restart_if_unusable:
      raise
    logging.warning(
      "No checkpoint in %s could be restored; starting over, as "
      "checkpoint.restart_if_unusable asks.",
      run.workdir,
    )
    checkpoints.set_aside(manager, manager.all_steps())
    return _start_or_resume(run, manager, False, writer)
  # The model's own statistics, whatever the dataset says now (it may have been re-prepared).
  stats = normalization.NormalizationStats.from_dict(restored.meta["stats"])
  data_iterator = train_iterator(stats)
  if not checkpoints.restore_data(manager, restored.step, data_iterator):
    logging.warning(
      "The data position was rebuilt from step %d × global batch %d (the saved iterator "
      "state is for another process count, or missing).",
      restored.step,
      config.batch_size,
    )
    data_iterator = train_iterator(stats, start_step=restored.step)
  logging.info("Resuming from the checkpoint at step %d in %s.", restored.step, run.workdir)
  writer.drop_after(restored.step)
  return restored.state, data_iterator, stats, restored.step


def _loop(
  run: Run, state, data_iterator, stats, first_step, train_step, manager, writer, stop, evaluator
) -> TrainState:
  config = run.config
  total = int(config.total_steps)
  meta = lambda step: {
    "config": json.loads(config.to_json_best_effort()),
    "stats": stats.to_dict(),
    "step": step,
  }
  flops_per_step = run.flops().train_step * config.batch_size
  peak = peak_flops_per_device() * jax.device_count()
  progress = metrics_lib.Progress(first_step, total)
  every = lambda n, step: n > 0 and step % n == 0
  pending = None  # (step, device metrics, seconds the step's batch took to arrive)
  last_report = time.perf_counter()
  data_seconds = 0.0
  saved_step = first_step if first_step else None

  def report(pending_item):
    """Fetches a step's metrics (one step late) and logs them."""
    nonlocal last_report, data_seconds
    step, device_metrics, wait = pending_item
    values = jax.device_get(device_metrics)
    data_seconds += wait
    if not values.pop("finite"):
      _on_nonfinite(config, step, values, saved_step)
    if not (every(config.log_every_steps, step) or step == total):
      return
    now = time.perf_counter()
    steps = max(1, min(config.log_every_steps or 1, step - first_step))
    step_time = (now - last_report) / steps
    last_report = now
    values.update(
      step_time_s=step_time,
      clips_per_s=config.batch_size / step_time,
      mfu=flops_per_step / step_time / peak,
    )
    writer.write(step, values)
    writer.write_scalars(
      step, {"input/wait_fraction": data_seconds / max(progress.training_seconds(), 1e-9)}
    )
    logging.info("%s; loss %.4f", progress.line(step), values["loss"])

  def save(step):
    if pending is not None:
      report(pending)
    checkpoints.save(manager, step, state, data_iterator, meta(step))
    return step

  step = first_step
  while step < total:
    started = time.perf_counter()
    host_batch = next(data_iterator)
    batch = sharding.global_batch(
      model_inputs(host_batch, two_views=config.input.two_views), run.mesh
    )
    wait = time.perf_counter() - started
    state, device_metrics = train_step(state, batch)
    step += 1
    if pending is not None:
      report(pending)
    pending = (step, device_metrics, wait)

    stopping = stop.should_stop()
    if every(config.checkpoint_every_steps, step) or step == total or stopping:
      saved_step, pending = save(step), None
    if not stopping and every(config.eval_every_steps, step) and step != total:
      if pending is not None:
        report(pending)
        pending = None
      progress.pause()
      write_evals(writer, step, evaluator.evaluate(state.params["model"]))
      progress.resume()
      stopping = stop.should_stop()
      if stopping and saved_step != step:
        saved_step = save(step)
    if stopping:
      manager.wait_until_finished()
      logging.warning(
        "Stopped at step %d for SIGTERM; the checkpoint is saved. Run the same "
        "command again to continue.",
        step,
      )
      return state
  if pending is not None:
    report(pending)
  manager.wait_until_finished()
  logging.info(
    "Training done at step %d; input wait %.1f%% of training time.",
    step,
    100 * data_seconds / max(progress.training_seconds(), 1e-9),
  )
  write_evals(writer, step, evaluator.evaluate(state.params["model"]))
  return state


def write_evals(writer, step: int, results: dict[str, dict]) -> None:
  """One metrics line per evaluated split."""
  for split, values in results.items():
    writer.write(step, {"split": split, **values})


def _on_nonfinite(config, step: int, values: dict, saved_step: int | None) -> None:
  if config.skip_nonfinite_batches:
    logging.warning(
      "Non-finite loss at step %d: that batch was skipped (%d skipped so far).",
      step,
      values.get("skipped_batches", 0),
    )
    return
  resume = (
    f"the checkpoint at step {saved_step}" if saved_step else "no checkpoint yet (start again)"
  )
  raise NonFiniteLossError(
    f"The loss became {values['loss']} at step {step}; the update was not applied. Resume "
    f"from {resume} with a lower optim.learning_rate, or set "
    "--config.skip_nonfinite_batches=True to skip such batches and count them."
  )
