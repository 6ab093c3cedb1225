"""Per-chip memory, step time and contrastive all-gather of CMVT training: a model, checked.

  python -m benchmarks.memory_model [--skip_check] [--fit] [--tpu]

Prints the tables of docs/scaling.md:
  1. parameters of vtn_base and of the large variant (configs/tpu_pod.py);
  2. memory per chip vs frames and clips per chip, with and without remat;
  3. the model against XLA: `jit(train_step).lower(...).compile().memory_analysis()` on this
     CPU for reduced shapes that compile here (float32, one device), and the error; with
     `--tpu`, against the TPU compiler for one v5e chip instead (bf16, remat off and on);
  4. step time from the FLOP model at a stated MFU on v5e-256, v5p-512 and 2 × v5e-256;
  5. the contrastive all-gather per step vs hosts.

The memory model (bytes per chip; b = clips per chip = global batch / chips, e = bytes of the
compute dtype, P = parameters, fsdp = size of the "fsdp" mesh axis):
  parameters 4P / fsdp, AdamW moments 8P / fsdp, gradients 4P / fsdp (all float32);
  inputs     b · (T·S²·3 + F·M) · 4 (the float32 batch);
  activations, what the backward pass keeps, per token of a block of width D, MLP width M,
    H heads over L tokens (coefficients measured on XLA:CPU, see `fit_coefficients`):
      ViT block        (14·D + 3·M + 3·H·L) · e    the H·L term: dense attention's scores
      Longformer block (27·D + 3·M + 13·H) · e     no L or window term: the banded kernel
                       keeps q, k, v, its output and the row log-sum-exp and recomputes the
                       scores blockwise, so the window w only costs FLOPs, 4·(2w+1)·L·D
      ResNet block     5.5 maps of its output (7.5 with a projection shortcut)
    (a minimal transformer block, Megatron-style, keeps 8·D + 2·M + H·L per token: XLA
    keeps about 1.8 times that);
    with remat, each block keeps only its input (L·D·e) and one block is recomputed at a
    time (+ that block's full activations);
  the loss: 3 · b · B · 4 (similarities, their softmax and gradient; B = global batch).
"""

from __future__ import annotations

import argparse
import dataclasses
import math

import jax
import jax.numpy as jnp

from cmvt_jax import compile as compile_lib
from cmvt_jax import flops as flops_lib
from cmvt_jax import run as run_lib
from cmvt_jax import train
from cmvt_jax.data import pipeline
from cmvt_jax.models import cmvt
from cmvt_jax.models import frame_encoder as frame_lib
from cmvt_jax.models import temporal_encoder
from configs import tpu_pod
from configs import vtn_base

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
GIB = 2**30


@dataclasses.dataclass(frozen=True)
class ChipMemory:
  """Bytes per chip by kind."""

  params: float
  optimizer: float
  gradients: float
  inputs: float
  activations: float

  @property
  def state(self) -> float:
    return self.params + self.optimizer

  @property
  def total(self) -> float:
    return self.state + self.gradients + self.inputs + self.activations


def input_shapes(config) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """One clip's video `(T, S, S, 3)` and log-mel `(F, M)`."""
  spec = pipeline.InputSpec.from_config(config.input)
  return (
    (spec.num_frames, spec.frame_size, spec.frame_size, 3),
    (spec.audio_frames, spec.mel.n_mels),
  )


def parameter_count(config) -> int:
  """Exact: the model's parameter shapes (nothing is computed)."""
  video, audio = input_shapes(config)
  model = cmvt.from_config(config)
  shapes = jax.eval_shape(
    model.init, jax.random.key(0), jnp.zeros((1, *video)), jnp.zeros((1, *audio))
  )
  return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes["params"]))


# Elements kept per token of a block, measured (`fit_coefficients`): (per D, per M, per H).
VIT_BLOCK = (14, 3, 3)  # the per-H term is per head and per token of the sequence (H·L)
LONGFORMER_BLOCK = (27, 3, 13)
RESNET_MAPS = (5.5, 7.5)  # identity shortcut, projection shortcut


def _block(tokens: int, width: int, heads: int, mlp: int, e: int, *, banded: bool) -> float:
  """Bytes one transformer block keeps for its backward pass (one sequence)."""
  if banded:
    per_d, per_m, per_h = LONGFORMER_BLOCK
    return tokens * (per_d * width + per_m * mlp + per_h * heads) * e
  per_d, per_m, per_h = VIT_BLOCK
  return tokens * (per_d * width + per_m * mlp + per_h * heads * tokens) * e


def _stack(
  tokens: int, width: int, heads: int, mlp: int, depth: int, e: int, *, banded: bool, remat: bool
) -> float:
  block = _block(tokens, width, heads, mlp, e, banded=banded)
  if not depth:
    return 0.0
  if remat:
    return depth * tokens * width * e + block
  return depth * block


def _vit(module: frame_lib.ViT, height: int, width: int, e: int, remat: bool) -> float:
  patch_h, patch_w = frame_lib.as_pair(module.patch_size, "patch_size")
  tokens = (height // patch_h) * (width // patch_w) + 1
  embed = 3 * tokens * module.width * e  # patch embedding, + positions, final norm input
  return embed + _stack(
    tokens,
    module.width,
    module.num_heads,
    module.mlp_dim,
    module.depth,
    e,
    banded=False,
    remat=remat,
  )


def _resnet(
  module: frame_lib.ResNet, height: int, width: int, e: int, remat: bool
) -> tuple[float, tuple[int, int, int]]:
  height, width = (
    math.ceil(height / module.stem_strides[0]),
    math.ceil(width / module.stem_strides[1]),
  )
  total = 3 * height * width * module.stem_width * e
  channels, blocks = module.stem_width, []
  for stage_width, count, strides in zip(
    module.stage_widths, module.blocks_per_stage, module.stage_strides
  ):
    for i in range(count):
      step = tuple(strides) if i == 0 else (1, 1)
      height, width = math.ceil(height / step[0]), math.ceil(width / step[1])
      maps = RESNET_MAPS[channels != stage_width or step != (1, 1)]
      blocks.append((maps * height * width * stage_width * e, height * width * channels * e))
      channels = stage_width
  if remat:
    total += sum(kept for _, kept in blocks) + max(full for full, _ in blocks)
  else:
    total += sum(full for full, _ in blocks)
  return total, (height, width, channels)


def _temporal(module, length: int, e: int, remat: bool) -> float:
  tokens = length + 1
  projected = tokens * module.width * e
  return projected + _stack(
    tokens,
    module.width,
    module.num_heads,
    module.mlp_dim,
    module.num_layers,
    e,
    banded=True,
    remat=remat,
  )


def activation_bytes(config, clips: int) -> dict[str, float]:
  """Bytes the backward pass keeps for `clips` clips, by tower (see the module docstring)."""
  model = cmvt.from_config(config)
  e = _DTYPE_BYTES[config.model.dtype]
  remat = bool(config.model.remat)
  (frames, size, _, _), (audio_frames, mels) = input_shapes(config)
  video = model.video_encoder
  if isinstance(video.frame_encoder, frame_lib.ViT):
    per_frame = _vit(video.frame_encoder, size, size, e, remat)
  else:
    per_frame, _ = _resnet(video.frame_encoder, size, size, e, remat)
  audio_cnn, (steps, _, _) = _resnet(model.audio_encoder.backbone, audio_frames, mels, e, remat)
  return {
    "frames": clips * frames * per_frame,
    "video temporal": clips * _temporal(video.temporal, frames, e, remat),
    "audio": clips * (audio_cnn + _temporal(model.audio_encoder.temporal, steps, e, remat)),
    "loss": 3 * clips * config.batch_size * 4,
  }


def chip_memory(config, chips: int, fsdp: int = 1, params: int | None = None) -> ChipMemory:
  """The model's bytes per chip for `config` on `chips` chips with an fsdp axis of `fsdp`."""
  params = parameter_count(config) if params is None else params
  clips = config.batch_size / chips
  video, audio = input_shapes(config)
  return ChipMemory(
    params=4 * params / fsdp,
    optimizer=8 * params / fsdp,
    gradients=4 * params / fsdp,
    inputs=clips * (math.prod(video) + math.prod(audio)) * 4,
    activations=sum(activation_bytes(config, clips).values()),
  )


def xla_memory(config, devices=None) -> dict[str, float]:
  """What XLA allocates per device for the whole train step (nothing is run): on this CPU's
  one device, or on `devices` (a TPU topology's, compiled by libtpu)."""
  run = run_lib.Run.create(config, "/tmp/cmvt_memory_model_unused", devices=devices)
  program = compile_lib.train_step(run, train.make_train_step)
  if program.compiled is None:
    raise ValueError(f"the train step does not fit: {program.refusal}")
  memory = compile_lib.per_chip_bytes(program.compiled)
  return {
    "arguments": memory["arguments"],
    "temp": memory["temporaries"],
    # The model leaves the program's code out.
    "total": memory["total"] - memory["code"],
  }


def step_seconds(config, chips: int, peak_flops: float, mfu: float) -> float:
  """Training-step time from the model FLOPs (3 × forward) at `mfu` of `chips` chips' peak."""
  video, audio = input_shapes(config)
  per_clip = flops_lib.count(
    cmvt.from_config(config), video_shape=video, audio_shape=audio
  ).train_step
  return per_clip * config.batch_size / (chips * peak_flops * mfu)


# ----------------------------------------------------------------------------- tables


def with_frames(config, frames: int, clips_per_chip: float, chips: int, remat: bool):
  config = config.copy_and_resolve_references()
  config.input.num_frames = frames
  config.batch_size = int(clips_per_chip * chips)
  config.model.remat = remat
  return config


def reduced(frames: int, size: int, batch: int, remat: bool):
  """vtn_base's structure at widths that compile on this CPU in float32, activations first."""
  config = vtn_base.get_config()
  config.input.num_frames, config.input.frame_size, config.batch_size = frames, size, batch
  config.optim.grad_accum_steps = 1  # the model has no term for accumulation
  model = config.model
  model.dtype, model.remat = "float32", remat
  model.embed_dim, model.projection_hidden_dim = 64, 256
  vit = model.video.vit
  vit.width, vit.depth, vit.num_heads, vit.mlp_dim, vit.patch_size = 96, 3, 3, 384, 8
  temporal = model.video.temporal
  temporal.width, temporal.num_layers, temporal.num_heads, temporal.mlp_dim = 96, 2, 3, 384
  cnn = model.audio.cnn
  cnn.stem_width, cnn.stage_widths, cnn.blocks_per_stage, cnn.norm_groups = (
    16,
    (16, 32, 64, 64),
    (1, 1, 1, 1),
    8,
  )
  audio = model.audio.temporal
  audio.width, audio.num_layers, audio.num_heads, audio.mlp_dim = 64, 1, 2, 256
  return config


def print_parameters():
  print("| config | parameters | float32 state (params + AdamW) |")
  print("|---|---:|---:|")
  for name, config in (
    ("vtn_base", vtn_base.get_config()),
    ("tpu_pod (large)", tpu_pod.get_config()),
  ):
    count = parameter_count(config)
    print(f"| {name} | {count / 1e6:.1f} M | {12 * count / GIB:.2f} GiB |")


def print_memory_table(name: str, config, chips: int, fsdp: int):
  params = parameter_count(config)
  print(
    f"\n{name}: {chips} chips, fsdp={fsdp}, {config.model.dtype}; GiB per chip "
    "(state = params + AdamW, grads, activations without / with remat, total with remat)"
  )
  print("| frames | clips/chip | state | grads | act. no remat | act. remat | total remat |")
  print("|---:|---:|---:|---:|---:|---:|---:|")
  for frames in (16, 64, 256, 1024):
    for clips in (1, 4, 16):
      plain = chip_memory(with_frames(config, frames, clips, chips, False), chips, fsdp, params)
      remat = chip_memory(with_frames(config, frames, clips, chips, True), chips, fsdp, params)
      print(
        f"| {frames} | {clips} | {plain.state / GIB:.2f} | {plain.gradients / GIB:.2f} | "
        f"{plain.activations / GIB:.1f} | {remat.activations / GIB:.2f} | "
        f"{remat.total / GIB:.1f} |"
      )


CHECK_SHAPES = ((4, 64, 8), (16, 64, 4), (8, 96, 2), (32, 64, 2), (8, 128, 2))


def print_check():
  print("\n| reduced shape (float32, 1 CPU device, no remat) | model MiB | XLA MiB | error |")
  print("|---|---:|---:|---:|")
  errors = []
  for frames, size, batch in CHECK_SHAPES:
    config = reduced(frames, size, batch, remat=False)
    model = chip_memory(config, chips=1).total
    xla = xla_memory(config)["total"]
    errors.append(model / xla - 1)
    print(
      f"| {frames} frames of {size}², batch {batch} | {model / 2**20:.1f} | "
      f"{xla / 2**20:.1f} | {errors[-1]:+.1%} |"
    )
  _print_errors(errors)


def print_tpu_check(topology: str = "v5e-1"):
  """The model against libtpu's compiler for one chip, bf16 compute, remat off and on."""
  devices = compile_lib.Topology.parse(topology).devices(1)
  print(f"\n| reduced shape (bf16, one {topology} chip) | remat | model MiB | TPU MiB | error |")
  print("|---|---|---:|---:|---:|")
  errors = []
  for frames, size, batch in CHECK_SHAPES:
    for remat in (False, True):
      config = reduced(frames, size, batch, remat=remat)
      config.model.dtype = "bfloat16"
      model = chip_memory(config, chips=1).total
      tpu = xla_memory(config, devices)["total"]
      errors.append(model / tpu - 1)
      print(
        f"| {frames} frames of {size}², batch {batch} | {'on' if remat else 'off'} | "
        f"{model / 2**20:.1f} | {tpu / 2**20:.1f} | {errors[-1]:+.1%} |",
        flush=True,
      )
  _print_errors(errors)


def _print_errors(errors: list[float]) -> None:
  print(
    f"\nlargest error {max(errors, key=abs):+.1%}, mean |error| "
    f"{sum(map(abs, errors)) / len(errors):.1%}"
  )


def _grad_temp(module, shape) -> int:
  """Compiled temp bytes of the gradient of sum(module(x)²) (nothing is run)."""
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  params = jax.eval_shape(module.init, jax.random.key(0), x)
  loss = lambda params, x: jnp.sum(module.apply(params, x) ** 2)
  return jax.jit(jax.grad(loss)).lower(params, x).compile().memory_analysis().temp_size_in_bytes


def fit_coefficients():
  """Measures the per-token elements a block keeps (VIT_BLOCK, LONGFORMER_BLOCK): the temp
  memory of 3 blocks minus 1 block, over shapes that vary D, M, H and L one at a time."""

  def vit(width, mlp, heads, size, images=64):
    per_depth = [
      _grad_temp(
        frame_lib.ViT(
          patch_size=8, width=width, depth=depth, num_heads=heads, mlp_dim=mlp, image_size=size
        ),
        (images, size, size, 3),
      )
      for depth in (1, 3)
    ]
    return (per_depth[1] - per_depth[0]) / 2 / (images * ((size // 8) ** 2 + 1)) / 4

  def longformer(width, mlp, heads, window, length=2048, batch=4):
    per_depth = [
      _grad_temp(
        temporal_encoder.TemporalEncoder(
          width=width,
          num_layers=layers,
          num_heads=heads,
          mlp_dim=mlp,
          windows=(window,) * layers,
          dilations=(1,) * layers,
        ),
        (batch, length, width),
      )
      for layers in (1, 3)
    ]
    return (per_depth[1] - per_depth[0]) / 2 / (batch * (length + 1)) / 4

  print("\n| block | D | M | H | L or window | elements kept per token (XLA:CPU) |")
  print("|---|---:|---:|---:|---:|---:|")
  for args in (
    (96, 384, 3, 64),
    (96, 768, 3, 64),
    (96, 384, 6, 64),
    (96, 384, 3, 128),
    (192, 768, 3, 64),
  ):
    tokens = (args[3] // 8) ** 2 + 1
    print(f"| ViT | {args[0]} | {args[1]} | {args[2]} | L={tokens} | {vit(*args):.0f} |")
  for args in (
    (96, 384, 3, 4),
    (96, 768, 3, 4),
    (96, 384, 6, 4),
    (96, 384, 3, 16),
    (192, 768, 3, 4),
  ):
    print(
      f"| Longformer | {args[0]} | {args[1]} | {args[2]} | w={args[3]} | {longformer(*args):.0f} |"
    )


PODS = (  # name, chips, hosts, slices, peak bf16 FLOP/s per chip (datasheet)
  ("v5e-256", 256, 64, 1, 197e12),
  ("v5p-512 (256 chips)", 256, 64, 1, 459e12),
  ("2 × v5e-256", 512, 128, 2, 197e12),
)
MFU = 0.35


def print_step_times():
  print(f"\nStep time at {MFU:.0%} MFU (model FLOPs = 3 × forward), global batch as configured")
  print("| config | frames | global batch | pod | s/step | clips/s |")
  print("|---|---:|---:|---|---:|---:|")
  for name, config in (("vtn_base", vtn_base.get_config()), ("tpu_pod", tpu_pod.get_config())):
    config.batch_size = tpu_pod.get_config().batch_size
    for frames in (16, 64):
      config.input.num_frames = frames
      for pod, chips, _, _, peak in PODS:
        seconds = step_seconds(config, chips, peak, MFU)
        print(
          f"| {name} | {frames} | {config.batch_size} | {pod} | {seconds:.2f} | "
          f"{config.batch_size / seconds:.0f} |"
        )


def print_all_gather():
  embed = tpu_pod.get_config().model.embed_dim
  print(
    f"\nContrastive all-gather per step (E={embed}, float32 embeddings of both towers; the "
    "backward reduce-scatters as much)"
  )
  print("| hosts | chips | global batch | gathered per chip | crossing DCN per slice |")
  print("|---:|---:|---:|---:|---:|")
  for hosts, chips, slices in ((1, 4, 1), (64, 256, 1), (128, 512, 2), (256, 1024, 4)):
    for per_chip in (16,):
      batch = per_chip * chips
      gathered = 2 * batch * embed * 4 * (1 - 1 / chips)
      dcn = 2 * batch * embed * 4 * (1 - 1 / slices)
      print(f"| {hosts} | {chips} | {batch} | {gathered / 2**20:.1f} MiB | {dcn / 2**20:.1f} MiB |")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument(
    "--skip_check", action="store_true", help="skip the XLA compilations (minutes on a small CPU)"
  )
  parser.add_argument(
    "--fit", action="store_true", help="also measure the per-token block coefficients"
  )
  parser.add_argument(
    "--tpu",
    action="store_true",
    help="check the model against the TPU compiler instead (needs requirements-tpu.txt)",
  )
  args = parser.parse_args()
  print_parameters()
  print_memory_table("vtn_base", vtn_base.get_config(), chips=256, fsdp=1)
  pod = tpu_pod.get_config()
  print_memory_table("tpu_pod (large)", pod, chips=256, fsdp=dict(pod.mesh.axes)["fsdp"])
  if args.fit:
    fit_coefficients()
  if args.tpu:
    print_tpu_check()
  elif not args.skip_check:
    print_check()
  print_step_times()
  print_all_gather()


if __name__ == "__main__":
  main()
