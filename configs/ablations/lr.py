"""Learning-rate sweep of the baby GPT (configs/pretrain/shakespeare_char.py), two seeds.

  python -m launch.sweep --config=configs/ablations/lr.py --workdir=runs/ablations/lr

Peak learning rate 3e-4, 1e-3 (nanoGPT's), 3e-3 and 1e-2 (cosine to a tenth of it, 100
warmup steps), 1000 steps each (half of the config's 2000) x seeds 0 and 1: 8 runs of
~1 minute on the 2-core CPU. Results table in README "Ablations".
"""

from configs import common


def get_config(arg=None):
  common.parse_arg(arg)  # no variants: any argument is an error
  c = common.baby_gpt_sweep()
  c.points = [{"name": f"lr={lr:g}", "optim.lr": lr, "optim.end_lr": lr / 10}
              for lr in (3e-4, 1e-3, 3e-3, 1e-2)]
  return c
