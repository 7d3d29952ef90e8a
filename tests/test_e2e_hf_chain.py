"""End to end from real open-model families: a tiny random Llama-3-architecture and
Qwen2-architecture Hugging Face directory with real tokenizers (tests/hf_chain_fixtures.py)
go through every post-training stage straight from `init_from=hf:<dir>`:

  SFT with LoRA (held-out response loss must fall) -> reward model (LoRA) and DPO (LoRA)
  from the SFT checkpoint -> PPO (LoRA policy and value, a few iterations) from SFT + RM ->
  `hf_convert export --merge` of the PPO policy -> `transformers` loads it, renders the
  prompt with `apply_chat_template` and generates greedily; the tokens equal
  `eval.sample --temperature=0` on our checkpoint and stop at the family's end of turn.

About 4 minutes per family on 2 CPU cores: the `slow` tier.
"""

import json
import os
import sys

import pytest

import torch
import transformers

import hf_chain_fixtures
from conftest import _subset_file, eval_records, run_cmd
from train import checkpoint as ckpt_lib

pytestmark = pytest.mark.slow

COMMON = ("--local_devices=2", "--config.train.peak_flops=1e9", "--config.lora.rank=8")
PREFERENCE = ("--config.data.val_fraction=0.25", "--config.data.seq_len=128",
              "--config.model.max_seq_len=128")
SYSTEM = "Answer briefly."
PROMPTS = ["Name a primary colour.", "What is the capital of France?",
           "Give one word for happy.", "Is water wet?"]
MAX_NEW = 16


def _short_alpaca(path):
  """The shared Alpaca subset's instructions with short answers and no input (154)."""
  from data.readers import resolve_data_path
  with open(resolve_data_path("sft/alpaca_subset.jsonl")) as src, open(path, "w") as out:
    for line in src:
      record = json.loads(line)
      if len(record["output"]) <= 40 and not record.get("input"):
        out.write(line)
  return str(path)


def _run(module, config, workdir, *flags):
  out = run_cmd([sys.executable, "-m", module, f"--config={config}", f"--workdir={workdir}",
                 *COMMON, *flags], timeout=900)
  assert out.returncode == 0, out.stdout[-4000:]
  return out.stdout


def _transformers_greedy(export_dir):
  """(new token ids, text) per prompt from transformers on the exported directory."""
  tok = transformers.AutoTokenizer.from_pretrained(export_dir)
  model = transformers.AutoModelForCausalLM.from_pretrained(export_dir,
                                                            dtype=torch.float32).eval()
  results = []
  for prompt in PROMPTS:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]
    inputs = tok.apply_chat_template(messages, add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    results.append((new, tok.decode(new, skip_special_tokens=True)))
  return results


@pytest.mark.parametrize("family", ["llama3", "qwen2"])
def test_hf_model_through_every_stage_and_back(family, tmp_path):
  hf_dir = getattr(hf_chain_fixtures, f"{family}_dir")(str(tmp_path / family))
  sft, rm, dpo, ppo = (str(tmp_path / n) for n in ("sft", "rm", "dpo", "ppo"))
  sources = _short_alpaca(tmp_path / "short.jsonl")
  pairs = _subset_file(tmp_path / "pairs.jsonl", 32)

  # SFT with LoRA, straight from the HF directory.
  _run("train.sft", "configs/sft/chat.py:runlocal=true", sft, f"--config.init_from=hf:{hf_dir}",
       f"--config.data.sources={sources}:alpaca", "--config.data.val_fraction=0.1",
       "--config.train.num_steps=60", "--config.train.eval_every=60",
       "--config.optim.lr=1e-2", "--config.optim.warmup_steps=5", "--config.sample_every=0")
  evals = eval_records(sft)
  assert evals[0]["step"] == 0 and evals[-1]["step"] == 60, evals
  assert evals[-1]["eval/loss"] < evals[0]["eval/loss"] - 0.3, evals
  meta = ckpt_lib.read_metadata(sft)
  assert meta["parent"]["path"] == f"hf:{os.path.abspath(hf_dir)}"
  assert meta["model_config"]["family"] == ("llama" if family == "llama3" else "qwen2")
  assert meta["model_config"]["lora_rank"] == 8

  # Reward model, DPO and PPO from the SFT checkpoint, all with adapters.
  _run("rlhf.reward", "configs/reward/hh.py:runlocal=true", rm, f"--config.init_from={sft}",
       f"--config.data.sources={pairs}", *PREFERENCE, "--config.train.num_steps=6",
       "--config.train.eval_every=6")
  _run("rlhf.dpo", "configs/dpo/hh.py:runlocal=true", dpo, f"--config.init_from={sft}",
       f"--config.data.sources={pairs}", *PREFERENCE, "--config.train.num_steps=4",
       "--config.train.eval_every=4")
  assert eval_records(rm) and eval_records(dpo)
  _run("rlhf.ppo", "configs/ppo/hh.py:runlocal=true", ppo, f"--config.init_from={sft}",
       f"--config.reward_from={rm}", f"--config.data.sources={pairs}",
       "--config.data.val_fraction=0.25", "--config.ppo.iterations=2")
  with open(os.path.join(ppo, "metrics.jsonl")) as f:
    assert sum("ppo/kl" in json.loads(line) for line in f) == 2

  # Export the PPO policy with its adapters merged; transformers generates what we sample.
  export = str(tmp_path / "export")
  out = run_cmd([sys.executable, "-m", "train.hf_convert", "export",
                 f"--checkpoint={ppo}/policy", f"--out={export}", "--merge"])
  assert out.returncode == 0, out.stdout[-3000:]
  with open(os.path.join(export, "generation_config.json")) as f:
    stops = json.load(f)["eos_token_id"]  # the end of turn first, then end of text
  with open(os.path.join(export, "tokenizer_config.json")) as f:
    assert json.load(f)["chat_template"]
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
  samples = tmp_path / "samples.jsonl"
  out = run_cmd([sys.executable, "-m", "eval.sample", f"--checkpoint={ppo}/policy",
                 f"--prompts_file={prompts}", "--temperature=0", f"--output={samples}",
                 f"--max_new_tokens={MAX_NEW}", f"--system={SYSTEM}"])
  assert out.returncode == 0, out.stdout[-3000:]
  ours = [json.loads(line) for line in samples.read_text().splitlines()]
  theirs = _transformers_greedy(export)
  for mine, (ids, text) in zip(ours, theirs, strict=True):
    assert mine["response"] == text and mine["tokens"] == len(ids), (mine, ids, text)
    # Both stop at the same token; transformers at an eos of generation_config.json.
    assert len(ids) == MAX_NEW or ids[-1] in stops, ids
    assert mine["ended"] == (ids[-1] == stops[0]), (mine, ids)
  assert any(m["ended"] for m in ours), ours  # the SFT model learnt to end its turn
