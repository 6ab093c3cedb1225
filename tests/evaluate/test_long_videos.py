"""Long videos: bucketed programs, the memory guard inside a folder export, and moment search
end to end on a generated long video (the micro workdir's model)."""

import dataclasses
import json
import logging

import numpy as np
import pytest
from absl import flags
from absl.testing import flagsaver

from cmvt_jax import embedding
from cmvt_jax import export
from cmvt_jax import search
from cmvt_jax import whole_video
from cmvt_jax.data import synthetic
from cmvt_jax.data import video_io
from cmvt_jax.models import cmvt
from configs import micro
from tests.data import media
from tests.evaluate.conftest import LATEST_STEP
from tests.evaluate.conftest import micro_config


def write_long_video(path, segments: int, seed: int) -> None:
  """A generated file of `segments` two-second segments (the micro dataset's kind of video)."""
  spec = dataclasses.replace(
    synthetic.SyntheticSpec.from_config(micro.get_config().dataset.synthetic),
    segments_per_file=segments,
    seed=seed,
  )
  rng = np.random.default_rng(seed)
  kind = synthetic.CLASSES[seed % len(synthetic.CLASSES)]
  events = synthetic.sample_events(spec, rng)
  frames = synthetic.render_video(spec, kind, events, rng)
  audio = synthetic.render_audio(spec, kind, events, rng)
  synthetic.write_mp4(path, frames, spec.fps, audio, spec.sample_rate)


@pytest.fixture(scope="module")
def video_embedder(run):
  """The export's whole-video embedder for a memory limit (GiB; None: the machine's)."""
  trained = run.restore_params(step=LATEST_STEP)

  def make(limit):
    config = micro_config(run.config.dataset.data_dir, **{"export.memory_limit_gib": limit})
    return export.video_embedder(run, trained, config.export)

  return make


def test_videos_of_many_lengths_share_a_handful_of_programs(run):
  trained = run.restore_params(step=LATEST_STEP)
  device = embedding.WholeVideoEmbedder(
    run.model, run.mesh, trained.params, chunk_frames=16, window_batch=8
  )
  embedder = whole_video.VideoEmbedder(
    device, run.preprocessor(trained.stats), moment_seconds=1.0, memory_limit_bytes=1 << 40
  )
  storage = run.dataset.storage
  rng = np.random.default_rng(0)
  # Seven lengths from 1.5 s to 40 s: 6 to 124 input frames (+ CLS) fill the 128-token bucket
  # and 160 frames the 256 one; their audio (48 to 992 log-mel frames, 8 per CNN step) fills
  # 1016 frames (127 steps + CLS), 1280 frames fill 2040. So two whole-video programs, plus
  # one for frame chunks and two (video, audio) for batches of moment windows.
  for seconds in (1.5, 3, 7.25, 11, 19.5, 31, 40):
    stored = round(seconds * storage.fps)
    frames = rng.integers(0, 255, (stored, 16, 16, 3), dtype=np.uint8)
    audio = rng.integers(-3000, 3000, round(seconds * storage.sample_rate)).astype(np.int16)
    embedded = embedder.embed_stored(frames, audio, f"{seconds} s")
    assert embedded.num_frames == int(seconds * 4)
  assert device.programs == 1 + 2 + 2


def test_videos_that_cannot_be_used_are_skipped_and_counted_while_the_rest_exports(
  tmp_path, workdir, run, micro_data_dir, video_embedder, caplog
):
  folder = tmp_path / "videos"
  for index in range(2):
    write_long_video(folder / f"short_{index}.mp4", segments=2, seed=index)
  write_long_video(folder / "long.mp4", segments=30, seed=5)  # one minute
  # 0.2 s: one stored frame at 8 fps, no input frame at 4 fps (first in the folder's order).
  media.write_video(folder / "a_tiny.mp4", num_frames=2, fps=10, audio=media.tone(0.2, 16000))
  embedder = video_embedder(None)
  limit = (embedder.memory_needed(4.0) + embedder.memory_needed(60.0)) / 2 / (1 << 30)
  config = micro_config(
    micro_data_dir,
    **{
      "export.whole_video": True,
      "export.video_dir": str(folder),
      "export.memory_limit_gib": limit,
    },
  )
  with caplog.at_level(logging.WARNING):
    export.export_embeddings(config, str(workdir), run=run)
  rows = export.load_embeddings(workdir, "videos_whole_video")
  assert list(rows["source"]) == ["short_0.mp4", "short_1.mp4"]
  manifest = json.loads((workdir / "embeddings/videos_whole_video/manifest.json").read_text())
  assert manifest["skipped_files"] == 2
  assert manifest["skipped"] == {
    whole_video.TooLongError.reason: 1,
    video_io.EmptyVideoError.reason: 1,
  }
  assert "Skipping a_tiny.mp4: empty: " in caplog.text
  assert "Skipping long.mp4: over the memory limit: " in caplog.text


def test_search_finds_a_planted_segment_of_a_long_video(
  tmp_path, workdir, run, micro_data_dir, capsys
):
  folder = tmp_path / "archive"
  for index in range(3):
    write_long_video(folder / f"film_{index}.mp4", segments=15, seed=10 + index)  # 30 s each
  config = micro_config(
    micro_data_dir, **{"export.whole_video": True, "export.video_dir": str(folder)}
  )
  export.export_embeddings(config, str(workdir), run=run)
  rows = export.load_embeddings(workdir, "archive_whole_video")
  for row in range(3):  # moments every second, in order, covering each 30-s video
    np.testing.assert_allclose(rows["moment_time"][rows["moment_row"] == row], np.arange(30))

  # The sound of film_1 at [17, 18) s, one window long on the moment grid, against the
  # collection's sounds: its own moment, exactly.
  query = f"{folder / 'film_1.mp4'}@17-18"
  flags.FLAGS.mark_as_parsed()
  with flagsaver.flagsaver(
    workdir=str(workdir),
    collection="archive_whole_video",
    query=query,
    query_modality="audio",
    same_modality=True,
    top_k=3,
    json=True,
  ):
    search.main(["search"])
  results = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert [result["rank"] for result in results] == [1, 2, 3]
  assert (results[0]["source"], results[0]["start"], results[0]["end"]) == ("film_1.mp4", 17, 18)
  assert results[0]["score"] == pytest.approx(1.0, abs=1e-5)
  assert results[0]["score"] >= results[1]["score"] >= results[2]["score"]

  # Cross-modal (the default): the same query searches the moments' video.
  answer = search.run_search(str(workdir), "archive_whole_video", query, query_modality="audio")
  assert answer.target == "video" and len(answer.results) == 10


def test_a_collection_exported_again_is_searched_again(tmp_path, workdir, run, micro_data_dir):
  """A video replaced by another of the same name and length, the folder exported again: the
  search finds the new film's moments (the first search's cache is not reused)."""
  folder = tmp_path / "reels"
  write_long_video(folder / "other.mp4", segments=3, seed=21)
  config = micro_config(
    micro_data_dir, **{"export.whole_video": True, "export.video_dir": str(folder)}
  )
  query = f"{folder / 'reel.mp4'}@3-4"  # one window on the moment grid: its own moment

  def best() -> search.Result:
    answer = search.run_search(
      str(workdir), "reels_whole_video", query, query_modality="audio", same_modality=True
    )
    return answer.results[0]

  for seed in (20, 22):  # then another film (another kind of object and sound), 6 s too
    write_long_video(folder / "reel.mp4", segments=3, seed=seed)
    export.export_embeddings(config, str(workdir), run=run)
    found = best()
    assert (found.source, found.start, found.end) == ("reel.mp4", 3, 4), seed
    assert found.score == pytest.approx(1.0, abs=1e-5), seed


def test_a_run_recorded_before_the_moment_keys_embeds_and_searches(tmp_path, workdir):
  recorded = json.loads((workdir / "config.json").read_text())
  for path in export.KEYS_ADDED:
    section, key = path.split(".")
    del recorded["config"][section][key]
  recorded["config"]["export"]["max_frames"] = 512  # the key those runs had
  old = tmp_path / "old_run"
  old.mkdir()
  (old / "config.json").write_text(json.dumps(recorded))
  config = export.workdir_config(old)
  defaults = micro.get_config()
  for path, value in export.KEYS_ADDED.items():
    section, key = path.split(".")
    assert config[section][key] == value == defaults[section][key], path
  assert cmvt.from_config(config).video_encoder.temporal.attention_implementation is None
  # The same model whatever the pipeline's speed settings: a collection stays searchable.
  faster = micro.get_config()
  faster.input.num_workers, faster.input.read_threads = 8, 4
  assert export.model_digest(faster) == export.model_digest(micro.get_config())
  # ... and whichever attention implementation computes it (they agree to float rounding).
  splash = micro.get_config()
  splash.model.attention_implementation = "splash"
  assert export.model_digest(splash) == export.model_digest(micro.get_config())
  wider = micro.get_config()
  wider.input.frame_size = 32
  assert export.model_digest(wider) != export.model_digest(micro.get_config())
