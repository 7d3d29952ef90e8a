"""The whole lifecycle on the 2-core CPU: pretrain -> SFT -> reward model -> PPO and DPO -> eval.

  python -m launch.pipeline --config=configs/pipeline/cpu.py --workdir=runs/pipeline
Tiny settings (a couple of minutes; used by tests/test_launch_pipeline.py):
  python -m launch.pipeline --config=configs/pipeline/cpu.py:size=tiny --workdir=/tmp/pipe

Stages (each a config of its own folder with a few overrides, each initialised from its
parent's checkpoint):
  pretrain  configs/pretrain/english_bpe.py, 1000 steps instead of 1700 (~17 of ~30 min)
  sft       configs/sft/chat.py from pretrain, 300 steps instead of 500
  rm        configs/reward/hh.py from sft (150 steps)
  ppo       configs/ppo/hh.py from sft against rm, 24 iterations instead of 48
  dpo       configs/dpo/hh.py from sft (150 steps)
Evaluation: eval.run on base / sft / ppo / dpo (WikiText-2 perplexity, the first 500 items
of HellaSwag, ARC-Easy, ARC-Challenge, PIQA, WinoGrande), rm_accuracy of the reward model,
and eval.winrate of every policy against sft on 64 held-out HH prompts x 4 samples judged
by rm. Sized for ~55 minutes of wall time (README "Pipeline" has the measured figures).
"""

import ml_collections

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, size="cpu")
  if arg.size not in ("cpu", "tiny"):
    raise ValueError(f"Unknown size {arg.size!r}; expected cpu or tiny")
  tiny = arg.size == "tiny"
  variant = ":runlocal=true" if tiny else ""
  c = ml_collections.ConfigDict()
  # Plain dicts in a list (ml_collections keeps list items as they are): dotted override keys.
  c.stages = [
      dict(name="pretrain", entry="train.pretrain",
           config="configs/pretrain/english_bpe.py" + variant,
           overrides={} if tiny else {"train.num_steps": 1000, "train.checkpoint_every": 500}),
      dict(name="sft", entry="train.sft", config="configs/sft/chat.py" + variant,
           init_from="pretrain",
           overrides={} if tiny else {"train.num_steps": 300, "train.eval_every": 150,
                                      "train.checkpoint_every": 300, "sample_every": 150}),
      dict(name="rm", entry="rlhf.reward", config="configs/reward/hh.py" + variant,
           init_from="sft"),
      dict(name="ppo", entry="rlhf.ppo", config="configs/ppo/hh.py" + variant,
           init_from="sft", reward_from="rm",
           overrides={} if tiny else {"ppo.iterations": 24, "train.num_steps": 24 * 4 * 2}),
      dict(name="dpo", entry="rlhf.dpo", config="configs/dpo/hh.py" + variant,
           init_from="sft"),
  ]
  e = c.eval = ml_collections.ConfigDict()
  # (name in the report, stage) pairs, in the report's column order.
  e.models = (("base", "pretrain"), ("sft", "sft"), ("ppo", "ppo"), ("dpo", "dpo"))
  e.reward_models = (("rm", "rm"),)
  e.tasks = ("hellaswag", "piqa") if tiny else (
      "wikitext2", "hellaswag", "arc_easy", "arc_challenge", "piqa", "winogrande")
  e.reward_tasks = ("rm_accuracy",)
  e.limit = 8 if tiny else 500        # items per task (0 = all)
  e.batch_size = 32
  e.winrate_policies = ("base", "sft", "ppo", "dpo")
  e.baseline = "sft"
  e.judge = "rm"
  e.max_prompts = 4 if tiny else 64
  e.samples_per_prompt = 1 if tiny else 4
  e.max_prompt_tokens = 48 if tiny else 128
  e.max_new_tokens = 8 if tiny else 64
  e.temperature = 0.7
  return c
