"""Annotation lists: the CSV files public audio-visual datasets publish, read as a `Listing`.

Every row names one segment of a video by canonical fields:
  youtube_id   the video's id (or any name the path template turns into a file name)
  start, end   seconds (float); a list without an end column gives `start + clip length`
               when the format knows it (VGGSound's clips are 10 s), else no end
  label        one label, or several (AudioSet: a quoted, comma-separated list of MIDs)
  split        train, validation (also written val or valid) or test

Formats (`list_format`), with the columns each maps:
  vggsound   no header; columns youtube_id, start_seconds, label, split; end = start + 10
  audioset   `#` comment lines (its header, `# YTID, start_seconds, end_seconds,
             positive_labels`, is one); columns YTID, start_seconds, end_seconds,
             positive_labels (several labels per row); no split column: name the split of
             each list file (`train=balanced_train_segments.csv`)
  kinetics   header `label, youtube_id, time_start, time_end, split`
Any other list: `columns` maps canonical fields to header names (or to 0-based positions in
a list without a header); it also overrides single columns of a named format.

The file of a row is `VIDEO_DIR / path_template.format(**row)`, the template a Python format
string over the canonical fields as listed (times as floats; `split` and `label` as written,
e.g. Kinetics' `val`). Defaults: `{youtube_id}_{start:06.0f}.mp4` (the VGGSound downloader's
layout; also used for AudioSet, which has no single downloader), Kinetics'
`{youtube_id}_{start:06.0f}_{end:06.0f}.mp4`, `{youtube_id}.mp4` for other lists.

By default each listed file is the segment (the public downloaders save pre-cut clips; the
times only name it); with `cut_segments` the rows' [start, end) are cut out of longer files.
A row's split: its list's `SPLIT=` prefix, else its split column, else `hash_split` (by a
hash of the file's path), else train.

Problems with the list itself stop the preparation with one line naming the file, line and
value (an unknown column or template field, a label outside the label map, a start after the
end, a wrong delimiter or encoding). Problems of single rows are counted and named in the
summary instead: a missing, unreadable, empty, audioless or too short file (found when
decoding), a row listed twice, a segment overlapping another row's in the same file.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import os
import string
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

from etils import epath

from cmvt_jax.data import dataset_writer

FIELDS = ("youtube_id", "start", "end", "label", "split")
# Split names as lists write them -> the dataset's split.
_SPLIT_NAMES = {
  "train": "train",
  "training": "train",
  "validation": "validation",
  "val": "validation",
  "valid": "validation",
  "test": "test",
  "testing": "test",
}


@dataclasses.dataclass(frozen=True)
class ListFormat:
  """How a published list lays out its rows.

  Attributes:
    name: what `--list_format` calls it.
    columns: canonical field -> header name (with `header`) or 0-based position.
    header: the first line that is not a comment names the columns.
    path_template: the default `--path_template`.
    multi_label: the label column holds several comma-separated labels.
    comment: lines starting with it are skipped (None: none are).
    segment_seconds: end = start + this for a list without an end column.
  """

  name: str
  columns: Mapping[str, str | int]
  header: bool
  path_template: str
  multi_label: bool = False
  comment: str | None = None
  segment_seconds: float | None = None


FORMATS = {
  "vggsound": ListFormat(
    "vggsound",
    {"youtube_id": 0, "start": 1, "label": 2, "split": 3},
    header=False,
    path_template="{youtube_id}_{start:06.0f}.mp4",
    segment_seconds=10.0,
  ),
  "audioset": ListFormat(
    "audioset",
    {"youtube_id": 0, "start": 1, "end": 2, "label": 3},
    header=False,
    path_template="{youtube_id}_{start:06.0f}.mp4",
    multi_label=True,
    comment="#",
  ),
  "kinetics": ListFormat(
    "kinetics",
    {
      "label": "label",
      "youtube_id": "youtube_id",
      "start": "time_start",
      "end": "time_end",
      "split": "split",
    },
    header=True,
    path_template="{youtube_id}_{start:06.0f}_{end:06.0f}.mp4",
  ),
}
_CUSTOM_TEMPLATE = "{youtube_id}.mp4"


class ListError(ValueError):
  """The annotation list (or its options) cannot be read as asked; the message says why."""


@dataclasses.dataclass(frozen=True)
class _Row:
  """One data row: where it is, its fields as listed and its labels."""

  where: str  # FILE:LINE
  fields: dict[str, Any]  # canonical field -> value (times as floats, absent fields None)
  labels: tuple[str, ...]


def parse_columns(text: str) -> dict[str, str | int]:
  """'youtube_id=video,start=2' -> {'youtube_id': 'video', 'start': 2} (digits: a position)."""
  columns = {}
  for item in filter(None, (part.strip() for part in text.split(","))):
    field, sep, column = (piece.strip() for piece in item.partition("="))
    if not sep or not column:
      raise ListError(f"--columns item {item!r} is not FIELD=COLUMN (e.g. youtube_id=video_id).")
    if field not in FIELDS:
      raise ListError(f"--columns: {field!r} is not a field; the fields are {', '.join(FIELDS)}.")
    columns[field] = int(column) if column.isdigit() else column
  return columns


def parse_list_argument(argument: str) -> tuple[str | None, str]:
  """'test=eval_segments.csv' -> ('test', 'eval_segments.csv'); 'a.csv' -> (None, 'a.csv')."""
  split, sep, path = argument.partition("=")
  if sep and split in dataset_writer.SPLITS:
    return split, path
  return None, argument


def read_label_map(path: epath.PathLike) -> list[str]:
  """Class names in order: one per line, or AudioSet's `class_labels_indices.csv` (its `mid`
  column, in `index` order)."""
  lines = _decode(epath.Path(path)).splitlines()
  header = next(csv.reader(lines[:1], skipinitialspace=True), [])
  if "mid" in header:
    rows = list(csv.DictReader(lines, skipinitialspace=True))
    if "index" in header:
      rows.sort(key=lambda row: int(row["index"]))
    names = [row["mid"].strip() for row in rows]
  else:
    names = [line.strip() for line in lines if line.strip()]
  duplicates = sorted(name for name, count in collections.Counter(names).items() if count > 1)
  if not names or duplicates:
    raise ListError(
      f"--label_map {path}: "
      + (f"{duplicates[0]!r} is listed twice" if duplicates else "it holds no label")
      + "; give one label per line (or AudioSet's class_labels_indices.csv)."
    )
  return names


def read_lists(
  lists: Sequence[str],
  video_dir: epath.PathLike,
  *,
  list_format: str | None = None,
  columns: Mapping[str, str | int] | None = None,
  path_template: str | None = None,
  cut_segments: bool = False,
  label_map: epath.PathLike | None = None,
  hash_split: Mapping[str, float] | None = None,
  unlabelled: bool = False,
) -> dataset_writer.Listing:
  """The rows of annotation lists as the entries to prepare (see the module docstring).

  Args:
    lists: list files, each `FILE` or `SPLIT=FILE` (its rows go to SPLIT).
    video_dir: the folder the path template is relative to.
    list_format: 'vggsound', 'audioset', 'kinetics', or None (then `columns` says it all).
    columns: canonical field -> column, over the format's mapping.
    path_template: the file of a row (default: the format's).
    cut_segments: cut each row's [start, end) out of its file instead of taking the whole
      file as the segment.
    label_map: a file of class names (`read_label_map`); a listed label outside it is an
      error. Default: the labels the lists name, sorted.
    hash_split: split rows that have no split by a hash of their file's path.
    unlabelled: ignore the labels.

  Raises:
    ListError: the lists or the options are unusable (the message names file, line, value).
  """
  if hash_split is not None:
    dataset_writer.check_hash_split(hash_split)
  if list_format is not None and list_format not in FORMATS:
    raise ListError(f"--list_format {list_format!r} is not one of {', '.join(FORMATS)}.")
  base = FORMATS.get(list_format) or ListFormat(
    "custom", {}, header=False, path_template=_CUSTOM_TEMPLATE
  )
  mapping = {**base.columns, **(columns or {})}
  if "youtube_id" not in mapping:
    raise ListError(
      "The list needs a youtube_id column: choose --list_format "
      f"({', '.join(FORMATS)}) or map it with --columns youtube_id=COLUMN."
    )
  # Named columns need a header line; all-positional ones read every line as data.
  fmt = dataclasses.replace(
    base, columns=mapping, header=any(isinstance(c, str) for c in mapping.values())
  )
  template = path_template or fmt.path_template
  has_end = "end" in mapping or fmt.segment_seconds is not None
  _check_template(template, has_end)
  if cut_segments and not {"start"} <= mapping.keys():
    raise ListError("--cut_segments needs start and end columns (map them with --columns).")
  if cut_segments and not has_end:
    raise ListError("--cut_segments needs an end column (map it with --columns end=COLUMN).")
  rows = []
  for argument in lists:
    split, path = parse_list_argument(argument)
    rows += [(split, row) for row in _read_rows(epath.Path(path), fmt)]
  if not rows:
    raise ListError(f"The lists {', '.join(lists)} hold no row.")
  label_names = [] if unlabelled else read_label_map(label_map) if label_map else _labels_seen(rows)
  known = set(label_names)
  entries, seen, segments = [], {}, {}
  for list_split, row in rows:
    unknown = [label for label in row.labels if label not in known]
    if unknown and not unlabelled:
      raise ListError(
        f"{row.where}: label {unknown[0]!r} is not in the label map {label_map} "
        f"({len(label_names)} labels): give a label map that holds it."
      )
    source = _source(template, row)
    entry = dataset_writer.VideoFile(
      path=os.fspath(epath.Path(video_dir) / source),
      source=source,
      split=_split(row, list_split, source, hash_split),
      labels=() if unlabelled else tuple(sorted(set(row.labels))),
      segment=(row.fields["start"], row.fields["end"]) if cut_segments else None,
      row=row.where,
    )
    entries.append(_refused(entry, seen, segments))
  return dataset_writer.Listing(
    files=entries,
    label_names=label_names,
    multi_label=fmt.multi_label and not unlabelled,
    kind="list",
  )


def _check_template(template: str, has_end: bool) -> None:
  try:
    names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
  except ValueError as error:
    raise ListError(f"--path_template {template!r} is not a format string ({error}).") from error
  for name in names:
    field = name.split(".")[0].split("[")[0]
    if field not in FIELDS:
      raise ListError(
        f"--path_template {template!r}: field {{{name}}} does not exist; the fields are "
        + ", ".join(f"{{{f}}}" for f in FIELDS)
        + "."
      )
    if field == "end" and not has_end:
      raise ListError(
        f"--path_template {template!r} uses {{end}}, but the list has no end column "
        "(map one with --columns end=COLUMN)."
      )
  if not names:
    raise ListError(
      f"--path_template {template!r} names no field: every row would be the same file."
    )


def _decode(path: epath.Path) -> str:
  """The text of a list file: UTF-8 (a byte-order mark is fine), or a clear error."""
  try:
    data = path.read_bytes()
  except FileNotFoundError as error:
    raise ListError(f"The list {path} does not exist.") from error
  if data.startswith((b"\xff\xfe", b"\xfe\xff")):
    raise ListError(f"{path} is UTF-16 text: save it as UTF-8 (or plain ASCII) CSV.")
  try:
    return data.decode("utf-8-sig")
  except UnicodeDecodeError as error:
    line = data[: error.start].count(b"\n") + 1
    raise ListError(
      f"{path} is not UTF-8 text (byte 0x{data[error.start]:02x} on line {line}): save it as UTF-8."
    ) from error


def _read_rows(path: epath.Path, fmt: ListFormat) -> list[_Row]:
  """Every data row of one list file, its fields parsed (times as floats)."""
  text = _decode(path)
  lines = [
    (number, line)
    for number, line in enumerate(text.splitlines(), 1)
    if line.strip() and not (fmt.comment and line.lstrip().startswith(fmt.comment))
  ]
  records = csv.reader((line for _, line in lines), skipinitialspace=True)
  numbered = [
    (number, [cell.strip() for cell in cells]) for (number, _), cells in zip(lines, records)
  ]
  positions = dict(fmt.columns)
  if fmt.header and numbered:
    header_line, header = numbered.pop(0)
    _check_delimiter(path, header_line, lines, header, len(fmt.columns))
    for field, column in fmt.columns.items():
      if isinstance(column, str):
        if column not in header:
          raise ListError(
            f"{path}: column {column!r} (for {field}) is not in the header on line "
            f"{header_line}; the columns are {', '.join(header)}."
          )
        positions[field] = header.index(column)
  width = max(positions.values()) + 1
  rows = []
  for number, cells in numbered:
    where = f"{path.name}:{number}"
    if len(cells) < width:
      _check_delimiter(path, number, lines, cells, width)
      raise ListError(
        f"{where}: {len(cells)} columns, the {fmt.name} layout needs {width} "
        f"({', '.join(f'{f}={c}' for f, c in fmt.columns.items())})."
      )
    fields = {field: cells[position] for field, position in positions.items()}
    rows.append(_row(where, fields, fmt))
  return rows


def _check_delimiter(path, number: int, lines, cells: Sequence[str], expected: int) -> None:
  """Names the delimiter when a line that should have several columns has one."""
  if len(cells) > 1 or expected <= 1:
    return
  line = dict(lines)[number]
  for name, delimiter in (("tab", "\t"), ("semicolon", ";"), ("|", "|")):
    if delimiter in line:
      raise ListError(
        f"{path}: line {number} has no comma but {line.count(delimiter)} {name} characters: "
        "the list must be comma-separated; convert it (or save it as CSV)."
      )


def _row(where: str, fields: dict[str, str], fmt: ListFormat) -> _Row:
  """A row's values: times as floats, checked; labels split when the format has several."""
  if not fields["youtube_id"]:
    raise ListError(f"{where}: the youtube_id column is empty.")
  values: dict[str, Any] = {field: fields.get(field) for field in FIELDS}
  for field in ("start", "end"):
    if fields.get(field) is None:
      continue
    try:
      values[field] = float(fields[field])
    except ValueError:
      raise ListError(
        f"{where}: {field} {fields[field]!r} is not a number of seconds"
        + (" (is the first line a header? name the columns by it)" if not fmt.header else "")
        + "."
      ) from None
  if values["start"] is None:
    values["start"] = 0.0
  if values["start"] < 0:
    raise ListError(f"{where}: start {values['start']:g} s is negative.")
  if values["end"] is None and fmt.segment_seconds is not None:
    values["end"] = values["start"] + fmt.segment_seconds
  if values["end"] is not None and values["start"] >= values["end"]:
    raise ListError(f"{where}: start {values['start']:g} s is not before end {values['end']:g} s.")
  label = fields.get("label") or ""
  labels = label.split(",") if fmt.multi_label else [label]
  return _Row(where, values, tuple(item.strip() for item in labels if item.strip()))


def _labels_seen(rows: Sequence[tuple[str | None, _Row]]) -> list[str]:
  return sorted({label for _, row in rows for label in row.labels})


def _source(template: str, row: _Row) -> str:
  try:
    relative = template.format(**row.fields)
  except (ValueError, TypeError, KeyError, IndexError, AttributeError) as error:
    raise ListError(
      f"{row.where}: --path_template {template!r} cannot format this row "
      f"({type(error).__name__}: {error}); fields: {row.fields}."
    ) from error
  return dataset_writer.printable(relative.replace(os.sep, "/").lstrip("/"))


def _split(
  row: _Row, list_split: str | None, source: str, hash_split: Mapping[str, float] | None
) -> str:
  if list_split is not None:
    return list_split
  written = row.fields["split"]
  if written:
    if written.lower() not in _SPLIT_NAMES:
      raise ListError(
        f"{row.where}: split {written!r} is not train, validation (val) or test; "
        "give the list's split as SPLIT=FILE instead."
      )
    return _SPLIT_NAMES[written.lower()]
  if hash_split is not None:
    return dataset_writer.hash_assign(source, hash_split)
  return "train"


def _refused(
  entry: dataset_writer.VideoFile,
  seen: dict[tuple, str],
  segments: dict[str, list[tuple[float, float, str]]],
) -> dataset_writer.VideoFile:
  """`entry`, marked skipped when an earlier row already takes its file or segment.

  `seen` maps (source, segment) to the first row naming it; `segments` a file's cut
  segments so far (overlapping segments would give the same clips twice).
  """
  key = (entry.source, entry.segment)
  if key in seen:
    return dataclasses.replace(
      entry, skip_reason="listed twice", skip_detail=f"the same as {seen[key]}"
    )
  seen[key] = entry.row
  if entry.segment is not None:
    start, end = entry.segment
    for other_start, other_end, other_row in segments.get(entry.source, ()):
      if start < other_end and other_start < end:
        return dataclasses.replace(
          entry,
          skip_reason="overlaps another row's segment",
          skip_detail=f"[{start:g}, {end:g}) s overlaps [{other_start:g}, {other_end:g}) s "
          f"of {other_row}",
        )
    segments.setdefault(entry.source, []).append((start, end, entry.row))
  return entry
