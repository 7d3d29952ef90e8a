"""Tests for the lm-evaluation-harness adapter (eval/lm_eval_adapter.py and its task YAMLs,
eval/lm_eval_tasks.py; eval.run's lm_eval:<task>, eval/lm_eval_run.py; python -m eval.lm_eval).

  pytest tests/test_eval_lm_eval_adapter.py            # default tier
  pytest -m cli tests/test_eval_lm_eval_adapter.py     # the two command lines

On a tiny random checkpoint (BPE tokenizer, so the whitespace rules of lm-eval's encoding
matter), all offline on the shared files:
- HellaSwag and ARC-Easy through lm-eval's evaluator (`simple_evaluate`, `log_samples`)
  give the built-in harness's per-choice log-likelihoods (eval.lm_tasks) and per-item
  acc / acc_norm;
- lm-eval's own LAMBADA cloze task (no built-in reader) runs on the shared file: its
  prompts are rebuilt here from the passages by hand, and its acc and perplexity equal
  the ones computed from those requests;
- generate_until equals a greedy decode written out with full forward passes (no KV
  cache), honours max_gen_toks and cuts at `until`, and equals the offline sampler;
- loglikelihood_rolling equals lm-eval's own rolling windows scored by full forward passes.
"""

import gzip
import json
import math
import os
import subprocess
import sys

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import lm_eval  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: E402

from conftest import REPO_ROOT, subprocess_env, tiny_run_config  # noqa: E402
from data import benchmarks as tasks_lib  # noqa: E402
from data.readers import resolve_data_path  # noqa: E402
from data.tokenizer import Tokenizer, train_tokenizer  # noqa: E402
from eval.lm_eval_adapter import LmlifeLM, cut_at_stop_strings  # noqa: E402
from eval.lm_eval_tasks import LM_EVAL_ONLY_TASKS, MC_TASKS, write_task_yamls  # noqa: E402
from eval.lm_tasks import LM_TASKS, score_multiple_choice  # noqa: E402
from eval.sample import RawTemplate, respond  # noqa: E402
from model.config import ModelConfig  # noqa: E402
from model.sampling import SamplingConfig  # noqa: E402
from train.losses import lm_loss  # noqa: E402
from train.trainer import Trainer  # noqa: E402

ITEMS = 8


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  """Workdir of a freshly initialised tiny model (context 128) with a 300-piece BPE."""
  root = tmp_path_factory.mktemp("lm_eval_adapter")
  with open(resolve_data_path("pretrain/tinyshakespeare.txt"), encoding="utf-8") as f:
    (root / "text.txt").write_text(f.read()[:100_000])
  tok = Tokenizer.from_file(train_tokenizer([str(root / "text.txt")], str(root / "tok.model"),
                                            300, "bpe"))
  config = tiny_run_config()
  # A wider init than training's: the random model's choices differ clearly.
  model_cfg = ModelConfig.from_dict({**config.model.to_dict(), "vocab_size": tok.vocab_size,
                                     "max_seq_len": 128, "init_std": 0.1})
  workdir = str(root / "run")
  trainer = Trainer(config, workdir, model_cfg, lm_loss, tokenizer_bytes=tok.to_bytes(),
                    tokenizer_fingerprint=tok.fingerprint)
  trainer.save(trainer.init_state())
  trainer.checkpointer.wait()
  trainer.close()
  return workdir


@pytest.fixture(scope="module")
def lm(ckpt):
  return LmlifeLM(checkpoint=ckpt, batch_size=8)


@pytest.fixture(scope="module")
def manager(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("lm_eval_tasks"))
  write_task_yamls(out)
  # Only the lmlife_* tasks: indexing lm-eval's thousands of YAMLs takes ~10 s.
  return TaskManager(include_path=out, include_defaults=False)


def _evaluate(lm, manager, tasks, limit, **kwargs):
  return lm_eval.simple_evaluate(model=lm, tasks=tasks, limit=limit, log_samples=True,
                                 task_manager=manager, bootstrap_iters=0, **kwargs)


_FORWARD = {}


def _full_forward_logp(lm, tokens):
  """log softmax of a plain full forward pass over `tokens` (no KV cache): [T, V].

  Jitted once per checkpoint on one right-padded row of the model's context (causal: the
  padding after the tokens changes nothing before it)."""
  key = id(lm)
  if key not in _FORWARD:
    model = nnx.merge(lm.loaded.graphdef, jax.device_get(lm.loaded.params))
    _FORWARD[key] = jax.jit(lambda t: jax.nn.log_softmax(model(t)[0].astype(jnp.float32)))
  padded = np.zeros((1, lm.max_length), np.int32)
  padded[0, :len(tokens)] = tokens
  return np.asarray(_FORWARD[key](padded))[:len(tokens)]


# ---------------------------------------------------------------------------- parity
def test_mc_tasks_through_lm_eval_equal_the_builtin_harness(lm, manager):
  names = {task: MC_TASKS[task][0] for task in ("hellaswag", "arc_easy")}
  results = _evaluate(lm, manager, list(names.values()), ITEMS)
  checked = 0
  for task, name in names.items():
    items = tasks_lib.MC_READERS[task](tasks_lib.task_path(task))[:ITEMS]
    _, ours = score_multiple_choice(lm.scorer, task, items)
    theirs = sorted(results["samples"][name], key=lambda s: s["doc_id"])
    assert len(theirs) == len(ours) == ITEMS
    for mine, other in zip(ours, theirs):
      # The same requests (lm-eval's YAML prompt == data/benchmarks.py's format) ...
      item = items[other["doc_id"]]
      assert [tuple(a) for a in other["arguments"]] == item.requests()
      # ... and the same numbers.
      lls = [r[0] for r in other["filtered_resps"]]
      np.testing.assert_allclose(lls, mine["loglik"], atol=1e-4, rtol=0)
      assert (float(other["acc"]), float(other["acc_norm"])) == (mine["acc"], mine["acc_norm"])
      checked += 1
    agg = results["results"][name]
    assert agg["acc,none"] == pytest.approx(np.mean([r["acc"] for r in ours]), abs=1e-12)
    assert agg["acc_norm,none"] == pytest.approx(np.mean([r["acc_norm"] for r in ours]),
                                                 abs=1e-12)
  assert checked == 2 * ITEMS


def test_lm_eval_own_lambada_cloze_runs_offline_on_the_shared_file(lm, manager):
  name = "lmlife_lambada_openai_cloze"
  assert name in LM_EVAL_ONLY_TASKS and "lambada_cloze" not in " ".join(LM_TASKS)
  n = 6
  results = _evaluate(lm, manager, [name], n)
  with gzip.open(resolve_data_path(tasks_lib.EVAL_FILES["lambada"]), "rt") as f:
    rows = [json.loads(line) for line in f][:n]
  # lm-eval's lambada_openai_cloze.yaml, by hand: all words but the last + " ____. ->".
  requests = []
  for row in rows:
    words = (row["context"].rstrip() + " " + row["continuation"].strip()).split(" ")
    requests.append((" ".join(words[:-1]) + " ____. ->", " " + words[-1]))
  samples = sorted(results["samples"][name], key=lambda s: s["doc_id"])
  assert [tuple(s["arguments"][0]) for s in samples] == requests
  expected = lm.scorer.loglikelihood(requests)
  lls = np.array([ll for ll, _ in expected])
  agg = results["results"][name]
  assert agg["acc,none"] == pytest.approx(np.mean([g for _, g in expected]), abs=1e-12)
  assert math.log(agg["perplexity,none"]) == pytest.approx(-lls.mean(), rel=1e-6)


# ---------------------------------------------------------------------------- generation
def _greedy_reference(lm, context, max_gen):
  """Greedy tokens by repeated full forward passes; stops after </s> (dropped)."""
  eos = lm.tokenizer.eos_id
  ids = lm.tokenizer.encode(context)[-(lm.max_length - max_gen):]
  out = []
  for _ in range(max_gen):
    token = int(np.argmax(_full_forward_logp(lm, ids + out)[-1]))
    if token == eos:
      break
    out.append(token)
  return out


def _generate(lm, context, **gen_kwargs):
  request = Instance("generate_until", {}, (context, gen_kwargs), 0)
  return lm.generate_until([request], disable_tqdm=True)[0]


def test_generate_until_is_greedy_honours_max_gen_toks_and_until(lm):
  context = "ROMEO: But soft, what light through yonder window breaks?\nJULIET:"
  reference = _greedy_reference(lm, context, 12)
  assert len(reference) >= 6, "the random model ended at once; pick another context"
  full = lm.tokenizer.decode(reference)
  assert _generate(lm, context, until=[], max_gen_toks=12) == full
  assert _generate(lm, context, until=[], max_gen_toks=5) == lm.tokenizer.decode(reference[:5])
  # A stop string taken from the middle of the text: the output ends right before it.
  stop = full[len(full) // 2:len(full) // 2 + 2]
  cut = _generate(lm, context, until=["\u2603", stop], max_gen_toks=12)
  assert cut == full[:full.index(stop)] and len(cut) < len(full)
  assert _generate(lm, context, until=stop, max_gen_toks=12) == cut  # a single string
  # The offline sampler (eval.sample's raw template on the same text), and a batch of three.
  offline = respond(lm.sampler, lm.loaded.params, RawTemplate(lm.tokenizer),
                    [[{"role": "user", "content": context}]],
                    SamplingConfig(max_new_tokens=12, temperature=0.0))[0]["response"]
  batch = lm.generate_until([Instance("generate_until", {}, (c, {"until": [],
                                                                 "max_gen_toks": 12}), i)
                             for i, c in enumerate(["Hi", context, "x" * 300])],
                            disable_tqdm=True)
  assert batch[1] == offline == full
  # A context longer than the model's: its last max_len - max_gen tokens are kept.
  assert batch[2] == lm.tokenizer.decode(_greedy_reference(lm, "x" * 300, 12))


def test_cut_at_stop_strings_takes_the_earliest():
  assert cut_at_stop_strings("a Q: b\n\nc", ["\n\n", "Q:"]) == "a "
  assert cut_at_stop_strings("abc", ["", "z"]) == "abc"


# ---------------------------------------------------------------------------- rolling
def test_loglikelihood_rolling_equals_lm_eval_windows_scored_by_full_forward(lm):
  text = ("To be, or not to be, that is the question: Whether 'tis nobler in the mind to "
          "suffer the slings and arrows of outrageous fortune, or to take arms against a "
          "sea of troubles and by opposing end them. To die: to sleep; no more. ") * 3
  tokens = lm.tokenizer.encode(text)
  assert len(tokens) > 2 * lm.max_length  # three windows at least
  expected = 0.0
  for window in get_rolling_token_windows(tokens, lm.tokenizer.eos_id, lm.max_length, 1):
    context, targets = make_disjoint_window(window)
    inputs = (list(context) + list(targets))[:-1]
    logp = _full_forward_logp(lm, inputs)[-len(targets):]
    expected += float(logp[np.arange(len(targets)), targets].sum())
  got = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)],
                                 disable_tqdm=True)
  assert got[0] == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------------------- model_args
def test_registered_and_built_from_model_args(ckpt):
  cls = get_model("lmlife")
  assert cls is LmlifeLM
  assert get_model("dummy").__name__ == "DummyLM"  # lm-eval's own models still found
  lm = cls.create_from_arg_string(f"checkpoint={ckpt},mesh=data:2/fsdp:2,max_gen_toks=7",
                                  {"batch_size": "auto", "device": "cuda"})
  assert dict(lm.loaded.mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 1}
  assert (lm.batch_size, lm.max_gen_toks) == (32, 7)
  with pytest.raises(ValueError, match="unknown \\['pretrained'\\].*known: checkpoint"):
    cls.create_from_arg_string(f"checkpoint={ckpt},pretrained=gpt2")
  with pytest.raises(ValueError, match="checkpoint=<dir> is required"):
    cls.create_from_arg_string("")


# ---------------------------------------------------------------------------- command lines
def _run(cmd, timeout=600):
  return subprocess.run(cmd, cwd=REPO_ROOT, env=subprocess_env(HF_DATASETS_OFFLINE="1",
                                                               HF_HUB_OFFLINE="1"),
                        timeout=timeout, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                        text=True)


@pytest.mark.cli
def test_cli_lm_eval_wrapper_runs_the_lmlife_model(ckpt, tmp_path):
  tasks = str(tmp_path / "tasks")
  out = _run([sys.executable, "-m", "eval.lm_eval_tasks", f"--out={tasks}"])
  assert out.returncode == 0 and "lmlife_arc_easy" in out.stdout, out.stdout
  out = _run([sys.executable, "-m", "eval.lm_eval", "run", "--model", "lmlife",
              "--model_args", f"checkpoint={ckpt}", "--batch_size", "8", "--tasks",
              "lmlife_arc_easy", "--include_path", tasks, "--limit", "4",
              "--output_path", str(tmp_path / "out")])
  assert out.returncode == 0, out.stdout[-3000:]
  [path] = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "out") for f in fs
            if f.startswith("results")]
  with open(path) as f:
    result = json.load(f)["results"]["lmlife_arc_easy"]
  lm = LmlifeLM(checkpoint=ckpt, batch_size=8)
  items = tasks_lib.arc(tasks_lib.task_path("arc_easy"))[:4]
  summary, _ = score_multiple_choice(lm.scorer, "arc_easy", items)
  assert result["acc,none"] == summary["acc"]
  assert result["acc_norm,none"] == summary["acc_norm"]


@pytest.mark.cli
def test_cli_eval_run_merges_lm_eval_tasks_into_results(ckpt, tmp_path):
  out_dir = str(tmp_path / "eval")
  out = _run([sys.executable, "-m", "eval.run", f"--checkpoint={ckpt}", "--local_devices=2",
              "--tasks=arc_easy,lm_eval:lmlife_arc_easy,lm_eval:lmlife_gsm8k",
              "--lm_eval_num_fewshot=0", "--limit=3",
              f"--output_dir={out_dir}"])
  assert out.returncode == 0, out.stdout[-3000:]
  with open(os.path.join(out_dir, "results.json")) as f:
    results = json.load(f)["results"]
  assert results["lm_eval:lmlife_arc_easy"]["acc"] == results["arc_easy"]["acc"]
  assert results["lm_eval:lmlife_arc_easy"]["acc_norm"] == results["arc_easy"]["acc_norm"]
  gsm8k = results["lm_eval:lmlife_gsm8k"]
  assert gsm8k["items"] == 3 and 0.0 <= gsm8k["exact_match_flexible-extract"] <= 1.0
  with open(os.path.join(out_dir, "lm_eval_lmlife_gsm8k.jsonl")) as f:
    records = [json.loads(line) for line in f]
  assert {r["filter"] for r in records} == {"strict-match", "flexible-extract"}
  assert all(isinstance(r["resps"][0][0], str) for r in records)
  with open(os.path.join(out_dir, "results.md")) as f:
    assert "| lm_eval:lmlife_arc_easy | acc |" in f.read()
  bad = _run([sys.executable, "-m", "eval.run", f"--checkpoint={ckpt}", "--local_devices=2",
              "--tasks=lm_eval:no_such_task_xyz", f"--output_dir={out_dir}"])
  assert bad.returncode == 2 and bad.stdout.strip().splitlines()[-1].startswith("error:")
  assert "no_such_task_xyz" in bad.stdout
