"""Retrieval, linear probe, kNN and multi-clip averaging on hand-made embeddings."""

import json
import logging

import numpy as np
import pytest

from cmvt_jax import evaluate
from cmvt_jax import metrics


def _unit(*rows):
  rows = np.asarray(rows, np.float64)
  return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def test_retrieval_ranks_count_ties_against_the_model():
  video = _unit([1, 0], [0, 1], [1, 0], [1, 1])
  audio = _unit([1, 0], [1, 0], [0, 1], [1, 1])
  # Audio 0 finds its video (sim 1) tied with video 2: rank 2. Audio 1's video scores 0,
  # below videos 0, 2 (1) and 3 (0.71): rank 4. Audio 2's video scores 0, tied with video 0
  # and below videos 1 and 3: rank 4. Audio 3's video scores 1, alone on top: rank 1.
  np.testing.assert_array_equal(evaluate.retrieval_ranks(audio, video), [2, 4, 4, 1])
  # Video 0: audio 0 (1) tied with audio 1: 2. Video 1: audio 1 (0) tied with audio 0,
  # below audios 2 and 3: 4. Video 2: audio 2 (0) below audios 0, 1, 3: 4. Video 3: 1.
  np.testing.assert_array_equal(evaluate.retrieval_ranks(video, audio), [2, 4, 4, 1])
  metrics = evaluate.retrieval_metrics(video, audio)
  assert metrics["eval/a2v_r1"] == pytest.approx(0.25)
  assert metrics["eval/a2v_r5"] == 1.0
  assert metrics["eval/a2v_median_rank"] == 3.0
  assert metrics["eval/v2a_r1"] == pytest.approx(0.25)


def test_linear_probe_reaches_100_percent_on_separable_embeddings():
  rng = np.random.default_rng(0)
  classes, dim = 4, 16
  centres = np.eye(dim)[:classes] * 3

  def sample(count):
    labels = rng.integers(classes, size=count)
    x = centres[labels] + rng.normal(scale=0.3, size=(count, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels

  train_x, train_y = sample(200)
  test_x, test_y = sample(100)
  assert evaluate.linear_probe_top1(train_x, train_y, test_x, test_y, classes) == 1.0


def test_knn_votes_by_similarity_over_the_k_nearest():
  train_x = _unit(
    [0.9, np.sqrt(1 - 0.81)], [0.5, np.sqrt(0.75)], [0.45, -np.sqrt(1 - 0.2025)], [-1, 0]
  )
  train_y = np.array([1, 0, 0, 1])
  test_x = _unit([1, 0])
  # k=3: neighbours score .9 (label 1), .5 and .45 (label 0): label 0 wins .95 to .9,
  # although the single nearest says 1.
  assert evaluate.knn_top1(train_x, train_y, test_x, np.array([0]), 2, k=3) == 1.0
  assert evaluate.knn_top1(train_x, train_y, test_x, np.array([1]), 2, k=1) == 1.0
  # k=4 adds the opposite point (-1, label 1): 0.95 to 0.9 - 1, still label 0.
  assert evaluate.knn_top1(train_x, train_y, test_x, np.array([0]), 2, k=4) == 1.0


def test_video_level_averages_the_clips_of_each_video():
  sources = ["b.mp4", "a.mp4", "b.mp4", "c.mp4"]
  embedded = {
    "video": _unit([1, 0], [0, 1], [0, 1], [1, 1]),
    "audio": _unit([1, 0], [1, 0], [1, 0], [0, 1]),
    "label": np.array([3, 5, 3, 7]),
    "source_key": evaluate.source_keys(sources),
  }
  videos = evaluate.video_level(embedded)
  # Videos in the order of their first clip: b (clips 0, 2), a, c.
  np.testing.assert_array_equal(videos["label"], [3, 5, 7])
  np.testing.assert_allclose(videos["video"], _unit([1, 1], [0, 1], [1, 1]), atol=1e-6)
  np.testing.assert_allclose(videos["audio"], _unit([1, 0], [1, 0], [0, 1]), atol=1e-6)


def test_video_level_averages_logits_and_keeps_the_first_clips_labels():
  embedded = {
    "video": _unit([1, 0], [0, 1], [1, 1]),
    "audio": _unit([1, 0], [0, 1], [1, 1]),
    "logits": np.array([[1.0, 3.0], [3.0, -1.0], [0.0, 2.0]], np.float32),
    "labels": np.array([[1, 0], [1, 0], [0, 1]], np.uint8),
    "has_audio": np.array([False, False, True]),
    "source_key": evaluate.source_keys(["a.mp4", "a.mp4", "b.mp4"]),
  }
  videos = evaluate.video_level(embedded)
  np.testing.assert_allclose(videos["logits"], [[2.0, 1.0], [0.0, 2.0]])
  np.testing.assert_array_equal(videos["labels"], [[1, 0], [0, 1]])
  np.testing.assert_array_equal(videos["has_audio"], [False, True])


def plain_average_precision(scores, positives):
  """AP by its definition: over the positives, the precision among every clip scoring at
  least as high (ties count against)."""
  precisions = []
  for i in np.flatnonzero(positives):
    at_least = scores >= scores[i]
    precisions.append(positives[at_least].sum() / at_least.sum())
  return np.mean(precisions)


def test_mean_average_precision_by_its_definition():
  rng = np.random.default_rng(0)
  # Scores with ties (rounded), a class without positives (column 3: left out).
  scores = np.round(rng.normal(size=(40, 4)), 1)
  targets = rng.random((40, 4)) < 0.3
  targets[:, 3] = False
  expected = np.mean([plain_average_precision(scores[:, c], targets[:, c]) for c in range(3)])
  assert evaluate.mean_average_precision(scores, targets) == pytest.approx(expected, rel=1e-12)
  # Perfect ranking: every AP is 1. Nothing positive: None.
  assert evaluate.mean_average_precision(targets[:, :3] * 1.0, targets[:, :3]) == 1.0
  assert evaluate.mean_average_precision(scores, np.zeros_like(targets)) is None
  # One positive tied with two negatives at the top: precision 1/3.
  assert evaluate.mean_average_precision(
    np.array([[1.0], [1.0], [1.0], [0.0]]), np.array([[0], [1], [0], [0]])
  ) == pytest.approx(1 / 3)


def test_top_k_accuracy_and_a_multi_label_probe():
  scores = np.array([[0.1, 0.5, 0.4], [0.9, 0.05, 0.05], [0.2, 0.3, 0.5]])
  assert evaluate.top_k_accuracy(scores, np.array([2, 0, 0]), 1) == pytest.approx(1 / 3)
  assert evaluate.top_k_accuracy(scores, np.array([2, 0, 0]), 2) == pytest.approx(2 / 3)
  assert evaluate.top_k_accuracy(scores, np.array([2, 0, 0]), 5) == 1.0  # k above C: all
  # Two tags on separable embeddings: class c present iff coordinate c is large.
  rng = np.random.default_rng(1)
  targets = (rng.random((300, 2)) < 0.5).astype(np.uint8)
  x = targets * 2.0 + rng.normal(scale=0.2, size=(300, 2))
  x = np.concatenate([x, np.ones((300, 1))], axis=1).astype(np.float32)
  probe = evaluate.fit_linear_probe(x[:200], targets[:200], 2)
  scores = evaluate.probe_scores(probe, x[200:])
  assert evaluate.mean_average_precision(scores, targets[200:]) > 0.99


def test_source_keys_are_equal_exactly_for_equal_sources():
  keys = evaluate.source_keys(["x/a.mp4", "x/b.mp4", "x/a.mp4", ""])
  assert keys.shape == (4, 2) and keys.dtype == np.int32
  assert (keys[0] == keys[2]).all()
  assert len({tuple(key) for key in keys}) == 3


def _lines(path):
  return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_torn_last_line_is_dropped_with_a_warning_and_appends_start_clean(tmp_path, caplog):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
  with caplog.at_level(logging.WARNING):
    assert metrics.read(tmp_path) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
  assert f"{path} (line 3)" in caplog.text
  writer = metrics.MetricsWriter(tmp_path, is_primary=True)
  writer.drop_after(2)  # what a resumed run does first
  writer.write(3, {"loss": 1.25})
  writer.close()
  assert _lines(path) == [
    {"step": 1, "loss": 2.0},
    {"step": 2, "loss": 1.5},
    {"step": 3, "loss": 1.25},
  ]


def test_a_damaged_line_before_the_last_is_an_error_naming_it(tmp_path):
  (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"ste\n{"step": 3}\n')
  with pytest.raises(ValueError, match=r"metrics.jsonl line 2 is not JSON"):
    metrics.read(tmp_path)


def test_evaluating_a_step_again_replaces_its_eval_lines(tmp_path):
  writer = metrics.MetricsWriter(tmp_path, is_primary=True)
  writer.write(10, {"loss": 1.0})
  metrics.write_evals(
    writer, 10, {"test": {"eval/a2v_r1": 0.5}, "validation": {"eval/a2v_r1": 0.4}}
  )
  metrics.write_evals(writer, 10, {"test": {"eval/a2v_r1": 0.5}})  # e.g. --mode eval again
  writer.close()
  assert _lines(tmp_path / "metrics.jsonl") == [
    {"step": 10, "loss": 1.0},
    {"step": 10, "split": "validation", "eval/a2v_r1": 0.4},
    {"step": 10, "split": "test", "eval/a2v_r1": 0.5},
  ]


def test_training_rate_leaves_out_the_first_step_and_paused_time(monkeypatch):
  now = [0.0]
  monkeypatch.setattr(metrics.time, "perf_counter", lambda: now[0])
  progress = metrics.Progress(first_step=0, total_steps=100)
  now[0] = 30.0  # the first step compiles for 30 s
  assert progress.note(1) == ""
  now[0] = 40.0  # 20 more steps in 10 s
  progress.pause()
  now[0] = 100.0  # an evaluation: not training time
  progress.resume()
  assert progress.note(21) == "2.00 steps/s, ETA 0:40 (evals excluded)"
