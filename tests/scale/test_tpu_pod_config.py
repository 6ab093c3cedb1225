"""configs/tpu_pod.py: the large variant for pods, as docs/scaling.md describes it."""

import math

from benchmarks import memory_model
from configs import tpu_pod


def test_tpu_pod_is_the_large_bf16_fsdp_variant():
  config = tpu_pod.get_config()
  assert config.model.dtype == "bfloat16" and config.model.remat
  assert dict(config.mesh.axes) == {"data": -1, "fsdp": 8}
  # The global batch splits over a v5e-256, a v5p-512 (256 chips) and 2 × v5e-256.
  for chips in (256, 512):
    assert config.batch_size % chips == 0
  assert math.isclose(memory_model.parameter_count(config), 401.1e6, rel_tol=1e-3)


def test_tpu_pod_fits_a_v5e_chip_by_the_memory_model():
  config = tpu_pod.get_config()
  per_chip = memory_model.chip_memory(config, chips=256, fsdp=8)
  assert per_chip.total < 16 * 2**30  # v5e: 16 GiB of HBM per chip
