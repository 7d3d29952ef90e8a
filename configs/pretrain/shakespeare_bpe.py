"""Tiny Shakespeare with a 1024-piece BPE tokenizer trained by the project.

Same model size and optimizer as shakespeare_char; each token now covers ~3 characters, so
a 64-token context sees ~3x more text. Compare validation loss in bits per character, not
per token (`eval/bpc` is logged alongside `eval/loss`).

Launch:
  python -m train.pretrain --config=configs/pretrain/shakespeare_bpe.py --workdir=runs/shakespeare_bpe
"""

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, runlocal=False)
  config = common.base_config()
  config.model = common.model_config("shakespeare_char", fuse_projections=True)
  config.optim = common.optim_config(lr=1e-3, end_lr=1e-4, warmup_steps=100, b2=0.99,
                                     flatten_update=True)
  config.train = common.train_config(batch_size=12, num_steps=2000, log_every=100,
                                     eval_every=500, checkpoint_every=500)
  config.data.seq_len = 64
  config.data.tokenizer.model_type = "bpe"
  config.data.tokenizer.vocab_size = 1024
  if arg.runlocal:
    config.train.num_steps = 20
    config.train.log_every = 5
    config.train.eval_every = 20
  return config
