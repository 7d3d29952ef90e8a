"""A 125M-parameter model (GPT-2 small shape, Llama blocks) on LM1B, for one GPU or a TPU host.

Launch (GPU or TPU VM; data from TFDS, which downloads `lm1b` on first use):
  python -m train.pretrain --config=configs/pretrain/gpt_125m.py --workdir=runs/gpt_125m
Smoke run on a CPU with the shared WikiText-2 text instead of TFDS:
  python -m train.pretrain --config=configs/pretrain/gpt_125m.py:runlocal=true --workdir=/tmp/125m

Batch 256 x 1024 tokens = 262k tokens per step; 20k steps ~ 5.2B tokens. FSDP over all
devices (parameters and Adam moments sharded), bf16 compute with f32 parameters.
Attention "auto": cuDNN flash attention on a GPU, Pallas splash on a TPU (model/attention.py).
"""

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, runlocal=False)
  config = common.base_config()
  config.model = common.model_config("gpt_125m", dtype="bfloat16",
                                     attention_impl="auto", max_seq_len=1024)
  config.optim = common.optim_config(lr=6e-4, end_lr=6e-5, warmup_steps=2000, b2=0.95)
  config.train = common.train_config(batch_size=256, num_steps=20000, log_every=50,
                                     eval_every=2000, eval_batch_size=256,
                                     checkpoint_every=2000)
  config.mesh = common.mesh_config(data=1, fsdp=-1)
  config.data.source = "tfds"
  config.data.tfds_name = "lm1b"
  config.data.tfds_val_split = "test"
  config.data.seq_len = 1024
  config.data.tokenizer.model_type = "bpe"
  config.data.tokenizer.vocab_size = 32000
  if arg.runlocal:
    common.wikitext_smoke(config)
    config.model.num_layers = 2
    config.train.eval_every = 10
  return config
