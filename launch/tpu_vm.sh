#!/usr/bin/env bash
# Runs cmvt_jax on a Cloud TPU VM slice (one program per host), or on several slices joined
# over the data-centre network (multi-slice, through queued resources).
#
#   launch/tpu_vm.sh COMMAND --name=NAME --zone=ZONE --project=PROJECT [options] [-- ARGS...]
#
# Commands:
#   create   create the slice (tpu-vm create), or queue it (--queued, or --num_slices > 1:
#            queued-resources create --node-count), and wait until it is up
#   setup    copy this checkout (or clone --repo) to every worker; install uv, Python
#            $PYTHON_VERSION and requirements-tpu.txt in ~/cmvt_venv; with
#            --data_bucket, install gcsfuse and mount the bucket
#   train    start `python -m cmvt_jax.main ARGS` on every worker of every slice (detached:
#            a dropped connection does not stop it), then stream worker 0's log until the
#            run ends; exits with worker 0's exit status. ARGS need --config and a gs://
#            --workdir; --num_slices N adds --config.mesh.num_slices=N
#   logs     stream worker 0's log again (e.g. after a dropped connection)
#   prepare  run `python -m cmvt_jax.prepare ARGS` split over the workers of the (first)
#            slice, each with --num_workers=W --worker_index=I, then the merge on worker 0
#   delete   delete the slice(s)
#   up       create, setup, train; with --delete_after, delete the slice(s) afterwards
#
# Options:
#   --name=NAME               TPU name; multi-slice nodes are NAME-0, NAME-1, ...
#   --zone=ZONE --project=PROJECT
#   --accelerator_type=TYPE   e.g. v5litepod-256, v5p-512 (create)
#   --runtime_version=V       TPU software version, e.g. v2-alpha-tpuv5-lite (create)
#   --num_slices=N            slices (default 1); N > 1 uses queued resources
#   --queued                  queue a single slice too (waits for capacity instead of failing)
#   --spot                    spot capacity (create)
#   --repo=URL [--ref=REF]    clone this repository on the workers instead of copying
#   --data_bucket=BUCKET      mount gs://BUCKET at /gcs/BUCKET on every worker: grain reads
#                             ArrayRecord files through POSIX paths only
#   --delete_after            (up) delete the slice(s) when training ends, however it ends
#   --dry-run                 print every command (gcloud and local) instead of running it
#
# Example (2 × v5e-256, data prepared in gs://my-data/datasets, mounted for reading):
#   launch/tpu_vm.sh up --name=cmvt --zone=us-west4-a --project=my-proj \
#     --accelerator_type=v5litepod-256 --runtime_version=v2-alpha-tpuv5-lite --num_slices=2 \
#     --data_bucket=my-data --delete_after -- --config=configs/tpu_pod.py \
#     --workdir=gs://my-runs/cmvt-1 --config.dataset.name=clips \
#     --config.dataset.data_dir=/gcs/my-data/datasets
set -euo pipefail

PYTHON_VERSION=3.11
REMOTE_DIR='$HOME/cmvt_jax'
VENV='$HOME/cmvt_venv'
LOG='$HOME/cmvt_run.log'
PID_FILE='$HOME/cmvt_run.pid'
STATUS_FILE='$HOME/cmvt_run.status'
METADATA='http://metadata.google.internal/computeMetadata/v1/instance/attributes'

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
  exit 2
}

die() {
  echo "tpu_vm.sh: $*" >&2
  exit 2
}

# ------------------------------------------------------------------------------ arguments

[[ $# -ge 1 ]] || usage
command=$1
shift
case $command in
  create | setup | train | logs | prepare | delete | up) ;;
  -h | --help | help) usage ;;
  *) die "unknown command '$command' (create, setup, train, logs, prepare, delete, up)" ;;
esac

name='' zone='' project='' accelerator_type='' runtime_version='' repo='' ref=''
data_bucket='' num_slices=1 queued=0 spot=0 delete_after=0 dry_run=0
args=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --name=*) name=${1#*=} ;;
    --zone=*) zone=${1#*=} ;;
    --project=*) project=${1#*=} ;;
    --accelerator_type=*) accelerator_type=${1#*=} ;;
    --runtime_version=*) runtime_version=${1#*=} ;;
    --num_slices=*) num_slices=${1#*=} ;;
    --repo=*) repo=${1#*=} ;;
    --ref=*) ref=${1#*=} ;;
    --data_bucket=*) data_bucket=${1#*=} ;;
    --queued) queued=1 ;;
    --spot) spot=1 ;;
    --delete_after) delete_after=1 ;;
    --dry-run) dry_run=1 ;;
    --) shift; args=("$@"); break ;;
    *) die "unknown option '$1' (options use --key=value; ARGS for cmvt_jax go after --)" ;;
  esac
  shift
done

[[ -n $name && -n $zone && -n $project ]] || die "--name, --zone and --project are required"
[[ $name =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
  die "--name=$name: use lower-case letters, digits and hyphens (a TPU name)"
[[ $num_slices =~ ^[1-9][0-9]*$ ]] || die "--num_slices=$num_slices must be a positive integer"
[[ -z $ref || -n $repo ]] || die "--ref needs --repo"
[[ -z $data_bucket || $data_bucket =~ ^[a-z0-9][-_.a-z0-9]*$ ]] ||
  die "--data_bucket=$data_bucket: give the bucket name alone, without gs://"
if [[ $command == create || $command == up ]]; then
  [[ -n $accelerator_type && -n $runtime_version ]] ||
    die "$command needs --accelerator_type (e.g. v5litepod-256) and --runtime_version (e.g. v2-alpha-tpuv5-lite)"
fi
if [[ $command == train || $command == up ]]; then
  printf '%s\n' "${args[@]}" | grep -q -- '^--config=' ||
    die "$command needs cmvt_jax.main arguments after --: --config=FILE --workdir=gs://BUCKET/PATH [...]"
  workdir=$(printf '%s\n' "${args[@]}" | sed -n 's/^--workdir=//p' | tail -n 1)
  [[ $workdir == gs://* ]] ||
    die "$command needs --workdir=gs://BUCKET/PATH after --: every worker writes its checkpoint shards and export part into the same workdir"
  if ((num_slices > 1)); then
    args+=("--config.mesh.num_slices=$num_slices")
  fi
fi
if [[ $command == prepare ]]; then
  printf '%s\n' "${args[@]}" | grep -q -- '^--data_dir=gs://' ||
    die "prepare needs cmvt_jax.prepare arguments after --, with --data_dir=gs://... (the workers share no disk)"
  if printf '%s\n' "${args[@]}" | grep -Eq -- '^--(num_workers|worker_index|merge)'; then
    die "prepare sets --num_workers, --worker_index and --merge itself (one worker per TPU VM host)"
  fi
fi

((num_slices > 1)) && queued=1
location=(--zone="$zone" --project="$project")

# ------------------------------------------------------------------------------ helpers

# Quotes only the words that need it, so a printed command reads and pastes as typed.
show() {
  local word words=()
  for word in "$@"; do
    if [[ $word =~ ^[-A-Za-z0-9_./:=,@%+]+$ ]]; then words+=("$word"); else words+=("${word@Q}"); fi
  done
  echo "${words[*]}"
}

run() {
  if ((dry_run)); then show "$@"; else "$@"; fi
}

nodes() {
  if ((num_slices > 1)); then
    for ((i = 0; i < num_slices; i++)); do echo "$name-$i"; done
  else
    echo "$name"
  fi
}

first_node=$(nodes | head -n 1)

# Runs a shell command on every worker of every slice.
on_all_workers() {
  if ((num_slices > 1)); then
    run gcloud compute tpus queued-resources ssh "$name" "${location[@]}" --node=all \
      --worker=all --command="$1"
  else
    run gcloud compute tpus tpu-vm ssh "$name" "${location[@]}" --worker=all --command="$1"
  fi
}

on_worker_0() {
  run gcloud compute tpus tpu-vm ssh "$first_node" "${location[@]}" --worker=0 --command="$1"
}

quoted_args() {
  local word out=()
  for word in "$@"; do out+=("$(printf '%q' "$word")"); done
  echo "${out[*]}"
}

mount_command() {
  [[ -n $data_bucket ]] || return 0
  printf '%s' "sudo mkdir -p /gcs/$data_bucket && sudo chown \$USER /gcs/$data_bucket && " \
    "(mountpoint -q /gcs/$data_bucket || gcsfuse --implicit-dirs --rename-dir-limit=100000 $data_bucket /gcs/$data_bucket) && "
}

# ------------------------------------------------------------------------------ commands

create() {
  if ((queued)); then
    local shape=(--node-id="$name")
    ((num_slices > 1)) && shape=(--node-count="$num_slices" --node-prefix="$name")
    local capacity=()
    ((spot)) && capacity=(--spot)
    run gcloud compute tpus queued-resources create "$name" "${location[@]}" \
      --accelerator-type="$accelerator_type" --runtime-version="$runtime_version" \
      "${shape[@]}" "${capacity[@]}"
    wait_until_active
  else
    local capacity=()
    ((spot)) && capacity=(--spot)
    run gcloud compute tpus tpu-vm create "$name" "${location[@]}" \
      --accelerator-type="$accelerator_type" --version="$runtime_version" "${capacity[@]}"
  fi
}

wait_until_active() {
  local describe=(gcloud compute tpus queued-resources describe "$name" "${location[@]}"
                  --format='value(state.state)')
  if ((dry_run)); then
    echo "$(show "${describe[@]}")  # repeated every 60 s until ACTIVE"
    return
  fi
  local state
  while state=$("${describe[@]}") && [[ $state != ACTIVE ]]; do
    case $state in
      FAILED | SUSPENDED) die "queued resource $name is $state; see 'gcloud compute tpus queued-resources describe $name'" ;;
    esac
    echo "queued resource $name: $state; waiting for capacity..." >&2
    sleep 60
  done
}

setup() {
  local code
  if [[ -n $repo ]]; then
    code="rm -rf $REMOTE_DIR && git clone --depth=1 ${ref:+--branch=$(printf %q "$ref")} $(printf %q "$repo") $REMOTE_DIR"
  else
    local repo_root archive
    repo_root=$(cd "$(dirname "$0")/.." && pwd)
    archive=${TMPDIR:-/tmp}/cmvt_jax_code.tar.gz
    run tar -czf "$archive" -C "$repo_root" --exclude=.git --exclude=.cache \
      --exclude=__pycache__ --exclude='*.egg-info' .
    while read -r node; do
      run gcloud compute tpus tpu-vm scp "$archive" "$node:cmvt_jax_code.tar.gz" \
        "${location[@]}" --worker=all
    done < <(nodes)
    code="rm -rf $REMOTE_DIR && mkdir -p $REMOTE_DIR && tar -xzf \$HOME/cmvt_jax_code.tar.gz -C $REMOTE_DIR"
  fi
  # requirements.txt plus jax[tpu] at the pinned jax version.
  local install="python3 -m pip install --user --quiet uv && \$HOME/.local/bin/uv venv --python=$PYTHON_VERSION $VENV && cd $REMOTE_DIR && \$HOME/.local/bin/uv pip install --python=$VENV/bin/python -r requirements-tpu.txt"
  local fuse=''
  if [[ -n $data_bucket ]]; then
    fuse="export GCSFUSE_REPO=gcsfuse-\$(lsb_release -c -s) && echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt \$GCSFUSE_REPO main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list && curl -s https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null && sudo apt-get update -q && sudo apt-get install -y -q gcsfuse && $(mount_command)"
  fi
  on_all_workers "set -e; $code && ${fuse}$install"
}

train() {
  # Detached (SIGHUP ignored, output to a file) so that the run outlives this ssh session.
  # A run that this script started before is stopped first: on SIGTERM it saves a
  # checkpoint and exits, and the new run resumes from it.
  local main_args stop start
  main_args=$(quoted_args "${args[@]}")
  stop="if [ -f $PID_FILE ] && kill \$(cat $PID_FILE) 2>/dev/null; then while kill -0 \$(cat $PID_FILE) 2>/dev/null; do sleep 1; done; fi"
  start="cd $REMOTE_DIR && rm -f $STATUS_FILE && (trap '' HUP; $VENV/bin/python -m cmvt_jax.main $main_args & echo \$! > $PID_FILE; wait \$!; echo \$? > $STATUS_FILE) > $LOG 2>&1 < /dev/null &"
  on_all_workers "$stop; $(mount_command)$start"
  logs
}

logs() {
  # tail ends with the run; worker 0's exit status then becomes this script's.
  on_worker_0 "tail --pid=\$(cat $PID_FILE) -n +1 -F $LOG; for i in 1 2 3 4 5 6 7 8 9 10; do [ -f $STATUS_FILE ] && break; sleep 1; done; exit \$(cat $STATUS_FILE 2>/dev/null || echo 1)"
}

prepare() {
  local prepare_args workers index
  prepare_args=$(quoted_args "${args[@]}")
  workers="\$(curl -s -H Metadata-Flavor:Google $METADATA/worker-network-endpoints | tr , '\\n' | wc -l)"
  index="\$(curl -s -H Metadata-Flavor:Google $METADATA/agent-worker-number)"
  local part="cd $REMOTE_DIR && $VENV/bin/python -m cmvt_jax.prepare $prepare_args --num_workers=$workers --worker_index=$index"
  run gcloud compute tpus tpu-vm ssh "$first_node" "${location[@]}" --worker=all --command="$part"
  on_worker_0 "cd $REMOTE_DIR && $VENV/bin/python -m cmvt_jax.prepare $prepare_args --num_workers=$workers --merge"
}

delete() {
  if ((queued)); then
    run gcloud compute tpus queued-resources delete "$name" "${location[@]}" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$name" "${location[@]}" --quiet
  fi
}

case $command in
  create) create ;;
  setup) setup ;;
  train) train ;;
  logs) logs ;;
  prepare) prepare ;;
  delete) delete ;;
  up)
    create
    # However training ends (error, Ctrl-C): an idle slice costs as much as a busy one.
    if ((delete_after && !dry_run)); then trap delete EXIT; fi
    setup
    train
    if ((delete_after && dry_run)); then delete; fi
    ;;
esac
