"""PNG figures of a run, written to WORKDIR/plots/ (`--mode plots`, and the end of training).

  training_curves.png    loss, temperature and learning rate per step, and the eval metrics
                         (R@1 both ways, linear probe, kNN) per evaluated split, from
                         metrics.jsonl
  similarity_matrix.png  cosine similarity of the audio (rows) and video (columns)
                         embeddings of the first `plots.num_clips` clips of eval.splits[0];
                         each clip's positive is on the diagonal
  embeddings_pca.png     the exported embeddings (`export` settings; without a complete
                         export, the split embedded now) on their first two principal
                         components, video and audio in the one shared space, coloured by label
  attention.png          the first temporal layer of the video tower: which keys each query
                         may attend by the banded rule (window, dilation, the global CLS row
                         and column) over a long sequence, and per head the attention
                         weights of one eval clip, computed densely from the layer's inputs

`manifest.json`, written after the figures, names the checkpoint step and config they show.

Figures are drawn on `matplotlib.figure.Figure` objects (the Agg canvas; no pyplot, no
display) at fixed sizes: `FIGURE_SIZES` inches at `DPI`. Every process must call
`make_plots` (embedding runs collectives on the mesh); only process 0 writes.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import matplotlib
import numpy as np
from absl import logging
from etils import epath
from flax import traverse_util
from matplotlib import figure
from ml_collections import config_dict

from cmvt_jax import console
from cmvt_jax import embedding
from cmvt_jax import evaluate
from cmvt_jax import export as export_lib
from cmvt_jax import files
from cmvt_jax import metrics
from cmvt_jax import run as run_lib
from cmvt_jax import sharding
from cmvt_jax.data import pipeline
from cmvt_jax.models import attention
from cmvt_jax.models import cmvt
from cmvt_jax.models import longformer

DPI = 100
# Written last into WORKDIR/plots/ (checkpoint step, config digest, figure files).
MANIFEST = "manifest.json"
FIGURE_SIZES = {  # inches (width, height)
  "training_curves": (15, 4),
  "similarity_matrix": (7, 6),
  "embeddings_pca": (9, 7),
  "attention": (15, 4),
}
# Sequence length (CLS + time steps) at which the attention rule is drawn: long enough for
# the band, its dilation and the global row and column to show.
RULE_LENGTH = 48
# Heads whose weights are drawn (the first ones).
MAX_HEADS = 4
# Clips embedded for the PCA figure when there is no export to read.
PCA_CLIPS = 2048
_EVAL_CURVES = ("eval/a2v_r1", "eval/v2a_r1", "eval/linear_probe_top1", "eval/knn_top1")


def make_plots(
  config: config_dict.ConfigDict,
  workdir: str,
  *,
  run: run_lib.Run | None = None,
  trained: run_lib.TrainedParams | None = None,
) -> list[epath.Path]:
  """Draws every figure of the module docstring; returns the files written (process 0).

  Args:
    config: the run's config (`eval`, `export` and `plots` sections).
    workdir: the run's workdir.
    run, trained: training's, at the end of a run; otherwise the latest checkpoint's
      parameters are read from the workdir.
  """
  run = run or run_lib.Run.create(config, workdir)
  trained = trained or run.restore_params()
  split = config.eval.splits[0]
  primary = jax.process_index() == 0
  with console.Stage("plots", len(FIGURE_SIZES), "figures", enabled=primary) as stage:
    figures = {"training_curves": lambda: training_curves(metrics.read(workdir))}
    # Embedding runs on every process; drawing only where the figure is written.
    embedder = embedding.ClipEmbedder(run.model, run.mesh, run.spec)
    clips = evaluate.embed_split(
      run, embedder, trained.params, trained.stats, split, limit=config.plots.num_clips
    )
    figures["similarity_matrix"] = lambda: similarity_matrix(clips, split)
    points, label_names, title = _pca_points(run, embedder, trained, config.export, workdir)
    figures["embeddings_pca"] = lambda: embeddings_pca(points, label_names, title)
    maps = attention_maps(run, trained, split)
    if maps is not None:
      figures["attention"] = lambda: attention_figure(**maps)
    else:
      logging.info("No attention figure: the video tower has no temporal attention layer.")
    stage.total = len(figures)
    if not primary:
      return []
    folder = epath.Path(workdir) / "plots"
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, draw in figures.items():
      path = folder / f"{name}.png"
      with files.replacing(path, kind="plot") as temporary, temporary.open("wb") as f:
        draw().savefig(f, format="png", dpi=DPI)
      written.append(path)
      stage.advance()
    manifest = {
      "step": trained.step,
      "config_sha256": run_lib.config_digest(config),
      "figures": [path.name for path in written],
    }
    files.write_json(folder / MANIFEST, manifest, kind="plots-manifest")
    stage.finish(note=f"in {folder}")
  return written


def is_current(config: config_dict.ConfigDict, workdir: epath.PathLike, step: int) -> bool:
  """Whether WORKDIR/plots holds this config's figures of checkpoint `step` (a rerun of a
  finished run skips them then). Call on every process."""
  manifest = epath.Path(workdir) / "plots" / MANIFEST
  return run_lib.output_is_current(manifest, config, step, listed="figures")


def _figure(name: str) -> figure.Figure:
  return figure.Figure(figsize=FIGURE_SIZES[name], dpi=DPI, layout="constrained")


# ----------------------------------------------------------------------------- training


def training_curves(lines: Sequence[dict[str, Any]]) -> figure.Figure:
  """Loss; temperature and learning rate; eval metrics per split — against the step."""
  fig = _figure("training_curves")
  loss_axes, temperature_axes, eval_axes = fig.subplots(1, 3)
  train = [line for line in lines if "loss" in line]
  steps = [line["step"] for line in train]
  loss_axes.plot(steps, [line["loss"] for line in train])
  loss_axes.set(title="training loss", xlabel="step")
  if train and "temperature" in train[0]:
    temperature_axes.plot(steps, [line["temperature"] for line in train], label="temperature")
  rate_axes = temperature_axes.twinx()
  if train and "learning_rate" in train[0]:
    rate_axes.plot(
      steps, [line["learning_rate"] for line in train], color="tab:orange", label="learning rate"
    )
  temperature_axes.set(title="temperature (left), learning rate (right)", xlabel="step")
  evals = [line for line in lines if "split" in line]
  for split in sorted({line["split"] for line in evals}):
    for key in _EVAL_CURVES:
      points = [
        (line["step"], line[key]) for line in evals if line["split"] == split and key in line
      ]
      if points:
        eval_axes.plot(*zip(*points), marker="o", label=f"{split} {key.split('/')[1]}")
  eval_axes.set(title="evaluation", xlabel="step", ylim=(0, 1.02))
  if evals:
    eval_axes.legend(fontsize="small")
  if not train:
    loss_axes.text(0.5, 0.5, "no training metrics yet", ha="center", transform=loss_axes.transAxes)
  return fig


# ----------------------------------------------------------------------------- embeddings


def similarity_matrix(clips: dict[str, np.ndarray], split: str) -> figure.Figure:
  """Audio (rows) × video (columns) cosine similarity of L2-normalised embeddings."""
  fig = _figure("similarity_matrix")
  axes = fig.subplots()
  similarity = clips["audio"] @ clips["video"].T
  image = axes.imshow(similarity, cmap="viridis")
  fig.colorbar(image, ax=axes, label="cosine similarity")
  r1 = float(np.mean(evaluate.retrieval_ranks(clips["audio"], clips["video"]) == 1))
  axes.set(
    title=f"{split}: {len(similarity)} clips, a→v R@1 among them {r1:.2f}",
    xlabel="video of clip",
    ylabel="audio of clip",
  )
  return fig


def _pca_points(
  run: run_lib.Run,
  embedder: embedding.ClipEmbedder,
  trained: run_lib.TrainedParams,
  export: config_dict.ConfigDict,
  workdir: str,
) -> tuple[dict[str, np.ndarray], Sequence[str], str]:
  """(embeddings, label names, description) for the PCA figure: the export that the
  config's `export` section describes when it is complete."""
  name = export_lib.export_name(export)
  try:
    _, manifest = export_lib.read_manifest(workdir, name)
  except FileNotFoundError:
    rows = evaluate.embed_split(
      run, embedder, trained.params, trained.stats, export.split, limit=PCA_CLIPS
    )
    return rows, run.dataset.label_names, f"{export.split} (step {trained.step}, not exported)"
  rows = export_lib.load_embeddings(workdir, name)
  return rows, manifest["label_names"] or (), f"export {name!r} (step {manifest['step']})"


def pca_2d(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """x `[N, E]` → (its coordinates on the first two principal components `[N, 2]`, the
  fraction of variance each explains `[2]`)."""
  centred = x - x.mean(axis=0)
  _, singular, axes = np.linalg.svd(centred, full_matrices=False)
  variance = singular**2
  return centred @ axes[:2].T, variance[:2] / max(variance.sum(), 1e-12)


def embeddings_pca(
  rows: dict[str, np.ndarray], label_names: Sequence[str], title: str
) -> figure.Figure:
  """Video (dots) and audio (crosses) embeddings in one PCA of the shared space."""
  fig = _figure("embeddings_pca")
  axes = fig.subplots()
  count = len(rows["video"])
  coordinates, explained = pca_2d(np.concatenate([rows["video"], rows["audio"]]))
  labels = rows["label"] if "label" in rows else np.full(count, -1)
  palette = matplotlib.colormaps["tab20" if len(label_names) > 10 else "tab10"]
  for label in np.unique(labels):
    where = labels == label
    colour = palette(int(label) % palette.N) if label >= 0 else "grey"
    name = label_names[label] if 0 <= label < len(label_names) else "unlabelled"
    axes.scatter(*coordinates[:count][where].T, s=14, color=colour, marker="o", label=name)
    axes.scatter(*coordinates[count:][where].T, s=14, color=colour, marker="x")
  axes.set(
    title=f"PCA of {title}: video ●, audio ×, {count} each",
    xlabel=f"PC 1 ({100 * explained[0]:.0f}% of variance)",
    ylabel=f"PC 2 ({100 * explained[1]:.0f}% of variance)",
  )
  axes.legend(fontsize="small", markerscale=1.5, loc="best")
  return fig


# ----------------------------------------------------------------------------- attention


def attention_maps(
  run: run_lib.Run, trained: run_lib.TrainedParams, split: str
) -> dict[str, Any] | None:
  """The first video temporal layer's settings and dense attention weights for the first
  clip of `split` (None when the tower mean-pools). Every process must call it."""
  temporal = run.model.video_encoder.temporal
  if temporal.num_layers == 0:
    return None
  window = int(longformer.per_layer("windows", temporal.windows, temporal.num_layers)[0])
  dilation = longformer.per_layer("dilations", temporal.dilations, temporal.num_layers)[0]
  dilations = (dilation,) * temporal.num_heads if isinstance(dilation, int) else dilation
  example = run.dataset.source(split)[0]
  clip = pipeline.text(example["id"])
  video = run.preprocessor(trained.stats)(example["frames"], example["audio"])["video"][None]
  length = video.shape[1] + 1  # the CLS token, then one step per frame
  rules = np.stack([attention.band_rule(length, window, d, [0]) for d in dilations])
  replicated = sharding.replicated(run.mesh)

  @functools.partial(jax.jit, out_shardings=replicated)
  def weights_fn(params, video, rules):
    # The first temporal layer's input, captured from a forward pass; its parameters live
    # at the same path in the parameter tree.
    _, state = run.model.apply(
      {"params": params},
      video,
      method=cmvt.CMVT.embed_video,
      mutable=["intermediates"],
      capture_intermediates=lambda module, method: module.name == "attention_norm",
    )
    captured = traverse_util.flatten_dict(state["intermediates"])
    path = min(key for key in captured if key[0] == "video_encoder")
    layer = functools.reduce(lambda tree, name: tree[name], path[:-2], params)
    x = captured[path][0][0]  # [L, D]
    return longformer.dense_attention_weights(
      layer["attention"], x, rules, global_projections=temporal.global_projections
    )

  weights = weights_fn(
    trained.params,
    jax.make_array_from_process_local_data(replicated, video),
    jax.make_array_from_process_local_data(replicated, rules),
  )
  return {
    "weights": np.asarray(jax.device_get(weights)),
    "rules": rules,
    "window": window,
    "dilations": tuple(int(d) for d in dilations),
    "clip": clip,
  }


def attention_figure(
  weights: np.ndarray, rules: np.ndarray, window: int, dilations: Sequence[int], clip: str
) -> figure.Figure:
  """The rule at RULE_LENGTH per distinct dilation, then the first heads' weights (keys
  outside the rule left blank)."""
  fig = _figure("attention")
  distinct = sorted(set(dilations))
  heads = min(len(dilations), MAX_HEADS)
  panels = fig.subplots(1, len(distinct) + heads, squeeze=False)[0]
  for axes, dilation in zip(panels, distinct):
    axes.imshow(
      attention.band_rule(RULE_LENGTH, window, dilation, [0]), cmap="Greys", interpolation="nearest"
    )
    axes.set(
      title=f"rule: window {window}, dilation {dilation},\nCLS (0) global; {RULE_LENGTH} positions",
      xlabel="key",
      ylabel="query",
    )
  for head, axes in enumerate(panels[len(distinct) :]):
    image = axes.imshow(
      np.ma.array(weights[head], mask=~rules[head]), cmap="viridis", vmin=0, interpolation="nearest"
    )
    axes.set(
      title=f"head {head} (dilation {dilations[head]})", xlabel="key (0 = CLS)", ylabel="query"
    )
    fig.colorbar(image, ax=axes, shrink=0.8)
  fig.suptitle(f"Video temporal layer 0: attention of clip {clip}")
  return fig
