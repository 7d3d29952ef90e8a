"""Benchmark: the curation pipeline (data/curate.py) end to end on the shared corpora.

  python benchmarks/curate_throughput.py [--config=configs/data/shared.py] [--workers=1,2]

For each worker count, a fresh workdir and the whole pipeline: read every source once,
filter (normalise, quality, safety, PII, 13-gram decontamination against the configured
evaluation sets, MinHash signatures), exact + near dedup, curated TFRecord shards, the
tokenizer (4096-piece BPE trained on the curated text), tokenized shards, the mixture and
the report. Wall time includes process start-up of the pool workers and every worker's
decontamination index (the evaluation sets are n-grammed once per process).

  docs_per_sec_N  documents entering the filters (read, after the held-out rules that keep
                  the SFT / reward-model validation data out) per second of the whole run
  mb_per_sec_N    megabytes (10^6, UTF-8) of those documents' text per second
  seconds_N       wall time, and phases_N the seconds per phase

Last line: one JSON object with docs_per_sec_1, docs_per_sec_2, mb_per_sec_1, mb_per_sec_2
(and the same for any other worker count), the document and byte counts, and the phases.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
import time

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

FLAGS = flags.FLAGS
flags.DEFINE_string("config", os.path.join(REPO, "configs/data/shared.py"),
                    "Curation config file (a configs/data/*.py).")
flags.DEFINE_string("workers", "1,2", "Comma-separated worker counts to time.")
flags.DEFINE_string("keep", "", "Keep the last run's workdir here (for the report).")


def main(argv):
  del argv
  import importlib.util
  from data.curate import Curator
  spec = importlib.util.spec_from_file_location("curate_cfg", FLAGS.config)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config()
  out = {}
  for workers in [int(w) for w in FLAGS.workers.split(",")]:
    workdir = tempfile.mkdtemp(prefix=f"curate_w{workers}_")
    phases = {}

    def log(line, phases=phases):
      m = re.match(r"curate: phase (\w+) done in ([\d.]+)s", line)
      if m:
        phases[m.group(1)] = float(m.group(2))
      print(line, flush=True)

    start = time.time()
    report = Curator(cfg, workdir).run(workers=workers, log=log)
    seconds = time.time() - start
    split = {s["name"]: json.load(open(os.path.join(workdir, "split", s["name"],
                                                     "stats.json"))) for s in cfg.sources}
    docs = sum(s["docs"] for s in split.values())
    mb = sum(s["bytes"] for s in split.values()) / 1e6
    kept = sum(r["output"] for r in report["per_source"].values())
    print(f"workers={workers}: {docs} documents ({mb:.2f} MB) in {seconds:.1f}s -> "
          f"{docs / seconds:.0f} docs/s, {mb / seconds:.3f} MB/s; {kept} kept", flush=True)
    out.update({f"docs_per_sec_{workers}": round(docs / seconds, 1),
                f"mb_per_sec_{workers}": round(mb / seconds, 4),
                f"seconds_{workers}": round(seconds, 1), f"phases_{workers}": phases,
                "documents": docs, "mb": round(mb, 3), "kept": kept})
    if FLAGS.keep:
      shutil.rmtree(FLAGS.keep, ignore_errors=True)
      shutil.copytree(workdir, FLAGS.keep)
    shutil.rmtree(workdir)
  print(json.dumps(out))


if __name__ == "__main__":
  app.run(main)
