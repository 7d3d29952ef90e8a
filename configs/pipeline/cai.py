"""Constitutional AI beside the human-feedback path, end to end (launch/pipeline.py).

  python -m launch.pipeline --config=configs/pipeline/cai.py --workdir=runs/cai_pipeline
Smoke size (the tiny model, a few steps each; tests/test_rlhf_cai_pipeline.py):
  python -m launch.pipeline --config=configs/pipeline/cai.py:size=tiny --workdir=/tmp/cai

Stages (each initialised from its parent's checkpoint; `data_from` points a stage's
data.sources at the file an rlhf.cai stage wrote):
  pretrain   configs/pretrain/english_bpe.py (context raised so CAI's multi-turn prompts fit)
  sft        configs/sft/chat.py from pretrain
  rm_human   configs/reward/hh.py from sft: human HH labels (the judge of the evaluation)
  cai_sl     rlhf.cai phase=sl with sft: answer, critique, revise -> SFT data
  cai_sft    configs/sft/chat.py from sft on the revisions (SL-CAI)
  cai_fb     rlhf.cai phase=feedback: cai_sft answers twice, sft judges -> AI preference pairs
  rm_ai      configs/reward/hh.py from cai_sft on the AI labels (AI-labelled reward model)
  dpo_ai     configs/dpo/hh.py from cai_sft on the AI labels (RL-CAI, DPO form)
  ppo_ai     configs/ppo/hh.py from cai_sft against rm_ai (RL-CAI, PPO form)
  dpo_human  configs/dpo/hh.py from sft on the human labels (the human-feedback path)
  ppo_human  configs/ppo/hh.py from sft against rm_human (the human-feedback path)
Evaluation, all judged by rm_human (a reward model trained on human labels): eval.run
`redteam` (harmlessness: held-out HH red-team prompts, the fraction of answers scored below
the threshold and the mean score) for every policy; eval.winrate of each
against sft (helpfulness proxy, same held-out prompts); rm_accuracy of rm_human and rm_ai on
their own held-out pairs (rm_ai's are AI-labelled).
"""

import ml_collections

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, size="cpu")
  if arg.size not in ("cpu", "tiny"):
    raise ValueError(f"Unknown size {arg.size!r}; expected cpu or tiny")
  tiny = arg.size == "tiny"
  small = ":runlocal=true" if tiny else ""
  cai = "configs/cai/hh.py:phase={}" + (",runlocal=true" if tiny else "")
  # CAI turns (prompt, answer, critique request, critique, revision request) need more
  # context than the tiny model's 64 tokens; the architecture is otherwise unchanged.
  pretrain = {"model.max_seq_len": 384} if tiny else {"train.num_steps": 1000,
                                                       "train.checkpoint_every": 500}
  # CAI transcripts are longer than the tiny SFT rows (64 tokens): room for prompt + revision.
  cai_sft = {"data.seq_len": 192} if tiny else {"train.num_steps": 150,
                                                 "train.checkpoint_every": 150}
  ppo = {} if tiny else {"ppo.iterations": 24, "train.num_steps": 24 * 4 * 2}
  c = ml_collections.ConfigDict()
  c.stages = [
      dict(name="pretrain", entry="train.pretrain",
           config="configs/pretrain/english_bpe.py" + small, overrides=pretrain),
      dict(name="sft", entry="train.sft", config="configs/sft/chat.py" + small,
           init_from="pretrain",
           overrides={} if tiny else {"train.num_steps": 300, "train.checkpoint_every": 300}),
      dict(name="rm_human", entry="rlhf.reward", config="configs/reward/hh.py" + small,
           init_from="sft"),
      dict(name="cai_sl", entry="rlhf.cai", config=cai.format("sl"), init_from="sft"),
      dict(name="cai_sft", entry="train.sft", config="configs/sft/chat.py" + small,
           init_from="sft", data_from="cai_sl", overrides=cai_sft),
      dict(name="cai_fb", entry="rlhf.cai", config=cai.format("feedback"),
           init_from="cai_sft", judge_from="sft"),
      dict(name="rm_ai", entry="rlhf.reward", config="configs/reward/hh.py" + small,
           init_from="cai_sft", data_from="cai_fb"),
      dict(name="dpo_ai", entry="rlhf.dpo", config="configs/dpo/hh.py" + small,
           init_from="cai_sft", data_from="cai_fb"),
      dict(name="ppo_ai", entry="rlhf.ppo", config="configs/ppo/hh.py" + small,
           init_from="cai_sft", reward_from="rm_ai", overrides=ppo),
      dict(name="dpo_human", entry="rlhf.dpo", config="configs/dpo/hh.py" + small,
           init_from="sft"),
      dict(name="ppo_human", entry="rlhf.ppo", config="configs/ppo/hh.py" + small,
           init_from="sft", reward_from="rm_human", overrides=ppo),
  ]
  e = c.eval = ml_collections.ConfigDict()
  e.models = (("sft", "sft"), ("cai_sft", "cai_sft"), ("dpo_ai", "dpo_ai"),
              ("ppo_ai", "ppo_ai"), ("dpo_human", "dpo_human"), ("ppo_human", "ppo_human"))
  e.reward_models = (("rm_human", "rm_human"), ("rm_ai", "rm_ai"))
  e.tasks = ("redteam",)
  e.task_judge = "rm_human"     # judges eval.run's redteam
  e.reward_tasks = ("rm_accuracy",)
  e.limit = 8 if tiny else 64   # red-team prompts per model
  e.batch_size = 16 if tiny else 32
  e.winrate_policies = ("sft", "cai_sft", "dpo_ai", "ppo_ai", "dpo_human", "ppo_human")
  e.baseline = "sft"
  e.judge = "rm_human"
  e.max_prompts = 8 if tiny else 64
  e.samples_per_prompt = 2 if tiny else 4
  e.max_prompt_tokens = 96 if tiny else 128
  e.max_new_tokens = 16 if tiny else 64
  e.temperature = 0.7
  return c
