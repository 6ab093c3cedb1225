"""`--mode compile`: a config's programs, compiled ahead of time for a TPU topology.

No chip and no dataset: libtpu's compiler (`pip install -r requirements-tpu.txt`) builds, on
this machine, exactly the programs a run on `compile.topology` × `compile.num_slices` would
execute, from abstract inputs:
  train_step    the update step of the run (its mesh rules, shardings, global batch, dtype,
                remat, donation and gradient accumulation: `train.make_train_step` itself)
  embed_step    the clip-embedding step of evaluation and export, at the larger of their
                global batch sizes
  whole_video   the one-pass temporal encoder and audio tower over a video of
                `compile.whole_video_frames` frames on one chip (whole-video export runs
                each video on a process's first chip; its frames reach the temporal encoder
                as features, encoded in chunks beforehand)
For each: the per-chip memory of XLA's buffer assignment (arguments, outputs, temporaries;
outputs that alias a donated argument counted once), the chip's HBM and the headroom, model
FLOPs per chip and the collectives one step of the optimised HLO executes. The tables are
printed and written with the HLO text to WORKDIR/compile/. Exit 1 (`DoesNotFitError`) when
a program does not fit.

Topologies are named as Cloud TPU names accelerator types: `v5e-256` (or `v5litepod-256`),
`v6e-64`, `v4-128`, `v5p-512`; the number counts chips for v5e/v6e and TensorCores for v4/v5p
(two per chip, which these programs use as one device: "megacore").
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import topologies
from ml_collections import config_dict

from cmvt_jax import embedding
from cmvt_jax import files
from cmvt_jax import flops as flops_lib
from cmvt_jax import run as run_lib
from cmvt_jax import sharding

GIB = 1 << 30
# Below this share of HBM left free a program may still fail on the chip: XLA's runtime, the
# input pipeline's transfers and fragmentation take some.
HEADROOM_WARNING = 0.15
PROGRAMS = ("train_step", "embed_step", "whole_video")


@dataclasses.dataclass(frozen=True)
class Generation:
  """A TPU generation: what Cloud's accelerator-type number counts, its chips, its HBM."""

  name: str  # as libtpu's topology names spell it: "v5e"
  cores_per_chip: int  # TensorCores the accelerator-type number counts per chip
  chip_config: str  # libtpu's chip config: one device per chip
  hbm_bytes: int  # per chip
  shapes: dict[int, tuple[int, ...]]  # chips → the slice's torus (chips per axis)


_2D = {
  1: (1, 1),
  4: (2, 2),
  8: (2, 4),
  16: (4, 4),
  32: (4, 8),
  64: (8, 8),
  128: (8, 16),
  256: (16, 16),
}
_3D = {
  4: (2, 2, 1),
  8: (2, 2, 2),
  16: (2, 2, 4),
  32: (2, 4, 4),
  64: (4, 4, 4),
  128: (4, 4, 8),
  256: (4, 8, 8),
  512: (8, 8, 8),
  1024: (8, 8, 16),
  2048: (8, 16, 16),
  4096: (16, 16, 16),
}
GENERATIONS = {
  "v4": Generation("v4", 2, "megacore", 32 * GIB, _3D),
  "v5e": Generation("v5e", 1, "default", 16 * GIB, _2D),
  "v5p": Generation("v5p", 2, "megacore", 95 * GIB, _3D),
  "v6e": Generation("v6e", 1, "default", 32 * GIB, _2D),
}
_ALIASES = {"v5litepod": "v5e", "v6litepod": "v6e"}


@dataclasses.dataclass(frozen=True)
class Topology:
  """One slice of a TPU accelerator type, e.g. `v5e-256`: 256 chips in a 16 × 16 torus."""

  accelerator_type: str
  generation: Generation
  chips: int

  @classmethod
  def parse(cls, name: str) -> Topology:
    match = re.fullmatch(r"([a-z0-9]+)-(\d+)", name.strip().lower())
    generation = match and GENERATIONS.get(_ALIASES.get(match[1], match[1]))
    if not generation:
      known = ", ".join(f"{g}-N" for g in [*GENERATIONS, *_ALIASES])
      raise ValueError(
        f"compile.topology={name!r} is no TPU accelerator type we know; use one of {known} "
        "(as Cloud TPU names them, e.g. v5e-256 or v5p-512)."
      )
    count = int(match[2])
    chips, odd = divmod(count, generation.cores_per_chip)
    if odd or chips not in generation.shapes:
      sizes = ", ".join(str(c * generation.cores_per_chip) for c in generation.shapes)
      unit = "TensorCores" if generation.cores_per_chip > 1 else "chips"
      raise ValueError(
        f"compile.topology={name!r}: a {generation.name} slice has one of {sizes} {unit}."
      )
    return cls(f"{generation.name}-{count}", generation, chips)

  @property
  def shape(self) -> tuple[int, ...]:
    return self.generation.shapes[self.chips]

  @property
  def host_bounds(self) -> tuple[int, int, int]:
    """Chips per host along the torus axes: a v5e/v6e host of a slice of more than 8 chips
    has 2 × 2; smaller slices are one host; v4 and v5p hosts have 2 × 2 × 1."""
    if len(self.shape) == 2 and self.chips <= 8:
      return (*self.shape, 1)
    return (2, 2, 1)

  def devices(self, num_slices: int) -> list:
    """The devices of `num_slices` such slices, without chips (libtpu's topology)."""
    # libtpu looks for this machine's TPU unless told which one it is (a CPU has none).
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", self.accelerator_type)
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    # libtpu takes a machine-wide lock for the chips it would drive; compiling drives none,
    # so two compile checks (or a compile beside a test) may run at once.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
      description = topologies.get_topology_desc(
        platform="tpu",
        topology_name=f"{self.generation.name}:{'x'.join(map(str, self.shape))}",
        chip_config_name=self.generation.chip_config,
        chips_per_host_bounds=self.host_bounds,
        num_slices=num_slices,
      )
    except RuntimeError as error:
      if importlib.util.find_spec("libtpu") is None:
        raise MissingCompilerError(
          "--mode compile needs the TPU compiler (libtpu), which is not installed here: "
          "pip install -r requirements-tpu.txt"
        ) from error
      raise
    return list(description.devices)


class MissingCompilerError(ValueError):
  """libtpu is not installed."""


class DoesNotFitError(ValueError):
  """A program needs more memory per chip than the chip's HBM."""


# ----------------------------------------------------------------------------- programs


@dataclasses.dataclass(frozen=True)
class Program:
  """One compiled program and what it was compiled for."""

  name: str
  inputs: str  # what one call takes, for the table's title
  chips: int  # the chips it runs on
  model_flops: float  # per call, on all its chips together
  compiled: jax.stages.Compiled | None  # None: refused by the compiler, see `refusal`
  refusal: str | None  # the TPU compiler's words when the program cannot fit HBM
  lower_seconds: float  # tracing and lowering to StableHLO (Python, jax)
  compile_seconds: float  # libtpu's compiler


def _program(name: str, inputs: str, chips: int, model_flops: float, step, *args) -> Program:
  """Lowers and compiles the jitted `step` for `args` (abstract, with their shardings). A
  program the TPU compiler refuses because it cannot fit the chip's HBM is returned with
  the compiler's words instead of raising."""
  start = time.perf_counter()
  lowered = step.lower(*args)
  lowered_at = time.perf_counter()
  compiled, refusal = None, None
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as error:
    words = str(error).strip().splitlines()[0]
    if not words.startswith("RESOURCE_EXHAUSTED"):
      raise
    refusal = words.removeprefix("RESOURCE_EXHAUSTED:").strip()
  return Program(
    name,
    inputs,
    chips,
    model_flops,
    compiled,
    refusal,
    lowered_at - start,
    time.perf_counter() - lowered_at,
  )


def _abstract(shape, dtype, sharding_) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype), sharding=sharding_)


def train_step(run: run_lib.Run, make_train_step: Callable) -> Program:
  """The run's update step on its global batch."""
  batch_size = int(run.config.batch_size)
  views = 2 if run.config.input.two_views else 1
  batch = run_lib.abstract_clips(
    run.spec, batch_size, sharding.batch_sharding(run.mesh), two_views=views == 2
  )
  return _program(
    "train_step",
    f"global batch {batch_size}" + (" × 2 views" if views == 2 else ""),
    run.mesh.size,
    run.flops().train_step * batch_size * views,
    make_train_step(run),
    run.abstract_state,
    batch,
  )


def embed_step(run: run_lib.Run) -> Program:
  """Evaluation's and export's clip embedding, at the larger of their batch sizes."""
  rows = max(int(run.config.eval.batch_size), int(run.config.export.batch_size))
  batch = run_lib.abstract_clips(run.spec, rows, sharding.batch_sharding(run.mesh))
  return _program(
    "embed_step",
    f"global batch {rows}",
    run.mesh.size,
    run.flops().forward * rows,
    embedding.clip_embedding_step(run.model, run.mesh, logits=run.config.objective == "supervised"),
    run.abstract_state.params["model"],
    batch["video"],
    batch["audio"],
  )


def whole_video(run: run_lib.Run, frames: int) -> Program:
  """The long-sequence passes of one whole video of `frames` input frames on one chip: the
  temporal encoder over its frame features and the audio tower over its log-mel, each padded
  to its bucket (the frames go through the frame encoder in chunks beforehand)."""
  on_chip = jax.sharding.SingleDeviceSharding(run.mesh.devices.flat[0])
  params = jax.tree.map(
    lambda x: _abstract(x.shape, x.dtype, on_chip), run.abstract_state.params["model"]
  )
  spec = run.spec
  padded = embedding.bucket_tokens(frames + 1) - 1
  audio_frames = spec.mel.num_frames(round(frames / spec.fps * spec.mel.sample_rate))
  one_frame = _abstract((1, spec.frame_size, spec.frame_size, 3), np.float32, on_chip)
  feature_dim = jax.eval_shape(embedding.frame_step(run.model), params, one_frame).shape[1]
  audio_padded = embedding.audio_bucket(run.model, audio_frames)
  features = _abstract((1, padded, feature_dim), np.float32, on_chip)
  frame_mask = _abstract((1, padded), np.bool_, on_chip)
  audio = _abstract((1, audio_padded, spec.mel.n_mels), np.float32, on_chip)
  audio_mask = _abstract((1, audio_padded), np.bool_, on_chip)
  video_shape = (frames, spec.frame_size, spec.frame_size, 3)
  forward = flops_lib.count(run.model, video_shape=video_shape, audio_shape=audio.shape[1:])
  return _program(
    "whole_video",
    f"one video of {frames} frames (features padded to {padded}) and {audio_frames} audio "
    f"frames (padded to {audio_padded})",
    1,
    forward.forward,
    embedding.whole_video_step(run.model),
    params,
    features,
    frame_mask,
    audio,
    audio_mask,
  )


# ----------------------------------------------------------------------------- analysis


def per_chip_bytes(compiled: jax.stages.Compiled) -> dict[str, int]:
  """XLA's buffer assignment for one chip: what the program holds at its peak.

  total = arguments + outputs − aliased (outputs written into donated arguments) +
  temporaries + the program's code.
  """
  memory = compiled.memory_analysis()
  parts = {
    "arguments": memory.argument_size_in_bytes,
    "outputs": memory.output_size_in_bytes,
    "aliased": memory.alias_size_in_bytes,
    "temporaries": memory.temp_size_in_bytes,
    "code": memory.generated_code_size_in_bytes,
  }
  parts = {key: int(value) for key, value in parts.items()}
  parts["total"] = (
    parts["arguments"] + parts["outputs"] - parts["aliased"] + parts["temporaries"] + parts["code"]
  )
  return parts


COLLECTIVE_KINDS = (
  "all-gather",
  "reduce-scatter",
  "all-reduce",
  "all-to-all",
  "collective-permute",
  "collective-broadcast",
  "ragged-all-to-all",
)
_BITS = {"pred": 8, "s4": 4, "u4": 4, "s8": 8, "u8": 8, "s16": 16, "u16": 16, "f16": 16}
_BITS.update({"bf16": 16, "s32": 32, "u32": 32, "f32": 32, "s64": 64, "u64": 64, "f64": 64})
_BITS.update({"c64": 64, "c128": 128, "f8e4m3fn": 8, "f8e5m2": 8, "f8e4m3b11fnuz": 8})
# An array in an HLO shape: dtype and dimensions, e.g. `bf16[8,128]`.
ARRAY_SHAPE = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s+\((.*)\)\s+->\s+.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s+=\s+(.*?)\s+([a-z][a-z0-9\-]*)\((.*)$")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_CALLED = re.compile(r"\b(?:calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_WHILE = re.compile(r"condition=%?([\w.\-]+), body=%?([\w.\-]+)")
# The TPU compiler writes a reduce-scatter as a fusion calling a computation of this name
# (an all-reduce and a dynamic slice inside): counted once, as a reduce-scatter.
_REDUCE_SCATTER_FUSION = "all-reduce-scatter"


def array_elements(dims: str) -> int:
  """Elements of an array from its HLO dimensions, `"8,128"` → 1024 (`""`, a scalar: 1)."""
  return int(np.prod([int(d) for d in dims.split(",") if d]))


def _bytes(shape_text: str) -> int:
  """Bytes of the arrays in an HLO shape (a tuple's elements summed)."""
  total = 0
  for dtype, dims in ARRAY_SHAPE.findall(shape_text):
    if dtype in _BITS:
      total += array_elements(dims) * _BITS[dtype] // 8
  return total


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
  """`{kind: {"count": n, "bytes": b}}` of the collectives one run of the program executes,
  read from its optimised HLO text.

  Counted wherever they are (fusions included), once each: an async `-start`/`-done` pair
  once; a fusion that calls an all-reduce-scatter as one reduce-scatter (and not the
  all-reduce inside it); inside a `while` loop (scanned layers, the compiler's windowed
  matmuls) as many times as the loop runs (its condition's `< constant` bound; once if it has
  none). Bytes: of the results each chip receives — an all-gather's gathered tensor, a
  reduce-scatter's shard, an all-reduce's sum — every element of a tuple counted (combined
  collectives move several tensors at once).
  """
  computations, entry = _computations(hlo_text)
  executions: dict[str, int] = {}

  def run(name: str, times: int) -> None:
    executions[name] = executions.get(name, 0) + times
    for instruction in computations.get(name, ()):
      for callee, factor in _callees(instruction, computations):
        run(callee, times * factor)

  run(entry, 1)
  found = {kind: {"count": 0, "bytes": 0} for kind in COLLECTIVE_KINDS}
  for computation, times in executions.items():
    if computation.startswith(_REDUCE_SCATTER_FUSION):
      continue
    started = {}
    for name, shape, op, rest in computations[computation]:
      called = _CALLS.search(rest)
      if op == "fusion" and called and called[1].startswith(_REDUCE_SCATTER_FUSION):
        kind = "reduce-scatter"
      else:
        kind = op.removesuffix("-start").removesuffix("-done")
      if kind not in found:
        continue
      if op.endswith("-start"):  # its result holds the operands too: the -done's result counts
        started[name] = kind
        found[kind]["count"] += times
      elif op.endswith("-done"):
        start = re.match(r"\s*%?([\w.\-]+)", rest)
        found[started.get(start[1] if start else "", kind)]["bytes"] += times * _bytes(shape)
      else:
        found[kind]["count"] += times
        found[kind]["bytes"] += times * _bytes(shape)
  return {kind: value for kind, value in found.items() if value["count"]}


def _computations(hlo_text: str) -> tuple[dict[str, list[tuple[str, ...]]], str]:
  """{computation: [(name, shape, op, rest of the line), ...]} and the entry's name."""
  computations: dict[str, list[tuple[str, ...]]] = {}
  current, entry = None, ""
  for line in hlo_text.splitlines():
    header = _COMPUTATION.match(line)
    if header:
      current = computations.setdefault(header[1], [])
      entry = header[1] if line.startswith("ENTRY") else entry
      continue
    match = _INSTRUCTION.match(line)
    if match and current is not None:
      current.append(match.groups())
  return computations, entry


def _callees(instruction: tuple[str, ...], computations: dict) -> list[tuple[str, int]]:
  """(computation, runs per execution of the instruction) of what it calls."""
  _, _, op, rest = instruction
  if op == "while":
    loop = _WHILE.search(rest)
    if loop:
      return [(loop[2], _trip_count(computations.get(loop[1], ())))]
  called = _CALLED.findall(rest)
  for branches in _BRANCHES.findall(rest):
    called += [name.strip().lstrip("%") for name in branches.split(",")]
  return [(name, 1) for name in called if name in computations]


def _trip_count(condition: list[tuple[str, ...]]) -> int:
  """A loop condition's bound: `compare(i, constant N), direction=LT` runs the body N times
  (the counters XLA writes start at 0 and step by 1); 1 when no such bound is found."""
  constants = {
    name: int(value[1])
    for name, _, op, rest in condition
    if op == "constant" and (value := re.match(r"(-?\d+)\)", rest))
  }
  for _, _, op, rest in condition:
    if op == "compare" and "direction=LT" in rest:
      operands = [o.strip().lstrip("%") for o in rest.split(")")[0].split(",")]
      if len(operands) == 2 and operands[1] in constants:
        return max(constants[operands[1]], 0)
  return 1


# ----------------------------------------------------------------------------- the mode


def compile_programs(
  config: config_dict.ConfigDict, workdir: str, *, make_train_step: Callable
) -> dict:
  """`--mode compile`: compiles, reports and checks every program; returns the summary.

  `make_train_step` is `train.make_train_step` (passed in: the training loop's module comes
  after this one in the package's import order).
  """
  if not config.compile.topology:
    raise ValueError(
      "--mode compile needs a TPU topology: pass --config.compile.topology=v5e-8 (or the "
      "accelerator type you will run on, e.g. v5e-256, v5p-512)."
    )
  topology = Topology.parse(config.compile.topology)
  # An executable compiled for a described topology cannot be read back from jax's persistent
  # cache without a TPU client (jax warns and compiles again): keep these out of it.
  jax.config.update("jax_enable_compilation_cache", False)
  config = config.copy_and_resolve_references()
  if config.compile.num_slices is not None:
    config.mesh.num_slices = int(config.compile.num_slices)
  num_slices = int(config.mesh.num_slices)
  frames = int(config.compile.whole_video_frames)
  if frames < 1:
    raise ValueError(f"compile.whole_video_frames must be >= 1; got {frames}.")
  chosen = tuple(config.compile.programs)
  unknown = sorted(set(chosen) - set(PROGRAMS))
  if unknown or not chosen:
    raise ValueError(
      f"compile.programs={chosen}: choose among {PROGRAMS}; unknown: {unknown or 'none given'}."
    )
  where = (
    f"{num_slices} × {topology.accelerator_type}" if num_slices > 1 else topology.accelerator_type
  )
  logging.info(
    "Compiling for %s (%d chips) with libtpu, on this machine's CPU.",
    where,
    topology.chips * num_slices,
  )
  run = run_lib.Run.create(config, workdir, devices=topology.devices(num_slices))
  hbm = topology.generation.hbm_bytes
  peak = flops_lib.peak_flops_of(run.mesh.devices.flat[0].device_kind)
  out = epath.Path(workdir) / "compile"
  out.mkdir(parents=True, exist_ok=True)
  builders = {
    "train_step": lambda: train_step(run, make_train_step),
    "embed_step": lambda: embed_step(run),
    "whole_video": lambda: whole_video(run, frames),
  }
  programs = {}
  for name in chosen:
    program = builders[name]()
    programs[name] = _summary(program, hbm, out)
    if program.compiled is not None:
      logging.info("%s", table(name, programs[name], peak))
  result = {
    "topology": topology.accelerator_type,
    "num_slices": num_slices,
    "chips": topology.chips * num_slices,
    "device_kind": run.mesh.devices.flat[0].device_kind,
    "mesh": dict(run.mesh.shape),
    "config_sha256": run_lib.config_digest(config),
    "programs": programs,
  }
  files.write_json(out / "summary.json", result, kind="compile-summary")
  logging.info("Wrote %s and each program's optimised HLO there.", out / "summary.json")
  _check_fit(programs, topology)
  return result


def _summary(program: Program, hbm: int, out: epath.Path) -> dict:
  """A program's entry of summary.json; its HLO text written beside it."""
  summary = {
    "inputs": program.inputs,
    "chips": program.chips,
    "hbm_bytes_per_chip": hbm,
    "model_flops_per_chip": program.model_flops / program.chips,
    "lower_seconds": round(program.lower_seconds, 1),
    "compile_seconds": round(program.compile_seconds, 1),
  }
  if program.compiled is None:
    return {**summary, "fits": False, "compiler": program.refusal}
  text = program.compiled.as_text()
  hlo = f"{program.name}.hlo.txt"
  files.write_text(out / hlo, text, kind="compile-hlo")
  memory = per_chip_bytes(program.compiled)
  found = collectives(text)
  return {
    **summary,
    "per_chip_bytes": memory,
    "headroom": 1 - memory["total"] / hbm,
    "fits": memory["total"] <= hbm,
    "collectives": {kind: c["count"] for kind, c in found.items()},
    "collective_bytes": {kind: c["bytes"] for kind, c in found.items()},
    "hlo": hlo,
  }


# What to change when a program does not fit.
_ADVICE = {
  "train_step": "Lower batch_size, set model.remat=True, raise optim.grad_accum_steps or the "
  "fsdp axis of mesh.axes, or use a larger slice.",
  "embed_step": "Lower eval.batch_size and export.batch_size, or raise the fsdp axis of mesh.axes.",
  "whole_video": "Lower compile.whole_video_frames: videos that long do not fit one chip.",
}


def _check_fit(programs: dict, topology: Topology) -> None:
  chip = topology.generation.name
  for name, summary in programs.items():
    hbm = summary["hbm_bytes_per_chip"]
    if "compiler" in summary:
      raise DoesNotFitError(
        f"{name} does not fit the {hbm / GIB:.2f} GiB of HBM of a {chip} chip; the TPU "
        f"compiler: {summary['compiler']} {_ADVICE[name]}"
      )
    total = summary["per_chip_bytes"]["total"]
    if not summary["fits"]:
      raise DoesNotFitError(
        f"{name} needs {total / GIB:.2f} GiB per chip but a {chip} chip has "
        f"{hbm / GIB:.2f} GiB of HBM. {_ADVICE[name]}"
      )
    if summary["headroom"] < HEADROOM_WARNING:
      logging.warning(
        "%s leaves %.0f%% of the chip's HBM free (%.2f of %.2f GiB used): under %.0f%%, "
        "the runtime's own buffers may not fit on the chip. %s",
        name,
        100 * summary["headroom"],
        total / GIB,
        hbm / GIB,
        100 * HEADROOM_WARNING,
        _ADVICE[name],
      )


def table(name: str, summary: dict, peak_flops: float) -> str:
  """One program's summary as a text table."""
  memory = summary["per_chip_bytes"]
  rows = [
    (key, _size(memory[key]))
    for key in ("arguments", "outputs", "aliased", "temporaries", "code", "total")
  ]
  flops = summary["model_flops_per_chip"]
  rows += [
    ("HBM", _size(summary["hbm_bytes_per_chip"])),
    ("headroom", f"{100 * summary['headroom']:.1f}%"),
    ("model FLOPs", f"{flops:.3e} (at the chip's peak {flops / peak_flops * 1e3:.3g} ms)"),
    ("lower, compile", f"{summary['lower_seconds']:.1f} s, {summary['compile_seconds']:.1f} s"),
  ]
  for kind, count in summary["collectives"].items():
    rows.append((kind, f"{count} ({_size(summary['collective_bytes'][kind])})"))
  width = max(len(key) for key, _ in rows)
  lines = [f"{name} ({summary['inputs']}), per chip:"]
  lines += [f"  {key:<{width}}  {value}" for key, value in rows]
  return "\n".join(lines)


def _size(count: int) -> str:
  return f"{count / GIB:.2f} GiB" if count >= GIB else f"{count / (1 << 20):.1f} MiB"
