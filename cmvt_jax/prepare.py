"""Prepares a folder of videos, or an annotation list, as a TFDS ArrayRecord dataset of clips.

  python -m cmvt_jax.prepare --video_dir DIR --data_dir DIR --name NAME \
      [--clip_seconds 2] [--stride_seconds 2] [--fps 8] [--short_side 32] \
      [--sample_rate 16000] [--keep_audioless] [--hash_split train=0.8,test=0.2] \
      [--unlabelled] [--num_workers N]

  python -m cmvt_jax.prepare --list FILE.csv --video_dir ROOT --data_dir DIR --name NAME \
      [--list_format vggsound|audioset|kinetics] [--columns NAME=COLUMN,...] \
      [--path_template TEMPLATE] [--cut_segments] [--label_map FILE] [storage flags]

A folder: `SPLIT/CLASS/*.mp4` (labels from the class folders), `CLASS/*.mp4` with
--hash_split, or any folder without class folders (nested or flat, unlabelled; --unlabelled
says so for a nested one). An annotation list (see `cmvt_jax.data.annotations`): each row a
file under ROOT named by --path_template (a Python format string over the fields
youtube_id, start, end, label, split), or with --cut_segments a segment of one; `--list` may
be repeated, each `FILE` or `SPLIT=FILE`.

Writes `DATA_DIR/NAME/VERSION/` (see `cmvt_jax.data.dataset_writer`); train on it with
`--config.dataset.name=NAME --config.dataset.data_dir=DATA_DIR`. Storage and log-mel defaults
match `configs/default.py`; the input pipeline resamples to whatever a config asks.

On many machines (see `cmvt_jax.data.parts`), run on each machine I of N

  python -m cmvt_jax.prepare --video_dir DIR --data_dir DIR --name NAME --num_workers N \
      --worker_index I [storage flags, the same everywhere]

then once, anywhere, `python -m cmvt_jax.prepare --data_dir DIR --name NAME --num_workers N
--merge`. DATA_DIR may be a `gs://` folder (the video folder too).
"""

import sys
from collections.abc import Sequence

from absl import app
from absl import flags

from cmvt_jax import files
from cmvt_jax.data import annotations
from cmvt_jax.data import dataset_writer
from cmvt_jax.data import parts
from cmvt_jax.data import spectrogram

_VIDEO_DIR = flags.DEFINE_string(
  "video_dir",
  None,
  "Folder of videos: SPLIT/CLASS/*.mp4 (or CLASS/*.mp4 with --hash_split, or any folder "
  "without class folders); with --list, the folder the path template is relative to. "
  "Needed except with --merge.",
)
_LIST = flags.DEFINE_multi_string(
  "list",
  [],
  "An annotation list (CSV) naming the files to prepare, FILE or SPLIT=FILE (its rows go "
  "to SPLIT); repeat for several.",
)
_LIST_FORMAT = flags.DEFINE_enum(
  "list_format",
  None,
  list(annotations.FORMATS),
  "The list's layout: vggsound (youtube_id, start_seconds, label, split; no header), "
  "audioset (YTID, start_seconds, end_seconds, positive_labels; # comments), kinetics "
  "(header label, youtube_id, time_start, time_end, split). Other lists: --columns.",
)
_COLUMNS = flags.DEFINE_string(
  "columns",
  None,
  "FIELD=COLUMN,... mapping the fields youtube_id, start, end, label, split to the list's "
  "header names (or 0-based positions in a list without a header); overrides single "
  "columns of --list_format.",
)
_PATH_TEMPLATE = flags.DEFINE_string(
  "path_template",
  None,
  "Each row's file relative to --video_dir, a Python format string over youtube_id, start, "
  "end (seconds, float), label, split; default per format, e.g. VGGSound's "
  "'{youtube_id}_{start:06.0f}.mp4'.",
)
_CUT_SEGMENTS = flags.DEFINE_bool(
  "cut_segments",
  False,
  "Cut each row's [start, end) out of its (longer) file; by default the listed file is "
  "the segment itself.",
)
_LABEL_MAP = flags.DEFINE_string(
  "label_map",
  None,
  "The classes, one per line (or AudioSet's class_labels_indices.csv); a listed label "
  "outside it is an error. Default: the labels the list names.",
)
_UNLABELLED = flags.DEFINE_bool(
  "unlabelled",
  False,
  "Prepare without labels: every video file under --video_dir, nested or flat (folders "
  "without class folders are unlabelled anyway); with --list, ignore its labels.",
)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data folder to write into.", required=True)
_NAME = flags.DEFINE_string("name", None, "Dataset name (a lower-case identifier).", required=True)
_CLIP_SECONDS = flags.DEFINE_float("clip_seconds", 2.0, "Clip length in seconds.")
_STRIDE_SECONDS = flags.DEFINE_float(
  "stride_seconds",
  None,
  "Seconds between clip starts (default: --clip_seconds, i.e. back-to-back clips).",
)
_FPS = flags.DEFINE_float("fps", 8.0, "Stored frames per second.")
_SHORT_SIDE = flags.DEFINE_integer("short_side", 32, "Stored frames' short side in pixels.")
_SAMPLE_RATE = flags.DEFINE_integer("sample_rate", 16000, "Stored audio sample rate.")
_KEEP_AUDIOLESS = flags.DEFINE_bool(
  "keep_audioless",
  False,
  "Keep videos without audio, marked audioless (has_audio=False: training leaves them out "
  "of the cross-modal loss, evaluation out of retrieval) instead of skipping them.",
)
_HASH_SPLIT = flags.DEFINE_string(
  "hash_split",
  None,
  "Split by a hash of each file's path instead of by top-level split "
  'folders, e.g. "train=0.8,validation=0.1,test=0.1"; labels are then the top-level '
  "folders.",
)
_NUM_WORKERS = flags.DEFINE_integer(
  "num_workers",
  0,
  "Workers the video files are split among. Without --worker_index they "
  "all run here, as processes (0: one per core); with --worker_index, this run is one of "
  "them (decoding with one process per core) and --merge joins their parts.",
)
_WORKER_INDEX = flags.DEFINE_integer(
  "worker_index",
  None,
  "This run is worker I of --num_workers: it decodes files I, I+N, ... "
  "and writes them as a part of the dataset.",
)
_MERGE = flags.DEFINE_bool(
  "merge",
  False,
  "Join the parts of all --num_workers workers into the dataset (once every worker has finished).",
)
_N_FFT = flags.DEFINE_integer("n_fft", 1024, "Log-mel FFT size (for the stored statistics).")
_HOP_LENGTH = flags.DEFINE_integer("hop_length", 500, "Log-mel hop in samples.")
_N_MELS = flags.DEFINE_integer("n_mels", 32, "Mel bins.")
_FMIN = flags.DEFINE_float("fmin", 60.0, "Lowest mel frequency (Hz).")
_FMAX = flags.DEFINE_float("fmax", 7800.0, "Highest mel frequency (Hz).")


def parse_hash_split(text: str) -> dict[str, float]:
  """'train=0.8,test=0.2' -> {'train': 0.8, 'test': 0.2}."""
  fractions = {}
  for item in text.split(","):
    split, sep, fraction = item.partition("=")
    try:
      fractions[split.strip()] = float(fraction)
    except ValueError:
      sep = ""
    if not sep:
      raise app.UsageError(
        f"--hash_split item {item!r} is not SPLIT=FRACTION (e.g. "
        '"train=0.8,validation=0.1,test=0.1").'
      )
  return fractions


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  try:
    _run()
  except (ValueError, FileNotFoundError, files.DiskFullError) as error:
    # The message names the problem and what to do; a traceback would only bury it.
    sys.stderr.write(f"prepare: {type(error).__name__}: {error}\n")
    sys.exit(1)


def _run() -> None:
  worker_index, num_workers = _WORKER_INDEX.value, _NUM_WORKERS.value
  if _MERGE.value:
    if worker_index is not None or num_workers < 1:
      raise app.UsageError(
        "--merge takes --num_workers N (the workers whose parts it joins) and no --worker_index."
      )
    parts.merge_parts(_DATA_DIR.value, _NAME.value, num_workers=num_workers)
    return
  if _VIDEO_DIR.value is None:
    raise app.UsageError(
      "--video_dir is required (except with --merge): the folder of videos, or with --list "
      "the folder the list's files are under."
    )
  list_only = ("list_format", "columns", "path_template", "cut_segments", "label_map")
  given = [name for name in list_only if flags.FLAGS[name].value]
  if given and not _LIST.value:
    raise app.UsageError(f"--{given[0]} describes an annotation list: give it with --list FILE.")
  if worker_index is not None and not 0 <= worker_index < num_workers:
    raise app.UsageError(
      f"--worker_index={worker_index} needs --num_workers N with "
      f"0 <= worker_index < N; got --num_workers={num_workers}."
    )
  storage = dataset_writer.StorageSpec(
    clip_seconds=_CLIP_SECONDS.value,
    stride_seconds=_STRIDE_SECONDS.value or _CLIP_SECONDS.value,
    fps=_FPS.value,
    short_side=_SHORT_SIDE.value,
    sample_rate=_SAMPLE_RATE.value,
    keep_audioless=_KEEP_AUDIOLESS.value,
  )
  mel = spectrogram.MelSettings(
    sample_rate=_SAMPLE_RATE.value,
    n_fft=_N_FFT.value,
    hop_length=_HOP_LENGTH.value,
    n_mels=_N_MELS.value,
    fmin=_FMIN.value,
    fmax=_FMAX.value,
  )
  hash_split = parse_hash_split(_HASH_SPLIT.value) if _HASH_SPLIT.value else None
  settings = dict(storage=storage, mel=mel, hash_split=hash_split, unlabelled=_UNLABELLED.value)
  if _LIST.value:
    settings["listing"] = annotations.read_lists(
      _LIST.value,
      _VIDEO_DIR.value,
      list_format=_LIST_FORMAT.value,
      columns=annotations.parse_columns(_COLUMNS.value or ""),
      path_template=_PATH_TEMPLATE.value,
      cut_segments=_CUT_SEGMENTS.value,
      label_map=_LABEL_MAP.value,
      hash_split=hash_split,
      unlabelled=_UNLABELLED.value,
    )
  if worker_index is not None:
    parts.prepare_part(
      _VIDEO_DIR.value,
      _DATA_DIR.value,
      _NAME.value,
      worker_index=worker_index,
      num_workers=num_workers,
      **settings,
    )
  elif "://" in _DATA_DIR.value:
    # ArrayRecord files are written with open(): write locally, then copy up (one part).
    parts.prepare_part(
      _VIDEO_DIR.value,
      _DATA_DIR.value,
      _NAME.value,
      worker_index=0,
      num_workers=1,
      processes=num_workers,
      **settings,
    )
    parts.merge_parts(_DATA_DIR.value, _NAME.value, num_workers=1)
  else:
    dataset_writer.prepare(
      _VIDEO_DIR.value, _DATA_DIR.value, _NAME.value, num_workers=num_workers, **settings
    )


if __name__ == "__main__":
  app.run(main)
