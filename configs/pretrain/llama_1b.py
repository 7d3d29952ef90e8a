"""Llama-3.2-1B shape (16 x 2048, GQA 32/8, tied embeddings) on C4, for a TPU pod slice.

Launch on every worker of a TPU VM slice (see launch/):
  python -m train.pretrain --config=configs/pretrain/llama_1b.py --workdir=gs://BUCKET/runs/llama_1b
Mesh: FSDP over all devices, tensor parallelism 1 (raise `--config.mesh.shape.tensor` for
bigger slices). Global batch 512 x 2048 = 1M tokens per step, bf16 compute, layers scanned
and rematerialised (dots without batch dimensions saved). Attention: Pallas splash (TPU); on
a GPU add `--config.model.attention_impl=cudnn` (or `auto`) for cuDNN flash attention.
"""

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, runlocal=False)
  config = common.base_config()
  config.model = common.model_config("llama_1b", dtype="bfloat16", attention_impl="splash")
  config.optim = common.optim_config(lr=3e-4, end_lr=3e-5, warmup_steps=2000, b2=0.95)
  config.train = common.train_config(batch_size=512, num_steps=50000, log_every=20,
                                     eval_every=5000, eval_batch_size=512,
                                     checkpoint_every=1000)
  config.mesh = common.mesh_config(data=1, fsdp=-1, tensor=1)
  config.data.source = "tfds"
  config.data.tfds_name = "c4/en"
  # Streamed per host (data/stream_sources.py): C4's train split is cut into one stream
  # per process (tfds.even_splits); 10k documents (~20 MB of text) in each shuffle buffer,
  # 16 files interleaved. Validation: the first 20k documents (~10M tokens).
  config.data.streams = 0
  config.data.shuffle_buffer = 10_000
  config.data.cycle_length = 16
  config.data.tfds_val_split = "validation[:20000]"
  config.data.seq_len = 2048
  config.data.tokenizer.model_type = "bpe"
  config.data.tokenizer.vocab_size = 128256
  # Trained on the first 100k training documents unless data.tokenizer.path names one
  # (e.g. Llama 3's tokenizer.json).
  config.data.tokenizer.train_sample_docs = 100_000
  if arg.runlocal:
    config.model.num_layers = 2
    config.model.embed_dim = 256
    config.model.mlp_dim = 512
    config.model.num_heads = 8
    config.model.num_kv_heads = 2
    common.wikitext_smoke(config)
  return config
