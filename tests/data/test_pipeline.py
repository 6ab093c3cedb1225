"""grain pipelines on an in-memory source whose frames encode each example's index."""

import dataclasses
import mmap
import subprocess
import sys

import numpy as np
import pytest

from cmvt_jax.data import normalization
from cmvt_jax.data import pipeline
from cmvt_jax.data import spectrogram
from tests.data import media

NUM_EXAMPLES = 24
STORAGE_FPS = 8.0


def _example(index):
  # 16 stored frames (2 s at 8 fps) all at grey level `index`: any crop, resize or flip of
  # them is still `index`, so an augmented batch row tells which example it came from.
  rng = np.random.default_rng(index)
  return {
    "frames": np.full((16, 32, 40, 3), index, np.uint8),
    "audio": (rng.normal(0, 3000, 32000)).astype(np.int16),
    "label": index % 3,
    "id": f"clip{index}".encode(),
    "source": f"dir/v{index}.mp4".encode(),
    "start": np.float32(index / 2),
    "has_audio": True,
  }


SOURCE = [_example(i) for i in range(NUM_EXAMPLES)]
# Identity normalisation keeps frame values readable: video = grey level.
STATS = normalization.NormalizationStats(
  video_mean=(0.0, 0.0, 0.0), video_std=(1 / 255,) * 3, audio_mean=0.0, audio_std=1.0, mel=media.MEL
)
SPEC = pipeline.InputSpec(
  num_frames=4,
  fps=4.0,
  frame_size=16,
  mel=media.MEL,
  crop_scale=(0.5, 1.0),
  crop_ratio=(3 / 4, 4 / 3),
  flip=True,
  num_time_masks=1,
  max_time_mask=4,
  num_freq_masks=1,
  max_freq_mask=8,
  two_views=False,
  num_workers=0,
  eval_num_workers=0,
  worker_buffer_size=1,
  read_threads=0,
  read_buffer_size=2,
)


def _preprocessor(spec=SPEC, stats=STATS):
  return pipeline.Preprocessor(spec, stats, storage_fps=STORAGE_FPS, storage_sample_rate=16000)


def _indices(batch):
  """The example index of each row (the grey level of its frames)."""
  levels = batch["video"].reshape(len(batch["video"]), -1)
  assert np.allclose(levels, levels[:, :1], atol=1e-3)
  return [int(round(level)) for level in levels[:, 0]]


def _take(dataset, count, **kwargs):
  iterator = iter(dataset)
  try:
    return [next(iterator) for _ in range(count)]
  finally:
    iterator.close()


def _train(seed=0, process_index=0, process_count=1, batch_size=4, spec=SPEC, **kwargs):
  return pipeline.train_dataset(
    SOURCE,
    _preprocessor(spec),
    batch_size=batch_size,
    seed=seed,
    process_index=process_index,
    process_count=process_count,
    **kwargs,
  )


def test_train_batch_keys_shapes_and_dtypes():
  [batch] = _take(_train(), 1)
  assert batch["video"].shape == (4, 4, 16, 16, 3) and batch["video"].dtype == np.float32
  assert batch["audio"].shape == (4, 32, 32) and batch["audio"].dtype == np.float32
  assert batch["label"].dtype == np.int32 and batch["mask"].dtype == np.bool_
  assert batch["mask"].all()
  assert list(batch["label"]) == [index % 3 for index in _indices(batch)]


def test_same_seed_same_batches_other_seed_other_batches():
  first, again, other = (_take(_train(seed=seed), 3) for seed in (7, 7, 8))
  for a, b in zip(first, again):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  assert any(not np.array_equal(a["audio"], c["audio"]) for a, c in zip(first, other))


def test_one_epoch_is_a_permutation():
  batches = _take(_train(), NUM_EXAMPLES // 4)
  assert sorted(sum((_indices(b) for b in batches), [])) == list(range(NUM_EXAMPLES))


@pytest.mark.parametrize("process_count", [1, 2, 4])
def test_host_shards_are_disjoint_cover_and_form_the_same_global_batches(process_count):
  global_batch, steps = 8, 6  # 2 epochs
  reference = _take(_train(batch_size=global_batch), steps)
  hosts = [
    _take(
      _train(
        process_index=p, process_count=process_count, batch_size=global_batch // process_count
      ),
      steps,
    )
    for p in range(process_count)
  ]
  for step in range(steps):
    rows = [index for host in hosts for index in _indices(host[step])]
    assert len(set(rows)) == global_batch  # disjoint within a global batch
    assert sorted(rows) == sorted(_indices(reference[step]))  # same examples as on one host
    # ... and the same augmented arrays: randomness follows the example, not the host.
    for host in hosts:
      for row, index in enumerate(_indices(host[step])):
        reference_row = _indices(reference[step]).index(index)
        np.testing.assert_array_equal(
          host[step]["audio"][row], reference[step]["audio"][reference_row]
        )
  epoch = [index for step in range(3) for host in hosts for index in _indices(host[step])]
  assert sorted(epoch) == list(range(NUM_EXAMPLES))  # every example once per epoch


def test_start_step_resumes_the_stream():
  batches = _take(_train(), 5)
  resumed = _take(_train(start_step=3), 2)
  for a, b in zip(batches[3:], resumed):
    np.testing.assert_array_equal(a["video"], b["video"])
    np.testing.assert_array_equal(a["audio"], b["audio"])


@pytest.mark.parametrize("num_workers", [0, 1])
def test_iterator_state_restores_the_next_batches(num_workers):
  spec = dataclasses.replace(SPEC, num_workers=num_workers)
  iterator = iter(_train(spec=spec))
  for _ in range(3):
    next(iterator)
  state = iterator.get_state()
  expected = [next(iterator) for _ in range(4)]
  iterator.close()

  restored = iter(_train(spec=spec))
  restored.set_state(state)
  actual = [next(restored) for _ in range(4)]
  restored.close()
  for a, b in zip(expected, actual):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def test_augmented_batches_are_c_contiguous():
  # grain's worker processes hand over only C-contiguous arrays in shared memory; a crop's
  # fancy indexing and a flip leave strided views, which were pickled through a pipe.
  for seed in range(4):  # some rows flipped, some not
    [batch] = _take(_train(seed=seed), 1)
    assert batch["video"].flags.c_contiguous and batch["audio"].flags.c_contiguous


def test_batches_from_a_worker_process_arrive_in_shared_memory():
  # A pickled batch costs a copy on each side and, larger than a pipe's buffer, can keep a
  # worker from exiting when its iterator is closed (grain then kills it after 25 s).
  spec = dataclasses.replace(SPEC, num_workers=1)
  [batch] = _take(_train(spec=spec), 1)
  for key in ("video", "audio"):
    assert isinstance(batch[key].base, mmap.mmap), f"{key} was pickled, not shared"


def test_an_eval_pass_with_workers_leaves_no_shared_memory_behind():
  # Python's resource tracker prints "leaked shared_memory objects" at exit for segments
  # nobody unlinked; a whole pass, closed with pipeline.close, must leave none.
  script = (
    "from tests.data import test_pipeline as t\n"
    "from cmvt_jax.data import pipeline\n"
    "import dataclasses\n"
    "spec = dataclasses.replace(t.SPEC, eval_num_workers=1)\n"
    "dataset = pipeline.eval_dataset(t.SOURCE, t._preprocessor(spec), batch_size=5)\n"
    "iterator = iter(dataset)\n"
    "rows = sum(int(batch['mask'].sum()) for batch in iterator)\n"
    "pipeline.close(iterator)\n"
    "print('rows', rows)\n"
  )
  result = subprocess.run(
    [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
  )
  assert f"rows {NUM_EXAMPLES}" in result.stdout
  assert "leaked" not in result.stderr, result.stderr


def test_two_views_are_independent_augmentations_of_the_same_clip():
  spec = dataclasses.replace(SPEC, two_views=True)
  [batch] = _take(_train(spec=spec), 1)
  assert batch["video_view2"].shape == batch["video"].shape
  assert batch["audio_view2"].shape == batch["audio"].shape
  assert _indices({"video": batch["video_view2"]}) == _indices(batch)
  assert not np.array_equal(batch["audio_view2"], batch["audio"])


@pytest.mark.parametrize("process_count, batch_size", [(1, 5), (2, 4), (3, 4), (5, 8)])
def test_eval_padding_masks_exactly_the_padded_rows(process_count, batch_size):
  source = SOURCE[:10]
  num_batches = pipeline.num_eval_batches(10, batch_size, process_count)
  seen = []
  for p in range(process_count):
    dataset = pipeline.eval_dataset(
      source, _preprocessor(), batch_size=batch_size, process_index=p, process_count=process_count
    )
    batches = list(dataset)
    assert len(batches) == num_batches  # every host the same count
    mask = np.concatenate([b["mask"] for b in batches])
    ids = np.concatenate([b["id"] for b in batches])
    share = len(range(p, 10, process_count))
    assert mask.tolist() == [True] * share + [False] * (len(mask) - share)
    assert all(i == "" for i in ids[~mask])
    assert (np.concatenate([b["label"] for b in batches])[~mask] == -1).all()
    assert (np.concatenate([b["video"] for b in batches])[~mask] == 0).all()
    seen += list(ids[mask])
  assert sorted(seen) == sorted(f"clip{i}" for i in range(10))  # each example exactly once


def test_eval_batches_are_deterministic_centre_crops_with_metadata():
  [batch] = list(pipeline.eval_dataset(SOURCE[:4], _preprocessor(), batch_size=4))
  [again] = list(pipeline.eval_dataset(SOURCE[:4], _preprocessor(), batch_size=4))
  np.testing.assert_array_equal(batch["audio"], again["audio"])
  assert list(batch["id"]) == ["clip0", "clip1", "clip2", "clip3"]
  assert list(batch["source"]) == [f"dir/v{i}.mp4" for i in range(4)]
  np.testing.assert_array_equal(batch["start"], np.float32([0.0, 0.5, 1.0, 1.5]))
  assert _indices(batch) == [0, 1, 2, 3]


def test_window_keeps_frames_and_audio_aligned():
  # Stored frame k has grey level k; stored sample j has value j (a time ramp).
  frames = np.stack([np.full((8, 8, 3), k, np.uint8) for k in range(16)])
  audio = np.arange(32000).astype(np.int16)
  spec = dataclasses.replace(SPEC, num_frames=3, fps=2.0)  # 1.5 s: 12 of 16 stored frames
  preprocessor = _preprocessor(spec)
  starts = set()
  for seed in range(30):
    window_frames, waveform = preprocessor.window(frames, audio, np.random.default_rng(seed))
    first = int(window_frames[0, 0, 0, 0])
    starts.add(first)
    assert [int(f[0, 0, 0]) for f in window_frames] == [first, first + 4, first + 8]
    assert len(waveform) == 24000
    assert round(float(waveform[0]) * 32768) == first / STORAGE_FPS * 16000
  assert starts == set(range(5))  # every start 0..16-12 occurs
  centre_frames, _ = preprocessor.window(frames, audio, None)
  assert int(centre_frames[0, 0, 0, 0]) == 2


def test_window_longer_than_the_clip_is_refused():
  spec = dataclasses.replace(SPEC, num_frames=12, fps=4.0)
  with pytest.raises(ValueError, match="prepare clips at least 3.0 s long"):
    _preprocessor(spec).window(SOURCE[0]["frames"], SOURCE[0]["audio"], None)


def test_normalisation_and_log_mel_of_the_eval_view():
  stats = dataclasses.replace(
    STATS, video_mean=(0.1, 0.2, 0.3), video_std=(0.5, 0.5, 0.25), audio_mean=-4.0, audio_std=2.0
  )
  frames = np.random.default_rng(0).integers(0, 256, (16, 16, 16, 3)).astype(np.uint8)
  audio = SOURCE[0]["audio"]
  spec = dataclasses.replace(SPEC, num_frames=8, fps=4.0)  # the whole 2 s clip, 16x16 frames
  view = _preprocessor(spec, stats)(frames, audio)

  expected_video = (frames[::2] / 255.0 - np.array([0.1, 0.2, 0.3])) / np.array([0.5, 0.5, 0.25])
  np.testing.assert_allclose(view["video"], expected_video, atol=1e-5)
  expected_audio = (spectrogram.LogMel(media.MEL)(audio / 32768.0) + 4.0) / 2.0
  np.testing.assert_allclose(view["audio"], expected_audio, atol=1e-5)


def test_crop_and_resize_by_hand():
  frames = np.arange(16, dtype=np.uint8).reshape(1, 4, 4, 1).repeat(3, axis=-1)
  same = pipeline.crop_and_resize(frames, 0, 0, 4, 4, 4)
  np.testing.assert_array_equal(same, frames.astype(np.float32))
  # 4x4 -> 2x2: sample points at pixel coordinates 0.5 and 2.5, the mean of 2x2 blocks.
  half = pipeline.crop_and_resize(frames, 0, 0, 4, 4, 2)[0, ..., 0]
  np.testing.assert_allclose(half, [[2.5, 4.5], [10.5, 12.5]])
  # The box rows 1..3, columns 2..4 at its own size: exactly those pixels.
  box = pipeline.crop_and_resize(frames, 1, 2, 2, 2, 2)[0, ..., 0]
  np.testing.assert_array_equal(box, [[6, 7], [10, 11]])


def test_statistics_for_other_mel_settings_are_refused():
  other = dataclasses.replace(media.MEL, n_mels=64)
  with pytest.raises(ValueError, match="log-mel settings"):
    pipeline.Preprocessor(dataclasses.replace(SPEC, mel=other), STATS, 8.0, 16000)


def test_batches_carry_has_audio_and_multi_hot_labels():
  source = [
    {**example, "has_audio": index % 3 != 0, "labels": np.array([index % 3, 4], np.int32)}
    for index, example in enumerate(SOURCE[:8])
  ]
  [train] = _take(
    pipeline.train_dataset(source, _preprocessor(), batch_size=8, seed=0, multi_hot_classes=5),
    1,
  )
  [evaluated] = list(
    pipeline.eval_dataset(source, _preprocessor(), batch_size=6, multi_hot_classes=5)
  )[1:]
  for batch in (train, evaluated):
    rows = [(i, index) for i, index in enumerate(_indices(batch)) if batch["mask"][i]]
    for row, index in rows:
      assert batch["has_audio"][row] == (index % 3 != 0)
      expected = np.zeros(5, np.uint8)
      expected[[index % 3, 4]] = 1
      np.testing.assert_array_equal(batch["labels"][row], expected)
  # Eval padding rows: no audio, no labels.
  assert not evaluated["has_audio"][2:].any() and not evaluated["labels"][2:].any()


# A second dataset stored at other rates (4 fps, 8 kHz) whose frames are grey levels 100 + i.
SOURCE_B = [
  {
    **_example(index),
    "frames": np.full((8, 24, 24, 3), 100 + index, np.uint8),
    "audio": np.random.default_rng(index).normal(0, 3000, 16000).astype(np.int16),
  }
  for index in range(10)
]


def _mixture(weights=(3, 1), **kwargs):
  preprocessor_b = pipeline.Preprocessor(SPEC, STATS, storage_fps=4.0, storage_sample_rate=8000)
  components = [
    pipeline.Component(SOURCE, _preprocessor(), weights[0]),
    pipeline.Component(SOURCE_B, preprocessor_b, weights[1]),
  ]
  kwargs.setdefault("batch_size", 4)
  return pipeline.mixture_train_dataset(components, seed=0, **kwargs)


def test_mixture_draws_by_weight_each_component_at_its_own_rates():
  batches = _take(_mixture(), 8)
  drawn = [index for batch in batches for index in _indices(batch)]
  first = [index for index in drawn if index < 100]
  second = [index - 100 for index in drawn if index >= 100]
  assert (len(first), len(second)) == (24, 8)  # weights 3 : 1 over 32 clips
  assert sorted(first) == list(range(24))  # each component shuffled, a permutation per epoch
  assert len(set(second)) == 8 and set(second) <= set(range(10))
  for batch in batches:
    assert batch["video"].shape == (4, 4, 16, 16, 3) and batch["audio"].shape == (4, 32, 32)
  # The first component's draws are the single dataset's stream, in order.
  alone = [index for batch in _take(_train(), 6) for index in _indices(batch)]
  assert first == alone


def test_mixture_resumes_exactly_from_its_state_or_from_the_step():
  iterator = iter(_mixture())
  for _ in range(3):
    next(iterator)
  state = iterator.get_state()
  expected = [next(iterator) for _ in range(3)]
  iterator.close()
  restored = iter(_mixture())
  restored.set_state(state)
  from_state = [next(restored) for _ in range(3)]
  restored.close()
  from_step = _take(_mixture(start_step=3), 3)
  for batches in (from_state, from_step):
    for a, b in zip(expected, batches):
      for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_mixture_host_shards_form_the_single_host_global_batches():
  reference = _take(_mixture(batch_size=8), 4)
  hosts = [_take(_mixture(batch_size=4, process_index=p, process_count=2), 4) for p in range(2)]
  for step in range(4):
    rows = [index for host in hosts for index in _indices(host[step])]
    assert sorted(rows) == sorted(_indices(reference[step]))
