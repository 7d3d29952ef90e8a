"""An English base model for SFT: WikiText-2, instruction sets and HH dialogue, 4096-piece BPE.

Corpus (`data/corpus.py`, `data.source = "corpus"`; held-out rules there): WikiText-2 valid
split into articles, the three SFT files (Alpaca subset, Dolly/HH 1k, GSM8K train) without the
conversations the SFT stage holds out, and the HH harmless-base `chosen` transcripts without
the reward model's validation prefixes. Conversations are plain "User: ...\\nAssistant: ..."
text; the chat markers are reserved in the BPE vocabulary (ids 5-8) but never occur in the
pretraining text, so SFT teaches the chat format on a base that already knows English and
turn-taking. 5% of the documents (by content hash) are the validation split: 12,355 train
documents (8.86M characters, ~2.64M tokens at ~3.36 characters per token) and 676 validation
documents (433k characters, 127k tokens).

Model: 4 layers, 256 wide, 4 heads of 64, SwiGLU 688, context 256, untied 4096-piece
embeddings: 5.26M parameters (4.21M without the input embedding). Batch 16 x 256 tokens,
AdamW lr 1e-3 cosine to 1e-4 with 200 warmup steps, 1700 steps = 7.0M tokens (~2.6 epochs).

Sized for ~30 minutes on the 2-core CPU (2 CPU devices, mesh data=2). Measured with
`--config.train.num_steps=200 --config.train.log_every=10 --config.train.eval_every=100`:
steady state 4,100-4,240 tokens/s = 0.97-1.0 s per step, first call (compile) 25 s, 277 s
wall in all, while other jobs shared the CPU at times (a run under heavier contention
saw 1,400-2,300 tokens/s). Expected: 1700 x ~0.98 s = ~28 min of steps plus ~1.5 min of
startup, compilation and four evaluations (~29.5 min); up to twice that on a busy machine.

Launch:
  python -m train.pretrain --config=configs/pretrain/english_bpe.py --workdir=runs/english_bpe
Smoke run (a tiny model, a few steps; used by tests):
  python -m train.pretrain --config=configs/pretrain/english_bpe.py:runlocal=true --workdir=/tmp/eb
Then SFT from it with `--config.init_from=runs/english_bpe`.

From a curated corpus (issue 7: data/curate.py with configs/data/shared.py, the same files
plus Shakespeare, filtered, deduplicated, mixed at temperature 2 and tokenized with its own
4096-piece BPE + chat markers):
  python -m data.curate --config=configs/data/shared.py --workdir=runs/curated --workers=2
  python -m train.pretrain --config=configs/pretrain/english_bpe.py:curated=runs/curated \
      --workdir=runs/english_bpe_curated
`curated=DIR` sets data.source = "curated" and data.curated_dir = DIR; everything else
(model, optimiser, steps) is unchanged.
"""

from configs import common
from data.chat import CHAT_MARKERS

SOURCES = ",".join([
    "pretrain/wikitext2_tokens_valid.txt:text",
    "sft/alpaca_subset.jsonl:sft",
    "sft/dolly_hhrlhf_1k.jsonl:sft",
    "sft/gsm8k_train.jsonl.gz:sft",
    "preference/hh_rlhf_harmless_base_test_shared.jsonl.gz:transcript",
])
# ~30 minutes at the measured ~0.98 s per step (module docstring).
NUM_STEPS = 1700


def get_config(arg=None):
  arg = common.parse_arg(arg, runlocal=False, curated="")
  config = common.base_config()
  # CPU speed switches as in shakespeare_char (README "Performance").
  config.model = common.model_config("shakespeare_char", embed_dim=256, num_layers=4,
                                     num_heads=4, num_kv_heads=4, mlp_dim=688,
                                     max_seq_len=256, fuse_projections=True)
  config.optim = common.optim_config(lr=1e-3, end_lr=1e-4, warmup_steps=200,
                                     flatten_update=True)
  config.train = common.train_config(batch_size=16, num_steps=NUM_STEPS, log_every=100,
                                     eval_every=500, eval_batch_size=64,
                                     checkpoint_every=500, steps_per_call=10)
  config.mesh = common.mesh_config(data=-1)
  config.data.source = "corpus"
  config.data.corpus_sources = SOURCES
  config.data.val_fraction = 0.05
  config.data.seq_len = 256
  config.data.tokenizer.model_type = "bpe"
  config.data.tokenizer.vocab_size = 4096
  config.data.tokenizer.user_defined_symbols = ",".join(CHAT_MARKERS)
  if arg.curated:
    config.data.source = "curated"
    config.data.curated_dir = arg.curated
  if arg.runlocal:
    config.model = common.model_config("tiny", vocab_size=0, max_seq_len=64,
                                       fuse_projections=True)
    config.data.seq_len = 64
    config.data.tokenizer.vocab_size = 1024
    config.optim.warmup_steps = 2
    config.train.update(dict(batch_size=8, num_steps=10, log_every=5, eval_every=10,
                             checkpoint_every=10, eval_batch_size=64))
  return config
