"""Streaming whole-video export of long files: wall time, frames per second, peak memory.

Generates (once, into --video_root) files of each length in --minutes: 640×360 at 30 fps,
H.264 + AAC (44.1 kHz stereo), a moving object over a noisy background and a tone that
changes every second, written frame by frame (an hour never sits in memory). Then, for each
length, `python -m cmvt_jax.main --mode export` embeds the folder whole, with moments, with
a trained workdir's model, in a fresh process, as a user runs it; the parent reads the
child's peak RSS (`getrusage(RUSAGE_CHILDREN)`; one child at a time).

  python -m benchmarks.long_video_export --workdir DIR [--minutes 10 60] [--video_root DIR]
"""

from __future__ import annotations

import argparse
import datetime
import fractions
import os
import pathlib
import resource
import subprocess
import sys
import time

import av
import numpy as np

from benchmarks import quality

REPO = pathlib.Path(__file__).resolve().parents[1]
WIDTH, HEIGHT, FPS, SAMPLE_RATE = 640, 360, 30, 44100


def write_long_video(path: pathlib.Path, minutes: float, seed: int = 0) -> None:
  """A `minutes`-long 640×360 30 fps H.264 + AAC file, written a frame at a time."""
  rng = np.random.default_rng(seed)
  noise = rng.integers(0, 40, (8, HEIGHT, WIDTH, 3), dtype=np.uint8)  # cycled backgrounds
  temporary = path.with_suffix(".partial.mp4")
  with av.open(str(temporary), "w") as container:
    video = container.add_stream("libx264", rate=FPS)
    video.width, video.height, video.pix_fmt = WIDTH, HEIGHT, "yuv420p"
    video.options = {"preset": "ultrafast"}
    audio = container.add_stream("aac", rate=SAMPLE_RATE, layout="stereo")
    samples_per_frame = SAMPLE_RATE // FPS
    pitches = rng.uniform(200, 2000, size=int(minutes * 60) + 1)
    for index in range(round(minutes * 60 * FPS)):
      frame = noise[index % len(noise)].copy()
      second = index // FPS
      x = int((np.sin(index / 40) * 0.5 + 0.5) * (WIDTH - 60))
      y = int(pitches[second] / 2000 * (HEIGHT - 60))
      frame[y : y + 60, x : x + 60] = (200, 80 + second % 100, 40)
      picture = av.VideoFrame.from_ndarray(frame, format="rgb24")
      picture.pts = index
      picture.time_base = fractions.Fraction(1, FPS)
      container.mux(video.encode(picture))
      times = (index * samples_per_frame + np.arange(samples_per_frame)) / SAMPLE_RATE
      tone = (0.2 * np.sin(2 * np.pi * pitches[second] * times)).astype(np.float32)
      sound = av.AudioFrame.from_ndarray(np.stack([tone, tone]), format="fltp", layout="stereo")
      sound.sample_rate = SAMPLE_RATE
      sound.pts = index * samples_per_frame
      container.mux(audio.encode(sound))
    container.mux(video.encode(None))
    container.mux(audio.encode(None))
  temporary.rename(path)


def export_folder(workdir: pathlib.Path, folder: pathlib.Path, name: str) -> float:
  """Runs the whole-video export of `folder` in a child process; returns its wall seconds."""
  command = [
    sys.executable,
    "-m",
    "cmvt_jax.main",
    "--config=configs/default.py",
    f"--workdir={workdir}",
    "--mode=export",
    "--config.export.whole_video=True",
    f"--config.export.video_dir={folder}",
    f"--config.export.name={name}",
  ]
  started = time.perf_counter()
  result = subprocess.run(
    command, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True
  )
  if result.returncode:
    raise RuntimeError(f"{' '.join(command)} exited {result.returncode}:\n{result.stderr[-3000:]}")
  return time.perf_counter() - started


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", type=pathlib.Path, required=True, help="a trained run")
  parser.add_argument("--minutes", type=float, nargs="+", default=[10, 60])
  parser.add_argument(
    "--video_root", type=pathlib.Path, default=pathlib.Path("/tmp/cmvt_long_videos")
  )
  args = parser.parse_args()
  rows = []
  for minutes in args.minutes:
    folder = args.video_root / f"{minutes:g}min"
    path = folder / f"film_{minutes:g}min.mp4"
    if not path.exists():
      folder.mkdir(parents=True, exist_ok=True)
      started = time.perf_counter()
      write_long_video(path, minutes)
      print(f"wrote {path} in {time.perf_counter() - started:.0f} s", flush=True)
    wall = export_folder(args.workdir, folder, f"long_{minutes:g}min")
    # Children run one at a time, so the maximum so far is this child's (lengths ascending).
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / (1 << 20)
    frames = minutes * 60 * FPS
    rows.append((minutes, wall, frames / wall, minutes * 60 / wall, peak))
    print(f"{minutes:g} min: {wall:.0f} s, peak RSS {peak:.2f} GiB", flush=True)
  print(
    f"\nDate: {datetime.date.today():%a %b %d %Y}. Machine: {quality.cpu_name()}, "
    f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end. Command: "
    f"python -m benchmarks.long_video_export --workdir DIR --minutes "
    f"{' '.join(f'{m:g}' for m in args.minutes)}. Files: {WIDTH}×{HEIGHT}, {FPS} fps H.264 + "
    f"AAC; configs/default.py (stored at 8 fps, short side 32; model at 4 fps), a moment "
    f"every second. Wall time of the whole `main --mode export` process (start-up, "
    f"restore, compile, decode, embed, write).\n"
  )
  print("| video | wall s | source frames/s | × real time | peak RSS GiB |")
  print("| --- | --- | --- | --- | --- |")
  for minutes, wall, fps, speed, peak in rows:
    print(f"| {minutes:g} min | {wall:.0f} | {fps:.0f} | {speed:.1f} | {peak:.2f} |")


if __name__ == "__main__":
  main()
