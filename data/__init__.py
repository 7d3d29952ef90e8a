"""Data: documents -> SentencePiece ids -> tf.data batches of numpy arrays.

Modules (import them directly; this package imports nothing so that importing
`data.sources` or `data.tokenizer` does not pull in TensorFlow):
  sources      text / jsonl / TFDS readers, data path resolution, train/val split.
  corpus       a multi-source pretraining corpus with held-out rules (source="corpus").
  tokenizer    lossless SentencePiece training and the `Tokenizer` wrapper (+ CLI).
  config       `default_data_config()`, `default_sft_data_config()` and
               `get_or_train_tokenizer`.
  packing      how documents are cut into (input, target) pieces and packed into rows.
  lm_pipeline  the pretraining pipeline: `build_lm_pipelines`, `LMPipeline`,
               `ValidationSet`.
  chat         the chat template: markers, `ChatTemplate` (ids + loss mask).
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

# TensorFlow prints C++ start-up lines on first import unless this is set before it (the
# entry points' --verbose brings them back; see train/quiet.py).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
