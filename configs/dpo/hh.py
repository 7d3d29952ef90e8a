"""DPO on the shared Anthropic HH harmless-base pairs, from the SFT model.

The policy and the frozen reference both start as `init_from` (default: the chat SFT run of
configs/sft/chat.py); the pairs and their split are the reward model's (configs/reward/hh.py:
10% of prompts held out). β = 0.1 (TRL's, ORLHF's and tunix's default).

Launch:
  python -m rlhf.dpo --config=configs/dpo/hh.py --workdir=runs/dpo --config.init_from=runs/sft
Smoke run (a few steps, any pretraining or SFT checkpoint):
  python -m rlhf.dpo --config=configs/dpo/hh.py:runlocal=true --workdir=/tmp/dpo \
      --config.init_from=/tmp/sft
"""

import ml_collections

from configs import common
from data.config import default_preference_data_config


def get_config(arg=None):
  arg = common.parse_arg(arg, runlocal=False)
  config = common.finetune_config("dpo", "runs/sft")
  config.data = default_preference_data_config()
  config.data.seq_len = 256
  config.dpo = ml_collections.ConfigDict()
  config.dpo.beta = 0.1
  config.dpo.label_smoothing = 0.0  # conservative DPO's epsilon (sigmoid loss only)
  config.dpo.loss_type = "sigmoid"  # sigmoid | ipo
  config.optim = common.optim_config(lr=2e-5, end_lr=2e-6, warmup_steps=15, b2=0.99,
                                     flatten_update=True)
  config.train = common.train_config(batch_size=16, num_steps=150, log_every=10,
                                     eval_every=50, eval_batch_size=32,
                                     checkpoint_every=150, steps_per_call=5)
  config.mesh = common.mesh_config(data=-1)
  if arg.runlocal:
    config.data.seq_len = 64
    common.smoke_train(config)
  return config
