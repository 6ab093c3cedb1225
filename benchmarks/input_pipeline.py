"""Input-side throughput at the default config, printed as Markdown tables.

  python benchmarks/input_pipeline.py [--batches 40] [--storage_clips 256]

1. Frame storage: bytes and decode time per clip of the default stored clip (16 frames of
   32x32) as raw uint8 (what `prepare` writes) vs a sequence of JPEG frames (PyAV's mjpeg
   encoder, quality ~90), and the on-disk size per example of the prepared dataset.
2. Generation and `prepare` of the default synthetic dataset (files/s, clips/s).
3. The train pipeline (grain, default augmentation) with 0, 1 and 2 worker processes: clips/s
   while nothing else runs (the trainer's own wait for data is measured in the real loop).
"""

import argparse
import dataclasses
import os
import sys
import tempfile
import time

import av
import numpy as np
from etils import epath

# Run as a script from the repository root: make `cmvt_jax` and `configs` importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cmvt_jax.data import dataset_writer
from cmvt_jax.data import datasets
from cmvt_jax.data import pipeline
from cmvt_jax.data import spectrogram
from cmvt_jax.data import synthetic
from configs import default


def _jpeg_encode(frames: np.ndarray) -> list[bytes]:
  codec = av.CodecContext.create("mjpeg", "w")
  codec.height, codec.width = frames.shape[1:3]
  codec.pix_fmt = "yuvj420p"
  codec.time_base = 1
  codec.options = {"qmin": "2", "qmax": "4"}  # about JPEG quality 90
  encoded = []
  for frame in frames:
    packets = codec.encode(av.VideoFrame.from_ndarray(frame, format="rgb24"))
    encoded.append(b"".join(bytes(packet) for packet in packets))
  return encoded


def _jpeg_decode(encoded: list[bytes]) -> np.ndarray:
  codec = av.CodecContext.create("mjpeg", "r")
  frames = []
  for data in encoded:
    for frame in codec.decode(av.Packet(data)):
      frames.append(frame.to_ndarray(format="rgb24"))
  return np.stack(frames)


def frame_storage(dataset: datasets.PreparedDataset, num_clips: int) -> str:
  source = dataset.source("train")
  clips = [source[i]["frames"] for i in range(min(num_clips, len(source)))]
  raw = [clip.tobytes() for clip in clips]
  jpegs = [_jpeg_encode(clip) for clip in clips]
  shape = clips[0].shape

  start = time.perf_counter()
  for data in raw:
    np.frombuffer(data, np.uint8).reshape(shape).astype(np.float32)
  raw_ms = (time.perf_counter() - start) / len(raw) * 1e3
  start = time.perf_counter()
  for data in jpegs:
    _jpeg_decode(data).astype(np.float32)
  jpeg_ms = (time.perf_counter() - start) / len(jpegs) * 1e3
  start = time.perf_counter()
  for i in range(len(clips)):
    source[i]
  read_ms = (time.perf_counter() - start) / len(clips) * 1e3
  files = list(epath.Path(dataset.directory).glob("*-train.array_record-*"))
  on_disk = sum(f.stat().length for f in files) / dataset.num_examples["train"]
  jpeg_error = np.mean(
    [np.abs(_jpeg_decode(j).astype(float) - c).mean() for j, c in zip(jpegs[:32], clips[:32])]
  )
  return "\n".join(
    [
      f"Stored clip: frames uint8 {list(shape)} + audio int16 [32000], {len(clips)} clips.",
      "",
      "| frames stored as | bytes per clip (frames) | decode ms per clip | mean abs error |",
      "| --- | --- | --- | --- |",
      f"| raw uint8 tensor | {np.mean([len(r) for r in raw]):,.0f} | {raw_ms:.3f} | 0 |",
      f"| 16 JPEG frames (q~90) | {np.mean([sum(map(len, j)) for j in jpegs]):,.0f} | "
      f"{jpeg_ms:.3f} | {jpeg_error:.2f} / 255 |",
      "",
      f"Prepared dataset on disk (raw frames, ArrayRecord compresses records): "
      f"{on_disk:,.0f} bytes per example (frames + audio + metadata); reading and decoding "
      f"one example from it: {read_ms:.3f} ms.",
    ]
  )


def generation_and_prepare(config, work_dir: str) -> tuple[str, datasets.PreparedDataset]:
  spec = synthetic.SyntheticSpec.from_config(config.dataset.synthetic)
  video_dir = os.path.join(work_dir, "videos")
  start = time.perf_counter()
  manifest = synthetic.generate(video_dir, spec)
  generate_s = time.perf_counter() - start
  start = time.perf_counter()
  directory = dataset_writer.prepare(
    video_dir,
    os.path.join(work_dir, "data"),
    "bench",
    storage=datasets.storage_from_config(config.dataset),
    mel=spectrogram.MelSettings.from_config(config.input),
  )
  prepare_s = time.perf_counter() - start
  dataset = datasets.open_prepared(directory)
  clips = sum(dataset.num_examples.values())
  files = len(manifest["files"])
  table = "\n".join(
    [
      "| stage (default dataset, 2 processes) | files | clips | seconds | files/s | clips/s |",
      "| --- | --- | --- | --- | --- | --- |",
      f"| generate (H.264 + AAC .mp4) | {files} | {clips} | {generate_s:.1f} | "
      f"{files / generate_s:.1f} | {clips / generate_s:.1f} |",
      f"| prepare (decode + write ArrayRecord) | {files} | {clips} | {prepare_s:.1f} | "
      f"{files / prepare_s:.1f} | {clips / prepare_s:.1f} |",
    ]
  )
  return table, dataset


def train_pipeline(config, dataset: datasets.PreparedDataset, num_batches: int) -> str:
  spec = pipeline.InputSpec.from_config(config.input)
  stats = dataset.normalization_stats(spec.mel)
  batch_size = config.get("batch_size", 64)
  rows = [
    f"| grain worker processes | batch | clips/s | (batches {num_batches} after 3 of warm-up) |",
    "| --- | --- | --- | --- |",
  ]
  for num_workers in (0, 1, 2):
    worker_spec = dataclasses.replace(spec, num_workers=num_workers)
    preprocessor = pipeline.Preprocessor(
      worker_spec, stats, dataset.storage.fps, dataset.storage.sample_rate
    )
    iterator = iter(
      pipeline.train_dataset(dataset.source("train"), preprocessor, batch_size=batch_size, seed=0)
    )
    for _ in range(3):  # worker start-up and librosa/numba warm-up
      next(iterator)
    start = time.perf_counter()
    for _ in range(num_batches):
      next(iterator)
    seconds = time.perf_counter() - start
    iterator.close()
    rows.append(f"| {num_workers} | {batch_size} | {num_batches * batch_size / seconds:.0f} | |")
  return "\n".join(rows)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batches", type=int, default=40)
  parser.add_argument("--storage_clips", type=int, default=256)
  args = parser.parse_args()
  config = default.get_config()
  with tempfile.TemporaryDirectory(prefix="cmvt_bench_") as work_dir:
    prepare_table, dataset = generation_and_prepare(config, work_dir)
    print("\n## Frame storage\n")
    print(frame_storage(dataset, args.storage_clips))
    print("\n## Input pipeline\n")
    print(prepare_table)
    print()
    print(train_pipeline(config, dataset, args.batches))


if __name__ == "__main__":
  main()
