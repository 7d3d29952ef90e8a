"""rlhf.cai and rlhf.cai_agreement as commands: bad input (cli tier) and the CAI pipeline
end to end at smoke size beside the human-feedback path (slow: ~10 minutes on 2 cores)."""

import json
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, run_cmd, subprocess_env
from train import checkpoint as ckpt_lib


def _cai(workdir, *flags):
  return [sys.executable, "-m", "rlhf.cai", "--config=configs/cai/hh.py:runlocal=true",
          f"--workdir={workdir}", *flags]


def _error_line(out):
  lines = [line for line in out.stdout.splitlines() if line.startswith("error:")]
  assert out.returncode == 2, out.stdout[-2000:]
  assert len(lines) == 1 and "Traceback" not in out.stdout, out.stdout[-2000:]
  return lines[0]


@pytest.mark.cli
def test_bad_input_is_one_error_line(tmp_path):
  bad = tmp_path / "constitution.json"
  bad.write_text('{"principles": [{"name": "a", "critique": "c", "comparison": "q"}]}')
  line = _error_line(run_cmd(_cai(tmp_path / "w", f"--config.constitution={bad}",
                                  "--config.init_from=/nowhere")))
  assert f"{bad}: principles[0].revision: expected a non-empty string" in line
  line = _error_line(run_cmd(_cai(tmp_path / "w", "--config.init_from=/nowhere/ckpt")))
  assert "config.init_from=/nowhere/ckpt" in line and "does not exist" in line
  line = _error_line(run_cmd(_cai(tmp_path / "w", "--config.init_from=hf:/nowhere/model")))
  assert "config.init_from=hf:/nowhere/model" in line and "config.json" in line
  line = _error_line(run_cmd([sys.executable, "-m", "rlhf.cai_agreement",
                              "--judge=/nowhere/judge", "--pairs=4"]))
  assert "--judge=/nowhere/judge" in line
  assert not (tmp_path / "w").exists()


@pytest.mark.slow
def test_cai_pipeline_end_to_end(tmp_path):
  workdir = tmp_path / "cai"
  out = subprocess.run([sys.executable, "-m", "launch.pipeline",
                        "--config=configs/pipeline/cai.py:size=tiny", f"--workdir={workdir}"],
                       cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True,
                       timeout=1800)
  assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
  # Supervised phase: every revision is an SFT example the SFT stage read.
  sl = json.loads((workdir / "cai_sl" / "summary.json").read_text())
  assert sl["examples"] > 0
  with open(workdir / "cai_sl" / "data.jsonl") as f:
    assert sum(1 for _ in f) == sl["examples"]
  meta = ckpt_lib.read_metadata(str(workdir / "cai_sft"))
  assert meta["config"]["data"]["sources"] == str(workdir / "cai_sl" / "data.jsonl")
  counts = re.findall(r"(train|val): (\d+) examples", (workdir / "cai_sft.log").read_text())
  assert sum(int(n) for _, n in counts[:2]) == sl["examples"]
  # Feedback phase: pairs with soft labels >= 0.5; the judge's position preference is
  # reported and averaged away.
  fb = json.loads((workdir / "cai_fb" / "summary.json").read_text())
  with open(workdir / "cai_fb" / "data.jsonl") as f:
    pairs = [json.loads(line) for line in f]
  assert len(pairs) == fb["pairs"] > 0
  assert all(0.5 < p["soft_label"] <= 1.0 and p["chosen"] != p["rejected"] for p in pairs)
  for stage in ("rm_ai", "dpo_ai"):
    meta = ckpt_lib.read_metadata(str(workdir / stage))
    assert meta["config"]["data"]["sources"] == str(workdir / "cai_fb" / "data.jsonl")
  report = json.loads((workdir / "report.json").read_text())
  for model in ("sft", "cai_sft", "dpo_ai", "ppo_ai", "dpo_human", "ppo_human"):
    red = report["eval"][model]["redteam"]
    assert 0.0 <= red["below_threshold"] <= 1.0 and red["items"] > 0
  assert set(report["winrate"]["policies"]) >= {"cai_sft", "dpo_ai", "ppo_ai", "dpo_human",
                                                "ppo_human"}
  for rm in ("rm_human", "rm_ai"):
    assert 0.0 <= report["eval"][rm]["rm_accuracy"]["accuracy"] <= 1.0
  # The judge's agreement with the human labels, as a JSON last line.
  out = run_cmd([sys.executable, "-m", "rlhf.cai_agreement", f"--judge={workdir}/sft",
                 "--pairs=8"])
  assert out.returncode == 0, out.stdout[-3000:]
  figures = json.loads(out.stdout.strip().splitlines()[-1])
  lo, hi = figures["agreement_ci95"]
  assert figures["pairs"] == 8 and lo <= figures["agreement"] <= hi
  assert os.path.exists(workdir / "report.md")
