"""Tests for train/sft.py: init_from with a grown vocabulary, the response-only loss, the
end-to-end CLI run (held-out response loss falls below the base model's), bad configs.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import SFT_FLAGS, run_cmd, sft_cmd
from data.chat import CHAT_MARKERS, ChatTemplate
from data.sft_rows import build_rows
from data.tokenizer import train_tokenizer, Tokenizer
from model import layout
from train import checkpoint as ckpt_lib
from train.losses import lm_loss
from train.restore import InitAdapter
from train.trainer import Trainer

@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, base_run):
  """SFT from the shakespeare_char base (its tokenizer lacks the chat markers)."""
  workdir = str(tmp_path_factory.mktemp("sft") / "run")
  out = run_cmd(sft_cmd(workdir, base_run, *SFT_FLAGS))
  assert out.returncode == 0, out.stdout[-5000:]
  return workdir, out.stdout


def _evals(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if "eval/loss" in r]


def test_sft_on_the_english_base_lowers_held_out_response_loss(english_sft_run):
  workdir, stdout = english_sft_run
  evals = _evals(workdir)
  assert [r["step"] for r in evals] == [0, 30]  # the base model's figure, then the end
  base, final = evals[0]["eval/loss"], evals[-1]["eval/loss"]
  assert final < base - 0.1, (base, final)
  assert "+ 0 chat markers" in stdout  # the base reserved them already
  samples = [json.loads(line) for line in open(os.path.join(workdir, "samples.jsonl"))]
  assert len(samples) == 2 and all(s["prompt"].endswith("<|assistant|>") for s in samples)


def test_sft_from_a_base_without_markers_grows_its_vocabulary_and_learns(sft_run):
  workdir, stdout = sft_run
  evals = _evals(workdir)
  assert [r["step"] for r in evals] == [0, 30]
  assert evals[-1]["eval/loss"] < evals[0]["eval/loss"] - 0.1
  assert "vocabulary 69 + 4 chat markers" in stdout


def test_sft_checkpoint_records_its_parent_and_the_grown_tokenizer(sft_run, base_run):
  workdir, _ = sft_run
  meta = ckpt_lib.read_metadata(workdir)
  assert meta["stage"] == "sft"
  assert meta["parent"]["path"] == os.path.join(base_run, "checkpoints", "40")
  assert meta["parent"]["stage"] == "pretrain"
  tok = Tokenizer.from_bytes(ckpt_lib.read_tokenizer(workdir))
  parent_tok = Tokenizer.from_bytes(ckpt_lib.read_tokenizer(base_run))
  assert tok.vocab_size == parent_tok.vocab_size + 4 == meta["model_config"]["vocab_size"]
  assert [tok.encode(m) for m in CHAT_MARKERS] == [[parent_tok.vocab_size + i]
                                                   for i in range(4)]


def test_init_from_keeps_every_pretrained_parameter(base_run, tmp_path):
  """The SFT run's initial parameters equal the parent's; new vocabulary rows are appended."""
  from train.parent import child_model_config, load_parent
  from configs.sft.chat import get_config
  parent_cfg, parent_tok, _ = load_parent(base_run)
  config = get_config("runlocal=true")
  with config.unlocked():
    config.init_from = base_run
  tokenizer = parent_tok.with_pieces(CHAT_MARKERS)
  model_cfg = child_model_config(parent_cfg, config.model, tokenizer.vocab_size)
  adapter = InitAdapter(parent_cfg, lambda p: layout.extend_vocab(p, model_cfg.vocab_size))
  trainer = Trainer(config, str(tmp_path), model_cfg, lm_loss, init_adapter=adapter,
                    devices=jax.devices()[:2])
  state, _ = trainer.restore_or_init()
  trainer.close()
  parent_trainer = Trainer(config, str(tmp_path / "p"), parent_cfg, lm_loss,
                           devices=jax.devices()[:2])
  parent, _, _ = ckpt_lib.load_params(base_run, parent_trainer.abstract_state.params)
  parent_trainer.close()
  got, want = jax.device_get(state.params), jax.device_get(parent)
  v = parent_cfg.vocab_size
  np.testing.assert_array_equal(got["embedding"][:v], want["embedding"][:v])
  np.testing.assert_array_equal(got["lm_head"][:, :v], want["lm_head"][:, :v])
  assert got["embedding"].shape[0] == v + 4
  new_rows = got["embedding"][v:]
  assert np.abs(new_rows - want["embedding"].mean(0)).max() < 0.05 * want["embedding"].std()
  assert len({row.tobytes() for row in new_rows}) == 4  # distinct markers
  rest = {k: x for k, x in got.items() if k not in ("embedding", "lm_head")}
  jax.tree.map(np.testing.assert_array_equal, rest,
               {k: x for k, x in want.items() if k not in ("embedding", "lm_head")})
  assert trainer.parent["stage"] == "pretrain"


def test_response_only_loss_on_a_two_turn_conversation_matches_a_hand_computation(tmp_path,
                                                                                 tiny_model):
  text = tmp_path / "t.txt"
  text.write_text("hello there, how are you? fine thanks. what is two plus two? four.\n" * 20)
  train_tokenizer([str(text)], str(tmp_path / "tok.model"), vocab_size=0, model_type="char",
                  user_defined_symbols=list(CHAT_MARKERS))
  template = ChatTemplate(Tokenizer.from_file(str(tmp_path / "tok.model")))
  conv = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "fine"},
          {"role": "user", "content": "two plus two?"},
          {"role": "assistant", "content": "four."}]
  rows, _ = build_rows([conv], template, seq_len=64, packing="pad")
  batch = {k: np.asarray(v) for k, v in rows.materializer()(np.array([0])).items()}
  model, _ = tiny_model
  loss, aux = lm_loss(model, {k: jnp.asarray(v) for k, v in batch.items()}, None)
  # By hand: the ids of the conversation, and the positions whose TARGET is an assistant
  # content token or the <|end|> closing an assistant turn.
  tok = template.tokenizer
  ids, counted = [], []
  for m in conv:
    marker = tok.encode({"user": "<|user|>", "assistant": "<|assistant|>"}[m["role"]])
    body = tok.encode(m["content"]) + tok.encode("<|end|>")
    ids += marker
    counted += [False] * len(marker)
    ids += body
    counted += [m["role"] == "assistant"] * len(body)
  logits = np.asarray(model(jnp.asarray([ids[:-1]])))[0]
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                                                                           keepdims=True)) \
      - logits.max(-1, keepdims=True)
  nll = -logp[np.arange(len(ids) - 1), ids[1:]]
  mask = np.array(counted[1:])
  assert mask.sum() == len(tok.encode("fine")) + len(tok.encode("four.")) + 2
  assert float(aux["weight"]) == mask.sum()
  assert float(loss) == pytest.approx(nll[mask].mean(), rel=1e-5)


@pytest.mark.cli
def test_sft_refuses_a_missing_init_from_and_an_architecture_override(base_run, tmp_path):
  out = run_cmd(sft_cmd(str(tmp_path / "a"), ""))
  assert out.returncode != 0 and "starts from a checkpoint: set --config.init_from" in out.stdout
  out = run_cmd(sft_cmd(str(tmp_path / "b"), base_run, "--config.model.num_layers=8"))
  assert out.returncode != 0 and "num_layers" in out.stdout
  out = run_cmd(sft_cmd(str(tmp_path / "c"), str(tmp_path / "nowhere")))
  assert out.returncode != 0 and "nowhere" in out.stdout
