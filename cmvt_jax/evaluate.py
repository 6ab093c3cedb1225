"""Evaluation of the learned embeddings: cross-modal retrieval, linear probe, kNN, classifier.

Every example of a split counts exactly once: each host embeds its padded share, the
embeddings are gathered to every host (they are small: N × E), and padding rows are dropped
by the batch's `mask`. All hosts then compute the same numbers; process 0 writes them.

* Retrieval, both directions: for audio query i the candidates are the videos of every clip of
  the split, and its rank is 1 + the number of other videos at least as similar as its own
  (cosine), so ties count against the model. R@1/5/10 and the median rank. Clips without
  audio (`keep_audioless`) are neither queries nor candidates on either side; the eval line
  counts them (`eval/num_audioless`).
* Linear probe: logistic regression on frozen, L2-normalised video embeddings (full-batch
  Adam, fixed recipe below), fitted on the train split: multinomial, top-1 on the split
  (`eval/linear_probe_top1`); for multi-label data one-vs-rest (sigmoid), mean average
  precision (`eval/linear_probe_map`).
* kNN: the k most cosine-similar train video embeddings vote (weighted by similarity);
  single-label data only.
* Classifier (`objective='supervised'`): the model's own classifier head on the split:
  `eval/classifier_top1` and `eval/classifier_top5`, or `eval/classifier_map` for
  multi-label data (as AudioSet and VGGSound report).
* Without labels (an unlabelled dataset, or one class) the evaluations that need them are
  skipped, said so in one log line, and their keys are absent; retrieval still runs.
  Single-label metrics count the clips that have a label.
* Multi-clip (`eval.multi_clip`): the clip embeddings of each source video are averaged (and
  re-normalised) into one per video, as video papers report (classifier logits averaged
  too); retrieval among the videos, and the probe and kNN (still fitted on train clips) on
  the averaged embeddings, reported as `eval/video_level_...` next to the per-clip keys.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from ml_collections import config_dict

from cmvt_jax import console
from cmvt_jax import embedding
from cmvt_jax import metrics
from cmvt_jax import run as run_lib
from cmvt_jax.data import normalization

RECALL_AT = (1, 5, 10)
# Linear-probe recipe (fixed, so numbers compare across runs).
PROBE_STEPS = 300
PROBE_LEARNING_RATE = 0.05
PROBE_WEIGHT_DECAY = 1e-4


# ----------------------------------------------------------------------------- metrics


def retrieval_ranks(queries: np.ndarray, candidates: np.ndarray) -> np.ndarray:
  """Rank of candidate i for query i, 1-based; ties count against: `[N]` int.

  queries, candidates: `[N, E]` L2-normalised; row i of each is a positive pair.
  """
  similarity = queries @ candidates.T
  positive = np.diagonal(similarity)[:, None]
  at_least_as_close = similarity >= positive
  np.fill_diagonal(at_least_as_close, False)
  return 1 + at_least_as_close.sum(axis=1)


def retrieval_metrics(video: np.ndarray, audio: np.ndarray) -> dict[str, float]:
  """a2v (audio queries, video candidates) and v2a R@K and median rank."""
  results = {}
  for name, queries, candidates in (("a2v", audio, video), ("v2a", video, audio)):
    ranks = retrieval_ranks(queries, candidates)
    for k in RECALL_AT:
      results[f"eval/{name}_r{k}"] = float(np.mean(ranks <= k))
    results[f"eval/{name}_median_rank"] = float(np.median(ranks))
  return results


def linear_probe_top1(
  train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, num_classes: int
) -> float:
  """Top-1 of a logistic regression fitted on (train_x, train_y), evaluated on test_x."""
  return probe_top1(fit_linear_probe(train_x, train_y, num_classes), test_x, test_y)


def probe_scores(weights: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
  """A fitted probe's (`fit_linear_probe`) class scores (logits) `[N, C]` of embeddings x."""
  return x @ weights["w"] + weights["b"]


def probe_top1(weights: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> float:
  """Top-1 of a fitted probe (`fit_linear_probe`) on embeddings x `[N, E]`, labels y `[N]`."""
  return top_k_accuracy(probe_scores(weights, x), y, 1)


def fit_linear_probe(
  train_x: np.ndarray, train_y: np.ndarray, num_classes: int
) -> dict[str, np.ndarray]:
  """The probe's weights `w` `[E, C]` and `b` `[C]`, by the fixed recipe above.

  train_y: class indices `[N]` (softmax cross-entropy), or multi-hot targets `[N, C]`
  (multi-label: one-vs-rest sigmoid cross-entropy).
  """
  weights = {"w": jnp.zeros((train_x.shape[1], num_classes)), "b": jnp.zeros(num_classes)}
  return jax.device_get(_fit_probe(weights, jnp.asarray(train_x), jnp.asarray(train_y)))


@jax.jit
def _fit_probe(weights, x, y):
  """`fit_linear_probe`'s optimisation; the data are arguments, so that every evaluation of
  a run (same shapes) reuses one compiled program."""
  tx = optax.adamw(PROBE_LEARNING_RATE, weight_decay=PROBE_WEIGHT_DECAY)

  def loss(weights):
    logits = x @ weights["w"] + weights["b"]
    if y.ndim == 2:
      return optax.sigmoid_binary_cross_entropy(logits, y.astype(jnp.float32)).mean()
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def step(carry, _):
    weights, opt_state = carry
    grads = jax.grad(loss)(weights)
    updates, opt_state = tx.update(grads, opt_state, weights)
    return (optax.apply_updates(weights, updates), opt_state), None

  (weights, _), _ = jax.lax.scan(step, (weights, tx.init(weights)), None, length=PROBE_STEPS)
  return weights


def top_k_accuracy(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
  """The fraction of rows whose label is among their k highest scores (`[N, C]`, `[N]`);
  a label tied with the k-th score counts as missed unless it is ranked in by index."""
  k = min(k, scores.shape[1])
  top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
  return float(np.mean(np.any(top == labels[:, None], axis=1)))


def mean_average_precision(scores: np.ndarray, targets: np.ndarray) -> float | None:
  """Mean over classes of the average precision of `scores` `[N, C]` against multi-hot
  `targets` `[N, C]` (AudioSet's mAP). A class's AP is the mean, over its positives, of the
  precision among the clips scoring at least as high as that positive (ties count against).
  Classes with no positive are left out; None when no class has one."""
  targets = np.asarray(targets, bool)
  precisions = []
  for column in np.flatnonzero(targets.any(axis=0)):
    score, positive = scores[:, column], targets[:, column]
    order = np.argsort(-score, kind="stable")
    score, positive = score[order], positive[order]
    # The last index of each run of equal scores: a clip's rank counts every tie.
    last = np.searchsorted(-score, -score, side="right") - 1
    true_positives = np.cumsum(positive)[last]
    precision = true_positives / (last + 1)
    precisions.append(float(np.mean(precision[positive])))
  return float(np.mean(precisions)) if precisions else None


def knn_top1(
  train_x: np.ndarray,
  train_y: np.ndarray,
  test_x: np.ndarray,
  test_y: np.ndarray,
  num_classes: int,
  k: int,
) -> float:
  """Top-1 of a similarity-weighted vote of the k nearest (cosine) train embeddings."""
  similarity = test_x @ train_x.T
  k = min(k, train_x.shape[0])
  nearest = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
  votes = np.zeros((test_x.shape[0], num_classes))
  np.add.at(
    votes,
    (np.arange(test_x.shape[0])[:, None], train_y[nearest]),
    np.take_along_axis(similarity, nearest, axis=1),
  )
  return float(np.mean(np.argmax(votes, axis=1) == test_y))


def video_level(embedded: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Clip embeddings averaged per source video (multi-clip evaluation).

  embedded: `video`, `audio` `[N, E]` L2-normalised, `source_key` `[N, 2]` (clips with
  equal keys come from the same video; see `source_keys`), and per-clip metadata (`label`,
  `labels`, `has_audio`, classifier `logits`).
  Returns `video`, `audio` `[V, E]` (means of each video's clips, L2-normalised again),
  `logits` (means) when given, and the other keys of each video's first clip, videos in the
  order of their first clip.
  """
  _, first, inverse = np.unique(
    embedded["source_key"], axis=0, return_index=True, return_inverse=True
  )
  order = np.argsort(first)  # np.unique sorts by key; keep the clips' order instead
  rank = np.empty_like(order)
  rank[order] = np.arange(len(order))
  video_of_clip = rank[inverse.reshape(-1)]
  clip_counts = np.bincount(video_of_clip, minlength=len(first))[:, None]
  result = {}
  for key, values in embedded.items():
    if key in ("video", "audio", "logits"):
      sums = np.zeros((len(first), values.shape[1]), np.float64)
      np.add.at(sums, video_of_clip, values)
      if key == "logits":
        result[key] = (sums / clip_counts).astype(np.float32)
      else:
        result[key] = (sums / np.linalg.norm(sums, axis=1, keepdims=True)).astype(np.float32)
    else:
      result[key] = values[first[order]]
  return result


def source_keys(sources) -> np.ndarray:
  """A 64-bit hash of each source path as int32 `[N, 2]`, to group clips by video after
  the device gather (strings cannot travel in jax arrays); collisions are negligible."""
  digests = b"".join(hashlib.sha256(str(source).encode("utf-8")).digest()[:8] for source in sources)
  return np.frombuffer(digests, dtype="<i4").reshape(-1, 2).astype(np.int32)


# ----------------------------------------------------------------------------- embedding


def embed_split(
  run: run_lib.Run,
  embedder: embedding.ClipEmbedder,
  model_params,
  stats: normalization.NormalizationStats,
  split: str,
  *,
  limit: int | None = None,
  stage: console.Stage | None = None,
) -> dict[str, np.ndarray]:
  """Embeddings of every clip of `split` (or its first `limit`), gathered on every host.

  Returns numpy `video`, `audio` `[N, E]` (and `logits` `[N, C]` when the embedder gives
  them), `label` `[N]`, `has_audio` `[N]`, `source_key` `[N, 2]` (see `source_keys`) and,
  for multi-label data, `labels` `[N, C]`, in the order of the split shared out over hosts
  (host-major within each batch); padding rows removed. `stage` counts this process's clips
  as they are read.
  """
  batch_size = run.config.eval.batch_size // jax.process_count()
  metadata = ("label", "has_audio", "source_key")
  if run.dataset.multi_label:
    metadata += ("labels",)
  with embedding.split_batches(run, stats, split, batch_size=batch_size, limit=limit) as batches:
    keyed = (
      {**batch, "source_key": source_keys(batch["source"])} for batch in _counted(batches, stage)
    )
    return embedder.embed(
      model_params, keyed, batch_size=batch_size, gather=True, metadata=metadata
    )


def _counted(batches: Iterator[dict], stage: console.Stage | None) -> Iterator[dict]:
  for batch in batches:
    yield batch
    if stage is not None:
      stage.advance(int(np.sum(batch["mask"])))


# ----------------------------------------------------------------------------- evaluator


class Evaluator:
  """Evaluates model parameters on the config's eval splits; used during and after training."""

  def __init__(self, run: run_lib.Run, stats: normalization.NormalizationStats):
    self.run, self.stats = run, stats
    self.supervised = run.config.objective == "supervised"
    self._embedder = embedding.ClipEmbedder(run.model, run.mesh, run.spec, logits=self.supervised)

  def evaluate(self, model_params, splits=None) -> dict[str, dict[str, float]]:
    """{split: {"eval/a2v_r1": ..., ...}} for each of `splits` (default `eval.splits`)."""
    config, dataset = self.run.config.eval, self.run.dataset
    if not dataset.labelled:
      logging.info(
        "The dataset at %s has no labels (%d classes): the linear probe, kNN and classifier "
        "evaluations are skipped; retrieval runs.",
        dataset.directory,
        len(dataset.label_names),
      )
    elif dataset.multi_label:
      logging.info("Multi-label data: the linear probe reports mAP; kNN is skipped.")
    splits = list(config.splits if splits is None else splits)
    train = probe = None
    results = {}
    stage = console.Stage(
      "evaluate",
      self._clips(splits, probe=dataset.labelled),
      "clips",
      enabled=jax.process_index() == 0,
    )
    for split in splits:
      embedded = embed_split(self.run, self._embedder, model_params, self.stats, split, stage=stage)
      values = {
        "eval/num_clips": int(len(embedded["label"])),
        "eval/num_audioless": int(np.sum(~embedded["has_audio"])),
      }
      levels = {"eval/": embedded}  # key prefix -> embeddings scored under it
      if config.multi_clip:
        levels["eval/video_level_"] = video_level(embedded)
        values["eval/num_videos"] = int(len(levels["eval/video_level_"]["label"]))
      if dataset.labelled and train is None:
        limit = config.probe_train_examples or None
        train = embed_split(
          self.run, self._embedder, model_params, self.stats, "train", limit=limit, stage=stage
        )
        probe = fit_linear_probe(*_probe_data(train, dataset.multi_label), len(dataset.label_names))
      for prefix, level in levels.items():
        scores = self._retrieval(level, split)
        if dataset.labelled:
          scores.update(self._label_metrics(level, train, probe))
        values.update({key.replace("eval/", prefix): value for key, value in scores.items()})
      results[split] = values
    stage.finish(note=", ".join(splits))
    for split, values in results.items():
      logging.info("eval on %s:\n%s", split, format_table(values))
    return results

  def _clips(self, splits: Sequence[str], *, probe: bool) -> int:
    """This process's clips an evaluation of `splits` reads (the probe's train clips too)."""
    share = lambda count: len(range(jax.process_index(), count, jax.process_count()))
    count = sum(share(len(self.run.dataset.source(split))) for split in splits)
    if probe:
      limit = self.run.config.eval.probe_train_examples or None
      count += share(min(len(self.run.dataset.source("train")), limit or math.inf))
    return count

  @staticmethod
  def _retrieval(level: dict[str, np.ndarray], split: str) -> dict[str, float]:
    """Retrieval among the clips (or videos) that have audio."""
    with_audio = level["has_audio"]
    if with_audio.sum() < 2:
      logging.info("Fewer than 2 clips of %s have audio: retrieval is skipped.", split)
      return {}
    return retrieval_metrics(level["video"][with_audio], level["audio"][with_audio])

  def _label_metrics(
    self, level: dict[str, np.ndarray], train: dict[str, np.ndarray], probe
  ) -> dict[str, float]:
    """Probe, kNN and classifier metrics of a labelled dataset (absent when undefined)."""
    values = {}
    if self.run.dataset.multi_label:
      targets = level["labels"]
      values["eval/linear_probe_map"] = mean_average_precision(
        probe_scores(probe, level["video"]), targets
      )
      if self.supervised:
        values["eval/classifier_map"] = mean_average_precision(level["logits"], targets)
      return {key: value for key, value in values.items() if value is not None}
    has_label, train_has_label = level["label"] >= 0, train["label"] >= 0
    if not has_label.any():
      return values
    video, labels = level["video"][has_label], level["label"][has_label]
    values["eval/linear_probe_top1"] = probe_top1(probe, video, labels)
    values["eval/knn_top1"] = knn_top1(
      train["video"][train_has_label],
      train["label"][train_has_label],
      video,
      labels,
      len(self.run.dataset.label_names),
      k=self.run.config.eval.knn_k,
    )
    if self.supervised:
      logits = level["logits"][has_label]
      values["eval/classifier_top1"] = top_k_accuracy(logits, labels, 1)
      values["eval/classifier_top5"] = top_k_accuracy(logits, labels, 5)
    return values


def _probe_data(train: dict[str, np.ndarray], multi_label: bool) -> tuple[np.ndarray, np.ndarray]:
  """The train clips' video embeddings and targets a probe is fitted on: multi-hot labels,
  or the class of every clip that has one."""
  if multi_label:
    return train["video"], train["labels"]
  has_label = train["label"] >= 0
  return train["video"][has_label], train["label"][has_label]


_TABLE_COLUMNS = (
  ("a2v_r1", "a2v R@1"),
  ("a2v_r5", "R@5"),
  ("a2v_r10", "R@10"),
  ("a2v_median_rank", "median"),
  ("v2a_r1", "v2a R@1"),
  ("v2a_r5", "R@5"),
  ("v2a_r10", "R@10"),
  ("v2a_median_rank", "median"),
  ("linear_probe_top1", "probe"),
  ("linear_probe_map", "probe mAP"),
  ("knn_top1", "kNN"),
  ("classifier_top1", "cls@1"),
  ("classifier_top5", "cls@5"),
  ("classifier_map", "cls mAP"),
)


def format_table(values: dict[str, float]) -> str:
  """The metrics of one split as a short text table: one row per level (clip, video); the
  columns of the metrics computed."""
  levels = [("clips", "eval/", values["eval/num_clips"])]
  if "eval/num_videos" in values:
    levels.append(("videos", "eval/video_level_", values["eval/num_videos"]))
  columns = [
    (key, title)
    for key, title in _TABLE_COLUMNS
    if key.startswith(("a2v", "v2a")) or any(prefix + key in values for _, prefix, _ in levels)
  ]
  cell = lambda key, value: f"{value:.1f}" if key.endswith("rank") else f"{value:.3f}"
  lines = [" " * 13 + "".join(f"{title:>10}" for _, title in columns)]
  for name, prefix, count in levels:
    cells = [
      cell(key, values[prefix + key]) if prefix + key in values else "-" for key, _ in columns
    ]
    lines.append(f"{count:>6} {name:<6}" + "".join(f"{text:>10}" for text in cells))
  if values.get("eval/num_audioless"):
    lines.append(f"({values['eval/num_audioless']} clips without audio: not retrieval candidates)")
  return "\n".join(lines)


def evaluate_latest(config: config_dict.ConfigDict, workdir: str) -> dict[str, dict[str, float]]:
  """`--mode eval`: evaluates the workdir's latest usable checkpoint; appends to metrics."""
  run = run_lib.Run.create(config, workdir)
  trained = run.restore_params()
  results = Evaluator(run, trained.stats).evaluate(trained.params)
  writer = metrics.MetricsWriter(workdir, is_primary=jax.process_index() == 0)
  writer.continue_from(trained.step)
  metrics.write_evals(writer, trained.step, results)
  writer.close()
  return results
