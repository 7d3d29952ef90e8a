"""Reward model on the shared Anthropic HH harmless-base pairs, from the SFT model.

The trunk and tokenizer come from `init_from` (default: the chat SFT run of
configs/sft/chat.py); a scalar head reads the score at each response's end-of-turn token.
The 1,313 pairs are split by prompt (10% of prompts held out, the same split the
English pretraining corpus leaves out), ~1,180 train pairs; 2 x 16 x 256 token slots
per step.

Launch:
  python -m rlhf.reward --config=configs/reward/hh.py --workdir=runs/rm \
      --config.init_from=runs/sft
Smoke run (a few steps, any pretraining or SFT checkpoint):
  python -m rlhf.reward --config=configs/reward/hh.py:runlocal=true --workdir=/tmp/rm \
      --config.init_from=/tmp/sft
Evaluate (accuracy with a bootstrap interval and the length baselines):
  python -m eval.reward --checkpoint=runs/rm --split=val
"""

import ml_collections

from configs import common
from data.config import default_preference_data_config

# ~2 epochs of the ~1,180 training pairs at 16 pairs per step.
NUM_STEPS = 150


def get_config(arg=None):
  arg = common.parse_arg(arg, runlocal=False)
  config = common.finetune_config("reward", "runs/sft")
  config.data = default_preference_data_config()
  config.data.seq_len = 256
  config.reward = ml_collections.ConfigDict()
  config.reward.margin = 0.0        # Constant margin in -log sigmoid(rc - rr - margin).
  config.reward.center_coef = 0.0   # c * mean((rc + rr)^2); TRL recommends 0.01 when used.
  config.optim = common.optim_config(lr=1e-4, end_lr=1e-5, warmup_steps=15, b2=0.99,
                                     flatten_update=True)
  config.train = common.train_config(batch_size=16, num_steps=NUM_STEPS, log_every=10,
                                     eval_every=50, eval_batch_size=32,
                                     checkpoint_every=NUM_STEPS, steps_per_call=5)
  config.mesh = common.mesh_config(data=-1)
  if arg.runlocal:
    config.data.seq_len = 64
    common.smoke_train(config)
  return config
