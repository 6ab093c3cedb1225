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
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from cmvt_jax import losses
from cmvt_jax import sharding
from cmvt_jax.data import pipeline

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


def embed_fn(run) -> Any:
  """Jitted (model params, global batch) → L2-normalised video and audio `[B, E]`, replicated."""
  model = run.model

  def embed(model_params, video, audio):
    out = model.apply({"params": model_params}, video, audio)
    return {"video": losses.l2_normalize(out["video"]), "audio": losses.l2_normalize(out["audio"])}

  return jax.jit(embed, out_shardings=sharding.replicated(run.mesh))


def embed_split(
  run, stats, model_params, split: str, *, limit: int | None = None, embed=None
) -> dict[str, np.ndarray]:
  """Embeddings of every clip of `split` (or its first `limit`), gathered on every host.

  Returns numpy `video`, `audio` `[N, E]`, `label` `[N]` and `source_key` `[N, 2]` (see
  `source_keys`), in the order of the split shared out over hosts (host-major within each
  batch); padding rows removed.
  """
  embed = embed or embed_fn(run)
  source = run.dataset.source(split)
  if limit is not None and limit < len(source):
    source = _Prefix(source, limit)
  host_batch = run.config.eval.batch_size // jax.process_count()
  dataset = pipeline.eval_dataset(
    source,
    run.preprocessor(stats),
    batch_size=host_batch,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  parts = {"video": [], "audio": [], "label": [], "source_key": []}
  batches = iter(dataset)
  try:
    for batch in batches:
      host = {key: batch[key] for key in ("video", "audio", "label", "mask")}
      host["source_key"] = source_keys(batch["source"])
      arrays = sharding.global_batch(host, run.mesh)
      out = jax.device_get(embed(model_params, arrays["video"], arrays["audio"]))
      gathered = jax.device_get(
        _replicate({key: arrays[key] for key in ("mask", "label", "source_key")}, run.mesh)
      )
      mask = np.asarray(gathered["mask"])
      parts["video"].append(out["video"][mask])
      parts["audio"].append(out["audio"][mask])
      parts["label"].append(np.asarray(gathered["label"])[mask])
      parts["source_key"].append(np.asarray(gathered["source_key"])[mask])
  finally:
    batches.close()  # stops grain's worker processes now, not whenever it is collected
  return {key: np.concatenate(value) for key, value in parts.items()}


def _replicate(x, mesh):
  return jax.jit(lambda x: x, out_shardings=sharding.replicated(mesh))(x)


class _Prefix:
  """The first `count` examples of a random-access source."""

  def __init__(self, source, count: int):
    self._source, self._count = source, count

  def __len__(self):
    return self._count

  def __getitem__(self, index):
    if not 0 <= index < self._count:
      raise IndexError(index)
    return self._source[index]


# ----------------------------------------------------------------------------- evaluator


class Evaluator:
  """Evaluates model parameters on the config's eval splits; used during and after training."""

  def __init__(self, run, stats):
    self.run, self.stats = run, stats
    self._embed = embed_fn(run)

  def evaluate(self, model_params) -> dict[str, dict[str, float]]:
    """{split: {"eval/a2v_r1": ..., ...}} for each split of `config.eval.splits`."""
    config = self.run.config.eval
    num_classes = len(self.run.dataset.label_names)
    train = probe = None
    results = {}
    for split in config.splits:
      embedded = embed_split(self.run, self.stats, model_params, split, embed=self._embed)
      values = {"eval/num_clips": int(len(embedded["label"]))}
      levels = {"eval/": embedded}  # key prefix -> embeddings scored under it
      if config.multi_clip:
        levels["eval/video_level_"] = video_level(embedded)
        values["eval/num_videos"] = int(len(levels["eval/video_level_"]["label"]))
      if num_classes > 1 and train is None:
        train = embed_split(
          self.run,
          self.stats,
          model_params,
          "train",
          limit=config.probe_train_examples or None,
          embed=self._embed,
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
      logging.info("eval on %s:\n%s", split, format_table(values))
    return results


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


def evaluate_latest(config, workdir: str) -> dict[str, dict[str, float]]:
  """`--mode eval`: evaluates the workdir's latest usable checkpoint; appends to metrics."""
  from cmvt_jax import metrics as metrics_lib
  from cmvt_jax import train
  from cmvt_jax.data import normalization

  run = train.Run.create(config, workdir)
  restored = run.restore()
  stats = normalization.NormalizationStats.from_dict(restored.meta["stats"])
  results = Evaluator(run, stats).evaluate(restored.state.params["model"])
  writer = metrics_lib.MetricsWriter(workdir, is_primary=jax.process_index() == 0)
  train.write_evals(writer, restored.step, results)
  writer.close()
  return results
