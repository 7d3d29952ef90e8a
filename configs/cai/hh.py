"""Constitutional AI on the HH harmless-base red-team prompts (rlhf/cai.py).

Supervised phase (answer, critique, revise -> SFT data), then SFT on it, then the feedback
phase (two answers judged under a principle -> preference pairs) for a reward model / DPO:
  python -m rlhf.cai --config=configs/cai/hh.py:phase=sl --workdir=runs/cai_sl \
      --config.init_from=runs/sft
  python -m train.sft --config=configs/sft/chat.py --workdir=runs/cai_sft \
      --config.init_from=runs/sft --config.data.sources=runs/cai_sl/data.jsonl
  python -m rlhf.cai --config=configs/cai/hh.py:phase=feedback --workdir=runs/cai_fb \
      --config.init_from=runs/cai_sft --config.judge_from=runs/sft
  python -m rlhf.dpo --config=configs/dpo/hh.py --workdir=runs/cai_dpo \
      --config.init_from=runs/cai_sft --config.data.sources=runs/cai_fb/data.jsonl
Smoke size (`:runlocal=true`): 48 prompts, 24 new tokens per turn.
The whole chain with the human-feedback path beside it: configs/pipeline/cai.py.
"""

import os

import ml_collections

from configs import common
from data.config import default_preference_data_config

CONSTITUTION = os.path.join(os.path.dirname(os.path.abspath(__file__)), "constitution.json")


def get_config(arg=None):
  arg = common.parse_arg(arg, phase="sl", runlocal=False)
  c = ml_collections.ConfigDict()
  c.stage = "cai"
  c.phase = arg.phase               # sl | feedback
  c.init_from = ""                  # the policy: a checkpoint or hf:<dir>
  c.judge_from = ""                 # feedback phase's judge ("" = the policy)
  c.constitution = CONSTITUTION
  c.template = "auto"               # data.chat.get_template name
  c.data = default_preference_data_config()  # sources, val_fraction and seed of the split
  c.num_prompts = 512               # training-split prompts used (the first that fit)
  c.max_prompt_tokens = 128
  c.max_new_tokens = 64             # per generated turn (answer, critique, revision)
  c.temperature = 0.7
  c.top_p = 0.95
  c.seed = 0                        # principles (hashed per prompt) and sampling
  c.batch_size = 32
  c.min_confidence = 0.0            # feedback: drop pairs with |P - 0.5| <= this
  if arg.runlocal:
    c.num_prompts = 48
    c.max_prompt_tokens = 96
    c.max_new_tokens = 24
    c.batch_size = 16
  return c
