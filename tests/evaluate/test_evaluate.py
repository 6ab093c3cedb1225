"""The evaluator on the micro test split: padding rows ignored, multi-clip (video-level) keys."""

import jax
import numpy as np

from cmvt_jax import evaluate
from cmvt_jax import run as run_lib
from tests.evaluate.conftest import LATEST_STEP
from tests.evaluate.conftest import MICRO_TEST_CLIPS
from tests.evaluate.conftest import MICRO_TEST_FILES
from tests.evaluate.conftest import micro_config
from tests.evaluate.conftest import plain_ranks
from tests.evaluate.test_long_videos import BACKEND_COMPILE_EVENT


def test_clip_and_video_level_retrieval_over_padded_batches(workdir, micro_data_dir, direct):
  # Batches of 6: the split's 16 clips leave 2 padding rows, which must not count.
  config = micro_config(micro_data_dir, **{"eval.batch_size": 6, "eval.multi_clip": True})
  run = run_lib.Run.create(config, workdir)
  trained = run.restore_params()
  [results] = evaluate.Evaluator(run, trained.stats).evaluate(trained.params).values()
  assert results["eval/num_clips"] == MICRO_TEST_CLIPS
  assert results["eval/num_videos"] == MICRO_TEST_FILES

  clips = direct.split(LATEST_STEP)
  video = np.stack([clip[0] for clip in clips.values()])
  audio = np.stack([clip[1] for clip in clips.values()])
  sources = [clip[3] for clip in clips.values()]
  by_video = {}
  for source, v, a in zip(sources, video, audio):
    by_video.setdefault(source, []).append((v, a))
  mean = lambda rows: np.mean(rows, axis=0) / np.linalg.norm(np.mean(rows, axis=0))
  video_level = {
    key: np.stack([mean([pair[index] for pair in pairs]) for pairs in by_video.values()])
    for index, key in enumerate(("video", "audio"))
  }

  for prefix, level in (
    ("eval/", {"video": video, "audio": audio}),
    ("eval/video_level_", video_level),
  ):
    a2v, v2a = (
      plain_ranks(level["audio"], level["video"]),
      plain_ranks(level["video"], level["audio"]),
    )
    for k in (1, 5, 10):
      assert results[f"{prefix}a2v_r{k}"] == np.mean(a2v <= k), (prefix, k)
      assert results[f"{prefix}v2a_r{k}"] == np.mean(v2a <= k), (prefix, k)
    assert results[f"{prefix}a2v_median_rank"] == np.median(a2v)
    for key in ("linear_probe_top1", "knn_top1"):
      assert 0 <= results[f"{prefix}{key}"] <= 1
  table = evaluate.format_table(results).splitlines()
  assert len(table) == 3 and "16 clips" in table[1] and "8 videos" in table[2]


def test_evaluations_exports_and_plots_of_one_run_share_their_programs(workdir, micro_data_dir):
  """In one process (training's end: an evaluation, the export, the plots), a pass after the
  first builds no new XLA executable: each pass used to compile the clip embedding again, and
  the gather of every batch compiled once per batch."""
  config = micro_config(micro_data_dir, **{"eval.batch_size": 6})
  run = run_lib.Run.create(config, workdir)
  trained = run.restore_params()
  evaluate.Evaluator(run, trained.stats).evaluate(trained.params)  # builds what it needs
  built = []

  def on_event(event, seconds, **kwargs):
    if event == BACKEND_COMPILE_EVENT:
      built.append(kwargs.get("fun_name"))

  jax.monitoring.register_event_duration_secs_listener(on_event)
  try:
    evaluate.Evaluator(run, trained.stats).evaluate(trained.params)
  finally:
    jax.monitoring.unregister_event_duration_listener(on_event)
  assert built == []
