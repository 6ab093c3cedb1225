"""Fixtures of the evaluate/export/plots tests: a workdir with checkpoints written in this
process, the run opened on it, and embeddings computed directly (model.apply on every clip,
written plainly here).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmvt_jax import checkpoints
from cmvt_jax import metrics
from cmvt_jax import run as run_lib
from cmvt_jax import train
from cmvt_jax.data import datasets
from cmvt_jax.data import pipeline
from cmvt_jax.models import cmvt
from configs import micro
from tests import helpers

# The steps of the workdir's checkpoints (the last one is the latest).
CHECKPOINT_STEPS = (5, 20)
LATEST_STEP = CHECKPOINT_STEPS[-1]
# The micro config's test split: 8 files of 2 two-second segments, one clip each.
MICRO_TEST_FILES = 8
MICRO_TEST_CLIPS = 16


def micro_config(data_dir, **overrides):
  """The micro config on the session's dataset, with `{"export.split": ...}`-style overrides."""
  config = micro.get_config()
  config.dataset.data_dir = str(data_dir)
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config


def plain_ranks(queries, candidates):
  """1 + how many other candidates score at least as high as the positive, row by row."""
  ranks = []
  for i, query in enumerate(queries):
    scores = candidates @ query
    ranks.append(1 + sum(scores[j] >= scores[i] for j in range(len(scores)) if j != i))
  return np.array(ranks)


@pytest.fixture(scope="session")
def workdir(tmp_path_factory, micro_data_dir):
  """A workdir written in this process, as training leaves it: complete checkpoints at
  CHECKPOINT_STEPS (each with its own random parameters, standing in for training) and a
  few metrics lines. No training subprocess: these tests check embedding, not learning."""
  workdir = tmp_path_factory.mktemp("evaluate") / "run"
  config = micro_config(micro_data_dir)
  run = run_lib.Run.create(config, workdir)
  stats = run.stats()
  data = iter(
    pipeline.train_dataset(
      run.dataset.source("train"), run.preprocessor(stats), batch_size=config.batch_size, seed=0
    )
  )
  manager = checkpoints.manager(workdir, max_to_keep=len(CHECKPOINT_STEPS))
  writer = metrics.MetricsWriter(workdir, is_primary=True)
  for step in CHECKPOINT_STEPS:
    run.config.seed = step
    state = run.init_state().replace(step=jnp.int32(step))
    meta = {"config": json.loads(config.to_json_best_effort()), "stats": stats.to_dict()}
    checkpoints.save(manager, step, state, data, {**meta, "step": step})
    writer.write(step, {"loss": 2.0 / step, "temperature": 0.1, "learning_rate": 1e-3})
  manager.wait_until_finished()
  manager.close()
  writer.close()
  data.close()
  train.write_config_json(workdir, config)
  return workdir


@pytest.fixture(scope="session")
def run(workdir, micro_data_dir):
  return run_lib.Run.create(micro_config(micro_data_dir), workdir)


class DirectEmbedder:
  """L2-normalised embeddings of the micro test split by a plain forward pass per clip."""

  def __init__(self, workdir, data_dir):
    config = micro_config(data_dir)
    self.model = cmvt.from_config(config)
    self.dataset = datasets.open_from_config(config.dataset, config.input)
    self.preprocessor = pipeline.Preprocessor(
      pipeline.InputSpec.from_config(config.input),
      self.dataset.stored_stats,
      self.dataset.storage.fps,
      self.dataset.storage.sample_rate,
    )
    self.workdir = workdir
    self._apply = jax.jit(
      lambda params, video, audio: self.model.apply({"params": params}, video, audio)
    )

  def params(self, step):
    return helpers.load_state(self.workdir, step)["params"]["model"]

  def __call__(self, step, video, audio):
    """video `[B, T, S, S, 3]`, audio `[B, F, M]` → normalised numpy video, audio `[B, E]`."""
    out = jax.device_get(self._apply(self.params(step), video, audio))
    return tuple(
      out[key] / np.linalg.norm(out[key], axis=1, keepdims=True) for key in ("video", "audio")
    )

  def split(self, step, split="test"):
    """{id: (video, audio, label, source)} of every clip of `split`."""
    source = self.dataset.source(split)
    examples = [source[i] for i in range(len(source))]
    views = [self.preprocessor(example["frames"], example["audio"]) for example in examples]
    video, audio = self(
      step, np.stack([view["video"] for view in views]), np.stack([view["audio"] for view in views])
    )
    return {
      example["id"].decode(): (
        video[i],
        audio[i],
        int(example["label"]),
        example["source"].decode(),
      )
      for i, example in enumerate(examples)
    }


@pytest.fixture(scope="session")
def direct(workdir, micro_data_dir):
  return DirectEmbedder(workdir, micro_data_dir)
