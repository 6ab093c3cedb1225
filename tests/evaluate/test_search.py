"""Moment search (cmvt_jax/search.py) on collections written directly by the test: the chunked
search against a plain brute force, the modality searched, the cache, the query syntax and
each error of the command line (run in-process; the query's embedding is faked, so no model).
"""

import json
import os

import numpy as np
import pytest
from absl import flags
from absl.testing import flagsaver
from ml_collections import config_dict

from cmvt_jax import export
from cmvt_jax import search
from cmvt_jax.data import dataset_writer
from cmvt_jax.data import video_io
from tests.data import media
from tests.evaluate import moment_collections
from tests.reliability import crash_harness

NAME = "videos_whole_video"
# 37 videos of 0 to 120 moments (some empty) over 3 parts: 2,000-odd moments.
LENGTHS = [int(n) for n in np.random.default_rng(7).integers(0, 120, size=37)]


@pytest.fixture
def collection(tmp_path):
  """(workdir, the moments in search order) of a 3-part collection."""
  truth = moment_collections.write_collection(tmp_path, NAME, LENGTHS, parts=3, embed_dim=8)
  return tmp_path, truth


def brute_force(matrix, queries, top_k):
  scores = queries @ matrix.T
  order = np.argsort(-scores, axis=1, kind="stable")[:, :top_k]
  return order, np.take_along_axis(scores, order, axis=1)


@pytest.mark.parametrize("chunk_size", [1, 7, 256, 1000, 1 << 16])
@pytest.mark.parametrize("top_k", [1, 5, 64])
def test_chunked_search_equals_brute_force(collection, chunk_size, top_k):
  workdir, truth = collection
  opened = search.load_collection(workdir, NAME)
  assert len(opened) == sum(LENGTHS) > 2 * 1000
  queries = np.random.default_rng(1).standard_normal((3, 8)).astype(np.float32)
  for modality in ("video", "audio"):
    np.testing.assert_array_equal(opened.moments(modality), truth[modality])
    indices, scores = search.nearest(
      opened.moments(modality), queries, top_k=top_k, chunk_size=chunk_size
    )
    expected_indices, expected_scores = brute_force(truth[modality], queries, top_k)
    np.testing.assert_array_equal(indices, expected_indices)
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-5, atol=1e-6)
  results = search.search(opened, queries[0], modality="audio", top_k=top_k, chunk_size=chunk_size)
  expected_indices, _ = brute_force(truth["audio"], queries[:1], top_k)
  assert [r.rank for r in results] == list(range(1, top_k + 1))
  assert [r.source for r in results] == list(truth["source"][expected_indices[0]])
  assert [r.start for r in results] == list(truth["time"][expected_indices[0]])
  assert [r.end - r.start for r in results] == [2.0] * top_k
  scores = [r.score for r in results]
  assert scores == sorted(scores, reverse=True)


def test_ties_go_to_the_earlier_moment_across_chunks():
  matrix = np.zeros((50, 4), np.float32)
  matrix[:, 0] = 1.0
  matrix[[3, 17, 33], 0] = 2.0  # three equal best, the rest all tied too
  query = np.eye(4, dtype=np.float32)[:1]
  for chunk_size in (1, 4, 10, 50):
    indices, scores = search.nearest(matrix, query, top_k=6, chunk_size=chunk_size)
    assert list(indices[0]) == [3, 17, 33, 0, 1, 2]
    np.testing.assert_array_equal(scores[0], [2, 2, 2, 1, 1, 1])


def test_more_results_asked_than_moments(tmp_path):
  moment_collections.write_collection(tmp_path, NAME, [3, 2])
  results = search.search(
    search.load_collection(tmp_path, NAME), np.ones(8) / 8**0.5, modality="video", top_k=10
  )
  assert len(results) == 5


# ----------------------------------------------------------------------------- cache


def test_the_cache_is_built_once_reused_and_rebuilt_when_the_export_changes(
  collection, monkeypatch
):
  workdir, truth = collection
  builds = []
  build = search._build_cache
  monkeypatch.setattr(search, "_build_cache", lambda *a: (builds.append(1), build(*a)))
  cache = workdir / "embeddings" / NAME / search.CACHE_DIR
  first = search.load_collection(workdir, NAME)
  assert len(builds) == 1
  assert isinstance(first.video, np.memmap)  # memory-mapped, not read
  assert sorted(p.name for p in cache.iterdir()) == sorted(
    [search.CACHE_INFO, "sources.json", *(file for file, _ in search._ARRAYS.values())]
  )
  search.load_collection(workdir, NAME)
  assert len(builds) == 1

  # Another export under the same name: a new manifest (and new moments).
  truth = moment_collections.write_collection(workdir, NAME, LENGTHS[:20], parts=2, seed=5)
  again = search.load_collection(workdir, NAME)
  assert len(builds) == 2
  np.testing.assert_array_equal(again.audio, truth["audio"])
  np.testing.assert_array_equal(again.time, truth["time"])
  assert [again.sources[i] for i in again.source_index] == list(truth["source"])

  # A partial cache (a rebuild killed before cache.json), then a damaged array.
  (cache / search.CACHE_INFO).unlink()
  search.load_collection(workdir, NAME)
  assert len(builds) == 3
  (cache / "moment_audio.npy").write_bytes(b"\x93NUMPY torn")
  reopened = search.load_collection(workdir, NAME)
  assert len(builds) == 4
  np.testing.assert_array_equal(reopened.audio, truth["audio"])
  assert not list(cache.glob("*.cmvt-tmp"))


@pytest.mark.parametrize("part_digests", [True, False])
def test_other_moments_of_the_same_shapes_rebuild_the_cache(tmp_path, part_digests):
  """An export again under the same name, of other videos of the same lengths (same
  manifest counts, same part sizes): its own moments are searched. The manifest's part
  digests tell the exports apart; an older manifest without them, the parts' times."""
  moment_collections.write_collection(tmp_path, NAME, LENGTHS, parts=3, part_digests=part_digests)
  search.load_collection(tmp_path, NAME)
  truth = moment_collections.write_collection(
    tmp_path, NAME, LENGTHS, parts=3, seed=5, part_digests=part_digests
  )
  for part in (tmp_path / "embeddings" / NAME).glob("part-*"):
    # Written a second later (file times tick in steps of a few milliseconds).
    stat = os.stat(part)
    os.utime(part, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
  again = search.load_collection(tmp_path, NAME)
  for modality in ("video", "audio"):
    np.testing.assert_array_equal(again.moments(modality), truth[modality])


def test_the_cache_writes_are_write_points(collection, monkeypatch, tmp_path):
  """Every cache write goes through cmvt_jax.files, as kind "search-cache"."""
  workdir, _ = collection
  log = tmp_path / "writes.log"
  monkeypatch.setenv("CMVT_WRITE_LOG", str(log))
  search.load_collection(workdir, NAME)
  kinds = {line.split("\t")[1] for line in log.read_text().splitlines()}
  assert kinds == {search.CACHE_KIND}
  assert search.CACHE_KIND in crash_harness.FILE_OF_KIND


# ----------------------------------------------------------------------------- queries


def test_query_syntax(tmp_path):
  assert search.parse_query("talk.wav@12.5-20") == search.Query("talk.wav", 12.5, 20.0)
  assert search.parse_query("talk.wav@.5-1.") == search.Query("talk.wav", 0.5, 1.0)
  assert search.parse_query("talk.wav") == search.Query("talk.wav")
  assert search.parse_query("me@home/talk.wav@3-4") == search.Query("me@home/talk.wav", 3, 4)
  named = tmp_path / "clip@1-2.mp4"  # an existing file is the whole file, '@' or not
  named.write_bytes(b"")
  assert search.parse_query(str(named)) == search.Query(str(named))
  for bad in ("talk.wav@12.5", "talk.wav@a-b", "talk.wav@-3-4", "talk.wav@20-12", "@1-2"):
    with pytest.raises(search.SearchError):
      search.parse_query(bad)


def test_the_query_modality_follows_the_file(tmp_path):
  media.write_video(tmp_path / "v.mp4", num_frames=2, audio=media.tone(0.2, 16000))
  media.write_video(tmp_path / "a.mkv", num_frames=0, audio=media.tone(0.2, 16000))
  assert search.file_modality(tmp_path / "v.mp4") == "video"
  assert search.file_modality(tmp_path / "a.mkv") == "audio"  # probed: no video stream
  assert search.file_modality(tmp_path / "cover-art.m4a") == "audio"  # by name, not opened
  (tmp_path / "junk.mp4").write_bytes(b"not a video")
  with pytest.raises(video_io.VideoReadError):
    search.file_modality(tmp_path / "junk.mp4")


# ----------------------------------------------------------------------------- command line


@pytest.fixture
def fake_model(monkeypatch, collection):
  """The workdir's model, faked: its digest, its config, and a query embedding that is
  moment `QUERY_MOMENT`'s own embedding of the asked modality. Its checkpoints are those
  of `moment_collections`' manifests (step 100); loading another step fails as
  `run.restore_params` does."""
  workdir, truth = collection
  calls = []
  config = config_dict.ConfigDict({"input": {"num_frames": 8, "fps": 4.0}})

  def segment_embedder(workdir, *, step=None, config=None, storage=None):
    if step != 100:
      raise ValueError(
        f"No complete checkpoint at step {step} in {workdir}/checkpoints; the complete ones "
        "are [100]."
      )
    assert storage == dataset_writer.StorageSpec(), "the manifest's storage settings"

    def embed(path, *, modality, start=None, end=None):
      calls.append(dict(path=path, start=start, end=end, modality=modality))
      if end is not None and end > 60:
        raise ValueError(f"{path} is 60.0 s long; the range [{start}, {end}) is outside it.")
      if "broken" in str(path):
        raise video_io.UnreadableVideoError(path, "FFmpeg cannot decode it")
      return truth[modality][QUERY_MOMENT]

    return embed

  monkeypatch.setattr(export, "model_digest", lambda c: moment_collections.MODEL_SHA256, False)
  monkeypatch.setattr(export, "workdir_config", lambda w: config)
  monkeypatch.setattr(export, "segment_embedder", segment_embedder, False)
  for name in ("talk.wav", "broken.wav"):
    (workdir / name).write_bytes(b"RIFF")
  return workdir, truth, calls, config


QUERY_MOMENT = 1234


def cli(capsys, **values):
  """Runs the command line in this process: (exit status, stdout, stderr)."""
  values.setdefault("collection", NAME)
  flags.FLAGS.mark_as_parsed()
  try:
    with flagsaver.flagsaver(**values):
      try:
        search.main(["search"])
        status = 0
      except SystemExit as exit:
        status = exit.code
  finally:
    flags.FLAGS.unparse_flags()
  out, err = capsys.readouterr()
  return status, out, err


def test_cross_modal_by_default_same_modal_on_request(fake_model, capsys):
  workdir, truth, calls, _ = fake_model
  query = str(workdir / "talk.wav")
  status, out, _ = cli(capsys, workdir=str(workdir), query=f"{query}@1.5-3.5", json=True, top_k=3)
  assert status == 0
  assert calls[-1] == dict(path=query, start=1.5, end=3.5, modality="audio")
  lines = [json.loads(line) for line in out.splitlines()]
  expected, _ = brute_force(truth["video"], truth["audio"][QUERY_MOMENT][None], 3)
  assert [line["rank"] for line in lines] == [1, 2, 3]
  assert [line["start"] for line in lines] == [float(t) for t in truth["time"][expected[0]]]
  assert [line["source"] for line in lines] == list(truth["source"][expected[0]])
  assert all(line["end"] == line["start"] + 2.0 for line in lines)
  assert set(lines[0]) == {"rank", "source", "start", "end", "score"}

  status, out, _ = cli(capsys, workdir=str(workdir), query=query, same_modality=True, json=True)
  assert status == 0 and calls[-1]["start"] is None
  best = json.loads(out.splitlines()[0])
  assert (best["source"], best["start"]) == (
    truth["source"][QUERY_MOMENT],
    float(truth["time"][QUERY_MOMENT]),
  )
  assert best["score"] == pytest.approx(1.0)
  assert len(out.splitlines()) == 10

  # A video file's soundtrack as the query; a video query searches the audio moments.
  status, out, _ = cli(capsys, workdir=str(workdir), query=query, query_modality="video")
  assert status == 0 and calls[-1]["modality"] == "video"
  expected, _ = brute_force(truth["audio"], truth["video"][QUERY_MOMENT][None], 10)
  table = out.splitlines()
  assert "(video) vs the audio of" in table[0] and table[1].split()[0] == "rank"
  assert [row.split()[-1] for row in table[2:]] == list(truth["source"][expected[0]])


def _write_clip_export(workdir):
  """A per-clip export: no moments."""
  folder = workdir / "embeddings" / "test"
  folder.mkdir(parents=True)
  np.savez(folder / "part-00000-of-00001.npz", id=np.asarray(["a@0"]), source=np.asarray(["a"]))
  manifest = {"whole_video": False, "embed_dim": 8, "count": 1, "step": 1}
  manifest["parts"] = {"part-00000-of-00001.npz": 1}
  (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(
  "case, values, says",
  [
    ("top_k", dict(top_k=0), "--top_k must be at least 1"),
    ("no file", dict(query="{w}/absent.wav"), "does not exist"),
    ("syntax", dict(query="{w}/talk.wav@12.5"), "START-END"),
    ("empty range", dict(query="{w}/talk.wav@20-12"), "not after its start"),
    ("outside", dict(query="{w}/talk.wav@50-70"), "outside"),
    ("unreadable", dict(query="{w}/broken.wav"), "Cannot read the query file"),
    ("directory", dict(query="{w}/embeddings"), "embeddings is a directory: give one"),
    ("not media", dict(query="{w}/junk.mp4"), "Cannot read the query file"),
    ("no collection", dict(collection="absent"), "--config.export.whole_video=True"),
    ("interrupted", dict(collection="interrupted"), "interrupted export"),
    ("part missing", dict(collection="part_missing"), "is incomplete"),
    ("per clip", dict(collection="test"), "per-clip embeddings"),
    ("no moments", dict(collection="no_moments"), "--config.export.moment_seconds=S` (S > 0"),
    ("none embedded", dict(collection="none_embedded"), "no video of it was embedded"),
    (
      "checkpoint gone",
      dict(collection="step_7", query="{w}/talk.wav@1-2"),
      "Cannot load the model that embedded collection 'step_7' (checkpoint step 7 of workdir",
    ),
    ("other model", dict(collection="other_model"), "another model"),
    ("other window", dict(collection="other_window"), "1 s moments"),
  ],
)
def test_each_error_is_one_line_and_exit_1(fake_model, capsys, case, values, says):
  workdir, _, _, _ = fake_model
  (workdir / "junk.mp4").write_bytes(b"not a video")
  moment_collections.write_collection(workdir, "interrupted", [3])
  (workdir / "embeddings" / "interrupted" / "manifest.json").unlink()
  moment_collections.write_collection(workdir, "part_missing", [3, 3], parts=2)
  (workdir / "embeddings" / "part_missing" / "part-00001-of-00002.npz").unlink()
  _write_clip_export(workdir)
  moment_collections.write_collection(workdir, "other_model", [3], model_sha256="f" * 64)
  moment_collections.write_collection(workdir, "other_window", [3], window_seconds=1.0)
  moment_collections.write_collection(workdir, "no_moments", [3])
  edit_manifest(workdir, "no_moments", moments=None)  # exported with moment_seconds=0
  moment_collections.write_collection(workdir, "none_embedded", [3])
  moments = {"count": 0, "moment_seconds": 1.0, "window_seconds": 2.0}
  edit_manifest(workdir, "none_embedded", count=0, moments=moments, skipped={"empty": 2})
  moment_collections.write_collection(workdir, "step_7", [3])
  edit_manifest(workdir, "step_7", step=7)  # its checkpoint since rotated away
  values = {
    key: value.format(w=workdir) if isinstance(value, str) else value
    for key, value in values.items()
  }
  values.setdefault("query", str(workdir / "talk.wav"))
  status, out, err = cli(capsys, workdir=str(workdir), **values)
  assert status == 1, case
  assert out == ""
  (line,) = err.strip().splitlines()
  assert line.startswith("search: ") and says in line, line
  if case in ("checkpoint gone", "no moments"):
    assert "--query" not in line, "a workdir problem, not the query's"


def edit_manifest(workdir, name, **changes):
  """Sets (None: removes) keys of a collection's manifest."""
  path = workdir / "embeddings" / name / "manifest.json"
  manifest = json.loads(path.read_text())
  for key, value in changes.items():
    if value is None:
      del manifest[key]
    else:
      manifest[key] = value
  path.write_text(json.dumps(manifest))
