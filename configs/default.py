"""The embedded default: a tiny CMVT on a generated audio-visual dataset, CPU-sized.

`python -m cmvt_jax.main --config configs/default.py --workdir DIR` needs nothing on disk: the
synthetic dataset is generated and prepared on first use. Variants import this module and
override a few fields (see configs/vtn_base.py).

Sections and their owners (each module reads only its own section):
  top level   schedule and run keys (train.py)
  dataset     where the prepared dataset lives and how it is stored (data/)
  input       what the input pipeline hands the model: frames, audio, augmentation (data/)
  model       the two towers and projection heads (models/)
  loss        contrastive objective and temperature (losses.py)
  optim       optimiser and learning-rate schedule (train.py)
  eval        evaluation (evaluate.py)
  export      embedding export (export.py)
  mesh        device mesh (sharding.py)
"""

from ml_collections import config_dict


def get_config() -> config_dict.ConfigDict:
  config = config_dict.ConfigDict()
  config.seed = 0

  config.dataset = config_dict.ConfigDict()
  config.input = config_dict.ConfigDict()
  config.model = config_dict.ConfigDict()
  config.loss = config_dict.ConfigDict()
  config.optim = config_dict.ConfigDict()
  config.eval = config_dict.ConfigDict()
  config.export = config_dict.ConfigDict()
  return config
