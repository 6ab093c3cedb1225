"""`--mode compile`: the micro model compiled by libtpu for small TPU topologies.

The runs need the TPU compiler (`pip install -r requirements-tpu.txt`, which the README's test
command installs); without it they are skipped with that reason. What they check is what the
TPU compiler decides, read back from its own outputs: memory per chip, the collectives and
dtypes in the optimised HLO.
"""

import importlib.util
import json
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import config_dict

from benchmarks import banded_attention_tpu
from cmvt_jax import compile as compile_lib
from cmvt_jax import sharding
from cmvt_jax.models import attention
from cmvt_jax.models import frame_encoder
from tests import helpers

needs_libtpu = pytest.mark.skipif(
  importlib.util.find_spec("libtpu") is None,
  reason="the TPU compiler is not installed: pip install -r requirements-tpu.txt",
)
GIB = 1 << 30
# Lengths where the compiler keeps the attention's buffers in HBM (below ~64k it keeps part
# of them in on-chip memory, and reports fewer temporaries).
LENGTHS = (65_536, 131_072)
# Wide enough that FSDP splits the ViT, Longformer and projection matrices (the micro
# model's are all smaller than sharding.FSDP_MIN_SIZE).
WIDE = (
  "--config.model.video.vit.width=64",
  "--config.model.video.vit.mlp_dim=512",
  "--config.model.video.temporal.mlp_dim=512",
  "--config.model.audio.temporal.mlp_dim=512",
  "--config.model.projection_hidden_dim=512",
)


@pytest.fixture(autouse=True)
def no_persistent_cache():
  """What the compile mode does: TPU executables compiled here cannot be read back from jax's
  persistent cache without a TPU client (jax warns and compiles again)."""
  enabled = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  yield
  jax.config.update("jax_enable_compilation_cache", enabled)


def compile_micro(workdir, *overrides: str, check: bool = True):
  return helpers.run_main(workdir, *overrides, mode="compile", check=check, timeout=900)


def summary(workdir) -> dict:
  return json.loads((workdir / "compile" / "summary.json").read_text())


# ----------------------------------------------------------------------------- no compiler


def test_topologies_are_named_as_cloud_tpu_names_accelerator_types():
  v5e = compile_lib.Topology.parse("v5litepod-256")
  assert (v5e.accelerator_type, v5e.chips, v5e.shape, v5e.host_bounds) == (
    "v5e-256",
    256,
    (16, 16),
    (2, 2, 1),
  )
  one_host = compile_lib.Topology.parse("v5e-8")
  assert (one_host.shape, one_host.host_bounds) == ((2, 4), (2, 4, 1))
  v5p = compile_lib.Topology.parse("v5p-512")  # TensorCores: 256 chips
  assert (v5p.chips, v5p.shape, v5p.generation.chip_config) == (256, (4, 8, 8), "megacore")
  assert compile_lib.Topology.parse("v4-8").chips == 4
  assert compile_lib.Topology.parse("v6e-64").generation.hbm_bytes == 32 * GIB
  with pytest.raises(ValueError, match=r"a v5p slice has one of 8, 16, .* TensorCores"):
    compile_lib.Topology.parse("v5p-12")
  with pytest.raises(ValueError, match=r"'h100-8' is no TPU accelerator type .* v5e-256"):
    compile_lib.Topology.parse("h100-8")


def test_without_libtpu_the_compile_mode_says_what_to_install(monkeypatch):
  def no_tpu_support(**kwargs):
    raise RuntimeError("JAX TPU support not installed; cannot generate TPU topology.")

  monkeypatch.setattr(compile_lib.topologies, "get_topology_desc", no_tpu_support)
  real_find_spec = importlib.util.find_spec
  monkeypatch.setattr(
    importlib.util, "find_spec", lambda name: None if name == "libtpu" else real_find_spec(name)
  )
  with pytest.raises(compile_lib.MissingCompilerError, match="pip install -r requirements-tpu.txt"):
    compile_lib.Topology.parse("v5e-8").devices(1)


# A module as the TPU compiler writes one (shapes with tiled layouts, operands by name only):
# a reduce-scatter as a fusion calling an all-reduce-scatter (the all-reduce inside is part
# of it), an all-gather inside a fusion, a combined (tuple) all-reduce, an async pair, and
# loops: a scanned layer (3 runs) holding a windowed matmul's loop (2 runs each).
HLO = """\
HloModule jit_train_step, entry_computation_layout={()}

%all-reduce-scatter.3 (input_0: f32[64,32], input_1: f32[16]) -> (f32[16,32], f32[4]) {
  %input_0 = f32[64,32]{1,0:T(8,128)} parameter(0)
  %all-reduce.1 = f32[64,32]{1,0:T(8,128)} all-reduce(%input_0), to_apply=%add
  ROOT %tuple.1 = (f32[16,32]{1,0:T(8,128)}, f32[4]{0}) tuple(%slice.1, %slice.2)
}

%fused_computation.7 (param_0.1: bf16[8,32]) -> bf16[32,32] {
  %param_0.1 = bf16[8,32]{1,0:T(8,128)(2,1)} parameter(0)
  ROOT %all-gather.2 = bf16[32,32]{1,0:T(8,128)(2,1)} all-gather(%param_0.1), dimensions={0}
}

%windowed_cond (param.4: (f32[8], u32[])) -> pred[] {
  %constant.2 = u32[]{:T(128)} constant(2)
  %param.4 = (f32[8]{0}, u32[]{:T(128)}) parameter(0)
  %get-tuple-element.5 = u32[]{:T(128)} get-tuple-element(%param.4), index=1
  ROOT %compare.3 = pred[]{:T(512)} compare(%get-tuple-element.5, %constant.2), direction=LT
}

%windowed_body (param.5: (f32[8], u32[])) -> (f32[8], u32[]) {
  %collective-permute.4 = f32[8]{0} collective-permute(%x), source_target_pairs={{0,1},{1,0}}
  ROOT %tuple.4 = (f32[8]{0}, u32[]{:T(128)}) tuple(%collective-permute.4, %i)
}

%layers_cond (param.2: (bf16[8,32], s32[])) -> pred[] {
  %param.2 = (bf16[8,32]{1,0}, s32[]) parameter(0)
  %get-tuple-element.3 = s32[] get-tuple-element(%param.2), index=1
  %constant.1 = s32[] constant(3)
  ROOT %compare.1 = pred[] compare(%get-tuple-element.3, %constant.1), direction=LT
}

%layers_body (param.3: (bf16[8,32], s32[])) -> (bf16[8,32], s32[]) {
  %all-gather.6 = bf16[32,32]{1,0} all-gather(%w), dimensions={0}
  %while.2 = (f32[8]{0}, u32[]) while(%t), condition=%windowed_cond, body=%windowed_body
  ROOT %tuple.2 = (bf16[8,32]{1,0}, s32[]) tuple(%a, %i)
}

ENTRY %main.9_spmd (p0: f32[64,32], p1: f32[16], p2: bf16[8,32]) -> f32[] {
  %while.1 = (bf16[8,32], s32[]) while(%t0), condition=%layers_cond, body=%layers_body
  %fusion.1 = (f32[16,32]{1,0:T(8,128)}, f32[4]{0}) fusion(%p0, %p1), calls=%all-reduce-scatter.3
  %fusion.2 = bf16[32,32]{1,0:T(8,128)(2,1)} fusion(%p2), kind=kCustom, calls=%fused_computation.7
  %all-reduce.5 = (f32[10]{0}, f32[6]{0}) all-reduce(%a, %b), to_apply=%add
  %collective-permute-start.1 = (f32[100]{0}, f32[100]{0}, u32[]) collective-permute-start(%x)
  %collective-permute-done.1 = f32[100]{0} collective-permute-done(%collective-permute-start.1)
  %copy-start.1 = (f32[4]{0}, f32[4]{0}, u32[]) copy-start(%y)
  %copy-done.1 = f32[4]{0} copy-done(%copy-start.1)
  ROOT %all-gather.9 = s32[12]{0} all-gather(%c), dimensions={0}
}
"""


def test_collectives_are_counted_once_each_with_the_bytes_each_chip_receives():
  # In the loops: an all-gather run 3 times (a scanned layer), and inside it a windowed
  # matmul's collective-permute run 2 times per layer.
  assert compile_lib.collectives(HLO) == {
    "reduce-scatter": {"count": 1, "bytes": (16 * 32 + 4) * 4},
    "all-gather": {"count": 2 + 3, "bytes": 32 * 32 * 2 + 12 * 4 + 3 * 32 * 32 * 2},
    "all-reduce": {"count": 1, "bytes": (10 + 6) * 4},
    "collective-permute": {"count": 1 + 3 * 2, "bytes": 100 * 4 + 3 * 2 * 8 * 4},
  }


def test_compile_without_a_topology_says_what_to_pass(tmp_path):
  result = compile_micro(tmp_path / "run", check=False)
  assert result.returncode == 1
  (error,) = helpers.logged(result.stderr)
  assert "--config.compile.topology=v5e-8" in error


def test_an_unknown_program_is_refused_before_any_compile(tmp_path):
  result = compile_micro(
    tmp_path / "run",
    "--config.compile.topology=v5e-8",
    "--config.compile.programs=('train',)",
    check=False,
  )
  assert result.returncode == 1
  (error,) = helpers.logged(result.stderr)
  assert "compile.programs=('train',): choose among ('train_step'" in error
  assert "unknown: ['train']" in error


# ----------------------------------------------------------------------------- compiled


@needs_libtpu
@pytest.mark.slow
def test_fsdp_bf16_programs_compile_for_a_v5e_8_with_their_memory_and_collectives(tmp_path):
  workdir = tmp_path / "run"
  result = compile_micro(
    workdir,
    *WIDE,
    "--config.compile.topology=v5e-8",
    "--config.mesh.axes=(('data', 2), ('fsdp', 4))",
    "--config.model.dtype=bfloat16",
    "--config.compile.whole_video_frames=40",
  )
  assert "TPU" not in result.stderr.replace("TPU v5 lite", "")  # no libtpu start-up noise
  found = summary(workdir)
  assert (found["topology"], found["num_slices"], found["chips"]) == ("v5e-8", 1, 8)
  assert found["mesh"] == {"data": 2, "fsdp": 4}
  assert set(found["programs"]) == {"train_step", "embed_step", "whole_video"}
  for name, program in found["programs"].items():
    memory = program["per_chip_bytes"]
    assert memory["total"] == (
      memory["arguments"]
      + memory["outputs"]
      - memory["aliased"]
      + memory["temporaries"]
      + memory["code"]
    )
    assert program["hbm_bytes_per_chip"] == 16 * GIB and program["fits"]
    assert (workdir / "compile" / program["hlo"]).stat().st_size > 0, name
    assert f"{name} (" in result.stderr  # its table
  train = found["programs"]["train_step"]
  # The state is donated: the new one is written over the old one.
  assert train["per_chip_bytes"]["aliased"] >= 0.9 * train["per_chip_bytes"]["outputs"]
  # FSDP: gradients reduce-scattered, parameters gathered (for evaluation too).
  assert train["collectives"]["reduce-scatter"] >= 1
  assert train["collectives"]["all-gather"] >= 1
  assert found["programs"]["embed_step"]["collectives"]["all-gather"] >= 1
  assert found["programs"]["whole_video"]["collectives"] == {}  # one chip
  assert found["programs"]["whole_video"]["chips"] == 1

  # bf16 on the TPU: the matmuls and convolutions run in bfloat16 (the CPU widens them).
  hlo = (workdir / "compile" / "train_step.hlo.txt").read_text()
  results = re.findall(r"= (\w+)\[[^\]]*\]\S* (?:convolution|dot)\(", hlo)
  assert results and results.count("bf16") >= 0.5 * len(results), results


@needs_libtpu
def test_two_slices_put_fsdp_inside_a_slice_and_data_across_them():
  """The hybrid mesh of 2 × v5e-16 from the compiler's devices (each carries slice_index)."""
  devices = compile_lib.Topology.parse("v5e-16").devices(2)
  assert sorted({d.slice_index for d in devices}) == [0, 1]
  mesh_config = config_dict.ConfigDict({"axes": (("data", -1), ("fsdp", 4)), "num_slices": 2})
  mesh = sharding.create_mesh(mesh_config, devices)
  assert dict(mesh.shape) == {"data": 8, "fsdp": 4}
  slices = [[d.slice_index for d in row] for row in mesh.devices]
  assert all(len(set(row)) == 1 for row in slices)  # an FSDP group never crosses slices
  assert [row[0] for row in slices] == [0] * 4 + [1] * 4  # data runs over both


@needs_libtpu
@pytest.mark.slow
def test_the_train_step_compiles_for_two_slices(tmp_path):
  workdir = tmp_path / "run"
  compile_micro(
    workdir,
    *WIDE,
    "--config.compile.topology=v5e-16",
    "--config.compile.num_slices=2",
    "--config.mesh.axes=(('data', -1), ('fsdp', 4))",
    "--config.batch_size=64",
    "--config.model.video.vit.depth=2",
    "--config.model.video.vit.scan_layers=True",  # as tpu_pod runs its ViT
    "--config.compile.programs=('train_step',)",
  )
  found = summary(workdir)
  assert (found["num_slices"], found["chips"], found["mesh"]) == (2, 32, {"data": 8, "fsdp": 4})
  train = found["programs"]["train_step"]
  assert train["fits"] and train["collectives"]["all-gather"] >= 1
  hlo = (workdir / "compile" / "train_step.hlo.txt").read_text()
  assert re.search(r" while\(.*frame_encoder/Transformer/while", hlo)  # the blocks: one loop


@needs_libtpu
@pytest.mark.slow
def test_a_program_that_does_not_fit_exits_1_with_one_line(tmp_path):
  # 2M frames are 139 hours at 4 fps: the audio tower's one pass over their 16M log-mel
  # frames needs more than a v5e chip holds (the TPU compiler refuses the program itself).
  result = compile_micro(
    tmp_path / "run",
    "--config.compile.topology=v5e-1",
    "--config.compile.programs=('whole_video',)",
    "--config.compile.whole_video_frames=2000000",
    check=False,
  )
  assert result.returncode == 1, result.stderr[-3000:]
  (error,) = helpers.logged(result.stderr, "EF")
  assert "whole_video does not fit the 16.00 GiB of HBM of a v5e chip" in error
  assert "Ran out of memory" in error and "Lower compile.whole_video_frames" in error
  assert summary(tmp_path / "run")["programs"]["whole_video"]["fits"] is False


@needs_libtpu
def test_with_libtpu_installed_a_machine_without_chips_starts_on_the_cpu_quietly():
  env = helpers.environment()
  del env["JAX_PLATFORMS"]  # as a user's shell has it
  started = subprocess.run(
    [
      sys.executable,
      "-c",
      "from cmvt_jax import sharding; sharding.choose_platforms(); import jax; "
      "print(jax.default_backend(), jax.device_count())",
    ],
    cwd=helpers.REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert started.returncode == 0, started.stderr
  assert started.stdout.split() == ["cpu", "1"]
  assert "TPU" not in started.stderr, started.stderr


@needs_libtpu
def test_remat_lowers_a_vits_backward_temporaries_on_a_tpu():
  """On XLA:CPU `jax.checkpoint` saves nothing (docs/scaling.md); the TPU compiler it is made
  for must keep fewer activations with it. (The micro train step is too small to show it:
  at 256 clips its temporaries were 22.7 MiB with remat and 17.8 MiB without.)"""
  on_chip = jax.sharding.SingleDeviceSharding(compile_lib.Topology.parse("v5e-1").devices(1)[0])
  images = jax.ShapeDtypeStruct((64, 64, 64, 3), jnp.float32, sharding=on_chip)
  temporaries = {}
  # Scanned blocks, as vtn_base and tpu_pod run them (and half the compile time of unrolled
  # ones). Measured 2026-12-03: 6.6 MiB with remat, 920 MiB without (unrolled: 36 vs 248 MiB).
  # At 32 images of 3 blocks the TPU compiler keeps everything in on-chip scratch and
  # reports no temporaries at all.
  for remat in (True, False):
    vit = frame_encoder.ViT(
      patch_size=8,
      width=256,
      depth=6,
      num_heads=4,
      mlp_dim=1024,
      image_size=64,
      remat=remat,
      scan_layers=True,
    )
    params = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=on_chip),
      jax.eval_shape(vit.init, jax.random.key(0), images),
    )
    loss = lambda params, x, vit=vit: jnp.sum(vit.apply(params, x) ** 2)
    compiled = jax.jit(jax.grad(loss)).lower(params, images).compile()
    temporaries[remat] = compiled.memory_analysis().temp_size_in_bytes
  print(f"temporaries on one v5e chip, remat on/off: {temporaries}")
  assert temporaries[True] < 0.1 * temporaries[False], temporaries


@needs_libtpu
def test_banded_attention_on_a_tpu_keeps_memory_linear_and_softmax_in_float32():
  """Forward + backward of `banded_attention` (bf16) compiled for one v5e chip at two lengths:
  no array of the program grows like T², the temporaries grow like T, and the exponentials
  of the softmax run in float32. (The whole range, 16k to 1M positions, is the table of
  benchmarks/banded_attention_tpu.py in BENCHMARKS.md; measured 2026-12-03: 9,230 and 9,225
  bytes per position at these two lengths, 3 s per compile.)"""
  device = compile_lib.Topology.parse("v5e-1").devices(1)[0]
  measured = {}
  for length in LENGTHS:
    compiled = banded_attention_tpu.compiled_gradient(length, device, "lax", global_token=False)
    text = compiled.as_text()
    exponentials = re.findall(r"= (\w+)\[[^\]]*\]\S* exponential\(", text)
    assert exponentials and set(exponentials) == {"f32"}, exponentials
    # Nothing larger than q itself ([T, heads, head_dim]): no T² scores, not even T·w.
    largest = banded_attention_tpu.largest_array(text)
    assert largest <= length * banded_attention_tpu.HEADS * banded_attention_tpu.HEAD_DIM
    measured[length] = compiled.memory_analysis().temp_size_in_bytes
  short, long = LENGTHS
  print(f"banded attention temporaries on one v5e chip: {measured}")
  assert measured[long] / long <= 1.25 * measured[short] / short, measured


@needs_libtpu
def test_the_splash_kernel_compiles_for_a_tpu_with_memory_linear_in_length():
  """The splash path's forward + backward (bf16) compiled for one v5e chip at two lengths: its
  kernels are in the program (forward, dq, dkv), the temporaries grow like T. (The range 16k
  to 1M, with a global token, is benchmarks/banded_attention_tpu.py's table in BENCHMARKS.md.)"""
  device = compile_lib.Topology.parse("v5e-1").devices(1)[0]
  measured = {}
  for length in LENGTHS:
    compiled = banded_attention_tpu.compiled_gradient(length, device, "splash", global_token=False)
    text = compiled.as_text()
    for kernel in ("splash_mha_fwd", "splash_mha_dq", "splash_mha_dkv"):
      assert kernel in text, kernel
    measured[length] = compiled.memory_analysis().temp_size_in_bytes
  short, long = LENGTHS
  print(f"splash temporaries on one v5e chip: {measured}")
  assert measured[long] / long <= 1.25 * measured[short] / short, measured


@needs_libtpu
@pytest.mark.parametrize("length,kernel", [(1024, True), (1023, False)])
def test_none_picks_splash_for_long_sequences_compiled_for_a_tpu(length, kernel):
  """`implementation=None` decides by the platform compiled for: lowered for a TPU from this
  CPU, a sequence of 1024 positions gets the kernel, a shorter one the lax loop."""
  device = compile_lib.Topology.parse("v5e-1").devices(1)[0]
  x = jax.ShapeDtypeStruct(
    (1, length, 2, 64), jnp.bfloat16, sharding=jax.sharding.SingleDeviceSharding(device)
  )
  lowered = jax.jit(lambda q: attention.banded_attention(q, q, q, window=16)).lower(x).as_text()
  assert ("splash_mha_fwd" in lowered) == kernel


@needs_libtpu
def test_splash_under_a_sharded_jit_runs_per_device_in_shard_map():
  """Traced for a 4-chip mesh with the batch split (as the train and embed steps are), the
  kernel runs in `shard_map` over the batch: it compiles, and every chip computes its own
  rows of attention without gathering another chip's q, k or v."""
  mesh = jax.sharding.Mesh(
    np.asarray(compile_lib.Topology.parse("v5e-4").devices(1)).reshape(2, 2), ("data", "fsdp")
  )
  rows = sharding.batch_sharding(mesh)
  x = jax.ShapeDtypeStruct((8, 2048, 2, 64), jnp.bfloat16, sharding=rows)
  cls = jax.ShapeDtypeStruct((8, 2048), jnp.bool_, sharding=rows)

  def loss(q, k, v, global_mask):
    out = attention.banded_attention(
      q, k, v, window=32, global_mask=global_mask, max_global=1, implementation="splash"
    )
    return jnp.sum(out.astype(jnp.float32) ** 2)

  step = jax.jit(
    sharding.traced_over(mesh, jax.grad(loss, argnums=(0, 1, 2))), out_shardings=(rows,) * 3
  )
  text = step.lower(x, x, x, cls).compile().as_text()
  assert "splash_mha_dkv" in text
  assert "all-gather" not in text
