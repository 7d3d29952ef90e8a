"""Tests for the evaluation harness (eval/loglik.py, data/benchmarks.py, eval/run.py).

Log-likelihoods are checked against transformers' LlamaForCausalLM on the same random
weights and our exported tokenizer, with the pairs encoded the way lm-eval does; task readers
name the file, line and field of a malformed row; the CLI writes its JSON, markdown and
per-item files and refuses unknown tasks and wrong checkpoint kinds."""

import gzip
import json
import math
import os
import sys

import numpy as np
import pytest
import torch
import transformers

from conftest import run_cmd
from hf_fixtures import random_llama_dir


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
  """A random Llama in transformers and the same model imported as our checkpoint."""
  from eval.loading import load_checkpoint
  from train.hf_convert import import_hf
  tmp = tmp_path_factory.mktemp("hf")
  model, llama = random_llama_dir(tmp, max_positions=48)
  ours = load_checkpoint(import_hf(llama, str(tmp / "ours")))
  return model, transformers.AutoTokenizer.from_pretrained(llama), ours


def _hf_loglik(model, tok, context, continuation, max_len):
  """lm-eval's HFLM computation, written out: encode whole / context, left-truncate."""
  n = len(context) - len(context.rstrip())
  if n:
    context, continuation = context[:-n], context[-n:] + continuation
  whole = tok.encode(context + continuation, add_special_tokens=False)
  ctx = tok.encode(context, add_special_tokens=False)
  cont = whole[len(ctx):]
  seq = (ctx + cont)[-(max_len + 1):]
  with torch.no_grad():
    logits = model(torch.tensor([seq[:-1]])).logits[0].double()
  logp = torch.log_softmax(logits, -1)[-len(cont):]
  target = torch.tensor(seq[-len(cont):])
  picked = logp.gather(1, target[:, None])[:, 0]
  return float(picked.sum()), bool((logp.argmax(-1) == target).all())


def test_logliks_match_transformers_on_lm_eval_encoding(hf_pair):
  from eval.loglik import LoglikScorer
  from eval.loglik import encode_pair
  from data.benchmarks import arc, mmlu, task_path
  model, tok, ours = hf_pair
  requests = [r for item in arc(task_path("arc_easy"))[:6] for r in item.requests()]
  # One-token continuations of one prompt (MMLU's " A".." D"; the shared-forward path).
  words = [p.replace("\u2581", " ") for p in (ours.tokenizer.id_to_piece(i) for i in range(
      ours.tokenizer.vocab_size)) if p.startswith("\u2581") and len(p) > 2][:4]
  context = mmlu(task_path("mmlu"), shots=0)[0].contexts[0]
  shared = [(context, w) for w in words]
  assert len(shared) == 4
  assert all(len(encode_pair(ours.tokenizer, c, x)[1]) == 1 for c, x in shared)
  requests += shared
  requests += [("The king ", "is dead"), ("To be, or not to be", ": that is"),
               ("x" * 300, " long context, truncated from the left")]
  scorer = LoglikScorer(ours, batch_size=4)
  got = scorer.loglikelihood(requests)
  for (context, continuation), (logp, greedy) in zip(requests, got):
    want, want_greedy = _hf_loglik(model, tok, context, continuation, 48)
    assert logp == pytest.approx(want, abs=1e-3), (context, continuation)
    assert greedy == want_greedy


def test_rolling_windows_cover_every_token_once_within_the_context():
  from eval.loglik import rolling_windows
  tokens = list(range(10, 10 + 23))
  windows = rolling_windows(tokens, prefix=3, max_len=8)
  targets = [t for _, w in windows for t in w]
  assert targets == tokens
  seen = [3]
  for context, window in windows:
    inputs = (context + window)[:-1]
    assert len(inputs) <= 8
    # The context is exactly the tokens before the window (or the prefix at the start).
    assert context == seen[-len(context):] if len(seen) > 1 else context == [3]
    seen = [3] + tokens[:tokens.index(window[-1]) + 1]


def test_rolling_loglik_of_a_short_text_is_one_pass_from_the_prefix(hf_pair):
  from eval.loglik import LoglikScorer
  model, tok, ours = hf_pair
  text = "ROMEO: But soft, what light"
  ids = ours.tokenizer.encode(text)
  assert len(ids) < 48
  (logp, count), = LoglikScorer(ours).rolling_loglikelihood([text])
  seq = [ours.tokenizer.eos_id] + ids
  with torch.no_grad():
    logits = model(torch.tensor([seq[:-1]])).logits[0].double()
  want = torch.log_softmax(logits, -1).gather(1, torch.tensor(seq[1:])[:, None]).sum()
  assert count == len(ids) and logp == pytest.approx(float(want), abs=1e-3)


def _write_jsonl(path, rows):
  with open(path, "w") as f:
    for row in rows:
      f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
  return str(path)


def test_malformed_rows_name_the_file_line_and_field(tmp_path):
  from data import benchmarks as tasks
  good = {"query": "Question: ?", "choices": ["a", "b"], "gold": 1}
  cases = [
      (tasks.arc, [good, {"query": "Question: ?", "choices": ["a", "b"]}], ":2: missing field 'gold'"),
      (tasks.arc, [good, {**good, "gold": 2}], ":2: field 'gold' is 2, expected an index"),
      (tasks.arc, [good, "{not json"], ":2: malformed JSON line"),
      (tasks.arc, [{**good, "choices": []}], ":1: field 'choices' is [], expected a non-empty"),
      (tasks.hellaswag, [{"activity_label": "x", "ctx": "y", "label": 0, "endings": ["a", 3]}],
       ":1: field 'endings' must be a list of strings"),
      (tasks.winogrande, [{"context_options": ["a", "b"], "continuation": "c", "gold": "x"}],
       ":1: field 'gold' is 'x'"),
  ]
  for i, (reader, rows, message) in enumerate(cases):
    path = _write_jsonl(tmp_path / f"{i}.jsonl", rows)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
      reader(path)
  mmlu = tmp_path / "mmlu"
  (mmlu / "test").mkdir(parents=True)
  (mmlu / "dev").mkdir()
  header = "question,choice0,choice1,choice2,choice3,answer\n"
  (mmlu / "dev" / "x_dev.csv").write_text(header + "q,a,b,c,d,0\n")
  (mmlu / "test" / "x_test.csv").write_text(header + "q,a,b,c,d,1\nq2,a,b,c,d,7\n")
  with pytest.raises(ValueError, match=r"x_test.csv:3: field 'answer' is '7'"):
    tasks.mmlu(str(mmlu))
  with pytest.raises(ValueError, match=r"has no '#### <number>'"):
    tasks.gsm8k(_write_jsonl(tmp_path / "g.jsonl", [{"question": "q", "answer": "42"}]))


def test_readers_build_lm_eval_prompts_from_the_shared_files():
  from data import benchmarks as tasks
  items = tasks.hellaswag(tasks.task_path("hellaswag"))
  assert len(items) == 9046
  first = items[0]
  assert first.contexts == ["Roof shingle removal: A man is sitting on a roof. he"]
  assert first.continuations[3] == " starts pulling up roofing on a roof." and first.gold == 3
  arc = tasks.arc(tasks.task_path("arc_easy"))
  assert len(arc) == 1878 and arc[0].contexts[0].startswith("Question: ")
  assert arc[0].contexts[0].endswith("\nAnswer:")
  mmlu = tasks.mmlu(tasks.task_path("mmlu"), shots=5)
  assert len(mmlu) == 12928 and mmlu[0].continuations == [" A", " B", " C", " D"]
  assert mmlu[0].contexts[0].count("\nAnswer:") == 6  # 5 shots + the question
  wino = tasks.winogrande(tasks.task_path("winogrande"))
  assert len(wino[0].requests()) == 2 and len(set(c for c, _ in wino[0].requests())) == 2
  assert len(tasks.piqa(tasks.task_path("piqa"))) == 1449
  assert len(tasks.gsm8k(tasks.task_path("gsm8k"))) == 1019
  assert tasks.last_number("so 1,234.0 apples #### 1,234") == "1234"
  assert tasks.last_number("It is $18.") == "18"


def test_cli_writes_results_and_refuses_bad_input(english_sft_run, english_rm_run, tmp_path):
  sft, rm = english_sft_run[0], english_rm_run[0]
  out_dir = str(tmp_path / "eval")
  tasks = "arc_easy,hellaswag,winogrande,mmlu,lambada,wikitext2,gsm8k"
  out = run_cmd([sys.executable, "-m", "eval.run", f"--checkpoint={sft}", f"--tasks={tasks}",
                 "--limit=6", "--mmlu_shots=1", "--max_new_tokens=16", "--batch_size=8",
                 f"--output_dir={out_dir}"], timeout=900)
  assert out.returncode == 0, out.stdout[-5000:]
  with open(os.path.join(out_dir, "results.json")) as f:
    results = json.load(f)["results"]
  for task in tasks.split(","):
    assert os.path.exists(os.path.join(out_dir, f"{task}.jsonl")), task
  for task in ("arc_easy", "hellaswag", "winogrande", "mmlu", "lambada"):
    assert results[task]["items"] == 6 and 0.0 <= results[task]["acc"] <= 1.0
    with open(os.path.join(out_dir, f"{task}.jsonl")) as f:
      records = [json.loads(line) for line in f]
    # The aggregate is the mean of the per-item outcomes written beside it.
    assert results[task]["acc"] == pytest.approx(np.mean([r["acc"] for r in records]))
  assert "acc_norm" in results["arc_easy"] and "acc_norm" not in results["mmlu"]
  assert results["wikitext2"]["token_perplexity"] > 1.0
  assert results["wikitext2"]["bits_per_byte"] == pytest.approx(
      math.log(results["wikitext2"]["byte_perplexity"]) / math.log(2))
  assert results["gsm8k"]["items"] == 6
  with open(os.path.join(out_dir, "results.md")) as f:
    assert "| arc_easy | acc |" in f.read()
  assert os.path.exists(os.path.join(out_dir, "metrics.jsonl"))
  # A second invocation adds its task to the same results.json.
  out = run_cmd([sys.executable, "-m", "eval.run", f"--checkpoint={sft}", "--tasks=piqa",
                 "--limit=6", "--batch_size=8", f"--output_dir={out_dir}"])
  assert out.returncode == 0, out.stdout[-5000:]
  with open(os.path.join(out_dir, "results.json")) as f:
    merged = json.load(f)["results"]
  assert set(merged) == set(tasks.split(",")) | {"piqa"}
  assert merged["arc_easy"] == results["arc_easy"]
  import glob
  import shutil
  no_tokenizer = str(tmp_path / "no_tokenizer")
  shutil.copytree(sft, no_tokenizer)
  for item in glob.glob(os.path.join(no_tokenizer, "checkpoints", "*", "tokenizer")):
    shutil.rmtree(item)
  bad = [
      ((f"--checkpoint={no_tokenizer}", "--tasks=arc_easy"), "holds no tokenizer"),
      ((f"--checkpoint={sft}", "--tasks=arc_easy,nosuchtask"), "Unknown task 'nosuchtask'"),
      ((f"--checkpoint={rm}", "--tasks=arc_easy"), "need a language model"),
      ((f"--checkpoint={sft}", "--tasks=rm_accuracy"), "rm_accuracy needs a reward-model"),
      ((f"--checkpoint={tmp_path / 'none'}", "--tasks=arc_easy"), "does not exist"),
  ]
  for flags, message in bad:
    out = run_cmd([sys.executable, "-m", "eval.run", *flags,
                   f"--output_dir={tmp_path / 'bad'}"])
    assert out.returncode != 0 and message in out.stdout, (flags, out.stdout[-2000:])


def test_cli_judged_tasks(english_sft_run, english_rm_run, tmp_path):
  """rm_accuracy on a reward model; winrate and redteam of a policy against itself."""
  sft, (rm, data, _) = english_sft_run[0], english_rm_run
  out = run_cmd([sys.executable, "-m", "eval.run", f"--checkpoint={rm}", "--tasks=rm_accuracy",
                 f"--output_dir={tmp_path / 'rm'}"])
  assert out.returncode == 0, out.stdout[-5000:]
  with open(tmp_path / "rm" / "results.json") as f:
    rm_result = json.load(f)["results"]["rm_accuracy"]
  assert rm_result["num_pairs"] > 0 and 0.0 <= rm_result["accuracy"] <= 1.0
  out = run_cmd([sys.executable, "-m", "eval.run", f"--checkpoint={sft}",
                 "--tasks=winrate,redteam", f"--baseline={sft}", f"--judge={rm}",
                 f"--prompt_sources={data}", "--prompt_val_fraction=0.25",
                 "--max_prompt_tokens=48", "--max_new_tokens=16", "--samples_per_prompt=2",
                 "--redteam_threshold=0.0", f"--output_dir={tmp_path / 'judged'}"])
  assert out.returncode == 0, out.stdout[-5000:]
  with open(tmp_path / "judged" / "results.json") as f:
    results = json.load(f)["results"]
  n = results["winrate"]["items"]
  assert n >= 2 and results["winrate"]["winrate"] == 0.5
  assert results["winrate"]["wins_ties_losses"] == [0, n, 0]  # the same policy and seed
  red = results["redteam"]
  assert 0.0 <= red["below_threshold"] <= 1.0
  assert red["below_threshold"] == red["baseline_below_threshold"]


def test_markdown_table_formats_numbers_and_results_keep_them_whole():
  from eval.run import markdown_table
  results = {"wikitext2": {"documents": 2, "tokens": 900, "token_perplexity": 4230122655.5658,
                           "word_perplexity": 684.71234, "bits_per_byte": 1.80812345,
                           "seconds": 3.2},
             "arc_easy": {"items": 6, "acc": 0.25, "acc_stderr": 0.0312345}}
  table = markdown_table(results)
  assert "| wikitext2 | token_perplexity | 4,230,122,656 | 2 |" in table
  assert "| wikitext2 | word_perplexity | 684.7 | 2 |" in table
  assert "| wikitext2 | bits_per_byte | 1.8081 | 2 |" in table
  assert "| arc_easy | acc | 0.2500 ± 0.0312 | 6 |" in table
  assert "seconds" not in table and "tokens" not in table


class _FakeScorer:
  """Rolling log-likelihood: -1 per character (what run_task passes is what is scored)."""

  progress = None

  def rolling_loglikelihood(self, texts):
    return [(-float(len(t)), len(t)) for t in texts]


def test_limit_counts_wikitext2_articles():
  from types import SimpleNamespace
  import re
  from data import benchmarks as tasks
  from eval.run import run_task
  with open(tasks.task_path("wikitext2"), encoding="utf-8") as f:
    text = f.read()
  # Articles start at top-level headings: " = Title = " between blank lines (sections are
  # " = = Title = = "; a table row " = National record " is no heading). The test set has 60.
  starts = [m.start(1) for m in re.finditer(r"(?:^|\n) \n( = [^=\n].* = \n)(?= \n)", text)]
  assert len(starts) == 60
  flags = SimpleNamespace(limit=2, data_dir="", text_field="text")
  summary, records = run_task("wikitext2", flags, None, _FakeScorer())
  assert summary["documents"] == len(records) == 2
  assert summary["bytes"] == len(text[:starts[2]].encode("utf-8"))
  # Without a limit every article is scored, and together they are the whole file.
  flags.limit = 0
  summary, records = run_task("wikitext2", flags, None, _FakeScorer())
  assert summary["documents"] == 60 and summary["bytes"] == len(text.encode("utf-8"))


@pytest.mark.cli
def test_cli_prints_the_results_once_formatted(hf_pair, tmp_path):
  _, _, ours = hf_pair
  out_dir = tmp_path / "eval"
  out = run_cmd([sys.executable, "-m", "eval.run",
                 f"--checkpoint={ours.meta['checkpoint_path']}", "--tasks=arc_easy,wikitext2",
                 "--limit=2", "--batch_size=8", f"--output_dir={out_dir}"], timeout=300)
  assert out.returncode == 0, out.stdout[-5000:]
  with open(out_dir / "results.json") as f:
    results = json.load(f)["results"]
  # Printed once: the table, no dict or JSON dump of the same results.
  assert out.stdout.count("| arc_easy | acc |") == 1
  assert out.stdout.count("| wikitext2 | token_perplexity |") == 1
  assert "{" not in out.stdout, out.stdout
  from eval.run import format_metric
  ppl = results["wikitext2"]["token_perplexity"]
  assert f"| wikitext2 | token_perplexity | {format_metric(ppl)} |" in out.stdout
  assert format_metric(ppl) != str(ppl)  # results.json keeps the full value
  assert results["wikitext2"]["documents"] == 2 and results["arc_easy"]["items"] == 2
