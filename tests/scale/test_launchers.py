"""The TPU VM and SLURM launchers: the commands they would run (nothing here reaches a cloud)."""

import os
import subprocess
import sys

import pytest

from tests import helpers

LAUNCH = helpers.REPO / "launch"
PLACE = ("--name=cmvt", "--zone=us-west4-a", "--project=my-proj")
SLICE = ("--accelerator_type=v5litepod-256", "--runtime_version=v2-alpha-tpuv5-lite")
TRAIN = ("--config=configs/tpu_pod.py", "--workdir=gs://my-runs/cmvt-1")


@pytest.fixture(autouse=True)
def no_cloud(tmp_path, monkeypatch):
  """A `gcloud` first on PATH that fails loudly: a dry run must never call the real one."""
  (tmp_path / "gcloud").write_text("#!/bin/sh\necho 'gcloud was called' >&2\nexit 99\n")
  (tmp_path / "gcloud").chmod(0o755)
  monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")


def tpu_vm(*args: str) -> subprocess.CompletedProcess:
  """`tpu_vm.sh` with `--dry-run` among its options (before the `--` of cmvt_jax's)."""
  split = args.index("--") if "--" in args else len(args)
  command = ["bash", str(LAUNCH / "tpu_vm.sh"), *args[:split], "--dry-run", *args[split:]]
  return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


def dry_run(*args: str) -> list[str]:
  result = tpu_vm(*args)
  assert result.returncode == 0, result.stderr
  return result.stdout.splitlines()


def line_with(lines: list[str], *parts: str) -> str:
  """The one printed command that contains every part."""
  found = [line for line in lines if all(part in line for part in parts)]
  assert len(found) == 1, f"{parts} in {len(found)} lines of:\n" + "\n".join(lines)
  return found[0]


def test_single_slice_up_creates_installs_trains_streams_and_deletes():
  lines = dry_run("up", *PLACE, *SLICE, "--delete_after", "--", *TRAIN)
  gcloud = [line for line in lines if line.startswith("gcloud ")]
  assert gcloud[0] == (
    "gcloud compute tpus tpu-vm create cmvt --zone=us-west4-a "
    "--project=my-proj --accelerator-type=v5litepod-256 "
    "--version=v2-alpha-tpuv5-lite"
  )
  assert gcloud[-1] == (
    "gcloud compute tpus tpu-vm delete cmvt --zone=us-west4-a --project=my-proj --quiet"
  )
  line_with(lines, "gcloud compute tpus tpu-vm scp", "cmvt:", "--worker=all")
  setup = line_with(lines, "gcloud compute tpus tpu-vm ssh cmvt", "--worker=all", "uv pip install")
  assert "-r requirements-tpu.txt" in setup
  train = line_with(lines, "gcloud compute tpus tpu-vm ssh cmvt", "--worker=all", "cmvt_jax.main")
  assert "--config=configs/tpu_pod.py --workdir=gs://my-runs/cmvt-1" in train
  assert "num_slices" not in train
  stream = line_with(lines, "--worker=0", "tail")
  assert stream.startswith("gcloud compute tpus tpu-vm ssh cmvt ")


def test_two_slices_are_queued_and_trained_with_a_dcn_axis():
  lines = dry_run("up", *PLACE, *SLICE, "--num_slices=2", "--data_bucket=my-data", "--", *TRAIN)
  assert lines[0] == (
    "gcloud compute tpus queued-resources create cmvt --zone=us-west4-a "
    "--project=my-proj --accelerator-type=v5litepod-256 "
    "--runtime-version=v2-alpha-tpuv5-lite --node-count=2 --node-prefix=cmvt"
  )
  line_with(lines, "gcloud compute tpus queued-resources describe cmvt", "state")
  for node in ("cmvt-0", "cmvt-1"):
    line_with(lines, "gcloud compute tpus tpu-vm scp", f"{node}:", "--worker=all")
  setup = line_with(lines, "gcloud compute tpus queued-resources ssh cmvt", "uv pip install")
  assert "--node=all --worker=all" in setup
  assert "gcsfuse --implicit-dirs --rename-dir-limit=100000 my-data /gcs/my-data" in setup
  train = line_with(lines, "gcloud compute tpus queued-resources ssh cmvt", "cmvt_jax.main")
  assert "--node=all --worker=all" in train
  assert "--workdir=gs://my-runs/cmvt-1 --config.mesh.num_slices=2" in train
  line_with(lines, "gcloud compute tpus tpu-vm ssh cmvt-0", "--worker=0", "tail")
  deleted = dry_run("delete", *PLACE, "--num_slices=2")
  assert deleted == [
    "gcloud compute tpus queued-resources delete cmvt --zone=us-west4-a "
    "--project=my-proj --force --quiet"
  ]


def test_prepare_runs_one_worker_per_host_then_merges():
  lines = dry_run(
    "prepare",
    *PLACE,
    "--",
    "--video_dir=gs://my-videos/all",
    "--data_dir=gs://my-data/datasets",
    "--name=clips",
  )
  assert len(lines) == 2
  assert lines[0].startswith("gcloud compute tpus tpu-vm ssh cmvt ")
  assert "--worker=all" in lines[0] and "--worker_index=$(curl" in lines[0]
  assert "agent-worker-number" in lines[0] and "worker-network-endpoints" in lines[0]
  assert "--worker=0" in lines[1] and "--merge" in lines[1]


@pytest.mark.parametrize(
  "args, message",
  [
    (
      ("train", *PLACE, "--", "--config=configs/tpu_pod.py", "--workdir=/tmp/run"),
      "needs --workdir=gs://BUCKET/PATH",
    ),
    (("create", *PLACE), "needs --accelerator_type"),
    (("up", "--zone=z", "--project=p", *SLICE, "--", *TRAIN), "--name, --zone and --project"),
    (("train", *PLACE, "--num_slices=two", "--", *TRAIN), "--num_slices=two"),
    (("prepare", *PLACE, "--", "--data_dir=gs://d", "--num_workers=4"), "sets --num_workers"),
    (("deploy", *PLACE), "unknown command 'deploy'"),
  ],
)
def test_tpu_vm_refuses_bad_arguments(args, message):
  result = tpu_vm(*args)
  assert result.returncode == 2
  assert message in result.stderr
  assert not result.stdout


def test_slurm_script_runs_one_process_per_node_or_per_gpu(tmp_path):
  script = LAUNCH / "gpu_slurm.sbatch"
  assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0
  text = script.read_text()
  for piece in (
    "#SBATCH --nodes=",
    "#SBATCH --ntasks-per-node=1",
    "#SBATCH --gpus-per-node=",
    "#SBATCH --signal=TERM@",
    '"jax[cuda13]==$jax_version"',
    "srun --kill-on-bad-exit=1",
  ):
    assert piece in text
  # srun stands in for SLURM: it prints what it would start, with JAX's device setting.
  stub = tmp_path / "srun"
  stub.write_text('#!/usr/bin/env bash\necho "devices=${JAX_LOCAL_DEVICE_IDS:-own} srun $*"\n')
  stub.chmod(0o755)
  env = dict(
    os.environ,
    PATH=f"{tmp_path}:{os.environ['PATH']}",
    SLURM_JOB_ID="7",
    SLURM_SUBMIT_DIR=str(helpers.REPO),
    SLURM_GPUS_ON_NODE="4",
    SLURM_NNODES="2",
    VENV=os.path.dirname(os.path.dirname(sys.executable)),
  )

  def submit(tasks_per_node: str) -> subprocess.CompletedProcess:
    return subprocess.run(
      ["bash", str(script), *TRAIN[:1], "--workdir=/shared/run"],
      env=dict(env, SLURM_NTASKS_PER_NODE=tasks_per_node),
      capture_output=True,
      text=True,
      timeout=60,
      check=False,
    )

  per_node = submit("1")
  assert per_node.returncode == 0, per_node.stderr
  assert (
    "devices=0,1,2,3 srun --kill-on-bad-exit=1 --cpu-bind=none "
    f"{env['VENV']}/bin/python -m cmvt_jax.main --config=configs/tpu_pod.py "
    "--workdir=/shared/run"
  ) in per_node.stdout
  per_gpu = submit("4")
  assert per_gpu.returncode == 0, per_gpu.stderr
  assert "devices=own srun" in per_gpu.stdout
  odd = submit("3")
  assert odd.returncode == 2 and "use 1 (one process per node) or 4" in odd.stderr
