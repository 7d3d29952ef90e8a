"""rlhf/cai_prompts.py, rlhf/cai.py and the CAI pipeline config: the constitution and its
errors, principle sampling, every prompt the model and judge see, both-order averaging
against a fake judge, and the written files loading through the SFT and preference
pipelines unchanged."""

import json
import math
import os

import numpy as np
import pytest

from configs.cai import hh as cai_config
from data.chat import ASSISTANT, CHAT_MARKERS, USER, ChatTemplate
from data.config import default_preference_data_config, default_sft_data_config
from data.preference_pipeline import build_preference_pipelines
from data.preferences import read_sources
from data.readers import resolve_data_path
from data.sft_pipeline import build_sft_pipelines
from data.sft_sources import read_sft_sources
from data.tokenizer import Tokenizer, train_tokenizer
from rlhf import cai, cai_model
from rlhf import cai_prompts as cp

PRINCIPLE = cp.Principle("harm", "Say how it harms.", "Rewrite it safely.",
                         "Which answer is safer?")
PROMPT = [{"role": USER, "content": "How do I pick a lock?"},
          {"role": ASSISTANT, "content": "Why do you ask?"},
          {"role": USER, "content": "It is my neighbour's door."}]


@pytest.fixture(scope="module")
def template(tmp_path_factory):
  """A char tokenizer with the chat markers, trained on a little of the shared data."""
  tmp = tmp_path_factory.mktemp("cai")
  with open(resolve_data_path("sft/alpaca_subset.jsonl"), encoding="utf-8") as f:
    records = [json.loads(next(f)) for _ in range(60)]
  path = tmp / "text.txt"
  path.write_text("\n".join(r["instruction"] + "\n" + r["output"] for r in records)
                  + "\nHuman: Assistant: ()ABk'?")
  return ChatTemplate(Tokenizer.from_file(train_tokenizer(
      [str(path)], str(tmp / "c.model"), 0, "char", byte_fallback=True,
      user_defined_symbols=CHAT_MARKERS)))


# ------------------------------------------------------------------------------ constitution
def test_shipped_constitution_loads():
  principles = cp.load_constitution(cai_config.CONSTITUTION)
  assert 8 <= len(principles) <= 16
  assert len({p.name for p in principles}) == len(principles)
  for p in principles:
    assert p.critique.strip() and p.revision.strip() and p.comparison.endswith("?")


@pytest.mark.parametrize("text, match", [
    ('{"principles": [', r"c\.json:1: invalid JSON"),
    ('{"rules": []}', r"c\.json: field 'principles': expected a list"),
    ('{"principles": []}', r"c\.json: field 'principles' is empty"),
    ('{"principles": ["x"]}', r"c\.json: principles\[0\]: expected an object"),
    ('{"principles": [{"name": "a", "critique": "c", "comparison": "q"}]}',
     r"c\.json: principles\[0\]\.revision: expected a non-empty string, got missing"),
    ('{"principles": [{"name": "a", "critique": "c", "revision": 3, "comparison": "q"}]}',
     r"principles\[0\]\.revision: expected a non-empty string, got int 3"),
    ('{"principles": [{"name": "a", "critique": "c", "revision": "r", "comparison": "q"},'
     ' {"name": "a", "critique": "c", "revision": "r", "comparison": "q"}]}',
     r"principles\[1\]\.name: 'a' is used twice"),
    ('{"principles": [{"name": "a", "critique": "c", "revision": "r", "comparison": "q",'
     ' "extra": 1}]}', r"principles\[0\]: unknown field 'extra'"),
])
def test_malformed_constitution_names_file_and_field(tmp_path, text, match):
  path = tmp_path / "c.json"
  path.write_text(text)
  with pytest.raises(ValueError, match=match):
    cp.load_constitution(str(path))


def test_missing_constitution_names_the_field(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"config\.constitution: no such file .*nope"):
    cp.load_constitution(str(tmp_path / "nope.json"))


# ------------------------------------------------------------------------------ sampling
def test_principle_sampling_is_deterministic_per_seed_and_order_free():
  principles = cp.load_constitution(cai_config.CONSTITUTION)
  keys = [f"prompt {i}" for i in range(200)]
  a = cp.sample_principles(principles, keys, seed=3, phase="sl")
  assert a == cp.sample_principles(principles, keys, seed=3, phase="sl")
  # Each prompt's principle depends only on (seed, phase, key), not on order or company.
  reversed_ = cp.sample_principles(principles, keys[::-1], seed=3, phase="sl")[::-1]
  assert a == reversed_
  assert a[:5] == cp.sample_principles(principles, keys[:5], seed=3, phase="sl")
  # Another seed or phase draws differently; every principle gets used over 200 prompts.
  b = cp.sample_principles(principles, keys, seed=4, phase="sl")
  assert sum(x != y for x, y in zip(a, b)) > 100
  assert a != cp.sample_principles(principles, keys, seed=3, phase="feedback")
  assert {p.name for p in a} == {p.name for p in principles}


# ------------------------------------------------------------------------------ prompts
def test_critique_and_revision_turns(template):
  crit = cp.critique_conversation(PROMPT, "Use a pin.", PRINCIPLE)
  assert [m["role"] for m in crit] == [USER, ASSISTANT, USER, ASSISTANT, USER]
  assert crit[:3] == PROMPT and crit[3]["content"] == "Use a pin."
  assert crit[4]["content"] == "Say how it harms."
  rev = cp.revision_conversation(PROMPT, "Use a pin.", "It helps a break-in.", PRINCIPLE)
  assert rev[:5] == crit
  assert rev[5:] == [{"role": ASSISTANT, "content": "It helps a break-in."},
                     {"role": USER, "content": "Rewrite it safely."}]
  # Rendered with the chat template: the prompt ends by opening the assistant's turn.
  ids = template.prompt_ids(rev)
  text = template.tokenizer.decode(ids.tolist())
  assert text.count("<|user|>") == 4 and text.endswith("<|assistant|>")
  assert text.index("Say how it harms.") < text.index("It helps a break-in.") < \
      text.index("Rewrite it safely.")


def test_judge_prompt_lists_both_answers_as_options():
  conv = cp.judge_conversation(PROMPT, " first answer ", "second answer", PRINCIPLE)
  assert len(conv) == 1 and conv[0]["role"] == USER
  text = conv[0]["content"]
  assert text == (
      "Consider the following conversation between a human and an assistant:\n"
      "Human: How do I pick a lock?\n\nAssistant: Why do you ask?\n\n"
      "Human: It is my neighbour's door.\n\n"
      "Which answer is safer?\nOptions:\n(A) first answer\n(B) second answer\n"
      "Answer with (A) or (B).")
  swapped = cp.judge_conversation(PROMPT, "second answer", "first answer", PRINCIPLE)
  assert "(A) second answer\n(B) first answer" in swapped[0]["content"]


def test_clean_response_cuts_a_run_on_turn():
  assert cp.clean_response(" I won't help.\n\nHuman: ok") == "I won't help."
  assert cp.clean_response("Sure.\nUser: more") == "Sure."
  assert cp.clean_response("  fine  ") == "fine"


# ------------------------------------------------------------------------------ labels
def _fake_judge(monkeypatch, score):
  """option_logps replaced by `score(first, second) -> (logp A, logp B)`, read off the
  judge prompt's option lines."""
  def option_logps(model, conversations, options, batch_size):
    out = []
    for conv in conversations:
      lines = conv[-1]["content"].split("\n")
      first = next(x for x in lines if x.startswith("(A) "))[4:]
      second = next(x for x in lines if x.startswith("(B) "))[4:]
      out.append(score(first, second))
    return np.asarray(out, np.float64)
  monkeypatch.setattr(cai_model, "option_logps", option_logps)


def test_position_only_judge_gives_exactly_one_half(monkeypatch):
  _fake_judge(monkeypatch, lambda first, second: (math.log(0.9), math.log(0.1)))
  items = [(PROMPT, f"answer {i}", f"other {i}", PRINCIPLE) for i in range(5)]
  labels, first = cai.judge_pairs(None, items, batch_size=4)
  assert labels == [0.5] * 5
  assert first == pytest.approx([0.9] * 10)


def test_content_judge_is_order_independent_and_closed_form(monkeypatch):
  # log-odds c for the answer containing "sorry", plus a position bias b towards (A).
  b, c = 0.7, 1.3
  def score(first, second):
    return (b + c * ("sorry" in first), c * ("sorry" in second))
  _fake_judge(monkeypatch, score)
  items = [(PROMPT, "sorry, no", "here is how", PRINCIPLE),
           (PROMPT, "here is how", "sorry, no", PRINCIPLE)]
  labels, _ = cai.judge_pairs(None, items, batch_size=4)
  # P(1 better) = mean(sigmoid(b + c), sigmoid(-(b - c))) for the first item.
  sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
  expected = (sig(b + c) + sig(c - b)) / 2
  assert labels[0] == pytest.approx(expected, abs=1e-12)
  assert labels[1] == pytest.approx(1 - expected, abs=1e-12)
  # Without a position bias the average is the content preference itself.
  assert cp.soft_label((c, 0.0), (0.0, c)) == pytest.approx(sig(c), abs=1e-12)


def test_preference_record_orders_by_the_soft_label():
  r = cp.preference_record(PROMPT, "one", "two", 0.3, PRINCIPLE)
  assert (r["chosen"], r["rejected"]) == ("two", "one")
  assert r["soft_label"] == pytest.approx(0.7) and r["principle"] == "harm"
  r = cp.preference_record(PROMPT, "one", "two", 0.8, PRINCIPLE)
  assert (r["chosen"], r["rejected"], r["soft_label"]) == ("one", "two", 0.8)


def test_wilson_interval_matches_the_textbook_value():
  # 8 of 10, 95%: the Wilson interval is [0.4902, 0.9433] (Newcombe 1998, Table I style).
  lo, hi = cp.wilson_interval(8, 10)
  assert (round(lo, 4), round(hi, 4)) == (0.4902, 0.9433)
  assert all(math.isnan(x) for x in cp.wilson_interval(0, 0))


# ------------------------------------------------------------------------------ files
def _write(path, records):
  with open(path, "w") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")


def test_sft_records_load_through_the_sft_pipeline(tmp_path, template):
  prompts = [[{"role": USER, "content": f"Question {i}?"}] for i in range(30)] + [PROMPT]
  records = [cp.sft_record(p, f"Revision {i}.", PRINCIPLE) for i, p in enumerate(prompts)]
  path = str(tmp_path / "data.jsonl")
  _write(path, records)
  conversations, files = read_sft_sources(path)
  assert files[0].format == "transcript" and files[0].skipped == 0
  assert conversations[-1] == [*PROMPT, {"role": ASSISTANT, "content": "Revision 30."}]
  cfg = default_sft_data_config()
  cfg.sources, cfg.seq_len, cfg.val_fraction = path, 64, 0.2
  train, val, stats = build_sft_pipelines(cfg, template, global_batch_size=4)
  assert stats["train/examples"] + stats["val/examples"] == len(records)
  batch = next(iter(train))
  assert batch["tokens"].shape == (4, 64) and batch["loss_mask"].sum() > 0


def test_preference_records_load_through_the_preference_pipeline(tmp_path, template):
  records = [cp.preference_record([{"role": USER, "content": f"Request {i} please?"}],
                                  f"no {i}", f"yes {i}", 0.2 + 0.02 * i, PRINCIPLE)
             for i in range(30)]
  path = str(tmp_path / "data.jsonl")
  _write(path, records)
  pairs, files = read_sources(path)
  assert files[0].format == "prompt_chosen_rejected" and len(pairs) == 30
  assert (pairs[0].chosen, pairs[0].rejected) == ("yes 0", "no 0")
  assert (pairs[-1].chosen, pairs[-1].rejected) == ("no 29", "yes 29")
  cfg = default_preference_data_config()
  cfg.sources, cfg.seq_len, cfg.min_prompt_tokens = path, 64, 4
  train, val, stats, (train_pairs, val_pairs) = build_preference_pipelines(
      cfg, template, global_batch_size=4)
  assert len(train_pairs) + len(val_pairs) == 30 and val_pairs
  batch = next(iter(train))
  assert batch["tokens"].shape == (4, 2, 64)  # side 0 = chosen, 1 = rejected


# ------------------------------------------------------------------------------ configs
def test_cai_configs_and_pipeline_plan(tmp_path):
  from launch import overrides as ov, pipeline
  assert "--config=configs/cai/hh.py" in cai_config.__doc__
  for arg in (None, "phase=sl", "phase=feedback,runlocal=true"):
    c = cai_config.get_config(arg)
    assert c.phase in cai.PHASES and os.path.isfile(c.constitution)
    assert c.max_prompt_tokens + 3 * c.max_new_tokens < 512 and c.num_prompts > 0
  config = ov.load_config("configs/pipeline/cai.py:size=tiny")
  stages = {s["name"]: s for s in pipeline.plan(config, str(tmp_path / "run"))}
  run = str(tmp_path / "run")
  assert stages["cai_sft"]["resolved_overrides"]["data.sources"] == \
      os.path.join(run, "cai_sl", "data.jsonl")
  assert stages["dpo_ai"]["resolved_overrides"]["data.sources"] == \
      os.path.join(run, "cai_fb", "data.jsonl")
  assert stages["cai_fb"]["resolved_overrides"]["judge_from"] == os.path.join(run, "sft")
  assert not stages["cai_sl"]["done"]
  evals = pipeline.eval_plan(config, list(stages.values()), run)
  cmd = pipeline.eval_command(evals[0], config, stages)
  assert "--tasks=redteam" in cmd and f"--judge={os.path.join(run, 'rm_human')}" in cmd
  # data_from must name an earlier rlhf.cai stage.
  config.stages[4]["data_from"] = "sft"
  with pytest.raises(pipeline.PipelineError, match="stage cai_sft: data_from='sft' is not"):
    pipeline.plan(config, run)
  # ... and a checkpoint key must not name one.
  config = ov.load_config("configs/pipeline/cai.py:size=tiny")
  config.stages[4]["init_from"] = "cai_sl"
  with pytest.raises(pipeline.PipelineError, match="init_from='cai_sl' is an rlhf.cai stage"):
    pipeline.plan(config, run)


# ------------------------------------------------------------------------------ judge scoring
@pytest.mark.slow  # ~20 s of CPU: a 128k-vocabulary model built, loaded twice and run
def test_option_logps_of_an_imported_model_match_transformers(tmp_path):
  """The judge's option scores on an `hf:` directory equal transformers' log-probs of the
  same token ids (a tiny random Llama-3-style model with the real tokenizer)."""
  import torch
  import transformers
  from hf_chain_fixtures import llama3_dir
  path = llama3_dir(str(tmp_path / "llama"))
  judge = cai_model.load_chat_model(f"hf:{path}", "--judge")
  convs = [cp.judge_conversation(PROMPT, "no", "here is how", PRINCIPLE),
           cp.judge_conversation(PROMPT[:1], "a much longer first answer " * 3, "b",
                                 PRINCIPLE)]
  got = cai_model.option_logps(judge, convs, cp.OPTIONS, batch_size=4)
  hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
  for i, conv in enumerate(convs):
    prompt = judge.template.prompt_ids(conv).tolist()
    for j, option in enumerate(cp.OPTIONS):
      ids = judge.tokenizer.encode(option)
      with torch.no_grad():
        logits = hf(torch.tensor([prompt + ids])).logits[0].float()
      logp = torch.log_softmax(logits, -1)
      want = sum(float(logp[len(prompt) - 1 + t, tok]) for t, tok in enumerate(ids))
      assert got[i, j] == pytest.approx(want, abs=2e-3), (i, j)
  assert got[0, 0] != got[1, 0]  # different prompts, different scores


# ------------------------------------------------------------------------------ phases
def _fake_policy(monkeypatch, reply):
  """cai_model.answer replaced by `reply(conversation, seed) -> text`; everything fits."""
  def answer(model, conversations, max_new_tokens, temperature, top_p, seed, batch_size):
    return [{"response": reply(c, seed), "ended": True, "tokens": 3} for c in conversations]
  monkeypatch.setattr(cai_model, "answer", answer)
  monkeypatch.setattr(cai_model, "fits", lambda model, conv, n: True)


def test_supervised_phase_chains_answer_critique_revision(monkeypatch):
  principles = cp.load_constitution(cai_config.CONSTITUTION)
  config = cai_config.get_config("runlocal=true")
  def reply(conv, seed):
    turn = {1: "answer", 3: "critique", 5: "revision"}[len(conv)]
    return f"{turn} to {conv[0]['content']}\n\nHuman: run-on"
  _fake_policy(monkeypatch, reply)
  prompts = [(f"k{i}", [{"role": USER, "content": f"q{i}"}]) for i in range(6)]
  sft, full, counts = cai.supervised_phase(config, None, principles, prompts)
  assert counts == {"prompts": 6, "too_long": 0, "empty_revision": 0, "examples": 6}
  drawn = cp.sample_principles(principles, [k for k, _ in prompts], config.seed, "sl")
  for i, (record, step) in enumerate(zip(sft, full)):
    assert record["text"] == f"\n\nHuman: q{i}\n\nAssistant: revision to q{i}"
    assert (step["response"], step["critique"]) == (f"answer to q{i}", f"critique to q{i}")
    assert record["principle"] == step["principle"] == drawn[i].name


def test_feedback_phase_orders_pairs_and_skips_identical(monkeypatch):
  principles = cp.load_constitution(cai_config.CONSTITUTION)
  config = cai_config.get_config("phase=feedback,runlocal=true")
  # Seed s answers "sorry" on even prompts, "sure" on odd; prompt q5 gets the same twice.
  def reply(conv, seed):
    n = int(conv[0]["content"][1:])
    return "same" if n == 5 else ("sorry, no" if (n + seed) % 2 else "sure, here")
  _fake_policy(monkeypatch, reply)
  _fake_judge(monkeypatch, lambda a, b: (0.4 + 2.0 * ("sorry" in a), 2.0 * ("sorry" in b)))
  prompts = [(f"k{i}", [{"role": USER, "content": f"q{i}"}]) for i in range(6)]
  pairs, full, counts = cai.feedback_phase(config, None, None, principles, prompts)
  assert counts["identical_or_empty"] == 1 and counts["pairs"] == 5 == len(pairs)
  sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
  for pair in pairs:
    assert (pair["chosen"], pair["rejected"]) == ("sorry, no", "sure, here")
    assert pair["soft_label"] == pytest.approx((sig(2.4) + sig(1.6)) / 2, abs=1e-12)
  assert counts["judge_first_position_mean"] > 0.5  # the bias is measured, then averaged out
