"""Evaluation of the learned embeddings: cross-modal retrieval, linear probe, kNN.

Every example of a split counts exactly once: each host embeds its padded share, the
embeddings are gathered to every host (they are small: N × E), and padding rows are dropped
by the batch's `mask`. All hosts then compute the same numbers; process 0 writes them.

* Retrieval, both directions: for audio query i the candidates are the videos of every clip of
  the split, and its rank is 1 + the number of other videos at least as similar as its own
  (cosine), so ties count against the model. R@1/5/10 and the median rank.
* Linear probe: multinomial logistic regression on frozen, L2-normalised video embeddings
  (full-batch Adam, fixed recipe below), fitted on the train split, top-1 on the split.
* kNN: the k most cosine-similar train video embeddings vote (weighted by similarity).
* Multi-clip (`eval.multi_clip`): the clip embeddings of each source video are averaged (and
  re-normalised) into one per video, as video papers report; retrieval among the videos,
  and the probe and kNN (still fitted on train clips) on the averaged embeddings, reported
  as `eval/video_level_...` next to the per-clip keys.
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


def probe_top1(weights: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> float:
  """Top-1 of a fitted probe (`fit_linear_probe`) on embeddings x `[N, E]`, labels y `[N]`."""
  return float(np.mean(np.argmax(x @ weights["w"] + weights["b"], axis=1) == y))


def fit_linear_probe(
  train_x: np.ndarray, train_y: np.ndarray, num_classes: int
) -> dict[str, np.ndarray]:
  """The probe's weights `w` `[E, C]` and `b` `[C]`, by the fixed recipe above."""
  weights = {"w": jnp.zeros((train_x.shape[1], num_classes)), "b": jnp.zeros(num_classes)}
  tx = optax.adamw(PROBE_LEARNING_RATE, weight_decay=PROBE_WEIGHT_DECAY)
  x, y = jnp.asarray(train_x), jnp.asarray(train_y)

  def loss(weights):
    logits = x @ weights["w"] + weights["b"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def fit(weights):
    def step(carry, _):
      weights, opt_state = carry
      grads = jax.grad(loss)(weights)
      updates, opt_state = tx.update(grads, opt_state, weights)
      return (optax.apply_updates(weights, updates), opt_state), None

    (weights, _), _ = jax.lax.scan(step, (weights, tx.init(weights)), None, length=PROBE_STEPS)
    return weights

  return jax.device_get(fit(weights))


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

  embedded: `video`, `audio` `[N, E]` L2-normalised, `label` `[N]` and `source_key` `[N, 2]`
  (clips with equal keys come from the same video; see `source_keys`).
  Returns `video`, `audio` `[V, E]` (means of each video's clips, L2-normalised again) and
  `label` `[V]`, videos in the order of their first clip.
  """
  _, first, inverse = np.unique(
    embedded["source_key"], axis=0, return_index=True, return_inverse=True
  )
  order = np.argsort(first)  # np.unique sorts by key; keep the clips' order instead
  rank = np.empty_like(order)
  rank[order] = np.arange(len(order))
  video_of_clip = rank[inverse.reshape(-1)]
  result = {"label": embedded["label"][first[order]]}
  for modality in ("video", "audio"):
    sums = np.zeros((len(first), embedded[modality].shape[1]), np.float64)
    np.add.at(sums, video_of_clip, embedded[modality])
    result[modality] = (sums / np.linalg.norm(sums, axis=1, keepdims=True)).astype(np.float32)
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

  Returns numpy `video`, `audio` `[N, E]`, `label` `[N]` and `source_key` `[N, 2]` (see
  `source_keys`), in the order of the split shared out over hosts (host-major within each
  batch); padding rows removed. `stage` counts this process's clips as they are read.
  """
  batch_size = run.config.eval.batch_size // jax.process_count()
  with embedding.split_batches(run, stats, split, batch_size=batch_size, limit=limit) as batches:
    keyed = (
      {**batch, "source_key": source_keys(batch["source"])} for batch in _counted(batches, stage)
    )
    return embedder.embed(
      model_params, keyed, batch_size=batch_size, gather=True, metadata=("label", "source_key")
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
    self._embedder = embedding.ClipEmbedder(run.model, run.mesh, run.spec)

  def evaluate(self, model_params, splits=None) -> dict[str, dict[str, float]]:
    """{split: {"eval/a2v_r1": ..., ...}} for each of `splits` (default `eval.splits`)."""
    config = self.run.config.eval
    num_classes = len(self.run.dataset.label_names)
    splits = list(config.splits if splits is None else splits)
    train = probe = None
    results = {}
    stage = console.Stage(
      "evaluate",
      self._clips(splits, probe=num_classes > 1),
      "clips",
      enabled=jax.process_index() == 0,
    )
    for split in splits:
      embedded = embed_split(self.run, self._embedder, model_params, self.stats, split, stage=stage)
      values = {"eval/num_clips": int(len(embedded["label"]))}
      levels = {"eval/": embedded}  # key prefix -> embeddings scored under it
      if config.multi_clip:
        levels["eval/video_level_"] = video_level(embedded)
        values["eval/num_videos"] = int(len(levels["eval/video_level_"]["label"]))
      if num_classes > 1 and train is None:
        limit = config.probe_train_examples or None
        train = embed_split(
          self.run, self._embedder, model_params, self.stats, "train", limit=limit, stage=stage
        )
        probe = fit_linear_probe(train["video"], train["label"], num_classes)
      for prefix, level in levels.items():
        values.update(
          {
            key.replace("eval/", prefix): value
            for key, value in retrieval_metrics(level["video"], level["audio"]).items()
          }
        )
        if num_classes > 1:
          values[f"{prefix}linear_probe_top1"] = probe_top1(probe, level["video"], level["label"])
          values[f"{prefix}knn_top1"] = knn_top1(
            train["video"],
            train["label"],
            level["video"],
            level["label"],
            num_classes,
            k=config.knn_k,
          )
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


def format_table(values: dict[str, float]) -> str:
  """The metrics of one split as a short text table: one row per level (clip, video)."""
  columns = [
    ("a2v_r1", "a2v R@1"),
    ("a2v_r5", "R@5"),
    ("a2v_r10", "R@10"),
    ("a2v_median_rank", "median"),
    ("v2a_r1", "v2a R@1"),
    ("v2a_r5", "R@5"),
    ("v2a_r10", "R@10"),
    ("v2a_median_rank", "median"),
    ("linear_probe_top1", "probe"),
    ("knn_top1", "kNN"),
  ]
  levels = [("clips", "eval/", values["eval/num_clips"])]
  if "eval/num_videos" in values:
    levels.append(("videos", "eval/video_level_", values["eval/num_videos"]))
  cell = lambda key, value: f"{value:.1f}" if key.endswith("rank") else f"{value:.3f}"
  lines = [" " * 13 + "".join(f"{title:>9}" for _, title in columns)]
  for name, prefix, count in levels:
    cells = [
      cell(key, values[prefix + key]) if prefix + key in values else "-" for key, _ in columns
    ]
    lines.append(f"{count:>6} {name:<6}" + "".join(f"{text:>9}" for text in cells))
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
