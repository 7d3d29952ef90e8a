"""nanoGPT's CPU "baby GPT" on character-level tiny Shakespeare.

Reproduces the README command of karpathy/nanoGPT:
  python train.py config/train_shakespeare_char.py --device=cpu --compile=False \
    --eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 \
    --n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0
(4 layers, 4 heads, 128 wide, context 64, batch 12, 2000 steps, lr 1e-3 cosine to 1e-4 with
100 warmup steps, beta2 0.99, weight decay 0.1, clip 1.0, first 90% train / last 10% val),
with this codebase's Llama-style blocks (RMSNorm, RoPE, SwiGLU) at the same ~0.8M params.

Launch:
  python -m train.pretrain --config=configs/pretrain/shakespeare_char.py --workdir=runs/shakespeare_char
Smoke run (a few seconds):
  python -m train.pretrain --config=configs/pretrain/shakespeare_char.py:runlocal=true --workdir=/tmp/sc
"""

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, runlocal=False)
  config = common.base_config()
  # CPU speed switches (same parameters, same math; see README "Performance"): fused
  # projection matmuls and a flattened optimizer update.
  config.model = common.model_config("shakespeare_char", fuse_projections=True)
  config.optim = common.optim_config(lr=1e-3, end_lr=1e-4, warmup_steps=100, b2=0.99,
                                     flatten_update=True)
  # 10 steps per jitted call: the host's per-dispatch work is paid once per 10 steps.
  config.train = common.train_config(batch_size=12, num_steps=2000, log_every=100,
                                     eval_every=500, checkpoint_every=500, steps_per_call=10)
  # One CPU device per core beats one device using both cores (see README "Performance").
  config.mesh = common.mesh_config(data=-1)
  config.data.seq_len = 64
  config.data.tokenizer.model_type = "char"
  if arg.runlocal:
    config.train.num_steps = 20
    config.train.log_every = 5
    config.train.eval_every = 20
    config.train.checkpoint_every = 10
  return config
