"""Tests for eval/sample.py: loading a checkpoint for sampling, batched responses, the CLI.

  pytest tests/test_eval_sample.py

A tiny checkpoint is written the way the project writes one (char tokenizer with the chat
markers, `Trainer.init_state` + `Trainer.save` on the 8 fake devices). Checked: restored
params and tokenizer equal the saved ones, on one device and sharded on a mesh; greedy
`respond` equals a direct `Sampler.generate` on independently built prompt ids; `ended` is
True exactly when `<|end|>` was generated (not for `</s>`, not at the length limit); history
truncation; the CLI's jsonl output, stdin chat with /reset, and one-line errors.
"""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from conftest import REPO_ROOT, subprocess_env, tiny_run_config
from data.chat import CHAT_MARKERS, ChatTemplate
from data.tokenizer import Tokenizer, train_tokenizer
from eval.sample import (RawTemplate, load_for_sampling, make_template, parse_mesh, respond,
                         truncate_history)
from model.config import ModelConfig
from model.sampling import Sampler, SamplingConfig
from model.transformer import Transformer
from train.losses import lm_loss
from train.trainer import Trainer

TEXT = ("Name three colors. Red, green and blue.\nhello there! hi, how are you?\n"
        "The quick brown fox jumps over the lazy dog; ROMEO: what light?\n") * 40
PROMPTS = ["Name three colors.", "hello", "hi, how are you?", "ROMEO:", "the lazy dog"]
GREEDY = SamplingConfig(max_new_tokens=8, temperature=0.0)


def _host(tree):
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def _user(text):
  return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  """(workdir, saved params on the host, tokenizer) of a freshly initialised tiny model."""
  root = tmp_path_factory.mktemp("sample")
  (root / "text.txt").write_text(TEXT)
  tok = Tokenizer.from_file(train_tokenizer([str(root / "text.txt")], str(root / "tok.model"),
                                            0, "char", user_defined_symbols=CHAT_MARKERS))
  config = tiny_run_config()
  model_cfg = ModelConfig.from_dict({**config.model.to_dict(), "vocab_size": tok.vocab_size})
  workdir = str(root / "run")
  trainer = Trainer(config, workdir, model_cfg, lm_loss, tokenizer_bytes=tok.to_bytes(),
                    tokenizer_fingerprint=tok.fingerprint)
  state = trainer.init_state()
  trainer.save(state)
  trainer.checkpointer.wait()
  params = _host(state.params)
  trainer.close()
  return workdir, params, tok


@pytest.fixture(scope="module")
def loaded(ckpt):
  return load_for_sampling(ckpt[0])


def test_load_for_sampling_restores_the_saved_params_and_tokenizer(ckpt, loaded):
  _, saved, tok = ckpt
  sampler, params, tokenizer, meta = loaded
  jax.tree.map(np.testing.assert_array_equal, _host(params), saved)
  assert jax.tree.structure(params) == jax.tree.structure(saved)
  assert tokenizer.to_bytes() == tok.to_bytes()
  assert meta["stage"] == "pretrain" and meta["checkpoint_path"].endswith("checkpoints/0")
  assert sampler.model_cfg.vocab_size == tok.vocab_size
  assert {d for x in jax.tree.leaves(params) for d in x.devices()} == {jax.devices()[0]}


def test_load_for_sampling_shards_weights_on_a_mesh(ckpt, loaded):
  workdir, saved, _ = ckpt
  sampler, params, tokenizer, _ = load_for_sampling(workdir, parse_mesh("fsdp=2,tensor=2"))
  assert dict(sampler.mesh.shape) == {"data": 1, "fsdp": 2, "tensor": 2}
  emb = params["embedding"]
  assert emb.sharding.spec == P("tensor", "fsdp")  # vocab -> tensor, embed -> fsdp
  assert {s.data.shape for s in emb.addressable_shards} == {(emb.shape[0] // 2, 32)}
  jax.tree.map(np.testing.assert_array_equal, _host(params), saved)
  # Greedy responses on the sharded weights equal the one-device ones.
  template = ChatTemplate(tokenizer)
  convs = [_user(p) for p in PROMPTS[:4]]
  one = respond(loaded[0], loaded[1], template, convs, GREEDY, batch_size=4)
  assert respond(sampler, params, template, convs, GREEDY, batch_size=4) == one


def test_respond_equals_direct_generate_on_independent_prompt_ids(ckpt, loaded):
  _, saved, tok = ckpt
  sampler, params, tokenizer, _ = loaded
  template = make_template("chat", tokenizer)
  # batch_size=4 over 5 prompts: the last batch is padded with filler rows.
  got = respond(sampler, params, template, [_user(p) for p in PROMPTS], GREEDY, batch_size=4)
  piece = {m: tok.encode(m)[0] for m in CHAT_MARKERS}
  ids = [[piece["<|user|>"], *tok.encode(p), piece["<|end|>"], piece["<|assistant|>"]]
         for p in PROMPTS]
  graphdef = nnx.split(nnx.eval_shape(lambda: Transformer(sampler.model_cfg,
                                                          nnx.Rngs(params=0))))[0]
  end = piece["<|end|>"]
  cfg = SamplingConfig(max_new_tokens=8, temperature=0.0, eos_ids=(end, tok.eos_id))
  out = Sampler(graphdef, sampler.model_cfg).generate(saved, ids, cfg)
  for row, r in enumerate(got):
    n = int(out.response_mask[row].sum())
    gen = out.response[row, :n].tolist()
    text = tok.decode(gen[:-1] if gen and gen[-1] in (end, tok.eos_id) else gen)
    assert r == {"response": text, "ended": end in gen, "tokens": n}, row


def _boost(params, token, hidden_dim=0):
  """Params whose greedy choice is always `token`: one residual dimension is a large
  constant (from the embedding) and only `token`'s head column reads it."""
  p = jax.tree.map(np.array, params)
  p["embedding"][:, hidden_dim] = 10.0
  p["lm_head"][hidden_dim, :] = 0.0
  p["lm_head"][hidden_dim, token] = 100.0
  return p


def test_ended_is_true_exactly_when_the_end_of_turn_token_is_generated(ckpt, loaded):
  sampler, _, tokenizer, _ = loaded
  saved = ckpt[1]
  template = ChatTemplate(tokenizer)
  convs = [_user(p) for p in PROMPTS[:4]]
  stop_end = respond(sampler, _boost(saved, template.end_id), template, convs, GREEDY)
  assert stop_end == [{"response": "", "ended": True, "tokens": 1}] * 4
  # </s> also stops generation, but it is not the end of an assistant turn.
  stop_eos = respond(sampler, _boost(saved, tokenizer.eos_id), template, convs, GREEDY)
  assert stop_eos == [{"response": "", "ended": False, "tokens": 1}] * 4
  # The raw template's end is </s>; a token that is no stop id runs to the length limit.
  raw = RawTemplate(tokenizer)
  assert respond(sampler, _boost(saved, tokenizer.eos_id), raw, [_user("hi")], GREEDY)[0][
      "ended"]
  letter = tokenizer.encode("x")[0]
  never = respond(sampler, _boost(saved, letter), raw, [_user("hi")], GREEDY)
  assert never == [{"response": "x" * 8, "ended": False, "tokens": 8}]


def test_prompts_beyond_the_context_and_unknown_templates_are_refused(loaded):
  sampler, params, tokenizer, _ = loaded
  with pytest.raises(ValueError, match="Prompt 1 has .* model context of 64"):
    respond(sampler, params, RawTemplate(tokenizer), [_user("hi"), _user("a" * 60)], GREEDY)
  with pytest.raises(ValueError,
                     match=r"Unknown template 'chatml'.*\['auto', 'chat', 'jinja', 'none'\]"):
    make_template("chatml", tokenizer)
  with pytest.raises(ValueError, match="expected axis=size"):
    parse_mesh("fsdp:2")


def test_truncate_history_drops_the_oldest_exchanges(loaded):
  template = ChatTemplate(loaded[2])
  system = [{"role": "system", "content": "be brief"}]
  history = [{"role": r, "content": c} for r, c in
             [("user", "hello"), ("assistant", "hi there"), ("user", "how are you?"),
              ("assistant", "fine"), ("user", "bye")]]
  full = len(template.prompt_ids(system + history))
  assert truncate_history(template, system, history, full) == (history, 0)
  last_two = len(template.prompt_ids(system + history[2:]))
  assert truncate_history(template, system, history, last_two) == (history[2:], 2)
  assert truncate_history(template, system, history, last_two - 1) == (history[4:], 4)
  assert truncate_history(template, system, history, 3) == ([], 5)


def _cli(*flags, stdin=None):
  return subprocess.run([sys.executable, "-m", "eval.sample", *flags], cwd=REPO_ROOT,
                        env=subprocess_env(), input=stdin, capture_output=True, text=True,
                        timeout=120)


@pytest.mark.cli
def test_cli_writes_jsonl_equal_to_respond(ckpt, loaded, tmp_path):
  out_path = tmp_path / "samples.jsonl"
  out = _cli(f"--checkpoint={ckpt[0]}", *(f"--prompt={p}" for p in PROMPTS[:4]),
             "--temperature=0", "--max_new_tokens=8", f"--output={out_path}")
  assert out.returncode == 0, out.stderr[-3000:]
  records = [json.loads(line) for line in out_path.read_text().splitlines()]
  expected = respond(loaded[0], loaded[1], ChatTemplate(loaded[2]),
                     [_user(p) for p in PROMPTS[:4]], GREEDY)
  assert records == [{"prompt": p, **e} for p, e in zip(PROMPTS, expected)]
  assert "=== prompt 4/4 ===" in out.stdout


@pytest.mark.cli
def test_cli_chat_keeps_history_and_resets(ckpt, loaded):
  out = _cli(f"--checkpoint={ckpt[0]}", "--chat", "--temperature=0", "--max_new_tokens=8",
             stdin="hello\n/reset\nhi\n/quit\nnever read\n")
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.count("assistant> ") == 2 and "(conversation reset)" in out.stderr
  template = ChatTemplate(loaded[2])
  # After /reset the second reply sees only "hi" (as a fresh conversation would).
  # (4 rows reuse the program compiled for the other tests' batches of 4.)
  first, second = [r["response"] for r in respond(
      loaded[0], loaded[1], template, [_user("hello"), _user("hi")] * 2, GREEDY)[:2]]
  assert out.stdout == f"assistant> {first}\nassistant> {second}\n"


@pytest.mark.parametrize("flags,needle", [
    (("--checkpoint={missing}", "--prompt=hi"), "does not exist"),
    (("--checkpoint={ckpt}", "--prompt=hi", "--template=chatml"), "Unknown template 'chatml'"),
    (("--checkpoint={ckpt}", "--prompt=" + "a" * 80, "--template=none"), "model context is 64"),
])
@pytest.mark.cli
def test_cli_errors_are_one_line(ckpt, tmp_path, flags, needle):
  missing = str(tmp_path / "nope")
  out = _cli(*(f.format(missing=missing, ckpt=ckpt[0]) for f in flags))
  assert out.returncode == 2
  lines = [line for line in out.stderr.splitlines() if not line.startswith("Loaded ")]
  assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], out.stderr
  if "missing" in flags[0]:
    assert missing in lines[0]
  assert "Traceback" not in out.stderr + out.stdout


@pytest.fixture(scope="module")
def bad_tokenizer_ckpt(ckpt, tmp_path_factory):
  """A copy of the tiny checkpoint whose tokenizer blob is random bytes."""
  import glob
  import os
  import shutil
  workdir = str(tmp_path_factory.mktemp("bad_tok") / "run")
  shutil.copytree(ckpt[0], workdir)
  blobs = glob.glob(os.path.join(workdir, "checkpoints", "*", "tokenizer", "blob.bin"))
  assert blobs
  for blob in blobs:
    with open(blob, "wb") as f:
      f.write(np.random.default_rng(0).bytes(300))
  return workdir


def test_unreadable_tokenizer_is_a_checkpoint_error_naming_it(bad_tokenizer_ckpt):
  from train.checkpoint import CheckpointError
  with pytest.raises(CheckpointError, match=r"checkpoints/0 holds an unreadable tokenizer"):
    load_for_sampling(bad_tokenizer_ckpt)


@pytest.mark.cli
@pytest.mark.parametrize("module,flags", [("eval.sample", ("--prompt=hi",)),
                                          ("eval.run", ("--tasks=arc_easy",))])
def test_cli_unreadable_tokenizer_is_one_error_line_exit_2(bad_tokenizer_ckpt, tmp_path,
                                                           module, flags):
  out = subprocess.run([sys.executable, "-m", module, f"--checkpoint={bad_tokenizer_ckpt}",
                        *flags, f"--output_dir={tmp_path / 'eval'}" if module == "eval.run"
                        else f"--output={tmp_path / 's.jsonl'}"],
                       cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 2, out.stderr[-3000:]
  lines = [line for line in out.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr[-3000:]
  assert bad_tokenizer_ckpt in lines[0] and "unreadable tokenizer" in lines[0]
  assert "Traceback" not in out.stderr + out.stdout and not list(tmp_path.iterdir())


class _FakeStdin:
  """Lines for the chat; then an item that is an exception class is raised ("" = EOF)."""

  def __init__(self, items, tty=False):
    self.items, self.tty = list(items), tty

  def isatty(self):
    return self.tty

  def readline(self):
    if not self.items:
      return ""
    item = self.items.pop(0)
    if isinstance(item, type) and issubclass(item, BaseException):
      raise item()
    return item


def _chat_flags():
  from types import SimpleNamespace
  return SimpleNamespace(max_new_tokens=8, temperature=0.0, top_k=0, top_p=1.0, system="",
                         seed=0)


@pytest.mark.parametrize("after", ["exit\n", "quit\n", " /quit \n", "/exit\n",
                                   KeyboardInterrupt, ""])
def test_chat_ends_on_exit_quit_ctrl_c_and_eof(loaded, monkeypatch, capsys, after):
  from eval.sample import run_chat
  stdin = _FakeStdin(["hello\n", after, "never read\n"])
  monkeypatch.setattr(sys, "stdin", stdin)
  run_chat(_chat_flags(), loaded[0], loaded[1], ChatTemplate(loaded[2]))  # no exception
  assert capsys.readouterr().out.count("assistant> ") == 1
  assert stdin.items == ["never read\n"]


def test_interactive_chat_has_readline_line_editing(loaded, monkeypatch, capsys):
  from eval.sample import run_chat
  monkeypatch.delitem(sys.modules, "readline", raising=False)
  monkeypatch.setattr(sys, "stdin", _FakeStdin(["exit\n"], tty=True))
  run_chat(_chat_flags(), loaded[0], loaded[1], ChatTemplate(loaded[2]))
  assert "readline" in sys.modules  # input() then edits lines and keeps a history
  assert capsys.readouterr().out == "you> "
