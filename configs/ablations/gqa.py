"""Grouped-query attention: 4 query heads sharing 4 (MHA), 2 or 1 (MQA) key/value heads.

  python -m launch.sweep --config=configs/ablations/gqa.py --workdir=runs/ablations/gqa

The baby GPT of configs/pretrain/shakespeare_char.py (4 layers, 128 wide, 4 heads), 1000
steps x seeds 0 and 1: 6 runs of ~1 minute on the 2-core CPU. Fewer key/value heads shrink
the K/V projections (and a sampler's KV cache) by 4 / num_kv_heads. Results table in README
"Ablations".
"""

import ml_collections

from configs import common


def get_config(arg=None):
  common.parse_arg(arg)  # no variants: any argument is an error
  c = ml_collections.ConfigDict()
  c.entry = "train.pretrain"
  c.base = "configs/pretrain/shakespeare_char.py"
  c.fixed = {"train": {"num_steps": 1000, "eval_every": 250, "log_every": 50,
                       "checkpoint_every": 1000, "keep_checkpoints": 1}}
  c.points = [{"model.num_kv_heads": kv} for kv in (4, 2, 1)]
  c.product = [("seed", (0, 1))]
  c.metric = "eval/loss"
  return c
