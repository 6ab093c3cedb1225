"""VTN-like CMVT for accelerators: ViT-B/16 frames + a 3-layer Longformer over time.

As in the Video Transformer Network (Neimark et al., 2021): a ViT-B/16 on every frame
(start it from an ImageNet checkpoint with `--config.model.video.vit.checkpoint=PATH.npz`,
Google ViT/AugReg layout), its CLS features through a 3-layer Longformer of ViT-B width,
window ±9 frames, with a global CLS token, on 16-frame clips; the audio tower a ResNet-18-
sized spectrogram CNN with a 2-layer Longformer. Computes in bfloat16 (params float32).

Made for one accelerator host: a v5e-8 (`compile.topology`; check it before renting with
`--mode compile`) or 8 GPUs. Real-data input, prepared first with matching storage:

  python -m cmvt_jax.prepare --video_dir VIDEOS --data_dir DATA --name NAME --fps 8 \
    --short_side 256 --sample_rate 16000 --n_fft 400 --hop_length 160 --n_mels 128 \
    --fmin 20 --fmax 8000

then `--config.dataset.name=NAME --config.dataset.data_dir=DATA`. Frames: 224-pixel random
resized crops of the 256-pixel frames (scale 0.3–1, aspect 3/4–4/3) and flips. Audio: the
AST / CAV-MAE front end — 16 kHz mono, 128 mel bins, 25 ms windows every 10 ms (200 frames per
2-second clip) — with SpecAugment (two time masks of up to 0.4 s, two of up to 24 mel bins).
"""

from configs import default


def get_config():
  config = default.get_config()

  # 16 frames of 224x224 over the 2-second clips (the pipeline resamples the stored frames).
  config.input.num_frames = 16
  config.input.fps = 8.0
  config.input.frame_size = 224
  config.input.crop_scale = (0.3, 1.0)
  config.input.crop_ratio = (3 / 4, 4 / 3)
  # The AST / CAV-MAE audio front end: 25 ms windows every 10 ms, 128 mel bins.
  config.input.sample_rate = 16000
  config.input.n_fft = 400
  config.input.hop_length = 160
  config.input.n_mels = 128
  config.input.fmin = 20.0
  config.input.fmax = 8000.0
  config.input.num_time_masks = 2
  config.input.max_time_mask = 40
  config.input.num_freq_masks = 2
  config.input.max_freq_mask = 24
  # How the prepared dataset stores them (the prepare command in the docstring).
  config.dataset.fps = 8.0
  config.dataset.short_side = 256
  config.dataset.sample_rate = 16000
  config.compile.topology = "v5e-8"

  model = config.model
  model.dtype = "bfloat16"
  model.embed_dim = 512
  model.projection_hidden_dim = 2048
  model.classifier_hidden_dim = 768

  vit = model.video.vit
  model.video.frame_encoder = "vit"
  vit.patch_size = 16
  vit.width = 768
  vit.depth = 12
  vit.num_heads = 12
  vit.mlp_dim = 3072
  vit.dropout_rate = 0.0
  vit.scan_layers = True  # the TPU compile of 12 unrolled blocks is most of the check's time

  temporal = model.video.temporal
  temporal.width = 768
  temporal.num_layers = 3
  temporal.num_heads = 12
  temporal.mlp_dim = 3072
  temporal.windows = (9,)
  temporal.dilations = (1,)
  temporal.dropout_rate = 0.1

  cnn = model.audio.cnn
  model.audio.backbone = "cnn"
  cnn.stem_width = 64
  cnn.stem_strides = (1, 2)
  cnn.stage_widths = (64, 128, 256, 512)
  cnn.blocks_per_stage = (2, 2, 2, 2)
  cnn.stage_strides = ((1, 1), (2, 2), (2, 2), (1, 2))  # (time, mel): 4x fewer steps
  cnn.norm_groups = 32

  audio_temporal = model.audio.temporal
  audio_temporal.width = 512
  audio_temporal.num_layers = 2
  audio_temporal.num_heads = 8
  audio_temporal.mlp_dim = 2048
  audio_temporal.windows = (8,)
  audio_temporal.dropout_rate = 0.1

  # Schedule for one accelerator host (e.g. 8 GPUs); see configs/tpu_pod.py for pod slices.
  # Start the frames from ImageNet weights, as VTN does: --config.model.video.vit.checkpoint.
  config.batch_size = 256
  config.total_steps = 30_000
  config.log_every_steps = 100
  config.checkpoint_every_steps = 2_000
  config.eval_every_steps = 5_000
  config.eval.batch_size = 256
  config.eval.probe_train_examples = 20_000
  config.optim.learning_rate = 3e-4
  config.optim.warmup_steps = 2_000
  config.optim.weight_decay = 0.05
  model.remat = True  # ViT-B on 16 frames × 256 clips does not fit activations otherwise
  # 32 clips per v5e chip did not fit even with remat (`--mode compile`: 16.09 GiB of 16;
  # 19.3 GiB of temporaries without remat): the batch is embedded in two halves (GradCache,
  # train.py), which keeps all 256 clips as each other's negatives.
  config.optim.grad_accum_steps = 2
  config.input.num_workers = 8
  config.input.eval_num_workers = 8  # large eval splits of real video
  config.input.worker_buffer_size = 4
  config.input.read_threads = 4
  return config
