# The GPU benchmark's one-line runner, for a borrowed H100/H200 whose image has its own jax,
# flax and optax but no network and no ml_collections. In the repository root, beforehand:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl ml_collections==1.1.0
# then run this with `.whl` carried (the device tool: carry=[".whl"], timeout_s=420):
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 python3 -m benchmarks.gpu_attention "$@" 2>&1 | tee "${OUT:-/tmp}/gpu_attention.txt"
