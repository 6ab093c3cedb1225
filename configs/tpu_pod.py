"""Pod-scale CMVT, the large variant of vtn_base: ViT-L/16 frames and a 4-layer Longformer of
ViT-L width over 16-frame clips, a global batch of 4096 clips (every other clip of the batch
is a negative), bfloat16 compute, parameters and AdamW moments split over an 8-way "fsdp"
mesh axis, every block rematerialised.

Made for a v5e-256 slice (`compile.topology`; check it before renting with `--mode compile`,
for several slices with `--config.compile.num_slices=N`; launch/tpu_vm.sh sets
`mesh.num_slices`); it also fits a v5p-512. docs/scaling.md models its memory per chip and
step time. Input as vtn_base's (prepare the dataset with the command in its docstring), on a
Cloud Storage FUSE mount:
  --config.dataset.name=NAME --config.dataset.data_dir=/gcs/BUCKET/datasets
"""

from configs import vtn_base


def get_config():
  config = vtn_base.get_config()
  config.batch_size = 4096
  config.total_steps = 100_000
  config.log_every_steps = 100
  config.checkpoint_every_steps = 2000
  config.eval_every_steps = 10_000
  config.eval.batch_size = 1024
  config.export.batch_size = 1024

  config.optim.grad_accum_steps = 1  # 16 clips per chip fit a v5e chip whole (vtn_base: 2)
  config.optim.learning_rate = 1e-3
  config.optim.warmup_steps = 5000
  config.optim.weight_decay = 0.1

  model = config.model
  model.dtype = "bfloat16"
  model.remat = True
  model.embed_dim = 768
  model.projection_hidden_dim = 4096
  model.classifier_hidden_dim = 1024
  vit = model.video.vit
  vit.width, vit.depth, vit.num_heads, vit.mlp_dim = 1024, 24, 16, 4096
  temporal = model.video.temporal
  temporal.width, temporal.num_layers, temporal.num_heads, temporal.mlp_dim = 1024, 4, 16, 4096

  # Within a slice: 8-way fsdp (one v5e host's chips, or two v5p hosts'), the rest data
  # parallel; slices multiply the data axis over the data-centre network.
  config.mesh.axes = (("data", -1), ("fsdp", 8))
  # A pod host decodes and augments 64 clips of 16 frames per step for its 4 chips.
  config.input.num_workers = 16
  config.input.eval_num_workers = 16  # large eval splits of real video
  config.input.worker_buffer_size = 4
  config.input.read_threads = 16
  config.input.read_buffer_size = 64
  # Many hosts take longer to start together; a stalled host is noticed within 5 minutes.
  config.distributed.initialization_timeout_seconds = 900
  config.distributed.heartbeat_timeout_seconds = 300
  config.compile.topology = "v5e-256"
  return config
