"""The curation pipeline: sources -> filtered, deduplicated, mixed and tokenized shards, as
one Apache Beam pipeline (`pipeline.run`).

  python -m data.curate --config=configs/data/shared.py --workdir=runs/curated [--workers=2]

Steps (documents are `(key, provenance, text)` with key = (source index, file index,
record index), the document order; "first occurrence" = smallest key):

  read         every file of every source's glob is a unit (`inputs.read_file`: text /
               jsonl / sft / transcript / tfds, held-out rules of the SFT and reward-model
               stages per file as in `data/corpus.py`); bad input counted per file.
  filter       normalise -> quality (per-source overrides) -> safety -> PII scrub ->
               decontamination: the evaluation sets' 13-gram index, built in parallel
               (`decontaminate.DecontaminationIndex`) and passed as a side input.
  exact dedup  grouped by `filters.exact_key`; the smallest key stays.
  near dedup   MinHash signatures (`filters.MinHasher`), LSH band keys grouped, candidate
               pairs confirmed by signature agreement, the edges resolved in document
               order: a document goes iff an earlier kept document is its neighbour
               (what streaming `filters.NearDuplicates` keeps).
  curated      kept documents as `tf.train.Example`s (`text`, `source`, `provenance` =
               "path:line" / "path#n") -> `curated/shard-XXXXX.tfrecord` (`num_shards`
               files; a document's file by a hash of its key, sorted by key within).
  tokenizer    `tokenize.tokenizer_path`, else SentencePiece trained on the
               `tokenize.sample_docs` (default 200,000) training documents of smallest
               text hash, in document order -> `tokenizer.model` (a side input of:)
  tokenize     token ids + eos; a document is validation when a salted hash of its text
               falls below `tokenize.val_fraction` (the pretraining corpus's rule).
  mixture      target shares per source (`mixture.weights` or `temperature`) realised on
               the training split by repeating / subsampling whole documents, one seeded
               permutation -> `tokenized/train-XXXXX.tfrecord` (`num_output_shards`,
               default `num_shards`) and `tokenized/val-00000.tfrecord` (Examples with an
               int64 `tokens` list and `source`).
  summary      `tokenized/info.json` (token counts, target and realised shares, tokenizer
               fingerprint), then `report.json`, after every file is written; the launcher
               then renders `report.md` and `report.png`.

Pretraining reads the result with `config.data.source = "curated"` and
`config.data.curated_dir = <workdir>` (`data.tokenized.load_tokenized`).

Determinism: Beam does not order elements, so every output file is grouped and sorted by a
deterministic key before it is written: the same input gives byte-identical files for any
number of workers. Restarts: a run first deletes the previous run's markers
(`tokenized/info.json`, `report.json`), then its other outputs and stray `*.tmp-*` files,
and writes every file by rename; so a killed run's partial output is never mistaken for a
finished one, and a rerun starts over (the runner retries failed bundles itself).

Bad input never crashes the run: an unreadable file (permission denied, a corrupt or
truncated .gz), an undecodable line, a line that is not JSON or not an object, a record
without its text field and an HH transcript that does not parse are counted per file under
`bad_input` in the report and skipped. A source whose glob matches no file is an input
error before anything is written; a source that gives no document is listed under
`empty_sources` and warned about.

Runners: the DirectRunner in multi-process mode (`--workers` processes) by default; every
flag `python -m data.curate` does not define goes to Beam's `PipelineOptions`, e.g.
`--runner=DataflowRunner --project=P --region=R --temp_location=gs://B/tmp
--setup_file=./setup.py` with a gs:// workdir (README "Data curation").

Modules: `pipeline` (the graph, `run`), `transforms` (read, filter, dedup), `tokens`
(tokenizer, tokenize, sorted shard writing), `inputs`, `mixture`, `decontaminate`,
`report`, `files`.
"""

import logging


class _BeamImportNoise(logging.Filter):
  """apache_beam warns on the root logger, when imported, that Google Cloud's client
  libraries are missing (only Dataflow needs them: the `apache-beam[gcp]` extra); that line
  stays off the console."""

  def filter(self, record: logging.LogRecord) -> bool:
    return "apitools not found" not in record.getMessage()


logging.getLogger().addFilter(_BeamImportNoise())

# pylint: disable=g-import-not-at-top,wrong-import-position (after the filter, on purpose)
from data.curate.decontaminate import eval_texts
from data.curate.inputs import BAD_KEYS, KINDS, Document, read_source, source_files
from data.curate.mixture import mixture_shares, realise_mixture
from data.curate.pipeline import plan, run
from data.curate.report import FILTER_STAGES, plot_report, report_markdown

__all__ = ["BAD_KEYS", "FILTER_STAGES", "KINDS", "Document", "eval_texts",
           "mixture_shares", "plan", "plot_report", "read_source", "realise_mixture",
           "report_markdown", "run", "source_files"]
