"""What the whole-video memory guard costs, and whether a cheaper estimate would do.

Before decoding a video, `whole_video.VideoEmbedder.check_fits` compiles the whole-video
program for the video's length bucket and reads XLA's buffer assignment
(`embedding.WholeVideoEmbedder.whole_video_bytes`). For each declared duration this prints
that number, the seconds and the peak RSS the compile costs (each duration in a fresh
process, `configs/default.py`'s model at random initialisation: the bytes depend on shapes
only), and what a linear model fitted to three small programs predicts:
bytes = c0 + cf · (padded frames) + ca · (padded log-mel frames).

  python -m benchmarks.memory_guard [--seconds 600 3600 14400 86400]
"""

from __future__ import annotations

import argparse
import datetime
import json
import resource
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from cmvt_jax import embedding
from cmvt_jax import sharding
from cmvt_jax.models import cmvt
from configs import default

# (input frames, log-mel frames) of the three small programs of the linear fit.
FIT_POINTS = ((1000, 8000), (2000, 8000), (1000, 16000))


def measure(points: list[tuple[int, int]]) -> list[dict]:
  """Compiles the whole-video program for each (frames, log-mel frames), in this process."""
  config = default.get_config()
  model = cmvt.from_config(config)
  size, mels = config.input.frame_size, config.input.n_mels
  video = jnp.zeros((1, config.input.num_frames, size, size, 3))
  audio = jnp.zeros((1, 64, mels))
  params = jax.jit(model.init)(jax.random.key(0), video, audio)["params"]
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  device = embedding.WholeVideoEmbedder(model, mesh, params, chunk_frames=256, window_batch=64)
  feature_dim = device.encode_frames(np.zeros((1, size, size, 3), np.float32)).shape[1]
  rows = []
  for frames, audio_frames in points:
    inputs = device.whole_inputs(frames, audio_frames, mels, feature_dim)
    started = time.perf_counter()
    needed = device.whole_video_bytes(frames, audio_frames, mels, feature_dim)
    rows.append(
      {
        "frames": frames,
        "audio_frames": audio_frames,
        "padded": [inputs[0].shape[1], inputs[2].shape[1]],
        "bytes": needed,
        "seconds": time.perf_counter() - started,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
      }
    )
  return rows


def child(points: list[tuple[int, int]]) -> list[dict]:
  """`measure(points)` in a fresh process."""
  argument = json.dumps(points)
  result = subprocess.run(
    [sys.executable, "-m", "benchmarks.memory_guard", "--child", argument],
    capture_output=True,
    text=True,
    check=True,
  )
  return json.loads(result.stdout.splitlines()[-1])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seconds", type=float, nargs="+", default=[600, 3600, 14400, 86400])
  parser.add_argument("--child", help=argparse.SUPPRESS)
  args = parser.parse_args()
  sharding.choose_platforms()
  if args.child:
    print(json.dumps(measure([tuple(point) for point in json.loads(args.child)])))
    return
  config = default.get_config()
  mel_rate = config.input.sample_rate / config.input.hop_length
  fit = child(list(FIT_POINTS))
  design = np.array([[1.0, *row["padded"]] for row in fit])
  coefficients = np.linalg.solve(design, [row["bytes"] for row in fit])
  print(
    f"Date: {datetime.datetime.now(datetime.UTC):%a %b %d %Y, %H:%M} UTC. Command: "
    f"python -m benchmarks.memory_guard --seconds {' '.join(f'{s:g}' for s in args.seconds)}."
    f" configs/default.py ({config.input.fps:g} fps, {mel_rate:g} log-mel frames/s). Fit: "
    f"c0 = {coefficients[0]:,.0f} B, cf = {coefficients[1]:,.0f} B/frame, "
    f"ca = {coefficients[2]:,.0f} B/log-mel frame, from {len(fit)} programs compiled in "
    f"{sum(row['seconds'] for row in fit):.0f} s.\n"
  )
  print(
    "| declared video | padded frames, log-mel | XLA's bytes GiB | compile s | peak RSS GiB "
    "| linear fit GiB | fit error |"
  )
  print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
  for seconds in args.seconds:
    [row] = child([(int(seconds * config.input.fps), int(seconds * mel_rate))])
    predicted = coefficients @ [1.0, *row["padded"]]
    print(
      f"| {_duration(seconds)} | {row['padded'][0]:,}, {row['padded'][1]:,} | "
      f"{row['bytes'] / 2**30:.2f} | {row['seconds']:.0f} | {row['peak_rss'] / 2**30:.2f} | "
      f"{predicted / 2**30:.2f} | {100 * (predicted / row['bytes'] - 1):+.1f}% |",
      flush=True,
    )


def _duration(seconds: float) -> str:
  return f"{seconds / 3600:g} h" if seconds >= 3600 else f"{seconds / 60:g} min"


if __name__ == "__main__":
  main()
