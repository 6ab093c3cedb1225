"""Annotation lists: the published layouts, path templates, cut segments, label maps, every
row accounted for, and one clear line for each kind of bad list."""

import csv
import subprocess
import sys

import numpy as np
import pytest

from cmvt_jax.data import annotations
from cmvt_jax.data import dataset_writer
from cmvt_jax.data import datasets
from cmvt_jax.data import parts
from tests import helpers
from tests.data import media

# A VGGSound download: (youtube_id, start, label, split, what the file is). The file of a row
# is `{youtube_id}_{start:06d}.mp4`; a "good" file holds one 2-s clip.
VGGSOUND_ROWS = [
  ("aaa", 0, "dog barking", "train", "good"),
  ("bbb", 30, "cat, meowing", "train", "good"),  # a label with a comma (quoted in the CSV)
  ("ccc", 10, "dog barking", "test", "good"),
  ("ddd", 0, "dog barking", "train", "missing"),
  ("eee", 0, "cat, meowing", "test", "corrupt"),
  ("fff", 0, "dog barking", "train", "audioless"),
  ("ggg", 0, "dog barking", "train", "short"),
  ("aaa", 0, "dog barking", "train", "listed again"),
]
SKIP_REASONS = {
  "missing": "missing",
  "corrupt": "unreadable",
  "audioless": "no audio stream",
  "short": "shorter than one clip",
  "listed again": "listed twice",
}


def write_csv(path, rows, *, header=None, comments=()) -> None:
  with open(path, "w", newline="", encoding="utf-8") as f:
    f.writelines(f"{line}\n" for line in comments)
    writer = csv.writer(f)
    if header:
      writer.writerow(header)
    writer.writerows(rows)


@pytest.fixture(scope="module")
def vggsound(tmp_path_factory):
  """(list path, video folder) of a VGGSound-style download with every kind of bad row."""
  root = tmp_path_factory.mktemp("vggsound")
  for youtube_id, start, _, _, kind in VGGSOUND_ROWS:
    media.listed_file(root / "videos" / f"{youtube_id}_{start:06d}.mp4", kind)
  write_csv(root / "vggsound.csv", [row[:4] for row in VGGSOUND_ROWS])
  return root / "vggsound.csv", root / "videos"


def _prepare(listing, video_dir, data_dir, **kwargs):
  directory = dataset_writer.prepare(
    video_dir,
    data_dir,
    "listed",
    mel=media.MEL,
    listing=listing,
    num_workers=1,
    progress=False,
    log=lambda _: None,
    **kwargs,
  )
  return datasets.open_prepared(directory)


def _examples(dataset, split):
  source = dataset.source(split)
  return {example["id"].decode(): example for example in (source[i] for i in range(len(source)))}


def test_vggsound_list_every_row_used_or_skipped_by_reason(vggsound, tmp_path):
  list_path, videos = vggsound
  listing = annotations.read_lists([str(list_path)], videos, list_format="vggsound")
  dataset = _prepare(listing, videos, tmp_path)

  summary = dataset.summary
  good = [row for row in VGGSOUND_ROWS if row[4] == "good"]
  assert summary.kind == "list"
  assert summary.found == len(VGGSOUND_ROWS) == summary.good + len(summary.skipped)
  assert summary.good == len(good)
  expected = {
    f"vggsound.csv:{line} ({row[0]}_{row[1]:06d}.mp4)": SKIP_REASONS[row[4]]
    for line, row in enumerate(VGGSOUND_ROWS, 1)
    if row[4] != "good"
  }
  assert {name: reason for name, reason, _ in summary.skipped} == expected
  assert (
    "same as vggsound.csv:1"
    in dict((n, d) for n, _, d in summary.skipped)["vggsound.csv:8 (aaa_000000.mp4)"]
  )
  assert summary.clips == {"train": 2, "test": 1}
  assert f"Rows listed: {len(VGGSOUND_ROWS)} = 3 used + 5 skipped" in summary.format()

  assert dataset.label_names == ("cat, meowing", "dog barking")
  assert dataset.format_version == dataset_writer.FORMAT_VERSION and not dataset.multi_label
  by_split = {split: _examples(dataset, split) for split in ("train", "test")}
  assert sorted(by_split["train"]) + sorted(by_split["test"]) == [
    f"{y}_{s:06d}.mp4@0.000" for y, s, *_ in good
  ]
  for youtube_id, start, label, split, _ in good:
    example = by_split[split][f"{youtube_id}_{start:06d}.mp4@0.000"]
    assert dataset.label_names[example["label"]] == label
    assert example["labels"].tolist() == [dataset.label_names.index(label)]
    assert example["has_audio"]


def test_keep_audioless_keeps_the_row_marked_without_audio(vggsound, tmp_path):
  list_path, videos = vggsound
  listing = annotations.read_lists([str(list_path)], videos, list_format="vggsound")
  storage = dataset_writer.StorageSpec(keep_audioless=True)
  dataset = _prepare(listing, videos, tmp_path, storage=storage)

  example = _examples(dataset, "train")["fff_000000.mp4@0.000"]
  assert not example["has_audio"] and not example["audio"].any()
  assert dataset.summary.audioless_clips == {"train": 1}
  assert dataset.summary.good == 4
  assert "train: 1 of the clips have no audio" in dataset.summary.format()


def test_audioset_lists_with_comments_several_labels_splits_and_a_label_map(tmp_path):
  comments = [
    "# Segments csv created Sun Mar  5 10:54:31 2017",
    "# num_ytids=3, num_segs=3, num_unique_labels=3, num_positive_labels=4",
    "# YTID, start_seconds, end_seconds, positive_labels",
  ]
  train = [("aaa", "30.000", "40.000", "/m/dog,/m/bark"), ("bbb", "0.000", "10.000", "/m/cat")]
  test = [("ccc", "5.000", "15.000", "/m/bark")]
  for youtube_id, start, *_ in train + test:
    media.listed_file(tmp_path / "videos" / f"{youtube_id}_{float(start):06.0f}.mp4", "good")
  # AudioSet's spacing after commas, written by hand: csv.writer would quote differently.
  for name, rows in (("balanced_train_segments.csv", train), ("eval_segments.csv", test)):
    lines = comments + [f'{y}, {s}, {e}, "{labels}"' for y, s, e, labels in rows]
    (tmp_path / name).write_text("\n".join(lines) + "\n")
  write_csv(
    tmp_path / "class_labels_indices.csv",
    [(1, "/m/bark", "Bark"), (0, "/m/dog", "Dog"), (2, "/m/cat", "Cat")],
    header=("index", "mid", "display_name"),
  )
  lists = [
    f"train={tmp_path / 'balanced_train_segments.csv'}",
    f"test={tmp_path / 'eval_segments.csv'}",
  ]
  listing = annotations.read_lists(
    lists,
    tmp_path / "videos",
    list_format="audioset",
    label_map=tmp_path / "class_labels_indices.csv",
  )
  dataset = _prepare(listing, tmp_path / "videos", tmp_path / "data")

  assert dataset.label_names == ("/m/dog", "/m/bark", "/m/cat")  # the map's index order
  assert dataset.multi_label and dataset.multi_hot_classes == 3
  assert dataset.num_examples == {"train": 2, "test": 1}
  train_examples = _examples(dataset, "train")
  assert train_examples["aaa_000030.mp4@0.000"]["labels"].tolist() == [0, 1]
  assert train_examples["aaa_000030.mp4@0.000"]["label"] == -1  # several labels: no single one
  assert train_examples["bbb_000000.mp4@0.000"]["labels"].tolist() == [2]
  assert train_examples["bbb_000000.mp4@0.000"]["label"] == 2
  assert _examples(dataset, "test")["ccc_000005.mp4@0.000"]["labels"].tolist() == [1]

  (tmp_path / "small_map.txt").write_text("/m/dog\n/m/bark\n")
  with pytest.raises(annotations.ListError, match="balanced_train_segments.csv:5: label '/m/cat'"):
    annotations.read_lists(
      lists, tmp_path / "videos", list_format="audioset", label_map=tmp_path / "small_map.txt"
    )


def test_kinetics_header_and_a_template_over_the_split_as_listed(tmp_path):
  rows = [("abseiling", "k1", 10, 20, "train"), ("juggling", "k2", 0, 10, "val")]
  for _, youtube_id, start, end, split in rows:
    media.listed_file(
      tmp_path / "videos" / split / f"{youtube_id}_{start:06d}_{end:06d}.mp4", "good"
    )
  write_csv(
    tmp_path / "k400.csv", rows, header=("label", "youtube_id", "time_start", "time_end", "split")
  )
  listing = annotations.read_lists(
    [str(tmp_path / "k400.csv")],
    tmp_path / "videos",
    list_format="kinetics",
    path_template="{split}/{youtube_id}_{start:06.0f}_{end:06.0f}.mp4",
  )
  assert [(file.source, file.split, file.labels) for file in listing.files] == [
    ("train/k1_000010_000020.mp4", "train", ("abseiling",)),
    ("val/k2_000000_000010.mp4", "validation", ("juggling",)),
  ]
  dataset = _prepare(listing, tmp_path / "videos", tmp_path / "data")
  assert dataset.num_examples == {"train": 1, "validation": 1}


def _long_file(path):
  """6 s at 10 fps whose frame i shows `media.index_frame(i)`, with a tone."""
  media.write_video(path, num_frames=60, fps=10, audio=media.tone(6.0, 16000))


CUT_STORAGE = dataset_writer.StorageSpec(clip_seconds=1.0, stride_seconds=1.0, fps=10.0)


@pytest.fixture(scope="module")
def segments(tmp_path_factory):
  """(list, videos) of rows cutting segments out of one 6-s file, in a custom layout."""
  root = tmp_path_factory.mktemp("segments")
  _long_file(root / "videos" / "long.mp4")
  rows = [
    ("long", "0", "2", "a"),  # clips at 0 and 1
    ("long", "2.5", "4.5", "b"),  # clips at 2.5, 3.5
    ("long", "4.6", "6.4", "a"),  # ends past the file's 6 s: cut to it, one clip at 4.6
    ("long", "6.5", "8", "b"),  # starts after the file: skipped
    ("long", "1", "3", "a"),  # overlaps the first row: skipped
  ]
  write_csv(root / "segments.csv", rows, header=("file", "t0", "t1", "cls"))
  return root / "segments.csv", root / "videos"


def _segment_listing(list_path, videos):
  return annotations.read_lists(
    [f"test={list_path}"],
    videos,
    columns=annotations.parse_columns("youtube_id=file,start=t0,end=t1,label=cls"),
    cut_segments=True,
  )


def test_cut_segments_take_each_rows_window_out_of_the_longer_file(segments, tmp_path):
  dataset = _prepare(_segment_listing(*segments), segments[1], tmp_path, storage=CUT_STORAGE)

  examples = _examples(dataset, "test")
  assert sorted(examples) == [f"long.mp4@{start:.3f}" for start in (0, 1, 2.5, 3.5, 4.6)]
  for example_id, example in examples.items():
    start = float(example_id.split("@")[1])
    # The clip's first frame is the file's frame at its start (10 fps), its label its row's.
    assert media.frame_index(example["frames"][0]) == round(start * 10)
    assert example["start"] == pytest.approx(start)
    expected = "b" if 2.5 <= start < 4.5 else "a"
    assert dataset.label_names[example["label"]] == expected
  summary = dataset.summary
  assert summary.found == 5 and summary.good == 3
  assert summary.skipped_by_reason == {
    "segment outside the file": 1,
    "overlaps another row's segment": 1,
  }
  [(name, detail)] = summary.cut_short
  assert name == "segments.csv:4 (long.mp4)" and "cut to [4.6, 6.00)" in detail


def test_list_prepared_in_two_parts_equals_one_machine(segments, tmp_path):
  one = _prepare(_segment_listing(*segments), segments[1], tmp_path / "one", storage=CUT_STORAGE)
  for worker in (0, 1):
    parts.prepare_part(
      segments[1],
      tmp_path / "two",
      "listed",
      worker_index=worker,
      num_workers=2,
      listing=_segment_listing(*segments),
      storage=CUT_STORAGE,
      mel=media.MEL,
      processes=1,
      progress=False,
      log=lambda _: None,
    )
  merged = datasets.open_prepared(
    parts.merge_parts(tmp_path / "two", "listed", num_workers=2, log=lambda _: None)
  )
  assert merged.summary == one.summary and merged.label_names == one.label_names
  assert merged.multi_label == one.multi_label and merged.stored_stats == one.stored_stats
  ours, theirs = _examples(merged, "test"), _examples(one, "test")
  assert ours.keys() == theirs.keys()
  for example_id, example in theirs.items():
    for key, value in example.items():
      np.testing.assert_array_equal(ours[example_id][key], value, err_msg=f"{example_id} {key}")


def _bad_list(tmp_path, text: bytes | str, name="list.csv"):
  path = tmp_path / name
  (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
  return str(path)


@pytest.mark.parametrize(
  "case, list_text, options, message",
  [
    (
      "unknown column",
      "video,t0\nabc,0\n",
      dict(columns={"youtube_id": "video", "start": "start"}),
      r"list.csv: column 'start' \(for start\) is not in the header on line 1; the columns are "
      "video, t0",
    ),
    (
      "template field that does not exist",
      "abc,0,dog,train\n",
      dict(list_format="vggsound", path_template="{video_id}.mp4"),
      r"--path_template '\{video_id\}.mp4': field \{video_id\} does not exist; the fields are "
      r"\{youtube_id\}, \{start\}, \{end\}, \{label\}, \{split\}",
    ),
    (
      "template field the list does not have",
      "abc,0\n",
      dict(columns={"youtube_id": 0, "start": 1}, path_template="{youtube_id}_{end}.mp4"),
      r"uses \{end\}, but the list has no end column",
    ),
    (
      "template format that does not fit the value",
      "abc,0,dog,train\n",
      dict(list_format="vggsound", path_template="{youtube_id:d}.mp4"),
      r"list.csv:1: --path_template '\{youtube_id:d\}.mp4' cannot format this row",
    ),
    (
      "start after the end",
      '# YTID, start_seconds, end_seconds, positive_labels\nabc, 20.0, 10.0, "/m/a"\n',
      dict(list_format="audioset"),
      r"list.csv:2: start 20 s is not before end 10 s",
    ),
    (
      "a time that is not a number",
      "youtube_id,start_seconds,label,split\nabc,0,dog,train\n",
      dict(list_format="vggsound"),
      r"list.csv:1: start 'start_seconds' is not a number of seconds \(is the first line a header",
    ),
    (
      "tab-separated",
      "label\tyoutube_id\ttime_start\ttime_end\tsplit\ndog\tabc\t0\t10\ttrain\n",
      dict(list_format="kinetics"),
      r"list.csv: line 1 has no comma but 4 tab characters: the list must be comma-separated",
    ),
    (
      "semicolon-separated without a header",
      "abc;0;dog;train\n",
      dict(list_format="vggsound"),
      r"line 1 has no comma but 3 semicolon characters",
    ),
    (
      "too few columns",
      "abc,0,dog\n",
      dict(list_format="vggsound"),
      r"list.csv:1: 3 columns, the vggsound layout needs 4",
    ),
    (
      "latin-1 encoding",
      "abc,0,caf\xe9,train\n".encode("latin-1"),
      dict(list_format="vggsound"),
      r"list.csv is not UTF-8 text \(byte 0xe9 on line 1\): save it as UTF-8",
    ),
    (
      "UTF-16 encoding",
      "abc,0,dog,train\n".encode("utf-16"),
      dict(list_format="vggsound"),
      r"list.csv is UTF-16 text: save it as UTF-8",
    ),
    (
      "an unknown split",
      "abc,0,dog,holdout\n",
      dict(list_format="vggsound"),
      r"list.csv:1: split 'holdout' is not train, validation \(val\) or test",
    ),
    (
      "no youtube_id column",
      "a,b\n1,2\n",
      dict(columns={"start": "a"}),
      r"The list needs a youtube_id column",
    ),
    (
      "cut segments without an end",
      "abc,0\n",
      dict(columns={"youtube_id": 0, "start": 1}, cut_segments=True),
      r"--cut_segments needs an end column",
    ),
    ("an empty list", "# nothing\n", dict(list_format="audioset"), r"hold no row"),
  ],
)
def test_a_bad_list_is_one_clear_error(case, list_text, options, message, tmp_path):
  path = _bad_list(tmp_path, list_text)
  with pytest.raises(annotations.ListError, match=message):
    annotations.read_lists([path], tmp_path, **options)


def test_bad_column_options_and_label_maps(tmp_path):
  with pytest.raises(annotations.ListError, match="'video' is not a field; the fields are"):
    annotations.parse_columns("video=vid")
  with pytest.raises(annotations.ListError, match="item 'youtube_id' is not FIELD=COLUMN"):
    annotations.parse_columns("youtube_id")
  assert annotations.parse_columns("youtube_id=vid, start=2") == {"youtube_id": "vid", "start": 2}
  (tmp_path / "map.txt").write_text("dog\ncat\ndog\n")
  with pytest.raises(annotations.ListError, match="'dog' is listed twice"):
    annotations.read_label_map(tmp_path / "map.txt")
  with pytest.raises(annotations.ListError, match="does not exist"):
    annotations.read_lists([str(tmp_path / "absent.csv")], tmp_path, list_format="vggsound")


def test_rows_without_a_split_follow_the_hash_split_or_go_to_train(tmp_path):
  rows = "".join(f'v{i}, 0.0, 10.0, "/m/a"\n' for i in range(40))
  path = _bad_list(tmp_path, rows)
  plain = annotations.read_lists([path], tmp_path, list_format="audioset")
  assert {file.split for file in plain.files} == {"train"}
  hashed = annotations.read_lists(
    [path], tmp_path, list_format="audioset", hash_split={"train": 0.5, "test": 0.5}
  )
  again = annotations.read_lists(
    [path], tmp_path, list_format="audioset", hash_split={"train": 0.5, "test": 0.5}
  )
  assert hashed == again and {file.split for file in hashed.files} == {"train", "test"}


@pytest.mark.slow
def test_prepare_command_line_with_a_list(vggsound, tmp_path):
  list_path, videos = vggsound
  command = [
    sys.executable,
    "-m",
    "cmvt_jax.prepare",
    f"--list={list_path}",
    "--list_format=vggsound",
    f"--video_dir={videos}",
    f"--data_dir={tmp_path}",
    "--name=vgg",
    "--num_workers=1",
  ]
  run = lambda *extra: subprocess.run(
    command + list(extra),
    cwd=helpers.REPO,
    env=helpers.environment(),
    capture_output=True,
    text=True,
    timeout=300,
  )
  result = run()
  assert result.returncode == 0, result.stderr
  assert "Rows listed: 8 = 3 used + 5 skipped" in result.stdout
  assert "(2 classes)" in result.stdout
  assert "vggsound.csv:4 (ddd_000000.mp4): missing" in result.stdout

  bad = run("--path_template={video}.mp4", "--name=other")
  assert bad.returncode == 1
  [line] = bad.stderr.strip().splitlines()
  assert line.startswith("prepare: ListError: --path_template '{video}.mp4': field {video}")
