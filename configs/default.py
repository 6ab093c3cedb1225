"""The embedded default: a tiny CMVT on a generated audio-visual dataset, CPU-sized.

`python -m cmvt_jax.main --config configs/default.py --workdir DIR` needs nothing on disk: the
synthetic dataset is generated and prepared on first use. Variants import this module and
override a few fields (see configs/vtn_base.py).

Sections and their owners (each module reads only its own section):
  top level   schedule and run keys (train.py)
  dataset     where the prepared dataset lives and how it is stored (data/)
  input       what the input pipeline hands the model: frames, audio, augmentation (data/)
  model       the two towers and projection heads (models/)
  loss        contrastive objective and temperature (losses.py)
  optim       optimiser and learning-rate schedule (train.py)
  eval        evaluation (evaluate.py)
  export      embedding export (export.py)
  mesh        device mesh (sharding.py)
  compile     ahead-of-time compile for a TPU topology (compile.py)
"""

from ml_collections import config_dict


def get_config() -> config_dict.ConfigDict:
  config = config_dict.ConfigDict()
  config.seed = 0
  # The schedule (train.py). `step` counts optimiser updates; 0 = only at the end.
  # 500 steps of 128 clips: ~1.5 min of training on 2 cores, ~2.5 min for the whole first run.
  # The test split asks for one clip among 256; 128 negatives per step teach that finer than
  # 64: at 1000 steps of 64, two seeds in five stopped at test a->v R@1 0.949 and 0.926; at
  # 400 steps of 128, one stopped at 0.840 (BENCHMARKS.md, The first run).
  config.total_steps = 500
  config.batch_size = 128  # global: split over every device and process
  config.log_every_steps = 50
  config.checkpoint_every_steps = 200
  config.eval_every_steps = 0
  config.objective = "contrastive"  # 'contrastive' | 'supervised' (classifier head, labels)
  # A non-finite loss stops the run (False) or skips that batch and counts it (True).
  config.skip_nonfinite_batches = False

  # Where the prepared dataset is and how its clips were stored (cmvt_jax/data/datasets.py).
  # name 'cmvt_synthetic' = the generated dataset, made on first use under data_dir; any
  # other name = DATA_DIR/NAME/VERSION written by `python -m cmvt_jax.prepare`.
  config.dataset = config_dict.ConfigDict()
  config.dataset.name = "cmvt_synthetic"
  config.dataset.data_dir = config_dict.placeholder(str)  # unset: ~/.cache/cmvt_jax
  # Storage (prepare's defaults; the synthetic dataset is prepared with these).
  config.dataset.clip_seconds = 2.0
  config.dataset.stride_seconds = 2.0
  config.dataset.fps = 8.0
  config.dataset.short_side = 32
  config.dataset.sample_rate = 16000
  config.dataset.keep_audioless = False
  # Training draws from several prepared datasets (each under data_dir) by weight, e.g.
  # (("vggsound", 0.7), ("kinetics", 0.3)); empty: from `name` alone. Evaluation, the probe
  # and export still use `name`. Each keeps its storage rates; statistics are the mixture's.
  config.dataset.mixture = ()
  # The generator (cmvt_jax/data/synthetic.py): 512/32/64 files of 4 two-second segments
  # give 2048/128/256 clips.
  config.dataset.synthetic = config_dict.ConfigDict()
  config.dataset.synthetic.seed = 0
  config.dataset.synthetic.train_files = 512
  config.dataset.synthetic.validation_files = 32
  config.dataset.synthetic.test_files = 64
  config.dataset.synthetic.segments_per_file = 4
  config.dataset.synthetic.segment_seconds = 2.0
  config.dataset.synthetic.fps = 12
  config.dataset.synthetic.frame_size = 48
  config.dataset.synthetic.sample_rate = 22050

  # What the input pipeline hands the model (cmvt_jax/data/pipeline.py): 8 frames of 16x16 at
  # 4 fps (2 s) and a 64-frame x 32-mel log-mel of the same 2 s. At 16 px an object's height
  # (its pitch) and colour (its class) are still clear, and 32 mel bins keep the four pitches
  # and their timbres apart; the step is half that of 32 px and 64 mel (BENCHMARKS.md, "The
  # first run").
  config.input = config_dict.ConfigDict()
  config.input.num_frames = 8
  config.input.fps = 4.0
  config.input.frame_size = 16
  config.input.sample_rate = 16000
  config.input.n_fft = 1024
  config.input.hop_length = 500
  config.input.n_mels = 32
  config.input.fmin = 60.0
  config.input.fmax = 7800.0
  # Augmentation (train only): random resized crop (area fraction, aspect ratio), flip,
  # SpecAugment masks (count and widest width, in log-mel frames / mel bins).
  # Off on the synthetic data except the flip: an object's height IS its pitch, so a
  # resized crop moves it by up to half a pitch level, and a frequency mask can erase a
  # note's fundamental. Measured at step 400 of a 600-step run (validation a->v R@1): 0.85 without,
  # 0.65 with SpecAugment alone, 0.05-0.10 with crop and SpecAugment (BENCHMARKS.md, Quality).
  config.input.crop_scale = (1.0, 1.0)
  config.input.crop_ratio = (1.0, 1.0)
  config.input.flip = True  # the horizontal position is a nuisance: flipping it is harmless
  config.input.num_time_masks = 0
  config.input.max_time_mask = 4
  config.input.num_freq_masks = 0
  config.input.max_freq_mask = 8
  # A second, independently augmented view per modality (for an intra-modal loss term).
  config.input.two_views = False
  # grain: worker processes (0 = preprocess in this process) for training and for the
  # passes of evaluation, export and plots, batches each worker buffers, reader threads per
  # process and their element buffer. Each pass starts its own workers, which costs seconds
  # (their imports); on small splits preprocessing in this process is faster.
  config.input.num_workers = 1
  config.input.eval_num_workers = 0
  config.input.worker_buffer_size = 2
  config.input.read_threads = 1
  config.input.read_buffer_size = 4
  # Each reading process keeps the train split's stored examples, and the log-mel of each
  # training window, in memory once read when the whole split fits this many GiB (0 = always
  # read from disk and compute): reading a stored clip and its log-mel were most of the input
  # pipeline's CPU (data/held_source.py). The default's 2,048 clips are ~230 MiB; a real
  # dataset larger than the budget streams from disk.
  config.input.cache_train_gib = 1.0

  # The two towers and heads (cmvt_jax/models/cmvt.py: from_config). Input sizes come from
  # config.input (frame_size sizes the ViT's position table). Tiny, for a 2-core CPU.
  config.model = config_dict.ConfigDict()
  config.model.dtype = "float32"  # compute dtype ('bfloat16' on GPU/TPU); params stay float32
  config.model.remat = False  # recompute every block in the backward pass (nn.remat)
  # The Longformer layers' `banded_attention` (cmvt_jax/models/attention.py): unset = chosen
  # for the platform the program is compiled for ('splash', jax's TPU kernel, on a TPU for
  # sequences of 1024+ steps; else 'lax'); 'lax' or 'splash' forces one. Not a shape key: a
  # checkpoint resumes under any of them.
  config.model.attention_implementation = config_dict.placeholder(str)
  config.model.embed_dim = 128  # the shared video-audio embedding space
  config.model.projection_hidden_dim = 256
  # > 0 adds VTN's classifier head on the video features (the supervised objective).
  config.model.num_classes = 0
  config.model.classifier_hidden_dim = 256
  config.model.classifier_dropout = 0.5

  video = config.model.video = config_dict.ConfigDict()
  video.frame_encoder = "vit"  # 'vit' | 'resnet'
  video.vit = config_dict.ConfigDict()
  video.vit.patch_size = 8
  video.vit.width = 64
  video.vit.depth = 2
  video.vit.num_heads = 2
  video.vit.mlp_dim = 128
  video.vit.dropout_rate = 0.0
  # One nn.scan over the blocks (parameters stacked on a layer axis): the TPU compiler sees one
  # block instead of `depth`. Changes the checkpoint layout (a resume must keep it).
  video.vit.scan_layers = False
  # A local ViT .npz (Google ViT/AugReg layout) to start the frame encoder from.
  video.vit.checkpoint = config_dict.placeholder(str)
  video.resnet = _resnet(
    stem_width=16, stem_strides=(2, 2), stage_widths=(32, 64), stage_strides=((1, 1), (2, 2))
  )
  # Longformer over frame time; windows/dilations: one entry for all layers, or one per layer.
  video.temporal = _temporal(width=128, num_layers=2, num_heads=4, mlp_dim=256, windows=(4,))

  audio = config.model.audio = config_dict.ConfigDict()
  audio.backbone = "cnn"  # 'cnn' (ResNet + temporal) | 'patch_transformer' (AST-like)
  # Strides are (time, mel): 64 x 32 log-mel -> 8 steps x 2 bins x 64 channels.
  audio.cnn = _resnet(
    stem_width=8,
    stem_strides=(1, 2),
    stage_widths=(16, 32, 64),
    stage_strides=((2, 2), (2, 2), (2, 2)),
  )
  audio.patch_transformer = config_dict.ConfigDict()
  audio.patch_transformer.patch_size = (8, 16)  # (time frames, mel bins)
  audio.patch_transformer.width = 64
  audio.patch_transformer.depth = 2
  audio.patch_transformer.num_heads = 2
  audio.patch_transformer.mlp_dim = 128
  audio.patch_transformer.dropout_rate = 0.0
  audio.temporal = _temporal(width=128, num_layers=1, num_heads=4, mlp_dim=256, windows=(4,))

  # The contrastive objective (cmvt_jax/losses.py: ContrastiveLoss.from_config).
  config.loss = config_dict.ConfigDict()
  config.loss.temperature = 0.1  # initial value when learnable
  config.loss.learn_temperature = True
  config.loss.min_temperature = 0.01
  config.loss.max_temperature = 1.0
  config.loss.cross_modal_weight = 1.0
  config.loss.intra_modal_weight = 0.0  # > 0 needs input.two_views
  # AdamW, warmup then cosine decay, global-norm clipping (train.py: optimizer).
  config.optim = config_dict.ConfigDict()
  config.optim.learning_rate = 2e-3
  config.optim.warmup_steps = 25
  config.optim.end_learning_rate_factor = 0.01
  config.optim.weight_decay = 0.05
  config.optim.b1 = 0.9
  config.optim.b2 = 0.999
  config.optim.eps = 1e-8
  config.optim.grad_clip_norm = 1.0
  # k > 1 splits each batch into k micro-batches GradCache-style: negatives still come from
  # the whole global batch; activations are one micro-batch's.
  config.optim.grad_accum_steps = 1

  # Evaluation (evaluate.py): retrieval on each split, linear probe and kNN against train.
  config.eval = config_dict.ConfigDict()
  config.eval.splits = ("test",)
  config.eval.batch_size = 64  # global
  config.eval.knn_k = 10
  config.eval.probe_train_examples = 0  # train clips for the probe and kNN; 0 = all
  # Also report video-level metrics (`eval/video_level_...`): the clip embeddings of each
  # source video averaged into one, as video papers report.
  config.eval.multi_clip = False

  # Embedding export (export.py) into WORKDIR/embeddings/NAME/; `--mode export` and, with
  # at_end, the end of training.
  config.export = config_dict.ConfigDict()
  config.export.split = "test"
  config.export.at_end = True
  config.export.step = config_dict.placeholder(int)  # checkpoint step; unset = the latest
  config.export.batch_size = 64  # global, clips per batch
  # Embed each source video whole (the temporal encoder and the audio tower in one pass over
  # it, any length) and per moment, instead of per clip.
  config.export.whole_video = False
  config.export.frame_chunk = 256  # frames per frame-encoder call while a video streams
  # A moment every this many seconds (its clip window embedded as in training); 0: none.
  config.export.moment_seconds = 1.0
  # What one whole video may need (device programs + host arrays); a longer video is skipped
  # and counted. Unset: the device's memory (on a CPU, the memory available when it starts).
  config.export.memory_limit_gib = config_dict.placeholder(float)
  # Embed every video file under this folder (no `prepare` needed) instead of a split.
  config.export.video_dir = config_dict.placeholder(str)
  # The folder under WORKDIR/embeddings/; unset = the split (or the video folder's name),
  # with '_whole_video' appended in whole-video mode.
  config.export.name = config_dict.placeholder(str)

  # Figures (plots.py) into WORKDIR/plots/; `--mode plots` and, with at_end, the end of
  # training. The similarity matrix shows the first num_clips clips of eval.splits[0].
  config.plots = config_dict.ConfigDict()
  config.plots.at_end = True
  config.plots.num_clips = 32

  # Checkpoints (orbax) in WORKDIR/checkpoints.
  config.checkpoint = config_dict.ConfigDict()
  config.checkpoint.keep = 3
  # When every checkpoint of the workdir is damaged: stop with an error (False), or set them
  # aside in WORKDIR/damaged_checkpoints/ and start over (True).
  config.checkpoint.restart_if_unusable = False

  # Devices (sharding.py): named axes within a slice, -1 = the devices left over; slices
  # joined over the data-centre network multiply the 'data' axis.
  config.mesh = config_dict.ConfigDict()
  config.mesh.axes = (("data", -1), ("fsdp", 1))
  config.mesh.num_slices = 1

  # Ahead-of-time compile for a TPU (--mode compile, compile.py): the accelerator type the
  # config is made for, as Cloud TPU names them (e.g. "v5e-256"; this CPU config has none:
  # pass one), the slices (None: mesh.num_slices), the length of the whole video compiled and
  # which of the run's programs to compile.
  config.compile = config_dict.ConfigDict()
  config.compile.topology = config_dict.placeholder(str)
  config.compile.num_slices = config_dict.placeholder(int)
  config.compile.whole_video_frames = 512
  config.compile.programs = ("train_step", "embed_step", "whole_video")

  # Multi-host runtime: how long to wait for every process at start, and after how many
  # seconds without a heartbeat a process counts as dead (the others then exit with an error).
  config.distributed = config_dict.ConfigDict()
  config.distributed.initialization_timeout_seconds = 300
  config.distributed.heartbeat_timeout_seconds = 100
  # The processes vote on stopping for SIGTERM about this often (0 = every step): a vote
  # blocks each host until its last step is done; a preemption notice gives ~30 s.
  config.distributed.stop_vote_seconds = 5.0
  return config


def _resnet(
  *,
  stem_width,
  stem_strides,
  stage_widths,
  stage_strides,
  stem_kernel=(3, 3),
  blocks_per_stage=None,
  norm_groups=8,
) -> config_dict.ConfigDict:
  """A `frame_encoder.ResNet` section: GroupNorm basic blocks, (height, width) strides."""
  cnn = config_dict.ConfigDict()
  cnn.stem_width = stem_width
  cnn.stem_kernel = stem_kernel
  cnn.stem_strides = stem_strides
  cnn.stage_widths = stage_widths
  cnn.blocks_per_stage = blocks_per_stage or (1,) * len(stage_widths)
  cnn.stage_strides = stage_strides
  cnn.norm_groups = norm_groups
  return cnn


def _temporal(
  *, width, num_layers, num_heads, mlp_dim, windows, dilations=(1,)
) -> config_dict.ConfigDict:
  """A `TemporalEncoder` section (num_layers=0: mean over time instead of a Longformer)."""
  temporal = config_dict.ConfigDict()
  temporal.width = width
  temporal.num_layers = num_layers
  temporal.num_heads = num_heads
  temporal.mlp_dim = mlp_dim
  temporal.windows = windows  # one-sided, in time steps
  temporal.dilations = dilations
  temporal.global_projections = True  # separate q/k/v for the CLS token (Longformer)
  temporal.dropout_rate = 0.0
  return temporal
