"""Fixtures of the reliability tests: the crash harness's uninterrupted training run."""

import pytest

from tests.reliability import crash_harness as harness


@pytest.fixture(scope="session")
def training_reference(tmp_path_factory, micro_data_dir) -> harness.Reference:
  """`harness.training` run once uninterrupted: 4 steps, checkpoints at 2 and 4, an
  evaluation at 2 and at the end, an export and plots (every kind of workdir file)."""
  return harness.reference(harness.training(micro_data_dir), tmp_path_factory.mktemp("crash"))
