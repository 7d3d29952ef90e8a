"""The curation pipeline: sources -> filtered, deduplicated, mixed and tokenized shards.

  python -m data.curate --config=configs/data/shared.py --workdir=runs/curated [--workers=2]

Phases, each resumable (a finished unit leaves a marker written last, by rename, so a
killed run redoes only unfinished units and never writes a unit twice):

  split     per source: read the file once (text / jsonl / sft / transcript / tfds, see
            `inputs.read_source`), apply the held-out rules of the stages that evaluate on the
            same data (as `data/corpus.py` does for the pretraining corpus), and cut the
            documents into `num_shards` contiguous ranges: `split/<source>/shard-XXXXX.jsonl`;
            marker `split/<source>/stats.json` (documents, bytes, bad input per file).
  filter    per shard, in a worker pool: the shard's range of every source through
            normalise -> quality -> safety -> PII scrub -> decontamination; survivors with
            their exact-duplicate key and MinHash signature -> `stage1/shard-XXXXX.jsonl`,
            counts and removed examples -> `stage1/shard-XXXXX.stats.json` (the marker).
  dedup     one process, shards in order: exact then near-duplicate removal across all
            sources (the first occurrence in shard order is kept) -> `dedup.json`.
  write     per shard: kept documents as TFRecord `tf.train.Example`s (`text`, `source`,
            `provenance` = "path:line" or "path#n") -> `curated/shard-XXXXX.tfrecord`.
  tokenizer one process: the `tokenize.tokenizer_path` model, else a SentencePiece model
            trained on the curated training split -> `tokenizer.model`.
  tokenize  per shard: token ids of the kept documents (eos appended), each document in
            the validation split when a hash of its text falls below
            `tokenize.val_fraction` -> `tokens/shard-XXXXX.npz`.
  mix       one process: the mixture (`mixture.weights` or `mixture.temperature`) realised
            on the training split by repeating / subsampling whole documents, shuffled
            -> `tokenized/train-XXXXX.tfrecord` (+ `val-00000.tfrecord`; Examples with an
            int64 `tokens` list and `source`) and `tokenized/info.json` (the marker:
            token counts, target and realised shares per source, tokenizer fingerprint).
  report    `report.json`, `report.md` and `report.png`: documents in and out of every
            stage per source, bad input per file, token shares, and up to
            `examples_per_filter` removed documents per filter and source.

Pretraining reads the result with `config.data.source = "curated"` and
`config.data.curated_dir = <workdir>` (`data.tokenized.load_tokenized`): the tokenized
shards are the corpus and `tokenizer.model` its tokenizer.

Modules: `inputs` (sources -> documents, held-out rules), `phases` (`Curator`), `mixture`,
`decontaminate` (the evaluation n-gram index), `report`, `files` (atomic writes, TFRecord
examples); `python -m data.curate` runs `__main__`.

Bad input never crashes the run: an undecodable line (invalid UTF-8), a line that is not
JSON, a jsonl line that is not a JSON object and a record without its text field (or with
a non-string one) are counted per file under `bad_input` in the report and skipped; an
HH transcript that does not parse is counted as `unparseable`. Everything is
deterministic given the config: the same input gives byte-identical shards for any number
of workers or processes.

On a cluster (README "Data curation"), every process runs the same command with
`--process_index=i --process_count=P --phase=<phase>`, phase by phase with a barrier
between them: the per-unit phases (split: sources; filter / write / tokenize: shards) take
the units u with u % P == i, the one-process phases (dedup, tokenizer, mix, report) run on
process 0, and each phase checks that the previous one is complete on disk. The workdir
must then be a filesystem every host sees.
"""

from data.curate.decontaminate import eval_texts
from data.curate.inputs import BAD_KEYS, KINDS, Document, read_source
from data.curate.mixture import mixture_shares, realise_mixture
from data.curate.phases import PHASES, Curator
from data.curate.report import FILTER_STAGES, StageCounts, plot_report, report_markdown

__all__ = ["BAD_KEYS", "FILTER_STAGES", "KINDS", "PHASES", "Curator", "Document",
           "StageCounts", "eval_texts", "mixture_shares", "plot_report",
           "read_source", "realise_mixture", "report_markdown"]
