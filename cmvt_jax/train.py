"""Training: the update step, the loop, resume, preemption; `--mode train`.

Sections, in the order the run meets them: run setup (config checks, config.json), update
step, preemption, the loop. The mesh, model, optimiser, dataset and checkpoint restore are
`run.Run`'s, shared with every other mode.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import importlib.metadata
import json
import math
import signal
import subprocess
import time
from collections.abc import Callable
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from etils import epath
from ml_collections import config_dict
from orbax import checkpoint as ocp

from cmvt_jax import checkpoints
from cmvt_jax import console
from cmvt_jax import evaluate
from cmvt_jax import export
from cmvt_jax import files
from cmvt_jax import flops
from cmvt_jax import metrics
from cmvt_jax import plots
from cmvt_jax import run as run_lib
from cmvt_jax import sharding
from cmvt_jax.data import datasets
from cmvt_jax.data import normalization
from cmvt_jax.data import pipeline
from cmvt_jax.models import cmvt


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or Inf."""


# ----------------------------------------------------------------------------- run setup


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
  path = workdir / "config.json"
  text = json.dumps(record, indent=2) + "\n"
  if not path.exists() or path.read_text() != text:  # a rerun of the same run writes nothing
    files.write_text(path, text, kind="config.json")


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
  try:
    files.probe_writable(folder, f".cmvt_write_probe_{jax.process_index()}")
  except OSError as error:
    raise PermissionError(
      f"--workdir {workdir} is not writable ({type(error).__name__}: {error}); choose a "
      "folder you can write to."
    ) from error


def _check_config(config: config_dict.ConfigDict) -> None:
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


def check_data(run: run_lib.Run) -> None:
  """Refuses, before any training, data the config cannot use: eval splits the dataset
  lacks, a supervised objective without (the right number of) labels, a mixture whose
  components disagree on what the labels mean."""
  config = run.config
  names = [name for name, _ in datasets.mixture_weights(config.dataset)]
  if names and config.dataset.name == datasets.SYNTHETIC_NAME and config.dataset.name not in names:
    raise ValueError(
      "dataset.mixture is set, but dataset.name is still the synthetic dataset: set "
      "--config.dataset.name to the dataset to evaluate and export (e.g. the first "
      f"component, {names[0]!r})."
    )
  dataset, mixture = run.dataset, run.train_components
  missing = [split for split in config.eval.splits if split not in dataset.num_examples]
  if missing:
    raise ValueError(
      f"eval.splits asks for {', '.join(missing)}, which the dataset at {dataset.directory} "
      f"does not have (it has {', '.join(dataset.num_examples)}): set --config.eval.splits, "
      "or prepare the dataset with that split (e.g. prepare --hash_split train=0.9,test=0.1)."
    )
  if config.objective != "supervised":
    return
  if not dataset.labelled:
    raise ValueError(
      f"objective='supervised' needs labelled data; the dataset at {dataset.directory} has "
      f"{len(dataset.label_names)} classes."
    )
  if config.model.num_classes != len(dataset.label_names):
    raise ValueError(
      f"model.num_classes={config.model.num_classes}, but the dataset at "
      f"{dataset.directory} has {len(dataset.label_names)} classes: set "
      f"--config.model.num_classes={len(dataset.label_names)}."
    )
  for component, _ in mixture:
    if (component.label_names, component.multi_label) != (
      dataset.label_names,
      dataset.multi_label,
    ):
      raise ValueError(
        f"objective='supervised' with a mixture needs every component to have the labels of "
        f"{dataset.directory}; {component.directory} has other classes."
      )


# ----------------------------------------------------------------------------- update step


def make_train_step(
  run: run_lib.Run,
) -> Callable[[run_lib.TrainState, dict], tuple[run_lib.TrainState, dict]]:
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
  schedule = run_lib.learning_rate_schedule(config)
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
      return supervised_loss(outs["logits"], batch)
    views = {"z_video_view2": outs.get("video_view2"), "z_audio_view2": outs.get("audio_view2")}
    return loss_fn(
      log_temperature, outs["video"], outs["audio"], has_audio=batch["has_audio"], **views
    )

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

  def train_step(state: run_lib.TrainState, batch: dict) -> tuple[run_lib.TrainState, dict]:
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
    sharding.traced_over(run.mesh, train_step),
    in_shardings=(run.state_shardings, batch_sharding),
    out_shardings=(run.state_shardings, sharding.replicated(run.mesh)),
    donate_argnums=(0,),
  )


def supervised_loss(logits: jax.Array, batch: dict) -> tuple[jax.Array, dict[str, jax.Array]]:
  """VTN's objective on classifier logits `[B, C]`: softmax cross-entropy over the clips
  with a label (`label` >= 0), or, for multi-label data (`labels` `[B, C]` multi-hot in the
  batch), sigmoid binary cross-entropy averaged over clips and classes."""
  if "labels" in batch:
    targets = batch["labels"].astype(jnp.float32)
    return optax.sigmoid_binary_cross_entropy(logits, targets).mean(), {}
  labels = batch["label"]
  labelled = (labels >= 0).astype(jnp.float32)
  count = jnp.maximum(labelled.sum(), 1.0)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(labels, 0))
  correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  return (losses * labelled).sum() / count, {"accuracy": (correct * labelled).sum() / count}


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
  keys = ["video", "audio", "label", "has_audio"]
  keys += ["video_view2", "audio_view2"] if two_views else []
  keys += ["labels"] if "labels" in host_batch else []
  return {key: host_batch[key] for key in keys}


# ----------------------------------------------------------------------------- preemption


class StopSignal:
  """Records SIGTERM (preemption); every process agrees on stopping at the same step.

  One process stops at the first step after the signal. Several vote (an all-gather of
  their flags; a SIGTERM may reach only some of them), but not every step, since a vote
  blocks each host on the step it just dispatched: each vote also gathers every process's
  wall time per step since the last vote, and all of them compute the same next voting step
  from the slowest, about `vote_seconds` ahead (`config.distributed.stop_vote_seconds`).
  """

  def __init__(self, vote_seconds: float):
    self.received = False  # this process got SIGTERM
    self._agreed = False  # the processes voted to stop
    self._vote_seconds = vote_seconds
    self._next_vote = None  # the first step seen votes
    self._last_vote = (None, time.perf_counter())
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint at the end of this step, then exiting.")
    self.received = True

  def should_stop(self, step: int, *, vote_now: bool = False) -> bool:
    """Whether to stop after `step`. Every process calls it after every step (and with
    `vote_now` at points every process reaches together, e.g. after an evaluation)."""
    if jax.process_count() == 1:
      return self.received
    if self._next_vote is not None and step < self._next_vote and not vote_now:
      return False
    last_step, last_time = self._last_vote
    now = time.perf_counter()
    seconds_per_step = (now - last_time) / max(step - (last_step or step - 1), 1)
    votes = sharding.gather([self.received, seconds_per_step], np.float32)
    slowest = float(votes[:, 1].max())
    self._next_vote = step + max(1, math.floor(self._vote_seconds / max(slowest, 1e-6)))
    self._last_vote = (step, now)
    self._agreed = bool(votes[:, 0].max())
    return self._agreed

  @property
  def stopped(self) -> bool:
    """Whether the run stops: one process on its own signal; several only on a vote they all
    saw (a process that got no SIGTERM stops too, and none goes on alone)."""
    return self.received if jax.process_count() == 1 else self._agreed

  def restore_handler(self) -> None:
    signal.signal(signal.SIGTERM, self._previous)


# ----------------------------------------------------------------------------- the loop


def train_and_evaluate(config: config_dict.ConfigDict, workdir: str) -> run_lib.TrainState:
  """`--mode train`: trains to `config.total_steps` (resuming), evaluates, exports, plots.

  Run again on a finished workdir, it does only the end stages that are missing (an
  evaluation, export or plots that a crash or a stop interrupted).
  """
  workdir = epath.Path(workdir)
  _check_config(config)
  check_workdir_writable(workdir)
  run = run_lib.Run.create(config, workdir)  # checks the mesh and the batch split
  # Opening the dataset (making it, when synthetic) is the last check before any write.
  check_data(run)
  logging.info("Dataset %s: %s clips.", run.dataset.directory, run.dataset.num_examples)
  workdir.mkdir(parents=True, exist_ok=True)
  if jax.process_index() == 0:
    _remove_temporaries(workdir)
  holds_run = checkpoints.holds_run(workdir)

  manager = checkpoints.manager(workdir, max_to_keep=config.checkpoint.keep)
  writer = metrics.MetricsWriter(workdir, is_primary=jax.process_index() == 0)
  # From here on, a SIGTERM stops the run at its next step (or vote), saved.
  stop = StopSignal(config.distributed.stop_vote_seconds)
  start = None
  try:
    start = _start_or_resume(run, manager, holds_run, writer)
    if jax.process_index() == 0:
      write_config_json(workdir, config)
    state = _TrainLoop(run, start, manager, writer, stop).train()
  finally:
    if start is not None:
      pipeline.close(start.data_iterator)  # stops grain's worker processes
    try:
      checkpoints.wait(manager)
    finally:
      manager.close()
      writer.close()
      stop.restore_handler()
  if stop.stopped:
    return state
  trained = run_lib.TrainedParams(
    step=int(state.step), params=state.params["model"], stats=start.stats
  )
  if config.export.at_end:
    if export.is_current(config, workdir, trained.step):
      logging.info("The export of step %d is complete already.", trained.step)
    else:
      export.export_embeddings(config, str(workdir), run=run, trained=trained)
  if config.plots.at_end:
    if plots.is_current(config, workdir, trained.step):
      logging.info("The plots of step %d are complete already.", trained.step)
    else:
      plots.make_plots(config, str(workdir), run=run, trained=trained)
  return state


def _remove_temporaries(workdir: epath.Path) -> None:
  """Removes what writes interrupted by a crash left in the workdir's own folders."""
  folders = [workdir, workdir / "plots"]
  if (workdir / "embeddings").is_dir():
    folders += [path for path in (workdir / "embeddings").iterdir() if path.is_dir()]
  for folder in folders:
    for path in files.remove_temporaries(folder):
      logging.info("Removed %s, left by an interrupted write.", path)


@dataclasses.dataclass
class _Start:
  """Where training starts: a fresh or restored state, its data and statistics."""

  state: run_lib.TrainState
  data_iterator: Iterator
  stats: normalization.NormalizationStats
  step: int


def _start_or_resume(
  run: run_lib.Run, manager: ocp.CheckpointManager, holds_run: bool, writer: metrics.MetricsWriter
) -> _Start:
  """The run's starting point — restored from the newest usable checkpoint when possible.

  The data iterator (and its worker processes) is made last, once nothing else can fail.
  """
  config = run.config
  host_batch = config.batch_size // jax.process_count()

  def train_iterator(stats, start_step=0) -> Iterator:
    components = [
      pipeline.Component(dataset.source("train"), run.preprocessor(stats, dataset), weight)
      for dataset, weight in run.train_components
    ]
    dataset = pipeline.mixture_train_dataset(
      components,
      multi_hot_classes=run.train_multi_hot_classes,
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
    writer.continue_from(0)
    return _Start(run.init_state(), train_iterator(stats), stats, 0)

  try:
    restored = checkpoints.restore_latest(manager, run.abstract_state, check=run.check_checkpoint)
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
  writer.drop_after(restored.step)
  writer.continue_from(restored.step)
  data_iterator = train_iterator(stats)
  try:
    if not checkpoints.restore_data(manager, restored.step, data_iterator):
      logging.warning(
        "The data position was rebuilt from step %d × global batch %d (the saved iterator "
        "state is for another process count, or missing).",
        restored.step,
        config.batch_size,
      )
      pipeline.close(data_iterator)
      data_iterator = train_iterator(stats, start_step=restored.step)
  except BaseException:
    pipeline.close(data_iterator)
    raise
  logging.info("Resuming from the checkpoint at step %d in %s.", restored.step, run.workdir)
  return _Start(restored.state, data_iterator, stats, restored.step)


class _TrainLoop:
  """Steps from the start to `total_steps`: metrics one step late, checkpoints, evals, stop."""

  def __init__(
    self,
    run: run_lib.Run,
    start: _Start,
    manager: ocp.CheckpointManager,
    writer: metrics.MetricsWriter,
    stop: StopSignal,
  ):
    self.run, self.config = run, run.config
    self.state, self.data_iterator, self.stats = start.state, start.data_iterator, start.stats
    self.first_step = self.step = start.step
    self.manager, self.writer = manager, writer
    self.total = int(self.config.total_steps)
    self.train_step = make_train_step(run)
    self.evaluator = evaluate.Evaluator(run, start.stats)
    self.stop = stop
    self.progress = metrics.Progress(start.step, self.total)
    self.stage = console.Stage(
      "train", self.total, "steps", enabled=jax.process_index() == 0, eta=False
    )
    self.flops_per_step = run.flops().train_step * self.config.batch_size
    self.peak = flops.peak_flops_per_device() * jax.device_count()
    self.pending = None  # (step, device metrics, seconds the step's batch took to arrive)
    self.saved_step = start.step or None
    self.last_report = time.perf_counter()
    self.data_seconds = 0.0
    self.stage_note = ""  # the train line's last loss and rate
    self.first_batch = None  # fetched while the step compiles

  def train(self) -> run_lib.TrainState:
    """Runs the loop; returns the final state (or the state it stopped at for SIGTERM)."""
    config = self.config
    if 0 < self.step < self.total and _every(config.eval_every_steps, self.step):
      self._evaluate(only_missing=True)  # a crash may have cut the evaluation after the save
    self.stage.update(self.step, note="compiling the step" if self.step < self.total else "")
    if self.step < self.total:
      self._compile_step()
    while self.step < self.total:
      self._step()
      step = self.step
      # Every process votes at the last step, so that none goes on to the final evaluation
      # and export while another stops.
      stopping = self.stop.should_stop(step, vote_now=step == self.total)
      if _every(config.checkpoint_every_steps, step) or step == self.total or stopping:
        self._save()
      if not stopping and _every(config.eval_every_steps, step) and step != self.total:
        self._evaluate()
        stopping = self.stop.should_stop(step, vote_now=True)
        if stopping and self.saved_step != step:
          self._save()
      if stopping:
        self.stage.finish(note="stopped")
        checkpoints.wait(self.manager)
        logging.warning(
          "Stopped at step %d for SIGTERM; the checkpoint is saved. Run the same "
          "command again to continue.",
          step,
        )
        return self.state
    self._report_pending()
    checkpoints.wait(self.manager)
    if self.step > self.first_step:
      wait = self.data_seconds / max(self.progress.training_seconds(), 1e-9)
      self.stage.finish(note=f"{self.stage_note}, input wait {wait:.1%} of training time")
    else:
      self.stage.finish(note=f"done before (the checkpoint at step {self.step})")
    self._evaluate(only_missing=True)
    return self.state

  def _compile_step(self) -> None:
    """Compiles the step from the batch's shapes while a thread asks for the first batch.

    grain starts its worker processes at the first request, and a worker's start-up (its
    imports) and first batch took ~6 s for the default config on a 2-core Xeon; compiling
    the step took 12 s. Done one after the other, the first step waited for both; now the
    workers start during the compile. The first step finds the program in jit's cache and
    the batch waiting.
    """
    batch = run_lib.abstract_clips(
      self.run.spec,
      self.config.batch_size,
      sharding.batch_sharding(self.run.mesh),
      two_views=self.config.input.two_views,
      multi_hot_classes=self.run.train_multi_hot_classes,
    )
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="first-batch") as pool:
      first = pool.submit(next, self.data_iterator)
      try:
        self.train_step.lower(self.state, batch).compile()
      finally:
        # Never leave the thread inside the iterator: a failed compile closes it next.
        concurrent.futures.wait([first])
    self.first_batch = first.result()

  def _step(self) -> None:
    started = time.perf_counter()
    if self.first_batch is not None:
      host_batch, self.first_batch = self.first_batch, None
    else:
      host_batch = next(self.data_iterator)
    inputs = model_inputs(host_batch, two_views=self.config.input.two_views)
    batch = sharding.global_batch(inputs, self.run.mesh)
    wait = time.perf_counter() - started
    self.state, device_metrics = self.train_step(self.state, batch)
    self.step += 1
    self._report_pending()
    self.pending = (self.step, device_metrics, wait)

  def _report_pending(self) -> None:
    """Fetches the pending step's metrics (one step late, so the host never waits for the
    step it just dispatched) and logs them."""
    if self.pending is None:
      return
    (step, device_metrics, wait), self.pending = self.pending, None
    config = self.config
    values = jax.device_get(device_metrics)
    self.data_seconds += wait
    if not values.pop("finite"):
      _on_nonfinite(config, step, values, self.saved_step)
    logged = _every(config.log_every_steps, step) or step == self.total
    self.stage_note = ", ".join(
      filter(None, [f"loss {values['loss']:.4f}", self.progress.note(step)])
    )
    # The last step's line is the stage's final one (`finish`), with the input wait.
    self.stage.update(step, note=self.stage_note, milestone=logged and step != self.total)
    if not logged:
      return
    now = time.perf_counter()
    steps = max(1, min(config.log_every_steps or 1, step - self.first_step))
    step_time = (now - self.last_report) / steps
    self.last_report = now
    values.update(
      step_time_s=step_time,
      clips_per_s=config.batch_size / step_time,
      mfu=self.flops_per_step / step_time / self.peak,
    )
    self.writer.write(step, values)
    wait_fraction = self.data_seconds / max(self.progress.training_seconds(), 1e-9)
    self.writer.write_scalars(step, {"input/wait_fraction": wait_fraction})

  def _save(self) -> None:
    self._report_pending()
    meta = {
      "config": json.loads(self.config.to_json_best_effort()),
      "stats": self.stats.to_dict(),
      "step": self.step,
    }
    self.writer.sync()  # the checkpoint must not outlive the metrics lines it resumes after
    checkpoints.save(self.manager, self.step, self.state, self.data_iterator, meta)
    self.saved_step = self.step

  def _evaluate(self, *, only_missing: bool = False) -> None:
    """Evaluates the current parameters on `eval.splits` (`only_missing`: those splits that
    metrics.jsonl has no line of this step for, as process 0 reads it)."""
    self._report_pending()
    splits = list(self.config.eval.splits)
    if only_missing:
      is_primary = jax.process_index() == 0
      done = metrics.evaluated_splits(self.run.workdir, self.step) if is_primary else set()
      missing = sharding.from_process_zero([split not in done for split in splits])
      splits = [split for split, is_missing in zip(splits, missing) if is_missing]
      if not splits:
        logging.info("The evaluation at step %d is in metrics.jsonl already.", self.step)
        return
    self.progress.pause()
    results = self.evaluator.evaluate(self.state.params["model"], splits)
    metrics.write_evals(self.writer, self.step, results)
    self.progress.resume()


def _every(n: int, step: int) -> bool:
  return n > 0 and step % n == 0


def _on_nonfinite(
  config: config_dict.ConfigDict, step: int, values: dict, saved_step: int | None
) -> None:
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


# ----------------------------------------------------------------------------- the summary


def summary(config: config_dict.ConfigDict, workdir: str, config_file: str) -> str:
  """What a finished run printed last: its final evaluation, where its outputs are, and the
  commands a person is likely to run next (with this run's config file and workdir)."""
  records = metrics.read(workdir)
  step = max((record["step"] for record in records), default=0)
  lines = [f"Done: {step} steps in {workdir}."]
  for record in records:
    if record["step"] == step and "split" in record:
      values = {key: value for key, value in record.items() if key.startswith("eval/")}
      lines += ["", f"{record['split']} split, step {step}:", evaluate.format_table(values)]
  folder = epath.Path(workdir)
  outputs = [
    ("checkpoints", folder / "checkpoints"),
    ("metrics", folder / "metrics.jsonl"),
    ("embeddings", folder / "embeddings" / export.export_name(config.export)),
    ("plots", folder / "plots"),
  ]
  lines += ["", "Where things are:"]
  lines += [f"  {name:<12} {path}" for name, path in outputs if path.exists()]
  base = f"python -m cmvt_jax.main --config {config_file} --workdir {workdir}"
  commands = [
    (f"{base} --mode eval", "evaluate again"),
    (f"{base} --mode export --config.export.video_dir=YOUR_VIDEOS", "embed your own videos"),
    (f"pip install tensorboard && tensorboard --logdir {workdir}", "the curves"),
  ]
  width = max(len(command) for command, _ in commands)
  lines += ["", "Next:"]
  lines += [f"  {command:<{width}}   # {what}" for command, what in commands]
  return "\n".join(lines)
