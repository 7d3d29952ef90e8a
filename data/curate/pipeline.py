"""The curation as one Apache Beam pipeline (`run`; the steps are in the `data.curate` doc).

`plan` checks the config and expands every source's glob before anything is written (a
source matching no file is an error naming `config.sources[i].path`); `build` lays out
the graph; `run` clears a previous run's outputs (`files.clear_outputs`), runs the
pipeline (DirectRunner in multi-process mode by default; any runner's own options pass
through) and renders report.md / report.png from the report.json it wrote last.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import sys
import tempfile
import time
import zlib
from typing import Any, Callable, Iterator, Sequence

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from data import benchmarks
from data.curate import files, inputs, mixture, report, tokens, transforms
from data.curate.decontaminate import DecontaminationIndex
from data.tokenizer import Tokenizer

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclasses.dataclass
class Plan:
  """A checked config: the config as a dict, the source names, the input files (units of
  reading: (source index, file index, path)) and the number of files per source."""
  cfg: dict[str, Any]
  workdir: str
  names: list[str]
  units: list[tuple[int, int, str]]
  num_files: list[int]

  def setting(self, section: str, field: str, default: Any) -> Any:
    return (self.cfg.get(section) or {}).get(field, default)

  @property
  def tokenizing(self) -> bool:
    return bool(self.setting("tokenize", "enabled", False))

  @property
  def doc_id(self) -> Callable[[transforms.Key], str]:
    return functools.partial(_doc_id, tuple(self.names), tuple(self.num_files))


def _doc_id(names: Sequence[str], num_files: Sequence[int], key: transforms.Key) -> str:
  return inputs.doc_id(names[key[0]], key[1], key[2], num_files[key[0]])


def plan(cfg: Any, workdir: str) -> Plan:
  """Checks `cfg` (a configs/data/*.py config) and expands the sources' globs.

  Raises:
    ValueError: naming the config field, e.g. "config.sources[2].path: no file matches
      /data/x*.jsonl".
  """
  sources = [dict(s) for s in cfg.sources]
  if not sources:
    raise ValueError("config.sources is empty")
  names = [s.get("name") for s in sources]
  if len(set(names)) != len(names) or not all(names):
    raise ValueError(f"config.sources: every source needs a distinct name, got {names}")
  units, num_files = [], []
  for i, s in enumerate(sources):
    if "/" in s["name"] or not s.get("path"):
      raise ValueError(f"config.sources[{i}]: source {s['name']!r} needs a 'path' and a "
                       "name without '/'")
    try:
      inputs.source_kind(s)
      paths = inputs.source_files(s)
    except ValueError as e:
      raise ValueError(f"config.sources[{i}].path: {e}") from e
    units += [(i, f, p) for f, p in enumerate(paths)]
    num_files.append(len(paths))
  if cfg.num_shards < 1:
    raise ValueError(f"config.num_shards must be >= 1, got {cfg.num_shards}")
  if cfg.decontaminate.enabled:
    unknown = [t for t in cfg.decontaminate.eval_tasks if t not in benchmarks.MC_READERS]
    if unknown:
      raise ValueError(f"config.decontaminate.eval_tasks: unknown tasks {unknown} "
                       f"(known: {sorted(benchmarks.MC_READERS)})")
  t = cfg.get("tokenize")
  if t is not None and t.get("enabled", False) and t.get("tokenizer_path"):
    path = os.path.expanduser(t.tokenizer_path)
    if not files.exists(path):
      raise ValueError(f"config.tokenize.tokenizer_path: no such file {path}")
  if "://" not in workdir:
    workdir = os.path.abspath(workdir)
  return Plan(cfg.to_dict(), workdir, names, units, num_files)


def _curated_record(plan: Plan, doc: transforms.Doc) -> tuple[str, tuple[Any, bytes]]:
  key, provenance, text = doc
  shard = zlib.crc32(repr(key).encode()) % plan.cfg["num_shards"]
  path = files.join(plan.workdir, "curated", f"shard-{shard:05d}.tfrecord")
  return path, (key, files.tf_example({"text": text, "source": plan.names[key[0]],
                                       "provenance": provenance}))


def _tokenized(p: beam.Pipeline, plan: Plan, kept) -> dict[str, Any]:
  """Tokenizer, tokens, mixture and the tokenized shards; side inputs for the summary."""
  c, names = plan.cfg, plan.names
  tok_cfg = c["tokenize"]
  model, model_written = kept | "Tokenizer" >> tokens.TokenizerModel(tok_cfg, plan.workdir)
  ids = kept | "Tokenize" >> beam.ParDo(
      tokens.Tokenize(bool(tok_cfg.get("add_eos", True)),
                      float(tok_cfg.get("val_fraction", 0.0))),
      model=beam.pvalue.AsSingleton(model))
  out_dir = files.join(plan.workdir, "tokenized")
  num_out = int(tok_cfg.get("num_output_shards", 0)) or c["num_shards"]
  val_path = files.join(out_dir, "val-00000.tfrecord")
  val = ids | "Val" >> beam.Filter(lambda t: t[2])
  val_written = (val
                 | "ValRecords" >> beam.Map(lambda t: (val_path, (t[0], files.tf_example(
                     {"tokens": t[1].tolist(), "source": names[t[0][0]]}))))
                 | "WriteVal" >> tokens.WriteShards([val_path]))
  val_stats = (val
               | "ValStats" >> beam.Map(lambda t: (1, len(t[1]), t[3]))
               | "SumVal" >> beam.CombineGlobally(
                   lambda xs: tuple(map(sum, zip(*xs))) or (0, 0, 0)))
  train = ids | "Train" >> beam.Filter(lambda t: not t[2])
  placed = (train
            | "Lengths" >> beam.Map(lambda t: (t[0][0], t[0], len(t[1])))
            | "AllLengths" >> beam.combiners.ToList()
            | "Mixture" >> beam.FlatMap(mixture.assign_mixture, names, c.get("mixture"),
                                        c["seed"], num_out).with_outputs("info",
                                                                         main="places"))
  train_paths = [files.join(out_dir, f"train-{k:05d}.tfrecord") for k in range(num_out)]

  def records(joined):
    key, j = joined
    if not j["places"]:  # left out by the mixture
      return
    example = files.tf_example({"tokens": j["ids"][0].tolist(), "source": names[key[0]]})
    for shard, pos in j["places"]:
      yield train_paths[shard], (pos, example)

  train_written = ({"ids": train | "ById" >> beam.Map(lambda t: (t[0], t[1])),
                    "places": placed.places}
                   | "Join" >> beam.CoGroupByKey()
                   | "TrainRecords" >> beam.FlatMap(records)
                   | "WriteTrain" >> tokens.WriteShards(train_paths))
  return {"model": model, "mix": placed.info, "val": val_stats,
          "written": [model_written, val_written, train_written], "num_out": num_out}


class _Summarize(beam.DoFn):
  """Writes tokenized/info.json, then report.json (the run's completion marker), once
  every shard is written (the written files are a side input)."""

  def __init__(self, plan: Plan):
    self.plan = plan

  def process(self, _, file_stats, counts, examples, removed, output, written,
              model=None, mix=None, val=(0, 0, 0), num_out=0):
    del written  # only a dependency: every file is written before the markers
    plan, info = self.plan, None
    if model is not None:
      info = {"tokenizer": "tokenizer.model",
              "tokenizer_fingerprint": Tokenizer.from_bytes(model).fingerprint,
              "add_eos": bool(plan.setting("tokenize", "add_eos", True)),
              "train_files": num_out, "train_tokens": mix["train_tokens"],
              "train_documents": mix["train_documents"], "val_tokens": int(val[1]),
              "val_documents": int(val[0]), "val_chars": int(val[2]),
              "per_source": mix["per_source"]}
      files.write_json(files.join(plan.workdir, "tokenized", "info.json"), info)
    result = report.build_report(
        plan.names, file_stats, counts, examples, removed, dict(output), info, plan.cfg,
        plan.cfg["examples_per_filter"], plan.doc_id)
    files.write_json(files.join(plan.workdir, "report.json"), result)
    yield "done"


def build(p: beam.Pipeline, plan: Plan) -> None:
  """The curation graph on `p` (see the `data.curate` doc for the steps)."""
  c, names = plan.cfg, plan.names
  read = (p
          | "Files" >> beam.Create(plan.units)
          | "Read" >> beam.ParDo(transforms.ReadFile(
              c["sources"], inputs.held_out_config(c), c.get("tfds_data_dir", "")))
          .with_outputs("files", main="docs"))
  docs = read.docs | "Spread" >> beam.Reshuffle()
  side = {}
  if c["decontaminate"]["enabled"]:
    index = p | "DecontaminationIndex" >> DecontaminationIndex(
        c["decontaminate"]["eval_tasks"], c["decontaminate"]["ngram"])
    side["index"] = beam.pvalue.AsSingleton(index)
  filtered = docs | "Filter" >> beam.ParDo(
      transforms.FilterDocs(c, names, c["examples_per_filter"]), **side
  ).with_outputs("counts", "examples", main="docs")
  kept, removed = filtered.docs, []
  if c["exact_dedup"]["enabled"]:
    exact = kept | "ExactDedup" >> transforms.ExactDedup()
    kept, removed = exact.docs, removed + [exact.removed]
  if c["near_dedup"]["enabled"]:
    n = c["near_dedup"]
    near = kept | "NearDedup" >> transforms.NearDedup(n["threshold"], n["num_perm"],
                                                       n["ngram"], c["seed"])
    kept, removed = near["docs"], removed + [near["removed"]]
  curated = [files.join(plan.workdir, "curated", f"shard-{k:05d}.tfrecord")
             for k in range(c["num_shards"])]
  written = [kept
             | "CuratedRecords" >> beam.Map(lambda d: _curated_record(plan, d))
             | "WriteCurated" >> tokens.WriteShards(curated)]
  extra = {}
  if plan.tokenizing:
    t = _tokenized(p, plan, kept)
    written += t["written"]
    extra = {"model": beam.pvalue.AsSingleton(t["model"]),
             "mix": beam.pvalue.AsSingleton(t["mix"]),
             "val": beam.pvalue.AsSingleton(t["val"]), "num_out": t["num_out"]}
  removed_all = (removed or [p | "NoneRemoved" >> beam.Create([])]) | \
      "Removed" >> beam.Flatten()
  output = (kept
            | "SourceOf" >> beam.Map(lambda d: names[d[0][0]])
            | "Output" >> beam.combiners.Count.PerElement())
  _ = (p
       | "Once" >> beam.Create([None])
       | "Summarize" >> beam.ParDo(
           _Summarize(plan), beam.pvalue.AsList(read.files),
           beam.pvalue.AsList(filtered.counts), beam.pvalue.AsList(filtered.examples),
           beam.pvalue.AsList(removed_all), beam.pvalue.AsList(output),
           beam.pvalue.AsList(written | "Written" >> beam.Flatten()), **extra))


def pipeline_options(workers: int, argv: Sequence[str], verbose: bool) -> PipelineOptions:
  """The runner's options: `argv` as given (--runner=DataflowRunner --project ...), and
  for the DirectRunner (the default) multi-process mode with `workers` processes."""
  args = list(argv)
  runner = next((a.split("=", 1)[1] for a in args if a.startswith("--runner=")), "")
  if not runner:
    args.append("--runner=DirectRunner")
  if runner in ("", "DirectRunner", "direct"):
    if not any(a.startswith("--direct_running_mode") for a in args):
      args.append("--direct_running_mode=multi_processing")
    if not any(a.startswith("--direct_num_workers") for a in args):
      args.append(f"--direct_num_workers={workers}")
    # The worker processes import this repository's modules (the DoFns live here).
    path = os.environ.get("PYTHONPATH", "")
    if _REPO_ROOT not in path.split(os.pathsep):
      os.environ["PYTHONPATH"] = os.pathsep.join(x for x in (_REPO_ROOT, path) if x)
  if not verbose and not any(a.startswith("--default_sdk_harness_log_level") for a in args):
    args.append("--default_sdk_harness_log_level=ERROR")
  return PipelineOptions(args)


def quiet_beam(verbose: bool) -> None:
  """Beam's own log lines (each worker's start-up, the job service) off the console
  unless `verbose`."""
  logging.getLogger("apache_beam").setLevel(logging.INFO if verbose else logging.ERROR)


@contextlib.contextmanager
def _workers_stderr(verbose: bool) -> Iterator[None]:
  """Unless `verbose`, file descriptor 2 (the DirectRunner's worker processes inherit it
  and log their start-up there) goes to a temporary file while the pipeline runs; its
  last lines are shown if the run fails."""
  if verbose:
    yield
    return
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as log:
    os.dup2(log.fileno(), 2)
    try:
      yield
    except BaseException:
      os.dup2(saved, 2)
      log.seek(0)
      tail = log.read().decode("utf-8", "replace").splitlines()[-40:]
      print("\n".join(["Beam worker log (last lines):", *tail]), file=sys.stderr)
      raise
    finally:
      os.dup2(saved, 2)
      os.close(saved)


@contextlib.contextmanager
def _local_tempdir() -> Iterator[None]:
  """The local temporary folders Beam makes on this machine (the DirectRunner's worker
  environments leave empty `beam-temp*` folders in /tmp after every run) go into one
  folder that is removed when the run ends."""
  saved = tempfile.tempdir
  with tempfile.TemporaryDirectory(prefix="curate-beam-") as tmp:
    tempfile.tempdir = tmp
    try:
      yield
    finally:
      tempfile.tempdir = saved


def run(cfg: Any, workdir: str, workers: int = 1, argv: Sequence[str] = (),
        verbose: bool = False, log: Callable[[str], None] | None = None) -> dict[str, Any]:
  """Runs the curation of `cfg` into `workdir`; returns the report."""
  log = log or (lambda s: print(s, flush=True))
  the_plan = plan(cfg, workdir)   # every input checked before anything is written
  quiet_beam(verbose)
  options = pipeline_options(workers, argv, verbose)
  files.clear_outputs(the_plan.workdir)
  start = time.time()
  with _workers_stderr(verbose), _local_tempdir():
    p = beam.Pipeline(options=options)
    build(p, the_plan)
    state = p.run().wait_until_finish()
  if state != "DONE":
    raise RuntimeError(f"the pipeline ended in state {state}")
  seconds = time.time() - start
  rep = files.read_json(files.join(the_plan.workdir, "report.json"))
  report.write_views(rep, the_plan.workdir)
  rows = rep["per_source"].values()
  total = {k: sum(r[k] for r in rows) for k in report.COLUMNS + ["input_bytes"]}
  log(f"curate: {len(the_plan.units)} files, {total['input']:,} documents "
      f"({total['input_bytes'] / 1e6:.2f} MB) read in {seconds:.1f}s: "
      f"{total['input'] / seconds:.0f} docs/s, {total['input_bytes'] / 1e6 / seconds:.3f} "
      "MB/s")
  log("curate: removed " + ", ".join(f"{k} {total[k]:,}" for k in (
      *report.FILTER_STAGES, "exact_dedup", "near_dedup")) +
      f"; kept {total['output']:,} (PII scrubbed in {total['pii_scrubbed']:,})")
  if rep.get("tokens"):
    t = rep["tokens"]
    log(f"curate: tokens train {t['train_tokens']:,} ({t['train_documents']:,} documents "
        f"in {t['train_files']} files), validation {t['val_tokens']:,}")
  for name in rep.get("empty_sources", []):
    log(f"warning: source {name!r} gave no document (see bad_input in the report)")
  return rep
