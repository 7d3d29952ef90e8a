"""eval package.

sample: responses, batches of prompts and interactive chat from a checkpoint
  (`python -m eval.sample --checkpoint=runs/sft --prompt="Name three colors."`).
"""
