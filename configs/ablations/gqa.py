"""Grouped-query attention: 4 query heads sharing 4 (MHA), 2 or 1 (MQA) key/value heads.

  python -m launch.sweep --config=configs/ablations/gqa.py --workdir=runs/ablations/gqa

The baby GPT of configs/pretrain/shakespeare_char.py (4 layers, 128 wide, 4 heads), 1000
steps x seeds 0 and 1: 6 runs of ~1 minute on the 2-core CPU. Fewer key/value heads shrink
the K/V projections (and a sampler's KV cache) by 4 / num_kv_heads. Results table in README
"Ablations".
"""

from configs import common


def get_config(arg=None):
  common.parse_arg(arg)  # no variants: any argument is an error
  c = common.baby_gpt_sweep()
  c.points = [{"model.num_kv_heads": kv} for kv in (4, 2, 1)]
  return c
