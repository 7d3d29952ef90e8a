"""Benchmark: the curation pipeline (data/curate/, Apache Beam) end to end on the shared corpora.

  python benchmarks/curate_throughput.py [--config=configs/data/shared.py] [--workers=1,2]

For each worker count, a fresh workdir and the whole pipeline on the DirectRunner in
multi-process mode (`direct_num_workers` = workers): read every source, filter (normalise,
quality, safety, PII, 13-gram decontamination against the configured evaluation sets, with
the index built in the pipeline), exact + near dedup, curated TFRecord shards, the
tokenizer (4096-piece BPE trained on the curated training split), tokens, the mixture, the
tokenized shards and the report. Wall time includes building the graph, starting the
worker processes (each imports TensorFlow to write TFRecords) and rendering the report.

  docs_per_sec_N  documents entering the filters (read, after the held-out rules that keep
                  the SFT / reward-model validation data out) per second of the whole run
  mb_per_sec_N    megabytes (10^6, UTF-8) of those documents' text per second
  seconds_N       wall time

Last line: one JSON object with docs_per_sec_1, docs_per_sec_2, mb_per_sec_1, mb_per_sec_2
(and the same for any other worker count), speedup_2 (docs_per_sec_2 / docs_per_sec_1),
the document and byte counts, and (unless --nopeer) datatrove's figures on the same
documents from benchmarks/curate_peer.py: peer_docs_per_sec (its largest worker count),
peer_docs_per_sec_N, peer_mb_per_sec_N, peer_kept_N.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

FLAGS = flags.FLAGS
flags.DEFINE_string("config", os.path.join(REPO, "configs/data/shared.py"),
                    "Curation config file (a configs/data/*.py).")
flags.DEFINE_string("workers", "1,2", "Comma-separated worker counts to time.")
flags.DEFINE_bool("peer", True, "Also time datatrove on the same documents "
                  "(benchmarks/curate_peer.py; needs the `peers` extra).")
flags.DEFINE_string("keep", "", "Keep the last run's workdir here (for the report).")


def peer_figures() -> dict[str, Any]:
  """datatrove on the same documents (benchmarks/curate_peer.py, whose module doc says which
  steps are comparable), run as its own process (datatrove starts its workers by forkserver,
  and its log stays out of this one): its last-line JSON (`peer_docs_per_sec`, ...)."""
  cmd = [sys.executable, os.path.join(REPO, "benchmarks", "curate_peer.py"),
         f"--config={FLAGS.config}", f"--workers={FLAGS.workers}"]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
  for line in proc.stdout.splitlines()[:-1]:
    print(f"(peer) {line}", flush=True)
  if proc.returncode != 0:
    print(f"error: the datatrove peer failed (exit {proc.returncode}; it needs "
          f"`pip install -e .[peers]`, or run with --nopeer):\n{proc.stderr[-2000:]}",
          file=sys.stderr)
    sys.exit(2)
  return json.loads(proc.stdout.splitlines()[-1])


def main(argv):
  del argv
  from data.curate import run  # pylint: disable=g-import-not-at-top (after sys.path)
  spec = importlib.util.spec_from_file_location("curate_cfg", FLAGS.config)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config()
  out: dict[str, Any] = {}
  for workers in [int(w) for w in FLAGS.workers.split(",")]:
    workdir = tempfile.mkdtemp(prefix=f"curate_w{workers}_")
    start = time.time()
    report = run(cfg, workdir, workers=workers)
    seconds = time.time() - start
    rows = report["per_source"].values()
    docs = sum(r["input"] for r in rows)
    mb = sum(r["input_bytes"] for r in rows) / 1e6
    kept = sum(r["output"] for r in rows)
    print(f"workers={workers}: {docs} documents ({mb:.2f} MB) in {seconds:.1f}s -> "
          f"{docs / seconds:.0f} docs/s, {mb / seconds:.3f} MB/s; {kept} kept", flush=True)
    out.update({f"docs_per_sec_{workers}": round(docs / seconds, 1),
                f"mb_per_sec_{workers}": round(mb / seconds, 4),
                f"seconds_{workers}": round(seconds, 1),
                "documents": docs, "mb": round(mb, 3), "kept": kept})
    if FLAGS.keep:
      shutil.rmtree(FLAGS.keep, ignore_errors=True)
      shutil.copytree(workdir, FLAGS.keep)
    shutil.rmtree(workdir)
  if "docs_per_sec_1" in out and "docs_per_sec_2" in out:
    out["speedup_2"] = round(out["docs_per_sec_2"] / out["docs_per_sec_1"], 2)
  if FLAGS.peer:
    out.update(peer_figures())
  print(json.dumps(out))


if __name__ == "__main__":
  app.run(main)
