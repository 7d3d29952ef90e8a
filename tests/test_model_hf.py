"""Tests for model/hf.py, data/hf_tokenizer.py and train/hf_convert.py (Llama layout; the other
families and the streaming reader are tests/test_model_hf_families.py): logits parity with transformers' LlamaForCausalLM both ways (float32,
max abs diff <= 1e-4) for GQA / MHA, tied / untied embeddings, fused and scanned layouts; the
exported tokenizer encodes real text exactly as ours; a checkpoint exports and re-imports.

Needs the `hf` extra (torch 2.13.0 CPU, transformers), which the CI installs."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

import torch
import transformers

from model import hf
from model.config import ModelConfig
from model.hf_config import hf_config, model_config_from_hf
from model.transformer import Transformer

CASES = {
    "gqa_untied": dict(num_heads=4, num_kv_heads=2),
    "gqa_tied": dict(num_heads=4, num_kv_heads=1, tie_embeddings=True),
    "mha_fused_scanned": dict(num_heads=4, num_kv_heads=4, fuse_projections=True,
                              scan_layers=True),
}


def _cfg(**overrides):
  return ModelConfig(vocab_size=97, embed_dim=64, num_layers=2, mlp_dim=96, max_seq_len=64,
                     rope_theta=500.0, norm_eps=1e-5, init_std=0.1, **overrides)


def _ours(cfg, seed=0):
  model = Transformer(cfg, nnx.Rngs(params=seed))
  graphdef, state = nnx.split(model)
  return graphdef, nnx.to_pure_dict(state)


def _logits(graphdef, params, tokens):
  return np.asarray(jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))(params, tokens))


def _hf_model(cfg, state_dict):
  config = transformers.LlamaConfig(**{k: v for k, v in hf_config(cfg).items()
                                       if k not in ("architectures", "model_type",
                                                    "torch_dtype")})
  model = transformers.LlamaForCausalLM(config).eval()
  missing, unexpected = model.load_state_dict(
      {k: torch.from_numpy(np.asarray(v)) for k, v in state_dict.items()}, strict=False)
  assert not unexpected and all("lm_head" in m for m in missing) == cfg.tie_embeddings \
      or not missing, (missing, unexpected)
  if cfg.tie_embeddings:
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
  return model


def _tokens(seed=1):
  return np.random.default_rng(seed).integers(0, 97, (2, 24)).astype(np.int32)


@pytest.mark.parametrize("case", sorted(CASES))
def test_ours_to_hf_logits_match(case):
  cfg = _cfg(**CASES[case])
  graphdef, params = _ours(cfg)
  tokens = _tokens()
  model = _hf_model(cfg, hf.to_hf_state_dict(params, cfg))
  with torch.no_grad():
    theirs = model(torch.from_numpy(tokens).long()).logits.numpy()
  ours = _logits(graphdef, params, tokens)
  assert np.abs(ours).max() > 0.1  # not a degenerate comparison
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", sorted(CASES))
def test_hf_to_ours_logits_match(case):
  cfg = _cfg(**CASES[case])
  config = transformers.LlamaConfig(**{k: v for k, v in hf_config(cfg).items()
                                       if k not in ("architectures", "model_type",
                                                    "torch_dtype")})
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(config).eval()
  for p in model.parameters():  # norms start at 1: randomise them too
    torch.nn.init.normal_(p, std=0.1) if p.ndim == 1 else None
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  assert model_config_from_hf(config.to_dict()) == cfg.replace(
      fuse_projections=False, scan_layers=False)
  params = hf.from_hf_state_dict(state, cfg)
  graphdef, abstract = _ours(cfg)
  assert jax.tree.map(np.shape, params) == jax.tree.map(np.shape, abstract)
  tokens = _tokens(2)
  with torch.no_grad():
    theirs = model(torch.from_numpy(tokens).long()).logits.numpy()
  np.testing.assert_allclose(_logits(graphdef, params, tokens), theirs, atol=1e-4, rtol=0)


def test_round_trip_is_exact():
  cfg = _cfg(**CASES["mha_fused_scanned"])
  _, params = _ours(cfg)
  back = hf.from_hf_state_dict(hf.to_hf_state_dict(params, cfg), cfg)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), params, back)


def test_bad_hf_inputs_are_named():
  cfg = _cfg(num_heads=4, num_kv_heads=2)
  _, params = _ours(cfg)
  state = hf.to_hf_state_dict(params, cfg)
  del state["model.layers.1.mlp.up_proj.weight"]
  with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj.weight"):
    hf.from_hf_state_dict(state, cfg)
  state = hf.to_hf_state_dict(params, cfg)
  state["model.layers.0.self_attn.q_proj.bias"] = np.zeros(64, np.float32)
  with pytest.raises(ValueError, match="q_proj.bias"):
    hf.from_hf_state_dict(state, cfg)
  with pytest.raises(ValueError, match="model_type='gpt2'"):
    model_config_from_hf({"model_type": "gpt2"})
  with pytest.raises(ValueError, match="rope_scaling.rope_type='linear'"):
    config = hf_config(cfg)
    del config["rope_parameters"]
    model_config_from_hf({**config, "rope_scaling": {"type": "linear"}})


def test_exported_tokenizer_encodes_like_ours(tmp_path):
  from data import readers
  from data.chat import CHAT_MARKERS
  from data.tokenizer import Tokenizer, train_tokenizer
  text = readers.resolve_data_path("pretrain/tinyshakespeare.txt")
  path = train_tokenizer([text], str(tmp_path / "t.model"), vocab_size=600)
  ours = Tokenizer.from_file(path).with_pieces(CHAT_MARKERS)
  from data.hf_tokenizer import hf_tokenizer
  theirs = hf_tokenizer(ours)
  theirs.save_pretrained(tmp_path / "hf")
  theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
  with open(text) as f:
    shakespeare = f.read()
  samples = [shakespeare[i:i + 700] for i in range(0, 200_000, 9_973)]
  samples += ["  two  spaces\n\nand newlines  ", "<|user|>Hi there<|end|>\n<|assistant|>",
              "ZZZ unseen \u00e9\u4e2d chars", " leading space", ""]
  for s in samples:
    assert theirs.encode(s, add_special_tokens=False) == ours.encode(s), repr(s)
    if ours.unk_id not in ours.encode(s):  # SentencePiece renders unk as " ⁇ "
      assert theirs.decode(ours.encode(s)) == ours.decode(ours.encode(s)), repr(s)
  assert theirs.eos_token_id == ours.eos_id and theirs.pad_token_id == ours.pad_id


def test_checkpoint_exports_and_imports(english_sft_run, tmp_path):
  from eval.loading import load_checkpoint
  sft = english_sft_run[0]
  out = str(tmp_path / "hf")
  from train.hf_export import export_checkpoint
  from train.hf_import import import_hf
  export_checkpoint(sft, out)
  for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer.model"):
    assert os.path.exists(os.path.join(out, name)), name
  loaded = load_checkpoint(sft)
  model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  tok = transformers.AutoTokenizer.from_pretrained(out)
  text = "<|user|>What is the capital of France?<|end|>\n<|assistant|>"
  ids = loaded.tokenizer.encode(text)
  assert tok.encode(text, add_special_tokens=False) == ids
  tokens = np.asarray([ids], np.int32)
  with torch.no_grad():
    theirs = model(torch.from_numpy(tokens).long()).logits.numpy()
  np.testing.assert_allclose(_logits(loaded.graphdef, loaded.params, tokens), theirs,
                             atol=1e-4, rtol=0)
  # Import writes a checkpoint of the shared format with the same function and tokenizer.
  step_dir = import_hf(out, str(tmp_path / "imported"))
  back = load_checkpoint(step_dir)
  assert back.tokenizer.fingerprint == loaded.tokenizer.fingerprint
  assert back.meta["stage"] == "hf_import"
  np.testing.assert_allclose(_logits(back.graphdef, back.params, tokens), theirs, atol=1e-4,
                             rtol=0)
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f)["num_hidden_layers"] == loaded.model_cfg.num_layers
  # The imported checkpoint starts a stage like any other (init_from).
  from conftest import run_cmd, sft_cmd
  run = run_cmd(sft_cmd(str(tmp_path / "sft_from_hf"), step_dir, "--config.train.num_steps=2",
                        "--config.train.eval_every=2", "--config.sample_every=0"))
  assert run.returncode == 0, run.stdout[-3000:]
  from train import checkpoint as ckpt_lib
  meta = ckpt_lib.read_metadata(str(tmp_path / "sft_from_hf"))
  assert meta["step"] == 2 and meta["parent"]["stage"] == "hf_import"


def test_cli_refuses_what_cannot_convert(english_rm_run, tmp_path):
  import sys
  from conftest import run_cmd
  rm = english_rm_run[0]
  out = run_cmd([sys.executable, "-m", "train.hf_convert", "export", f"--checkpoint={rm}",
                 f"--out={tmp_path / 'x'}"])
  assert out.returncode != 0 and "only language models" in out.stdout, out.stdout[-2000:]
  cfg = _cfg(num_heads=4, num_kv_heads=2)
  (tmp_path / "llama3").mkdir()
  with open(tmp_path / "llama3" / "config.json", "w") as f:
    json.dump(hf_config(cfg), f)
  out = run_cmd([sys.executable, "-m", "train.hf_convert", "import",
                 f"--hf_dir={tmp_path / 'llama3'}", f"--workdir={tmp_path / 'y'}"])
  assert out.returncode == 2 and "no tokenizer file" in out.stdout, \
      out.stdout[-2000:]
