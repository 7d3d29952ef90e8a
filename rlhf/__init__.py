"""rlhf package: the post-SFT stages on the shared Trainer core.

reward: the reward-model loss (Bradley-Terry) and entry point
  (`python -m rlhf.reward --config=configs/reward/hh.py --workdir=runs/rm`).
"""
