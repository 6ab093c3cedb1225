"""Times Hugging Face's LongformerSelfAttention forward on the CPU; prints one JSON line.

Runs in a benchmark-only virtualenv with torch and transformers (never in requirements.txt);
`python -m benchmarks.attention --torch_python VENV/bin/python` calls it for its row (d). The
layer does q/k/v projections and sliding-window attention, no global tokens.
"""

import argparse
import json
import statistics
import time

import torch
import transformers
from transformers.models.longformer.modeling_longformer import LongformerSelfAttention


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--length", type=int, default=4096)
  parser.add_argument("--hidden", type=int, default=512)
  parser.add_argument("--heads", type=int, default=8)
  parser.add_argument("--window", type=int, default=128, help="one-sided; HF's is 2×")
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()

  config = transformers.LongformerConfig(
    hidden_size=args.hidden,
    num_attention_heads=args.heads,
    attention_window=[2 * args.window],
    attention_probs_dropout_prob=0.0,
  )
  layer = LongformerSelfAttention(config, layer_id=0).eval()
  hidden = torch.randn(1, args.length, args.hidden)
  mask = torch.zeros(1, args.length)  # 0 = local attention for every position
  flags = dict(is_index_masked=mask < 0, is_index_global_attn=mask > 0, is_global_attn=False)

  times = []
  with torch.inference_mode():
    layer(hidden, attention_mask=mask, **flags)  # warm-up
    for _ in range(args.repeats):
      start = time.perf_counter()
      layer(hidden, attention_mask=mask, **flags)
      times.append(time.perf_counter() - start)
  print(
    json.dumps(
      {
        "seconds": statistics.median(times),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
      }
    )
  )


if __name__ == "__main__":
  main()
