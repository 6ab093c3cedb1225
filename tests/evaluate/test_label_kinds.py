"""Evaluation and export of unlabelled, partly audioless and multi-label datasets, against
embeddings and logits computed directly (a plain forward pass per clip)."""

import json
import logging

import jax
import numpy as np
import pytest

from cmvt_jax import evaluate
from cmvt_jax import export
from cmvt_jax import run as run_lib
from cmvt_jax.data import annotations
from cmvt_jax.data import dataset_writer
from cmvt_jax.data import datasets
from cmvt_jax.data import synthetic
from tests.data import media
from tests.evaluate.conftest import micro_config
from tests.evaluate.conftest import plain_ranks
from tests.evaluate.test_metrics import plain_average_precision

# Tags of the multi-label dataset: each generated file's class, plus "odd" on odd indices.
TAGS = {"red_disc": "/m/red", "green_square": "/m/green"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """Two datasets of the tiny generated set: 'plain' (unlabelled; two silent test files
  kept, marked audioless) and 'tags' (multi-label, from an AudioSet-style list)."""
  root = tmp_path_factory.mktemp("label_kinds")
  videos = root / "videos"
  synthetic.generate(videos, media.TINY_SPEC, num_workers=1, progress=False)
  for name in ("quiet_0.mp4", "quiet_1.mp4"):
    media.write_video(videos / "test" / "silent" / name, num_frames=25, fps=10)
  prepare = dict(mel=media.MEL, num_workers=1, progress=False, log=lambda _: None)
  dataset_writer.prepare(
    videos,
    root / "data",
    "plain",
    unlabelled=True,
    storage=dataset_writer.StorageSpec(keep_audioless=True),
    **prepare,
  )
  manifest = json.loads((videos / "manifest.json").read_text())
  for split in ("train", "test"):
    lines = [
      f'{entry["path"][:-4]}, 0.0, 4.0, "{TAGS[entry["label"]]}'
      + (',/m/odd"' if entry["path"][-5] in "13579" else '"')
      for entry in manifest["files"]
      if entry["split"] == split
    ]
    (root / f"{split}.csv").write_text("\n".join(lines) + "\n")
  listing = annotations.read_lists(
    [f"train={root / 'train.csv'}", f"test={root / 'test.csv'}"],
    videos,
    list_format="audioset",
    path_template="{youtube_id}.mp4",
  )
  dataset_writer.prepare(videos, root / "data", "tags", listing=listing, **prepare)
  return root / "data"


def _run(data_dir, tmp_path, **overrides):
  config = micro_config(data_dir, **{"eval.splits": ("test",), **overrides})
  run = run_lib.Run.create(config, tmp_path / "run")
  return run, run.init_state().params["model"], run.stats()


def _direct(run, params, stats):
  """Normalised video and audio embeddings, logits and stored examples of the test split."""
  source = run.dataset.source("test")
  examples = [source[i] for i in range(len(source))]
  preprocessor = run.preprocessor(stats)
  views = [preprocessor(example["frames"], example["audio"]) for example in examples]
  apply = jax.jit(lambda p, v, a: run.model.apply({"params": p}, v, a))
  out = jax.device_get(
    apply(params, np.stack([v["video"] for v in views]), np.stack([v["audio"] for v in views]))
  )
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  return unit(out["video"]), unit(out["audio"]), out.get("logits"), examples


def test_unlabelled_data_skips_label_metrics_and_retrieval_leaves_audioless_clips_out(
  data_dir, tmp_path, caplog
):
  run, params, stats = _run(data_dir, tmp_path, **{"dataset.name": "plain"})
  assert not run.dataset.labelled
  with caplog.at_level(logging.INFO):
    [values] = evaluate.Evaluator(run, stats).evaluate(params).values()

  video, audio, _, examples = _direct(run, params, stats)
  has_audio = np.array([bool(example["has_audio"]) for example in examples])
  assert values["eval/num_clips"] == len(examples) == 6
  assert values["eval/num_audioless"] == 2 == np.sum(~has_audio)
  a2v = plain_ranks(audio[has_audio], video[has_audio])
  v2a = plain_ranks(video[has_audio], audio[has_audio])
  for k in (1, 5, 10):
    assert values[f"eval/a2v_r{k}"] == pytest.approx(np.mean(a2v <= k))
    assert values[f"eval/v2a_r{k}"] == pytest.approx(np.mean(v2a <= k))
  assert not [key for key in values if "probe" in key or "knn" in key or "classifier" in key]
  said = [record.message for record in caplog.records if "has no labels" in record.message]
  assert len(said) == 1 and "skipped; retrieval runs" in said[0]


def test_multi_label_supervised_evaluation_reports_map_and_no_top1(data_dir, tmp_path):
  run, params, stats = _run(
    data_dir,
    tmp_path,
    **{"dataset.name": "tags", "objective": "supervised", "model.num_classes": 3},
  )
  assert run.dataset.multi_label and run.dataset.label_names == ("/m/green", "/m/odd", "/m/red")
  [values] = evaluate.Evaluator(run, stats).evaluate(params).values()

  _, _, logits, examples = _direct(run, params, stats)
  targets = np.zeros((len(examples), 3), bool)
  for row, example in enumerate(examples):
    targets[row, example["labels"]] = True
  expected = np.mean([plain_average_precision(logits[:, c], targets[:, c]) for c in range(3)])
  assert values["eval/classifier_map"] == pytest.approx(expected, rel=1e-5)
  assert 0 < values["eval/linear_probe_map"] <= 1
  for key in ("knn_top1", "linear_probe_top1", "classifier_top1", "classifier_top5"):
    assert f"eval/{key}" not in values


def test_exports_keep_the_label_kinds(data_dir, tmp_path):
  run, params, stats = _run(data_dir, tmp_path, **{"dataset.name": "tags"})
  trained = run_lib.TrainedParams(step=1, params=params, stats=stats)
  export.export_embeddings(run.config, str(tmp_path / "run"), run=run, trained=trained)
  rows = export.load_embeddings(tmp_path / "run", "test")
  _, manifest = export.read_manifest(tmp_path / "run", "test")
  assert manifest["multi_label"] and manifest["label_names"] == ["/m/green", "/m/odd", "/m/red"]
  assert rows["labels"].dtype == np.uint8 and rows["labels"].shape == (len(rows["id"]), 3)
  stored = {
    example["id"].decode(): example
    for example in (run.dataset.source("test")[i] for i in range(len(rows["id"])))
  }
  for clip_id, labels, label in zip(rows["id"], rows["labels"], rows["label"]):
    assert np.flatnonzero(labels).tolist() == stored[clip_id]["labels"].tolist()
    assert label == stored[clip_id]["label"]

  plain, params, stats = _run(data_dir, tmp_path / "plain", **{"dataset.name": "plain"})
  trained = run_lib.TrainedParams(step=1, params=params, stats=stats)
  export.export_embeddings(plain.config, str(tmp_path / "plain"), run=plain, trained=trained)
  rows = export.load_embeddings(tmp_path / "plain", "test")
  assert "label" not in rows and "labels" not in rows and len(rows["id"]) == 6
  assert datasets.open_prepared(plain.dataset.directory).summary.audioless_clips == {"test": 2}
