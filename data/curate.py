"""The curation pipeline: sources -> filtered, deduplicated, mixed and tokenized shards.

  python -m data.curate --config=configs/data/shared.py --workdir=runs/curated [--workers=2]

Phases, each resumable (a finished unit leaves a marker written last, by rename, so a
killed run redoes only unfinished units and never writes a unit twice):

  split     per source: read the file once (text / jsonl / sft / transcript / tfds, see
            `read_source`), apply the held-out rules of the stages that evaluate on the
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
`config.data.curated_dir = <workdir>` (`load_tokenized`): the tokenized shards are the
corpus and `tokenizer.model` its tokenizer.

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

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import json
import os
import sys
from typing import Any, Callable, Iterator, Mapping, Sequence

from data import filters

KINDS = ("text", "jsonl", "sft", "transcript", "tfds")
PHASES = ("split", "filter", "dedup", "write", "tokenizer", "tokenize", "mix", "report")
FILTER_STAGES = ("normalize", "quality", "safety", "decontaminate")
BAD_KEYS = ("undecodable", "not_json", "not_an_object", "missing_field", "unparseable")
_VAL_SALT = "corpus-val"  # The same validation hash as data/corpus.py.


@dataclasses.dataclass
class Document:
  doc_id: str        # "<source>/<index>"
  source: str
  text: str
  provenance: str    # "path:line" (jsonl), "path#n" (n-th piece of a text file), "tfds:..."


def _open_bytes(path: str):
  return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _records(path: str, counts: dict[str, int]) -> Iterator[tuple[int, dict]]:
  """(line number, JSON object) of a jsonl[.gz] file; bad lines counted in `counts`."""
  with _open_bytes(path) as f:
    for number, raw in enumerate(f, 1):
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError:
        counts["undecodable"] += 1
        continue
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        counts["not_json"] += 1
        continue
      if not isinstance(record, dict):
        counts["not_an_object"] += 1
        continue
      yield number, record


def _text_pieces(path: str, split: str, counts: dict[str, int], name: str) -> list[str]:
  with _open_bytes(path) as f:
    data = f.read()
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError:
    counts["undecodable"] += 1
    text = data.decode("utf-8", errors="ignore")  # counted; the readable rest is kept
  if split == "file":
    return [text]
  if split == "lines":
    return text.split("\n")
  if split == "articles":  # WikiText: one document per " = Title = " article
    from data.corpus import split_wikitext_articles
    return split_wikitext_articles(text)
  if split == "paragraphs":
    return text.split("\n\n")
  raise ValueError(f"source {name!r}: split={split!r}, expected file, lines, articles or "
                   "paragraphs")


def _held_out_cfg(cfg: Any) -> dict[str, Any]:
  from data.config import default_data_config
  d = default_data_config()
  h = dict(cfg.get("held_out", {}) or {})
  return {"sft_val_fraction": h.get("sft_val_fraction", d.corpus_sft_val_fraction),
          "sft_seed": h.get("sft_seed", d.corpus_sft_seed),
          "pref_val_fraction": h.get("pref_val_fraction", d.corpus_pref_val_fraction),
          "pref_seed": h.get("pref_seed", d.corpus_pref_seed)}


def read_source(source: Mapping[str, Any], bad: dict[str, dict[str, int]],
                held_out: Mapping[str, Any] | None = None, tfds_data_dir: str = ""
                ) -> tuple[list[Document], int]:
  """Documents of one source, and how many its held-out rule removed.

  `source`: {"name", "path", "kind"} with kind (`KINDS`)
    text        "split": paragraphs | articles | lines | file
    jsonl       "text_field" (default "text"), or "text_fields": several, joined by a
                blank line
    sft         instruction/chat records (format detected as in data/sft_sources.py),
                rendered as "User: ...\\nAssistant: ..." dialogue; the conversations the
                SFT stage holds out are left out (`held_out` sft_val_fraction, sft_seed)
    transcript  HH preference pairs: each distinct `chosen` transcript, without the
                reward model's validation prefixes (pref_val_fraction, pref_seed)
    tfds        "path" = "tfds:name[:split]" (split default train), "text_field"
Problems are counted in bad[path] (`BAD_KEYS`).
"""
  from data import corpus, sft_sources
  from data.sources import resolve_data_path
  name, kind = source["name"], source.get("kind") or ""
  spec = source["path"]
  if not kind:
    kind = "tfds" if spec.startswith("tfds:") else ("jsonl" if ".jsonl" in spec else "text")
  if kind not in KINDS:
    raise ValueError(f"source {name!r}: kind={kind!r}, expected one of {KINDS}")
  path = spec if kind == "tfds" else resolve_data_path(spec)
  if kind != "tfds":
    corpus.check_not_held_out(spec)  # evaluation files are never training sources
    if not os.path.isfile(path):
      raise FileNotFoundError(f"source {name!r}: no such file {path}")
  counts = bad.setdefault(path, {k: 0 for k in BAD_KEYS})
  h = dict(held_out or _held_out_cfg({}))
  docs: list[Document] = []

  def add(text: str, provenance: str) -> None:
    docs.append(Document(f"{name}/{len(docs)}", name, text, provenance))

  if kind == "text":
    for n, piece in enumerate(_text_pieces(path, source.get("split", "paragraphs"),
                                           counts, name)):
      if piece.strip():
        add(piece, f"{path}#{n}")
    return docs, 0
  if kind == "tfds":
    import tensorflow_datasets as tfds
    ds_name, _, split = spec[len("tfds:"):].partition(":")
    field = source.get("text_field", "text")
    from data.sources import load_tfds
    ds = load_tfds(ds_name, split or "train", tfds_data_dir)
    if field not in ds.element_spec:
      raise ValueError(f"source {name!r}: TFDS {ds_name} has no feature {field!r} "
                       f"(has: {sorted(ds.element_spec)})")
    for n, example in enumerate(tfds.as_numpy(ds)):
      try:
        add(example[field].decode("utf-8"), f"{spec}#{n}")
      except UnicodeDecodeError:
        counts["undecodable"] += 1
    return docs, 0
  if kind == "jsonl":
    fields = list(source.get("text_fields") or [source.get("text_field", "text")])
    for number, record in _records(path, counts):
      if not all(isinstance(record.get(f), str) for f in fields):
        counts["missing_field"] += 1
        continue
      add("\n\n".join(record[f] for f in fields if record[f]), f"{path}:{number}")
    return docs, 0
  if kind == "sft":
    fmt, kept, held = source.get("format"), [], 0
    for number, record in _records(path, counts):
      fmt = fmt or sft_sources.detect_format(record)
      try:
        if fmt is None:
          raise ValueError("no known format")
        sft_sources._check_record(path, number, record, fmt)  # pylint: disable=protected-access
      except ValueError:
        counts["missing_field"] += 1
        continue
      messages = sft_sources.record_to_conversation(record, fmt)
      if messages is None:
        counts["unparseable"] += 1
        continue
      kept.append((messages, f"{path}:{number}"))
    train, val = sft_sources.split_examples([m for m, _ in kept], h["sft_val_fraction"],
                                            h["sft_seed"])
    held_ids = {id(m) for m in val}
    for messages, provenance in kept:
      if id(messages) in held_ids:
        held += 1
      else:
        add(corpus.render_dialogue(messages), provenance)
    return docs, held
  # transcript
  chosen: dict[str, str] = {}
  for number, record in _records(path, counts):
    if not isinstance(record.get("chosen"), str):
      counts["missing_field"] += 1
      continue
    chosen.setdefault(record["chosen"], f"{path}:{number}")
  _, val = corpus.split_preference_prefixes(
      [corpus.preference_prefix(t) for t in chosen], h["pref_val_fraction"], h["pref_seed"])
  held_set, held_starts, held = set(val), tuple(val), 0
  for transcript, provenance in chosen.items():
    if corpus.preference_prefix(transcript) in held_set or transcript.startswith(held_starts):
      held += 1
      continue
    messages = sft_sources.parse_transcript(transcript)
    if messages is None:
      counts["unparseable"] += 1
    else:
      add(corpus.render_dialogue(messages), provenance)
  return docs, held


def _counter() -> dict[str, int]:
  return {"docs": 0, "chars": 0}


class StageCounts:
  """Per source: documents and characters entering each stage, and removed by it."""

  def __init__(self):
    self.data: dict[str, dict[str, dict[str, int]]] = {}

  def add(self, source: str, stage: str, what: str, text: str) -> None:
    c = self.data.setdefault(source, {}).setdefault(f"{stage}/{what}", _counter())
    c["docs"] += 1
    c["chars"] += len(text)

  def merge(self, other: Mapping[str, Any]) -> None:
    for source, stages in other.items():
      for key, c in stages.items():
        mine = self.data.setdefault(source, {}).setdefault(key, _counter())
        mine["docs"] += c["docs"]
        mine["chars"] += c["chars"]


def _atomic_write(path: str, text: str) -> None:
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp, path)


def _read_json(path: str) -> Any:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _example(features: Mapping[str, Any]):
  import tensorflow as tf
  out = {}
  for key, value in features.items():
    if isinstance(value, str):
      out[key] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[value.encode()]))
    else:
      out[key] = tf.train.Feature(int64_list=tf.train.Int64List(value=value))
  # deterministic=True: map fields in key order, else the bytes vary between processes.
  return tf.train.Example(features=tf.train.Features(feature=out)).SerializeToString(
      deterministic=True)


def mixture_shares(tokens: Mapping[str, int], weights: Mapping[str, float] | None = None,
                   temperature: float = 1.0) -> dict[str, float]:
  """Target token share per source: explicit `weights` (normalised; every source named),
  else temperature sampling p_s ~ n_s^(1/T) (T=1: natural shares, T->inf: uniform)."""
  names = list(tokens)
  if weights:
    unknown = sorted(set(weights) - set(names))
    missing = [n for n in names if n not in weights]
    if unknown or missing:
      raise ValueError(f"mixture.weights: unknown sources {unknown}, sources without a "
                       f"weight {missing} (sources: {names})")
    raw = {n: float(weights[n]) for n in names}
    if any(v < 0 for v in raw.values()) or sum(raw.values()) <= 0:
      raise ValueError(f"mixture.weights must be >= 0 with a positive sum, got {raw}")
  else:
    if temperature <= 0:
      raise ValueError(f"mixture.temperature must be > 0, got {temperature}")
    raw = {n: float(tokens[n]) ** (1.0 / temperature) if tokens[n] else 0.0 for n in names}
  total = sum(raw.values())
  return {n: v / total for n, v in raw.items()}


def realise_mixture(lengths: Mapping[str, Sequence[int]], shares: Mapping[str, float],
                    total_tokens: int, seed: int) -> dict[str, list[int]]:
  """Document indices per source whose tokens come closest to share * total_tokens:
  a seeded permutation of the source's documents, cycled (whole epochs repeat each
  document equally often) and cut where the running total is nearest the target."""
  import numpy as np
  out = {}
  for k, (name, lens) in enumerate(lengths.items()):
    target, picked, running = shares[name] * total_tokens, [], 0
    if not len(lens) or target <= 0:
      out[name] = []
      continue
    rng = np.random.default_rng([seed, k])
    while True:
      for i in rng.permutation(len(lens)):
        if running + lens[i] / 2 > target:  # adding it would overshoot by more than half
          out[name] = picked
          break
        picked.append(int(i))
        running += int(lens[i])
      else:
        continue
      break
  return out


class Curator:
  """One curation run (config: configs/data/*.py `get_config()`)."""

  def __init__(self, cfg: Any, workdir: str):
    self.cfg, self.workdir = cfg, workdir
    self.sources = [dict(s) for s in cfg.sources]
    if not self.sources:
      raise ValueError("config.sources is empty")
    names = [s.get("name") for s in self.sources]
    if len(set(names)) != len(names) or not all(names):
      raise ValueError(f"config.sources: every source needs a distinct name, got {names}")
    for s in self.sources:
      if "/" in s["name"] or not s.get("path"):
        raise ValueError(f"config.sources: source {s['name']!r} needs a 'path' and a name "
                         "without '/'")
    if cfg.num_shards < 1:
      raise ValueError(f"config.num_shards must be >= 1, got {cfg.num_shards}")
    self.blocklist = filters.Blocklist(list(cfg.safety.blocklist))

  def _path(self, *parts: str) -> str:
    return os.path.join(self.workdir, *parts)

  def _shard(self, phase: str, shard: int, ext: str) -> str:
    return self._path(phase, f"shard-{shard:05d}.{ext}")

  def _get(self, section: str, field: str, default: Any) -> Any:
    c = self.cfg.get(section)
    return c.get(field, default) if c is not None else default

  # ------------------------------------------------------------------ split
  def split_source(self, index: int) -> None:
    source = self.sources[index]
    marker = self._path("split", source["name"], "stats.json")
    if os.path.exists(marker):
      return
    bad: dict[str, dict[str, int]] = {}
    docs, held = read_source(source, bad, _held_out_cfg(self.cfg),
                             self.cfg.get("tfds_data_dir", ""))
    n, k = len(docs), self.cfg.num_shards
    for shard in range(k):
      part = docs[shard * n // k:(shard + 1) * n // k]
      _atomic_write(self._path("split", source["name"], f"shard-{shard:05d}.jsonl"),
                    "".join(json.dumps(dataclasses.asdict(d), ensure_ascii=False) + "\n"
                            for d in part))
    _atomic_write(marker, json.dumps({
        "docs": n, "held_out": held, "bad_input": bad,
        "bytes": sum(len(d.text.encode("utf-8")) for d in docs)}))

  def _split_stats(self) -> dict[str, dict[str, Any]]:
    return {s["name"]: _read_json(self._path("split", s["name"], "stats.json"))
            for s in self.sources}

  # ------------------------------------------------------------------ filter
  def decontaminator(self) -> filters.Decontaminator | None:
    if not self.cfg.decontaminate.enabled:
      return None
    os.makedirs(self.workdir, exist_ok=True)
    return _decontaminator(tuple(self.cfg.decontaminate.eval_tasks),
                           self.cfg.decontaminate.ngram,
                           self._path("decontaminate_index.npy"))

  def quality_rules(self, source: Mapping[str, Any]) -> dict[str, Any]:
    """The config's rules with the source's own `quality` overrides on top."""
    return {**dict(self.cfg.quality.rules), **dict(source.get("quality") or {})}

  def filter_shard(self, shard: int) -> None:
    c = self.cfg
    stats_path = self._shard("stage1", shard, "stats.json")
    if os.path.exists(stats_path):
      return
    counts, examples, out = StageCounts(), {}, []
    near = filters.MinHasher(c.near_dedup.num_perm, c.near_dedup.ngram, c.seed)
    deco = self.decontaminator()
    for source in self.sources:
      rules = self.quality_rules(source)
      with open(self._path("split", source["name"], f"shard-{shard:05d}.jsonl"),
                encoding="utf-8") as f:
        docs = [Document(**json.loads(line)) for line in f]
      for doc in docs:
        counts.add(doc.source, "input", "kept", doc.text)
        text = filters.normalize(doc.text, c.normalize.strip_markup) \
            if c.normalize.enabled else doc.text
        removed = rule = None
        if not text:
          removed = "normalize"
        elif c.quality.enabled and (rule := filters.quality_failure(text, rules)):
          removed = "quality"
        elif c.safety.enabled and (rule := filters.safety_failure(text, self.blocklist)):
          removed = "safety"
        if removed is None and c.pii.enabled:
          text, found = filters.scrub_pii(text)
          if sum(found.values()):
            counts.add(doc.source, "pii", "scrubbed", text)
        if removed is None and deco is not None and deco.contaminated(text):
          removed = "decontaminate"
        if removed:
          counts.add(doc.source, removed, "removed", doc.text)
          ex = examples.setdefault(removed, {}).setdefault(doc.source, [])
          if len(ex) < c.examples_per_filter:
            why = ",".join(self.blocklist.matches(text)) if rule == "blocklist" else \
                rule or removed
            ex.append({"doc_id": doc.doc_id, "provenance": doc.provenance, "rule": why,
                       "text": doc.text[:300]})
          continue
        out.append({"doc_id": doc.doc_id, "source": doc.source, "provenance": doc.provenance,
                    "text": text, "exact": filters.exact_key(text),
                    "minhash": near.signature(text).tolist() if c.near_dedup.enabled else []})
    _atomic_write(self._shard("stage1", shard, "jsonl"),
                  "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out))
    _atomic_write(stats_path, json.dumps({"counts": counts.data, "examples": examples}))

  def _stage1(self, shard: int) -> list[dict[str, Any]]:
    with open(self._shard("stage1", shard, "jsonl"), encoding="utf-8") as f:
      return [json.loads(line) for line in f]

  # ------------------------------------------------------------------ dedup
  def deduplicate(self) -> dict[str, Any]:
    path = self._path("dedup.json")
    if os.path.exists(path):
      return _read_json(path)
    import numpy as np
    c = self.cfg
    seen, kept, removed = {}, [], {"exact_dedup": [], "near_dedup": []}
    near = filters.NearDuplicates(c.near_dedup.threshold, c.near_dedup.num_perm,
                                  c.near_dedup.ngram, c.seed) if c.near_dedup.enabled else None
    for shard in range(c.num_shards):
      for r in self._stage1(shard):
        if c.exact_dedup.enabled and r["exact"] in seen:
          removed["exact_dedup"].append([r["doc_id"], seen[r["exact"]]])
          continue
        seen.setdefault(r["exact"], r["doc_id"])
        if near is not None:
          twin = near.add_signature(r["doc_id"], np.asarray(r["minhash"], np.uint64))
          if twin is not None:
            removed["near_dedup"].append([r["doc_id"], twin])
            continue
        kept.append(r["doc_id"])
    result = {"kept": kept, "removed": removed}
    _atomic_write(path, json.dumps(result))
    return result

  @functools.cached_property
  def kept(self) -> set[str]:
    return set(self.deduplicate()["kept"])

  # ------------------------------------------------------------------ write
  def write_shard(self, shard: int) -> None:
    import tensorflow as tf
    path = self._shard("curated", shard, "tfrecord")
    if os.path.exists(path):
      return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with tf.io.TFRecordWriter(tmp) as writer:
      for r in self._stage1(shard):
        if r["doc_id"] in self.kept:
          writer.write(_example({k: r[k] for k in ("text", "source", "provenance")}))
    os.replace(tmp, path)

  # ------------------------------------------------------------------ tokenize
  def _tokenizing(self) -> bool:
    return bool(self._get("tokenize", "enabled", False))

  def is_val(self, text: str) -> bool:
    from data.corpus import unit_hash
    return unit_hash(_VAL_SALT, text) < float(self._get("tokenize", "val_fraction", 0.0))

  def train_tokenizer(self) -> None:
    out = self._path("tokenizer.model")
    if os.path.exists(out):
      return
    import shutil
    t = self.cfg.tokenize
    if t.get("tokenizer_path"):
      shutil.copyfile(os.path.expanduser(t.tokenizer_path), out + ".tmp")
      os.replace(out + ".tmp", out)
      return
    from data.tokenizer import train_tokenizer
    text_path = self._path("tokenizer_train.txt")
    with open(text_path, "w", encoding="utf-8") as f:
      for shard in range(self.cfg.num_shards):
        for r in self._stage1(shard):
          if r["doc_id"] in self.kept and not self.is_val(r["text"]):
            f.write(r["text"] + "\n")  # the trainer reads lines; joining loses nothing
    symbols = [s.strip() for s in t.get("user_defined_symbols", "").split(",") if s.strip()]
    train_tokenizer([text_path], out + ".tmp.model", vocab_size=t.vocab_size,
                    model_type=t.get("model_type", "bpe"),
                    byte_fallback=t.get("byte_fallback", False), user_defined_symbols=symbols)
    os.replace(out + ".tmp.model", out)
    os.remove(text_path)

  def tokenize_shard(self, shard: int) -> None:
    import numpy as np
    path = self._shard("tokens", shard, "npz")
    if os.path.exists(path):
      return
    tok = _tokenizer(self._path("tokenizer.model"))
    rows = [r for r in self._stage1(shard) if r["doc_id"] in self.kept]
    ids = tok.encode_batch([r["text"] for r in rows]) if rows else []
    if self._get("tokenize", "add_eos", True):
      ids = [x + [tok.eos_id] for x in ids]
    keep = [i for i, x in enumerate(ids) if len(x) >= 2]  # at least one next-token target
    names = [s["name"] for s in self.sources]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}.npz"
    np.savez(tmp,
             tokens=np.concatenate([np.asarray(ids[i], np.int32) for i in keep])
             if keep else np.zeros([0], np.int32),
             lengths=np.asarray([len(ids[i]) for i in keep], np.int64),
             source=np.asarray([names.index(rows[i]["source"]) for i in keep], np.int32),
             val=np.asarray([self.is_val(rows[i]["text"]) for i in keep], bool),
             chars=np.asarray([len(rows[i]["text"]) for i in keep], np.int64))
    os.replace(tmp, path)

  def mix(self) -> dict[str, Any]:
    info_path = self._path("tokenized", "info.json")
    if os.path.exists(info_path):
      return _read_json(info_path)
    import numpy as np
    import tensorflow as tf
    c, names = self.cfg, [s["name"] for s in self.sources]
    docs = {n: [] for n in names}   # train documents (token arrays) per source
    val, val_chars = [], 0
    for shard in range(c.num_shards):
      with np.load(self._shard("tokens", shard, "npz")) as npz:
        z = {k: npz[k] for k in npz.files}  # an NpzFile re-reads an array on every access
      starts = np.concatenate([[0], np.cumsum(z["lengths"])])
      for i in range(len(z["lengths"])):
        ids = z["tokens"][starts[i]:starts[i + 1]]
        if z["val"][i]:
          val.append((names[z["source"][i]], ids))
          val_chars += int(z["chars"][i])
        else:
          docs[names[z["source"][i]]].append(ids)
    natural = {n: int(sum(len(d) for d in docs[n])) for n in names}
    m = c.get("mixture")
    if m is not None and m.get("enabled", False):
      shares = mixture_shares(natural, dict(m.get("weights") or {}),
                              float(m.get("temperature", 1.0)))
      total = int(m.get("total_tokens", 0)) or sum(natural.values())
      picked = realise_mixture({n: [len(d) for d in docs[n]] for n in names}, shares,
                               total, c.seed)
    else:
      total = sum(natural.values())
      shares = {n: natural[n] / max(total, 1) for n in names}
      picked = {n: list(range(len(docs[n]))) for n in names}
    order = [(n, i) for n in names for i in picked[n]]
    perm = np.random.default_rng([c.seed, 7]).permutation(len(order))
    num_out = int(self._get("tokenize", "num_output_shards", 0)) or c.num_shards
    out_dir = self._path("tokenized")
    os.makedirs(out_dir, exist_ok=True)
    realised = {n: 0 for n in names}
    for k in range(num_out):
      with tf.io.TFRecordWriter(os.path.join(out_dir, f"train-{k:05d}.tfrecord")) as w:
        for j in perm[k * len(order) // num_out:(k + 1) * len(order) // num_out]:
          n, i = order[j]
          realised[n] += len(docs[n][i])
          w.write(_example({"tokens": docs[n][i].tolist(), "source": n}))
    with tf.io.TFRecordWriter(os.path.join(out_dir, "val-00000.tfrecord")) as w:
      for n, ids in val:
        w.write(_example({"tokens": ids.tolist(), "source": n}))
    out_total = max(sum(realised.values()), 1)
    tok = _tokenizer(self._path("tokenizer.model"))
    info = {
        "tokenizer": "tokenizer.model", "tokenizer_fingerprint": tok.fingerprint,
        "add_eos": bool(self._get("tokenize", "add_eos", True)),
        "train_files": num_out, "train_tokens": sum(realised.values()),
        "train_documents": len(order), "val_tokens": int(sum(len(v) for _, v in val)),
        "val_documents": len(val), "val_chars": val_chars,
        "per_source": {n: {"natural_tokens": natural[n],
                           "natural_share": natural[n] / max(sum(natural.values()), 1),
                           "target_share": shares[n],
                           "tokens": realised[n], "share": realised[n] / out_total,
                           "documents": len(picked[n]),
                           "epochs": realised[n] / natural[n] if natural[n] else 0.0}
                       for n in names}}
    _atomic_write(info_path, json.dumps(info, indent=1))
    return info

  # ------------------------------------------------------------------ the run
  def _units(self, phase: str) -> list[int]:
    return list(range(len(self.sources))) if phase == "split" else \
        list(range(self.cfg.num_shards))

  def _check_done(self, phase: str) -> None:
    """Raises unless every unit of `phase` has its marker (cluster mode barrier)."""
    marker = {"split": lambda u: self._path("split", self.sources[u]["name"], "stats.json"),
              "filter": lambda u: self._shard("stage1", u, "stats.json"),
              "write": lambda u: self._shard("curated", u, "tfrecord"),
              "tokenize": lambda u: self._shard("tokens", u, "npz"),
              "dedup": lambda u: self._path("dedup.json"),
              "tokenizer": lambda u: self._path("tokenizer.model")}[phase]
    units = self._units(phase) if phase not in ("dedup", "tokenizer") else [0]
    missing = [u for u in units if not os.path.exists(marker(u))]
    if missing:
      raise RuntimeError(f"phase {phase!r} is incomplete in {self.workdir}: units "
                         f"{missing} have no output; run --phase={phase} on every process "
                         "first")

  def run(self, workers: int = 1, phases: Sequence[str] = PHASES, process_index: int = 0,
          process_count: int = 1, log: Callable[[str], None] | None = None
          ) -> dict[str, Any] | None:
    """Runs `phases` (all by default) for this process; returns the report when the
    report phase ran here."""
    import time
    log = log or (lambda s: print(s, flush=True))
    unknown = [p for p in phases if p not in PHASES]
    if unknown:
      raise ValueError(f"unknown phases {unknown}; expected some of {PHASES}")
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index={process_index} not in [0, {process_count})")
    per_unit = {"split": "split_source", "filter": "filter_shard", "write": "write_shard",
                "tokenize": "tokenize_shard"}
    single = {"dedup": self.deduplicate, "tokenizer": self.train_tokenizer, "mix": self.mix,
              "report": self.report}
    needs = {"filter": "split", "dedup": "filter", "write": "dedup", "tokenizer": "dedup",
             "tokenize": "tokenizer", "mix": "tokenize", "report": "dedup"}
    report = None
    for phase in PHASES:
      if phase not in phases:
        continue
      if phase in ("tokenizer", "tokenize", "mix") and not self._tokenizing():
        continue
      if phase in needs:
        self._check_done(needs[phase])
      start = time.time()
      if phase == "filter":
        self.decontaminator()  # built once here, loaded by the pool workers
      if phase in per_unit:
        units = [u for u in self._units(phase) if u % process_count == process_index]
        if workers > 1 and len(units) > 1:
          import multiprocessing
          with multiprocessing.get_context("spawn").Pool(min(workers, len(units))) as pool:
            pool.starmap(_run_unit, [(self.cfg.to_dict(), self.workdir, per_unit[phase], u)
                                     for u in units])
        else:
          for u in units:
            getattr(self, per_unit[phase])(u)
      elif process_index == 0:
        result = single[phase]()
        if phase == "report":
          report = result
      else:
        continue
      log(f"curate: phase {phase} done in {time.time() - start:.1f}s")
    return report

  # ------------------------------------------------------------------ report
  def report(self) -> dict[str, Any]:
    dedup = self.deduplicate()
    split = self._split_stats()
    counts, bad, examples = StageCounts(), {}, {}
    for stats in split.values():
      bad.update(stats["bad_input"])
    for shard in range(self.cfg.num_shards):
      stats = _read_json(self._shard("stage1", shard, "stats.json"))
      counts.merge(stats["counts"])
      for stage, by_source in stats["examples"].items():
        for source, ex in by_source.items():
          mine = examples.setdefault(stage, {}).setdefault(source, [])
          mine.extend(ex[:max(self.cfg.examples_per_filter - len(mine), 0)])
    per_source = {s["name"]: {} for s in self.sources}
    for stage in ("exact_dedup", "near_dedup"):
      for doc_id, twin in dedup["removed"][stage]:
        source = doc_id.split("/")[0]
        per_source[source][stage] = per_source[source].get(stage, 0) + 1
        ex = examples.setdefault(stage, {}).setdefault(source, [])
        if len(ex) < self.cfg.examples_per_filter:
          ex.append({"doc_id": doc_id, "duplicate_of": twin})
    kept_by_source: dict[str, int] = {}
    for doc_id in dedup["kept"]:
      source = doc_id.split("/")[0]
      kept_by_source[source] = kept_by_source.get(source, 0) + 1
    table = {}
    for source in per_source:
      data = counts.data.get(source, {})
      row = {"held_out": split[source]["held_out"],
             "input": data.get("input/kept", _counter())["docs"]}
      for stage in FILTER_STAGES:
        row[stage] = data.get(f"{stage}/removed", _counter())["docs"]
      row["pii_scrubbed"] = data.get("pii/scrubbed", _counter())["docs"]
      row["exact_dedup"] = per_source[source].get("exact_dedup", 0)
      row["near_dedup"] = per_source[source].get("near_dedup", 0)
      row["output"] = kept_by_source.get(source, 0)
      row["input_chars"] = data.get("input/kept", _counter())["chars"]
      table[source] = row
    info_path = self._path("tokenized", "info.json")
    tokens = _read_json(info_path) if os.path.exists(info_path) else None
    report = {"per_source": table, "bad_input": bad, "examples": examples,
              "tokens": tokens, "config": self.cfg.to_dict()}
    _atomic_write(self._path("report.json"), json.dumps(report, indent=1))
    _atomic_write(self._path("report.md"), report_markdown(report))
    plot_report(report, self._path("report.png"))
    return report


COLUMNS = ["held_out", "input", *FILTER_STAGES, "pii_scrubbed", "exact_dedup",
           "near_dedup", "output"]


def report_markdown(report: Mapping[str, Any]) -> str:
  lines = ["Documents per source through each stage (held_out: removed by the held-out rules "
           "before the input count; pii_scrubbed documents are kept).", "",
           "| source | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
  rows = report["per_source"]
  lines += [f"| {s} | " + " | ".join(str(r[k]) for k in COLUMNS) + " |" for s, r in rows.items()]
  lines += ["| total | " + " | ".join(str(sum(r[k] for r in rows.values())) for k in COLUMNS)
            + " |", ""]
  bad = {p: c for p, c in report["bad_input"].items() if any(c.values())}
  lines.append("Bad input: " + ("none" if not bad else "; ".join(
      f"{p}: " + ", ".join(f"{k} {v}" for k, v in c.items() if v) for p, c in bad.items())))
  if report.get("tokens"):
    t = report["tokens"]
    lines += ["", f"Tokens: train {t['train_tokens']:,} ({t['train_documents']:,} documents), "
              f"validation {t['val_tokens']:,} ({t['val_documents']:,} documents).", "",
              "| source | natural tokens | natural share | target share | tokens | "
              "realised share | epochs |", "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {s} | {r['natural_tokens']:,} | {r['natural_share']:.3f} | "
              f"{r['target_share']:.3f} | {r['tokens']:,} | {r['share']:.3f} | "
              f"{r['epochs']:.2f} |" for s, r in t["per_source"].items()]
  lines += ["", "Examples of removed documents:"]
  for stage, by_source in report["examples"].items():
    for e in (e for ex in by_source.values() for e in ex):
      what = e.get("text", f"duplicate of {e.get('duplicate_of')}")
      lines.append(f"- {stage} ({e.get('rule', stage)}) {e['doc_id']}: "
                   + json.dumps(what[:160], ensure_ascii=False))
  return "\n".join(lines) + "\n"


def plot_report(report: Mapping[str, Any], path: str) -> None:
  """Left: documents each stage removed, per source (log scale: a filter that removes 3 of
  7,000 stays visible); labels say how many of the input were kept. Right, when the run
  tokenized: natural, target and realised token share per source."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np
  rows, tokens = report["per_source"], report.get("tokens")
  names = list(rows)
  stages = ["held_out", *FILTER_STAGES, "exact_dedup", "near_dedup"]
  fig, axes = plt.subplots(1, 2 if tokens else 1, figsize=(13 if tokens else 8,
                                                           1.5 + 0.6 * len(names)),
                           squeeze=False)
  ax, y = axes[0][0], np.arange(len(names))
  height = 0.8 / len(stages)
  for k, stage in enumerate(stages):
    values = [rows[n][stage] for n in names]
    ax.barh(y + k * height, values, height, label=stage, color=f"C{k}")
  ax.set_xscale("symlog", linthresh=1)
  ax.set_yticks(y + 0.4 - height / 2,
                [f"{n}\nkept {rows[n]['output']:,}/{rows[n]['input']:,}" for n in names])
  ax.set_xlabel("documents removed (symlog)")
  ax.set_title("Curation: documents removed by each stage")
  ax.legend(fontsize=7, loc="upper right")
  if tokens:
    ax = axes[0][1]
    t = tokens["per_source"]
    for k, (key, label) in enumerate([("natural_share", "natural"),
                                      ("target_share", "target"), ("share", "realised")]):
      ax.barh(y + k * 0.27, [t[n][key] for n in names], 0.27, label=label)
    ax.set_yticks(y + 0.27, names)
    ax.set_xlabel("share of training tokens")
    ax.set_title("Mixture")
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def _tail(text: str, k: int) -> str:
  """The suffix of `text` that starts at its k-th last word (`filters.words` token): its
  words are exactly the last k words of `text`."""
  starts = [m.start() for m in filters._WORD.finditer(text)]  # pylint: disable=protected-access
  return text[starts[-k]:] if len(starts) > k else text


def eval_texts(eval_tasks: Sequence[str], ngram: int) -> list[str]:
  """Texts whose n-grams are exactly those of every scored request (context +
  continuation) of the tasks, without repeating a context once per choice: each distinct
  context once, then each continuation after the context's last n-1 words (every n-gram
  that reaches into the continuation starts there)."""
  from eval import tasks as tasks_lib
  texts: dict[str, None] = {}
  for task in eval_tasks:
    path = tasks_lib.task_path(task)
    reader = tasks_lib.MC_READERS[task]
    for item in (reader(path, 0) if task == "mmlu" else reader(path)):
      for context, continuation in item.requests():
        texts[context] = None
        texts[_tail(context, ngram - 1) + continuation] = None
  return list(texts)


@functools.lru_cache(maxsize=None)
def _decontaminator(eval_tasks: tuple[str, ...], ngram: int,
                    index_path: str = "") -> filters.Decontaminator:
  """The n-gram index of the evaluation sets: loaded from `index_path` when it exists,
  else built (and saved there), once per process (a pool worker filters several shards)."""
  import numpy as np
  if index_path and os.path.exists(index_path):
    deco = filters.Decontaminator([], ngram)
    deco.index = np.load(index_path)
    return deco
  deco = filters.Decontaminator(eval_texts(eval_tasks, ngram), ngram)
  if index_path:
    tmp = f"{index_path}.tmp{os.getpid()}.npy"
    np.save(tmp, deco.index)
    os.replace(tmp, index_path)
  return deco


@functools.lru_cache(maxsize=4)
def _tokenizer(path: str):
  from data.tokenizer import Tokenizer
  return Tokenizer.from_file(path)


def _run_unit(cfg_dict: dict, workdir: str, method: str, unit: int) -> None:
  import ml_collections
  getattr(Curator(ml_collections.ConfigDict(cfg_dict), workdir), method)(unit)


# ---------------------------------------------------------------------- reading the output
def load_tokenized(curated_dir: str):
  """The tokenized output of a curation run: (tokenizer, train TokenizedCorpus,
  validation TokenizedCorpus, info). Raises naming the directory if it is not one."""
  import glob
  import numpy as np
  import tensorflow as tf
  from data.lm_pipeline import TokenizedCorpus
  info_path = os.path.join(curated_dir, "tokenized", "info.json")
  if not os.path.exists(info_path):
    raise FileNotFoundError(
        f"{curated_dir} holds no finished curation output ({info_path} is missing); run "
        f"`python -m data.curate --config=configs/data/<name>.py --workdir={curated_dir}` "
        "with tokenize.enabled=True first")
  info = _read_json(info_path)
  tok = _tokenizer(os.path.join(curated_dir, info["tokenizer"]))
  if tok.fingerprint != info["tokenizer_fingerprint"]:
    raise ValueError(f"{curated_dir}/{info['tokenizer']} is not the tokenizer the shards "
                     "were made with (fingerprint differs)")
  spec = {"tokens": tf.io.VarLenFeature(tf.int64)}

  def corpus(pattern: str) -> TokenizedCorpus:
    files = sorted(glob.glob(os.path.join(curated_dir, "tokenized", pattern)))
    pieces = [tf.sparse.to_dense(tf.io.parse_single_example(raw, spec)["tokens"]).numpy()
              for raw in tf.data.TFRecordDataset(files)]
    lengths = np.asarray([len(p) for p in pieces], np.int64)
    tokens = (np.concatenate(pieces) if pieces else np.zeros([0])).astype(np.int32)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) \
        if len(pieces) else np.zeros([0], np.int64)
    return TokenizedCorpus(tokens, starts, lengths)

  train, val = corpus("train-*.tfrecord"), corpus("val-*.tfrecord")
  if train.num_tokens != info["train_tokens"] or val.num_tokens != info["val_tokens"]:
    raise ValueError(f"{curated_dir}/tokenized: the shards hold {train.num_tokens} train / "
                     f"{val.num_tokens} validation tokens, info.json says "
                     f"{info['train_tokens']} / {info['val_tokens']}")
  return tok, train, val, info


def main(argv: Sequence[str]) -> None:
  from absl import flags
  FLAGS = flags.FLAGS
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {argv[1:]}")
  phases = PHASES if FLAGS.phase == "all" else tuple(FLAGS.phase.split(","))
  try:
    report = Curator(FLAGS.config, FLAGS.workdir).run(
        FLAGS.workers, phases, FLAGS.process_index, FLAGS.process_count)
  except (ValueError, OSError, RuntimeError) as e:
    sys.exit("error: " + " ".join(str(e).split()))
  if report is not None:
    with open(os.path.join(FLAGS.workdir, "report.md")) as f:
      print(f.read())
    print(json.dumps({"per_source": report["per_source"], "bad_input": report["bad_input"]}))


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "configs/data/*.py", lock_config=True)
  flags.DEFINE_string("workdir", None, "Output directory.", required=True)
  flags.DEFINE_integer("workers", 1, "Worker processes for the per-unit phases.")
  flags.DEFINE_string("phase", "all", f"'all' or comma-separated phases of {PHASES}.")
  flags.DEFINE_integer("process_index", 0, "This process (cluster mode; see module doc).")
  flags.DEFINE_integer("process_count", 1, "Processes running the per-unit phases.")
  app.run(main)
