"""rlhf package: the post-SFT stages on the shared Trainer core.

reward: the reward-model loss (Bradley-Terry) and entry point
  (`python -m rlhf.reward --config=configs/reward/hh.py --workdir=runs/rm`).
dpo_core, dpo: the DPO / IPO losses and entry point (`python -m rlhf.dpo ...`).
ppo_core: PPO's math (KL estimators, per-token rewards, GAE, clipped losses, KL control).
rollout: PPO's prompt set, rollout scoring and policy / value losses.
ppo: the PPO loop around a policy and a value Trainer (`python -m rlhf.ppo ...`).
cai_prompts, cai_model, cai: Constitutional AI, critique/revision SFT data and AI-judged
  preference pairs (`python -m rlhf.cai --config=configs/cai/hh.py:phase=sl ...`);
  cai_agreement: the judge's agreement with the human HH labels.
"""
