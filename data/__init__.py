"""Data: documents -> SentencePiece ids -> tf.data batches of numpy arrays.

Modules (import them directly; this package imports nothing so that importing
`data.readers` or `data.tokenizer` does not pull in TensorFlow; their layers are in
.importlinter, checked by tests/test_layering.py):
  readers      leaf readers: data path resolution, UTF-8 text, the one jsonl reader
               (`jsonl_records`, raising or counting bad lines); imports no project code.
  benchmarks   the evaluation files (HellaSwag, ARC, ..., GSM8K) as scored items.
  tfds_builders / tfds_readers  TFDS builders of the local files; `load_tfds`,
               `tfds_records`, `read_tfds`.
  corpus       a multi-source pretraining corpus with held-out rules (source="corpus").
  documents    a data config -> (train, val) documents: one loader per `data.source`
               (`SOURCE_KINDS`: text, jsonl, tfds, corpus).
  tokenized    token-id corpora, `tokenize_documents`; curated output: `curated_shards`
               (checked file lists), `load_tokenized` (all in memory, tests).
  curate/      the curation pipeline (`python -m data.curate`).
  sources      only `load_split_documents` for train/pretrain.py (to be removed).
  tokenizer    lossless SentencePiece training and the `Tokenizer` wrapper (+ CLI);
               `load_tokenizer` (checkpoint bytes -> either backend), `fill_id`.
  hf_backend   `HFTokenizer`: the Hugging Face `tokenizers` backend (tokenizer.json).
  tiktoken_convert  a tiktoken BPE file (Llama-3) -> an equivalent tokenizer.json.
  hf_tokenizer Hugging Face directories: `tokenizer_from_hf_dir`, `save_hf_tokenizer`.
  config       `default_data_config()`, `default_sft_data_config()` and
               `get_or_train_tokenizer`.
  packing      how documents are cut into (input, target) pieces and packed into rows.
  pipeline_state  `FetchingPipeline`: serving steps of a multi-step fetch and the
               resumable state blob, shared by the pretraining pipelines.
  lm_pipeline  the in-memory pretraining pipeline (text, jsonl, corpus sources):
               `build_lm_pipelines`, `LMPipeline`, `ValidationSet`.
  stream_pipeline  the streaming pretraining pipeline: packing rows from document
               streams, `StreamPipeline`, `StreamValidationSet`.
  stream_sources  curated shards and TFDS splits as streams: `build_stream_pipelines`.
  chat         the chat templates: markers, `ChatTemplate` (ids + loss mask),
               `get_template` ("auto" | "chat" | "jinja").
  jinja_chat   `JinjaChatTemplate`: an imported model's own Jinja chat template.
  sft_sources  SFT jsonl readers (alpaca, prompt/response, GSM8K, HH transcripts)
               and the train/val split by prompt hash.
  sft_rows     SFT examples -> rows: truncation, first-fit packing or padding.
  row_pipeline shuffled, resumable, per-host batches of a fixed row table:
               `RowPipeline`, `RowValidationSet` (SFT and preference rows).
  sft_pipeline the SFT pipeline: `build_sft_pipelines`.
  preferences  preference-pair readers (HH transcripts, prompt/chosen/rejected,
               sharegpt, TFDS) with counted skips, and the split by prompt.
  preference_pipeline  pairs -> [B, 2, T] chosen/rejected rows: truncation,
               score index, `build_preference_pipelines`.

This package never imports jax or model code.
"""

import os

# TensorFlow prints C++ start-up lines on first import unless these are set before it (the
# entry points' --verbose brings them back; see train/quiet.py). TF 2.21 prints its oneDNN
# notice whatever TF_CPP_MIN_LOG_LEVEL says; TF runs only host-side tf.data here, whose ops do
# not use oneDNN's custom kernels, so turning them off changes no number this project computes.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
