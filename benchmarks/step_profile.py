"""Where a training step's time goes: each part of the default step timed alone, as a table.

Each row is one jitted function on random inputs of the default config's batch, run after a
compile step and timed over `--steps` calls: the forward and backward pass of each part of
the model (gradients with respect to its parameters and input), the loss, the optimiser
update, and the whole train step (`train.make_train_step`) for reference. The parts do not
add up exactly to the step (XLA fuses across them inside the step), but they rank where the
time goes. Also: the whole step's compile time, and the host side of the real loop (input
wait, dispatch) is in the default run's own `input wait` line.

  python -m benchmarks.step_profile [--steps 20] [--set KEY=VALUE ...]

`--set input.frame_size=32 --set input.n_mels=64 --set batch_size=64` measures the default of
before the first run was made faster (issue 18).
"""

from __future__ import annotations

import argparse
import ast
import functools
import platform
import time

import jax
import jax.numpy as jnp
import optax

from benchmarks import train_step as train_step_benchmark
from cmvt_jax import run as run_lib
from cmvt_jax import train
from configs import default


def _timed(function, *args, steps: int) -> tuple[float, float]:
  """(compile + first call seconds, seconds per call) of a jitted function."""
  started = time.perf_counter()
  jax.block_until_ready(function(*args))
  first = time.perf_counter() - started
  started = time.perf_counter()
  for _ in range(steps):
    out = function(*args)
  jax.block_until_ready(out)
  return first, (time.perf_counter() - started) / steps


def _forward_backward(apply):
  """A jitted fwd+bwd of `apply(params, x)`: gradients w.r.t. the parameters and the input."""

  def loss(params, x):
    return jnp.sum(apply(params, x).astype(jnp.float32) ** 2)

  return jax.jit(jax.grad(loss, argnums=(0, 1)))


def parts(run: run_lib.Run, batch: dict) -> list[tuple[str, object, tuple]]:
  """(name, jitted function, arguments) of every part of the model's step."""
  model = run.model
  params = run.init_state().params["model"]
  variables = {"params": params}
  b, t = batch["video"].shape[:2]
  frames = batch["video"].reshape((b * t,) + batch["video"].shape[2:])

  def method(function):
    return lambda params, x: model.apply({"params": params}, x, method=function)

  frame_features = jax.jit(method(lambda m, x: m.video_encoder.encode_frames(x)))(
    params, frames
  ).reshape(b, t, -1)
  audio = batch["audio"]
  audio_map = model.apply(
    variables, audio[..., None], method=lambda m, x: m.audio_encoder.backbone.feature_map(x)
  )
  audio_sequence = audio_map.reshape(audio_map.shape[:2] + (-1,))
  out = jax.jit(lambda p, v, a: model.apply({"params": p}, v, a))(
    params, batch["video"], batch["audio"]
  )
  log_temperature = run.init_state().params["log_temperature"]
  full_params = run.init_state().params
  grads = jax.tree.map(jnp.ones_like, full_params)
  opt_state = run.tx.init(full_params)

  @jax.jit
  def optimiser(grads, opt_state, params):
    updates, opt_state = run.tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return [
    (
      f"video frame encoder ({b}×{t} frames)",
      _forward_backward(method(lambda m, x: m.video_encoder.encode_frames(x))),
      (params, frames),
    ),
    (
      "video temporal encoder",
      _forward_backward(method(lambda m, x: m.video_encoder.encode_features(x))),
      (params, frame_features),
    ),
    (
      "audio CNN",
      _forward_backward(method(lambda m, x: m.audio_encoder.backbone.feature_map(x))),
      (params, audio[..., None]),
    ),
    (
      "audio temporal encoder",
      _forward_backward(method(lambda m, x: m.audio_encoder.temporal(x))),
      (params, audio_sequence),
    ),
    (
      "projection heads + loss",
      jax.jit(
        jax.grad(
          lambda lt, v, a: run.loss(lt, model.apply(variables, v, method=_project_video), a)[0],
          argnums=(0, 1, 2),
        )
      ),
      (log_temperature, out["video_features"], out["audio"]),
    ),
    ("optimiser update (AdamW, clipping)", optimiser, (grads, opt_state, full_params)),
  ]


def _project_video(module, features):
  return module.video_projection(features)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--set", action="append", default=[], help="KEY=VALUE config override")
  args = parser.parse_args()
  config = default.get_config()
  for item in args.set:
    key, value = item.split("=", 1)
    *sections, leaf = key.split(".")
    node = config
    for section in sections:
      node = node[section]
    node[leaf] = ast.literal_eval(value)
  run = run_lib.Run.create(config, "/tmp/unused_workdir")
  batch = train_step_benchmark.random_batch(run, config.batch_size)
  print(
    f"{time.strftime('%Y-%m-%d %H:%M')}, {platform.machine()} ({platform.processor() or '?'}), "
    f"{jax.device_count()} × {jax.devices()[0].device_kind}, jax {jax.__version__}, "
    f"default config{' with ' + ', '.join(args.set) if args.set else ''}, "
    f"batch {config.batch_size}, {args.steps} timed calls each"
  )
  print("\n| part (forward + backward) | ms per call | share of the step | compile s |")
  print("|---|---:|---:|---:|")
  step = train.make_train_step(run)
  state = run.init_state()
  compile_started = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_seconds = time.perf_counter() - compile_started
  # The step donates its state: time it on a fresh state each call through a closure.
  _, step_seconds = _timed(
    functools.partial(_step_loop, compiled, state), batch, steps=max(1, args.steps // 10)
  )
  step_seconds /= 10
  for name, function, arguments in parts(run, batch):
    first, seconds = _timed(function, *arguments, steps=args.steps)
    print(f"| {name} | {1e3 * seconds:.1f} | {seconds / step_seconds:.0%} | {first:.1f} |")
  print(f"| **whole train step** | {1e3 * step_seconds:.1f} | 100% | {compile_seconds:.1f} |")


def _step_loop(compiled, state, batch):
  """Ten steps from a copy of `state` (the step donates its input state)."""
  state = jax.tree.map(jnp.copy, state)
  for _ in range(10):
    state, metrics = compiled(state, batch)
  return metrics


if __name__ == "__main__":
  main()
