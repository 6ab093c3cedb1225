"""Opening prepared datasets; making the default synthetic dataset on first use.

`open_from_config(config.dataset, config.input, process_index=...)` is what the trainer calls:
  * `dataset.name == 'cmvt_synthetic'`: the generated dataset, made once under
    `DATA_DIR/cmvt_synthetic-<settings hash>/` (generation + `prepare`, by process 0 only; the
    other processes wait until it is complete). A change of the generator or storage settings
    gives a new hash and so a new dataset; an unchanged one is reused.
  * any other name: `DATA_DIR/NAME/VERSION/` written by `python -m cmvt_jax.prepare`.
DATA_DIR is `dataset.data_dir`, or the cache folder `default_data_dir()` when unset.

`open_mixture` opens the datasets of `dataset.mixture` (training draws from them by weight);
`mixture_stats` gives the normalisation statistics of that mixture.

Datasets of every format version `prepare` has written are read (`dataset_writer`'s
docstring); a newer one is refused with what to do.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import tensorflow_datasets as tfds
from etils import epath

from cmvt_jax.data import dataset_writer
from cmvt_jax.data import normalization
from cmvt_jax.data import spectrogram
from cmvt_jax.data import synthetic

SYNTHETIC_NAME = "cmvt_synthetic"
# Examples read to recompute normalisation statistics for other log-mel settings.
_STATS_EXAMPLES = 512


def default_data_dir() -> epath.Path:
  """The cache folder: `$XDG_CACHE_HOME/cmvt_jax`, by default `~/.cache/cmvt_jax`."""
  cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return epath.Path(cache) / "cmvt_jax"


def storage_from_config(dataset_config) -> dataset_writer.StorageSpec:
  """The storage settings of the config's `dataset` section."""
  return dataset_writer.StorageSpec(
    clip_seconds=float(dataset_config.clip_seconds),
    stride_seconds=float(dataset_config.stride_seconds),
    fps=float(dataset_config.fps),
    short_side=int(dataset_config.short_side),
    sample_rate=int(dataset_config.sample_rate),
    keep_audioless=bool(dataset_config.keep_audioless),
  )


@dataclasses.dataclass(frozen=True)
class PreparedDataset:
  """A dataset written by `prepare`, opened for reading.

  Attributes:
    directory: `DATA_DIR/NAME/VERSION`.
    label_names: class names; label i is `label_names[i]`; () when unlabelled.
    num_examples: clips per split.
    storage: how its clips were cut and stored.
    stored_stats: normalisation statistics of its train split (None without a train split).
    summary: the preparation's report.
    format_version: the layout it was written in (`dataset_writer.FORMAT_VERSION` now).
    multi_label: a clip may have several labels (then `labels` carries them all).
  """

  directory: epath.Path
  label_names: tuple[str, ...]
  num_examples: dict[str, int]
  storage: dataset_writer.StorageSpec
  stored_stats: normalization.NormalizationStats | None
  summary: dataset_writer.PrepareSummary
  format_version: int = dataset_writer.FORMAT_VERSION
  multi_label: bool = False

  @property
  def labelled(self) -> bool:
    """Whether its clips carry classes to evaluate (two or more of them)."""
    return len(self.label_names) > 1

  @property
  def multi_hot_classes(self) -> int:
    """C for multi-label data (the pipeline's `labels` `[B, C]`), else 0."""
    return len(self.label_names) if self.multi_label else 0

  def audio_fraction(self, split: str) -> float:
    """The fraction of `split`'s clips that have audio."""
    clips = self.summary.clips.get(split, 0)
    return 1.0 - self.summary.audioless_clips.get(split, 0) / clips if clips else 0.0

  def source(self, split: str) -> Sequence[dict[str, Any]]:
    """Random-access source of `split` for grain (pickles into worker processes).

    Examples are dicts of numpy arrays and Python scalars; text fields are bytes.
    """
    if split not in self.num_examples:
      raise ValueError(
        f"Split {split!r} is not in the dataset at {self.directory}; it has "
        f"{', '.join(self.num_examples)}."
      )
    return tfds.builder_from_directory(os.fspath(self.directory)).as_data_source(split)

  def normalization_stats(
    self, mel: spectrogram.MelSettings, log: Callable[[str], None] = print
  ) -> normalization.NormalizationStats:
    """The stored statistics; recomputed from train examples when `mel` differs from theirs."""
    if self.stored_stats is not None and self.stored_stats.mel == mel:
      return self.stored_stats
    if "train" not in self.num_examples:
      raise ValueError(
        f"The dataset at {self.directory} has no train split to compute normalisation "
        "statistics from; take them from the checkpoint of the model that uses them."
      )
    source = self.source("train")
    count = min(len(source), _STATS_EXAMPLES)
    log(
      f"Log-mel settings {mel} differ from those of the statistics stored with "
      f"{self.directory}; computing statistics from {count} train examples."
    )
    return normalization.compute_stats(
      (source[i] for i in range(count)), mel, self.storage.sample_rate
    )


def open_prepared(directory: epath.PathLike) -> PreparedDataset:
  """Opens `DATA_DIR/NAME/VERSION`; raises FileNotFoundError when it is not a dataset."""
  directory = epath.Path(directory)
  if not dataset_writer.is_prepared(directory):
    raise FileNotFoundError(
      f"No prepared dataset at {directory}: prepare one with `python -m cmvt_jax.prepare "
      "--video_dir DIR --data_dir DATA_DIR --name NAME`."
    )
  info = tfds.builder_from_directory(os.fspath(directory)).info
  metadata = info.metadata or {}
  if dataset_writer.STORAGE_KEY not in metadata:
    raise ValueError(
      f"{directory} is a TFDS dataset but was not written by cmvt_jax.prepare "
      f"(its metadata.json has no {dataset_writer.STORAGE_KEY!r})."
    )
  # Format 1 had no format record: single-label clips, no `labels` feature.
  layout = metadata.get(dataset_writer.FORMAT_KEY, {"version": 1, "multi_label": False})
  if layout["version"] > dataset_writer.FORMAT_VERSION:
    raise ValueError(
      f"{directory} was written by a newer cmvt_jax (dataset format {layout['version']}; this "
      f"one reads up to {dataset_writer.FORMAT_VERSION}): upgrade cmvt_jax, or prepare it "
      "again with this one (python -m cmvt_jax.prepare ... into another --data_dir)."
    )
  stats = metadata.get(dataset_writer.NORMALIZATION_KEY)
  return PreparedDataset(
    directory=directory,
    label_names=tuple(info.features["label"].names),
    num_examples={split: info.splits[split].num_examples for split in info.splits},
    storage=dataset_writer.StorageSpec(**metadata[dataset_writer.STORAGE_KEY]),
    stored_stats=normalization.NormalizationStats.from_dict(stats) if stats else None,
    summary=dataset_writer.PrepareSummary.from_dict(metadata[dataset_writer.SUMMARY_KEY]),
    format_version=int(layout["version"]),
    multi_label=bool(layout["multi_label"]),
  )


def synthetic_dataset_dir(dataset_config) -> epath.Path:
  """Where the synthetic dataset of these settings lives (whether made yet or not)."""
  spec = synthetic.SyntheticSpec.from_config(dataset_config.synthetic)
  storage = storage_from_config(dataset_config)
  settings = json.dumps([dataclasses.asdict(spec), dataclasses.asdict(storage)], sort_keys=True)
  digest = hashlib.sha256(settings.encode()).hexdigest()[:10]
  data_dir = epath.Path(dataset_config.data_dir or default_data_dir())
  return dataset_writer.dataset_dir(data_dir / f"{SYNTHETIC_NAME}-{digest}", SYNTHETIC_NAME)


def ensure_synthetic_dataset(
  dataset_config,
  mel: spectrogram.MelSettings,
  *,
  process_index: int,
  timeout_s: float = 3600.0,
  log: Callable[[str], None] = print,
) -> epath.Path:
  """Generates and prepares the synthetic dataset unless it is there; returns its folder.

  Process 0 does the work (videos in a local temporary folder, deleted afterwards; the
  dataset under `synthetic_dataset_dir`); every other process waits for it to be complete.

  Args:
    dataset_config: the config's `dataset` section (`synthetic`, storage keys, `data_dir`).
    mel: log-mel settings for the stored normalisation statistics.
    process_index: this process's index (`jax.process_index()`).
    timeout_s: how long other processes wait before giving up.
    log: where notices go.
  """
  directory = synthetic_dataset_dir(dataset_config)
  if dataset_writer.is_prepared(directory):
    return directory
  if process_index != 0:
    log(f"Waiting for process 0 to prepare the synthetic dataset at {directory}.")
    deadline = time.monotonic() + timeout_s
    while not dataset_writer.is_prepared(directory):
      if time.monotonic() > deadline:
        raise TimeoutError(
          f"Process {process_index} waited {timeout_s:.0f} s for process 0 to prepare the "
          f"synthetic dataset at {directory}. All processes must see the same "
          "dataset.data_dir (e.g. a gs:// folder on multi-host runs)."
        )
      time.sleep(1.0)
    return directory
  spec = synthetic.SyntheticSpec.from_config(dataset_config.synthetic)
  log(f"Generating the synthetic dataset into {directory} (once; later runs reuse it).")
  with tempfile.TemporaryDirectory(prefix="cmvt_synthetic_videos_") as video_dir:
    synthetic.generate(video_dir, spec)
    try:
      dataset_writer.prepare(
        video_dir,
        directory.parent.parent,
        SYNTHETIC_NAME,
        storage=storage_from_config(dataset_config),
        mel=mel,
        log=lambda summary: None,  # every generated file is used: the stage line says it all
      )
    except OSError:
      # Another run on the same cache folder finished the same dataset first.
      if not dataset_writer.is_prepared(directory):
        raise
  return directory


def open_from_config(
  dataset_config,
  input_config,
  *,
  process_index: int = 0,
  log: Callable[[str], None] = print,
  name: str | None = None,
) -> PreparedDataset:
  """The dataset the config names (see module docstring), made first when synthetic.

  `name`: another dataset of the same data folder (a mixture's component) instead of
  `dataset.name`.
  """
  name = name or dataset_config.name
  if name == SYNTHETIC_NAME:
    directory = ensure_synthetic_dataset(
      dataset_config,
      spectrogram.MelSettings.from_config(input_config),
      process_index=process_index,
      log=log,
    )
  else:
    directory = dataset_writer.dataset_dir(dataset_config.data_dir or default_data_dir(), name)
  return open_prepared(directory)


def mixture_weights(dataset_config) -> list[tuple[str, float]]:
  """`dataset.mixture` checked: (name, weight) pairs, names distinct, weights positive."""
  pairs = []
  for entry in dataset_config.mixture:
    if (
      not isinstance(entry, (tuple, list))
      or len(entry) != 2
      or not isinstance(entry[0], str)
      or isinstance(entry[1], bool)
      or not isinstance(entry[1], (int, float))
      or entry[1] <= 0
    ):
      raise ValueError(
        f"dataset.mixture entry {entry!r} is not (NAME, WEIGHT) with a positive weight; e.g. "
        "--config.dataset.mixture=\"(('vggsound', 0.7), ('kinetics', 0.3))\"."
      )
    pairs.append((entry[0], float(entry[1])))
  names = [name for name, _ in pairs]
  if len(set(names)) != len(names):
    raise ValueError(f"dataset.mixture names a dataset twice: {names}.")
  return pairs


def open_mixture(
  dataset_config, input_config, *, process_index: int = 0, log: Callable[[str], None] = print
) -> list[tuple[PreparedDataset, float]]:
  """The datasets of `dataset.mixture` (each under `dataset.data_dir`) with their weights."""
  components = []
  for name, weight in mixture_weights(dataset_config):
    dataset = open_from_config(
      dataset_config, input_config, process_index=process_index, log=log, name=name
    )
    if "train" not in dataset.num_examples:
      raise ValueError(
        f"Mixture component {name} at {dataset.directory} has no train split (it has "
        f"{', '.join(dataset.num_examples)}): training draws from train splits."
      )
    components.append((dataset, weight))
  return components


def mixture_stats(
  components: Sequence[tuple[PreparedDataset, float]],
  mel: spectrogram.MelSettings,
  log: Callable[[str], None] = print,
) -> normalization.NormalizationStats:
  """Normalisation statistics of the clips a mixture's train stream draws: each
  component's statistics, weighted by its share of the stream (its audio by its share of
  clips with audio; see `normalization.mixture`)."""
  weights = [weight for _, weight in components]
  return normalization.mixture(
    [dataset.normalization_stats(mel, log=log) for dataset, _ in components],
    weights,
    [weight * dataset.audio_fraction("train") for dataset, weight in components],
  )
