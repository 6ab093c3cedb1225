"""The test-sized config: a handful of generated clips, 4 frames of 16×16, a tiny model.

Used by the test suite (end-to-end runs in a few seconds each) and handy for checking a
setup. Imports the default and shrinks it.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.total_steps = 6
  config.batch_size = 8
  config.log_every_steps = 1
  config.checkpoint_every_steps = 3
  config.optim.warmup_steps = 2
  config.export.at_end = False
  config.export.batch_size = 8
  config.plots.at_end = False
  config.plots.num_clips = 16

  synthetic = config.dataset.synthetic
  synthetic.train_files = 16
  synthetic.validation_files = 2
  synthetic.test_files = 8
  synthetic.segments_per_file = 2
  synthetic.frame_size = 32
  config.dataset.short_side = 16

  config.input.num_frames = 4
  config.input.frame_size = 16
  config.input.num_workers = 0
  config.eval.batch_size = 8

  video = config.model.video
  video.vit.patch_size = 8
  video.vit.width = 32
  video.vit.depth = 1
  video.vit.num_heads = 2
  video.vit.mlp_dim = 64
  video.temporal.width = 32
  video.temporal.num_layers = 1
  video.temporal.num_heads = 2
  video.temporal.mlp_dim = 64
  video.temporal.windows = (2,)
  audio = config.model.audio
  audio.cnn.stem_width = 8
  audio.cnn.stage_widths = (8, 16, 32)
  audio.temporal.width = 32
  audio.temporal.num_layers = 1
  audio.temporal.num_heads = 2
  audio.temporal.mlp_dim = 64
  audio.temporal.windows = (2,)
  config.model.embed_dim = 32
  config.model.projection_hidden_dim = 64
  config.model.classifier_hidden_dim = 64
  return config
