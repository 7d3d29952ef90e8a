"""Llama 3 / Qwen2 / Qwen3 / Mistral through the Hugging Face path (model/hf.py,
model/hf_config.py, train/hf_import.py, train/hf_export.py).

Each family's tiny random model is built locally with transformers' config class and
`save_pretrained` (sharded and bf16 in some cases), imported by the streaming reader onto a
fsdp=2 x tensor=2 mesh in the plain, fused and scanned layouts; its float32 logits must equal
transformers' (max abs diff <= 1e-4), and exporting the imported params must give back every
safetensors tensor bit for bit and a directory AutoModelForCausalLM loads with the same
logits. Bad directories fail with one line naming the file and the field.
"""

import json
import os

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

from model import sharding as msharding
from model.config import ModelConfig
from model.hf_config import model_config_from_hf
from model.transformer import Transformer
from train.hf_export import write_hf_model
from train.hf_import import HFWeights, load_hf_params, read_hf_config
from train.state import abstract_model, mesh_shardings, with_shardings

V, T = 96, 24
COMMON = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
              max_position_embeddings=64)
FAMILIES = {
    # Llama 3.1: orig 16 puts the 8 frequencies of head_dim 16 in all three llama3 regimes.
    "llama3": (transformers.LlamaConfig, dict(rope_parameters=dict(
        rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
        high_freq_factor=4.0, original_max_position_embeddings=16))),
    "qwen2": (transformers.Qwen2Config, dict(tie_word_embeddings=True,
                                             rope_parameters=dict(rope_theta=1e6))),
    "qwen3": (transformers.Qwen3Config, dict(head_dim=24, tie_word_embeddings=False)),
    "mistral": (transformers.MistralConfig, dict(sliding_window=64,
                                                 max_position_embeddings=128)),
}
LAYOUTS = {"plain": {}, "fused": dict(fuse_projections=True),
           "scanned": dict(scan_layers=True), "fused_scanned": dict(fuse_projections=True,
                                                                    scan_layers=True)}


def make_hf_dir(path, family, dtype=torch.float32, shard=False, seed=0):
  """A tiny random model of `family` saved with save_pretrained; norms and biases random."""
  config_cls, extra = FAMILIES[family]
  config = config_cls(**{**COMMON, **extra})
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1:  # norms start at 1 and biases at 0: randomise them too
        p.copy_(1 + 0.3 * torch.randn_like(p) if "norm" in name else 0.3 * torch.randn_like(p))
  model.to(dtype).save_pretrained(path, max_shard_size="60KB" if shard else "1GB")
  return str(path)


def hf_logits(path, tokens):
  model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
  with torch.no_grad():
    return model(torch.from_numpy(tokens).long()).logits.numpy()


def mesh():
  return msharding.make_mesh({"data": 1, "fsdp": 2, "tensor": 2}, jax.devices()[:4])


def import_and_run(path, layout, tokens):
  """Our float32 logits of the directory read by the streaming reader, and the params."""
  cfg = read_hf_config(path).replace(**layout)
  params, logits = _stream_and_run(path, cfg, tokens)
  return cfg, params, logits


def import_and_run_cfg(path, cfg, tokens):
  """Our logits of the directory read as `cfg` (e.g. another attention kernel)."""
  return _stream_and_run(path, cfg, tokens)[1]


def _stream_and_run(path, cfg, tokens):
  graphdef, abstract, logical = abstract_model(Transformer, cfg)
  m = mesh()
  params = load_hf_params(path, cfg, with_shardings(
      abstract, mesh_shardings(logical, m, msharding.DEFAULT_RULES)))
  leaf = jax.tree.leaves(params)[0]
  assert len(leaf.sharding.device_set) == 4  # really on the mesh
  with jax.set_mesh(m):
    logits = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))(params, tokens)
  return params, np.asarray(logits)


def tokens(seed=1):
  return np.random.default_rng(seed).integers(0, V, (2, T)).astype(np.int32)


def safetensors_of(path):
  if os.path.exists(os.path.join(path, "model.safetensors")):
    return load_file(os.path.join(path, "model.safetensors"))
  out = {}
  for name in sorted(os.listdir(path)):
    if name.endswith(".safetensors"):
      out.update(load_file(os.path.join(path, name)))
  return out


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_import_logits_match_and_export_round_trips(family, layout, tmp_path):
  path = make_hf_dir(tmp_path / "hf", family, shard=layout == "scanned")
  x = tokens()
  theirs = hf_logits(path, x)
  cfg, params, ours = import_and_run(path, LAYOUTS[layout], x)
  assert cfg.family == ("llama" if family == "llama3" else family)
  assert np.abs(theirs).max() > 0.1  # not a degenerate comparison
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
  out = str(tmp_path / "export")
  write_hf_model(cfg, jax.device_get(params), out, {"eos_token_id": [1, 2]})
  original, exported = safetensors_of(path), safetensors_of(out)
  if cfg.tie_embeddings:
    original.pop("lm_head.weight", None)
  assert sorted(exported) == sorted(original)
  for name, a in original.items():
    assert exported[name].dtype == a.dtype and np.array_equal(exported[name], a), name
  np.testing.assert_allclose(hf_logits(out, x), theirs, atol=1e-5, rtol=0)
  with open(os.path.join(out, "config.json")) as f:
    config = json.load(f)
  assert model_config_from_hf(config) == cfg.replace(fuse_projections=False, scan_layers=False)
  with open(os.path.join(out, "generation_config.json")) as f:
    assert json.load(f)["eos_token_id"] == [1, 2]


def test_family_switches_are_read(tmp_path):
  cfgs = {f: read_hf_config(make_hf_dir(tmp_path / f, f)) for f in FAMILIES}
  assert cfgs["llama3"].rope_scaling_type == "llama3"
  assert cfgs["llama3"].rope_scaling_original_max_len == 16
  assert cfgs["qwen2"].qkv_bias and cfgs["qwen2"].tie_embeddings
  assert cfgs["qwen3"].qk_norm and cfgs["qwen3"].resolved_head_dim == 24
  assert not cfgs["qwen3"].qkv_bias
  assert cfgs["mistral"].sliding_window == 64 and cfgs["mistral"].max_seq_len == 128


def test_llama3_rope_frequencies_match_transformers():
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
  from model.layers import rope_tables
  config = transformers.LlamaConfig(**{**COMMON, **FAMILIES["llama3"][1]})
  inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
  cfg = model_config_from_hf(config.to_dict())
  positions = np.arange(8)[None]
  cos, _ = rope_tables(positions, 16, cfg.rope_theta, cfg)
  expected = np.cos(positions[..., None] * inv_freq.numpy())
  np.testing.assert_allclose(np.asarray(cos), expected, atol=1e-6)
  plain, _ = rope_tables(positions, 16, cfg.rope_theta)
  assert np.abs(np.asarray(plain) - expected).max() > 1e-2  # the scaling changed something


def test_bf16_weights_stream_and_export_as_bf16(tmp_path):
  path = make_hf_dir(tmp_path / "hf", "qwen2", dtype=torch.bfloat16, shard=True)
  assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))
  x = tokens(3)
  cfg, params, ours = import_and_run(path, {"param_dtype": "bfloat16"}, x)
  assert {str(a.dtype) for a in jax.tree.leaves(params)} == {"bfloat16"}
  out = str(tmp_path / "export")
  write_hf_model(cfg, jax.device_get(params), out)
  original, exported = safetensors_of(path), safetensors_of(out)
  original.pop("lm_head.weight", None)
  for name, a in original.items():
    assert exported[name].dtype == a.dtype and np.array_equal(exported[name], a), name
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f)["dtype"] == "bfloat16"
  # Float32 compute over the bf16 values equals transformers' float32 model of them.
  cfg32, _, ours32 = import_and_run(path, {}, x)
  np.testing.assert_allclose(ours32, hf_logits(path, x), atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------ bad input
def _edit_config(path, **changes):
  with open(os.path.join(path, "config.json")) as f:
    config = json.load(f)
  config.update(changes)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config, f)


def _import(path):
  cfg = read_hf_config(path)
  _, abstract, logical = abstract_model(Transformer, cfg)
  return load_hf_params(path, cfg, with_shardings(
      abstract, mesh_shardings(logical, mesh(), msharding.DEFAULT_RULES)))


@pytest.mark.parametrize("changes,match", [
    (dict(model_type="gemma"), r"config.json: model_type='gemma' is not supported"),
    (dict(hidden_act="gelu"), r"config.json: hidden_act='gelu' is not supported"),
    (dict(rope_parameters=dict(rope_type="yarn", rope_theta=1e4, factor=4.0)),
     r"config.json: rope_parameters.rope_type='yarn' is not supported"),
    (dict(use_sliding_window=True), r"config.json: use_sliding_window=True is not supported"),
    (dict(num_hidden_layers=None), r"config.json: num_hidden_layers is missing"),
])
def test_unsupported_config_values_are_named(tmp_path, changes, match):
  path = make_hf_dir(tmp_path / "hf", "qwen2")
  _edit_config(path, **changes)
  with pytest.raises(ValueError, match=match) as e:
    read_hf_config(path)
  assert "\n" not in str(e.value)


def test_weights_that_disagree_with_config_are_named(tmp_path):
  path = make_hf_dir(tmp_path / "hf", "llama3")
  file = os.path.join(path, "model.safetensors")
  _edit_config(path, intermediate_size=80)
  with pytest.raises(ValueError, match=r"model.safetensors: tensor 'model.layers.0.mlp."
                     r"gate_proj.weight' has shape \(96, 64\), expected \(80, 64\)"):
    _import(path)
  _edit_config(path, intermediate_size=96)
  state = load_file(file)
  missing = state.pop("model.layers.1.self_attn.k_proj.weight")
  save_file(state, file)
  with pytest.raises(ValueError, match=r"model.safetensors: tensor 'model.layers.1.self_attn."
                     r"k_proj.weight' is missing"):
    _import(path)
  state["model.layers.1.self_attn.k_proj.weight"] = missing
  state["model.layers.0.self_attn.q_proj.bias"] = np.zeros(64, np.float32)
  save_file(state, file)
  with pytest.raises(ValueError, match=r"model.safetensors: unexpected tensor "
                     r"'model.layers.0.self_attn.q_proj.bias'"):
    _import(path)


def test_missing_files_are_named(tmp_path):
  path = make_hf_dir(tmp_path / "hf", "qwen3", shard=True)
  index = os.path.join(path, "model.safetensors.index.json")
  with open(index) as f:
    shard = sorted(set(json.load(f)["weight_map"].values()))[0]
  os.remove(os.path.join(path, shard))
  with pytest.raises(ValueError, match=f"index.json: weight_map names {shard}, which does not"):
    _import(path)
  os.remove(index)
  with pytest.raises(ValueError, match="neither model.safetensors nor model.safetensors.index"):
    HFWeights(path)
  os.remove(os.path.join(path, "config.json"))
  with pytest.raises(ValueError, match="config.json does not exist"):
    read_hf_config(path)


@pytest.mark.parametrize("impl", ["xla", "chunked"])
def test_mistral_sliding_window_shorter_than_the_sequence_matches(impl, tmp_path):
  """A window of 8 over 24 tokens masks most of each row: logits still equal transformers'
  (whose Mistral mask is kv_idx > q_idx - window), in both CPU kernels."""
  config_cls, extra = FAMILIES["mistral"]
  config = config_cls(**{**COMMON, **extra, "sliding_window": 8})
  torch.manual_seed(0)
  transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
  toks = tokens()
  cfg = read_hf_config(str(tmp_path)).replace(attention_impl=impl, attention_block_size=5)
  assert cfg.sliding_window == 8 and cfg.max_seq_len == 128
  full = read_hf_config(str(tmp_path)).replace(sliding_window=0)
  ours = import_and_run_cfg(str(tmp_path), cfg, toks)
  np.testing.assert_allclose(ours, hf_logits(str(tmp_path), toks), atol=1e-4, rtol=0)
  assert np.abs(ours - import_and_run_cfg(str(tmp_path), full, toks)).max() > 1e-2


# ------------------------------------------------------------------- init_from=hf:<dir>
@pytest.mark.cli
def test_stages_start_from_an_hf_directory(tmp_path):
  """SFT and the reward model start from `hf:<dir>` (a tiny Qwen2 with a SentencePiece
  tokenizer) directly: the LM adapter grows the vocabulary, the reward adapter drops the
  output projection, both through the streaming reader."""
  import shutil
  import sys
  from conftest import SHAKESPEARE, reward_cmd, run_cmd, sft_cmd
  from data import readers
  from data.tokenizer import train_tokenizer
  from train import checkpoint as ckpt_lib
  sp = train_tokenizer([readers.resolve_data_path(SHAKESPEARE)], str(tmp_path / "t.model"),
                       vocab_size=600)
  config = transformers.Qwen2Config(**{**COMMON, "vocab_size": 600,
                                       "max_position_embeddings": 512},
                                    tie_word_embeddings=True)
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(config)
  hf_dir = tmp_path / "qwen2"
  model.save_pretrained(hf_dir)
  shutil.copy(sp, hf_dir / "tokenizer.model")
  steps = ("--config.train.num_steps=2", "--config.train.eval_every=2")
  out = run_cmd(sft_cmd(str(tmp_path / "sft"), f"hf:{hf_dir}", *steps,
                        "--config.sample_every=0"))
  assert out.returncode == 0, out.stdout[-3000:]
  meta = ckpt_lib.read_metadata(str(tmp_path / "sft"))
  assert meta["parent"]["stage"] == "hf_import" and meta["parent"]["path"].startswith("hf:")
  assert meta["model_config"]["family"] == "qwen2" and meta["model_config"]["qkv_bias"]
  out = run_cmd(reward_cmd(str(tmp_path / "rm"), f"hf:{hf_dir}", *steps))
  assert out.returncode == 0, out.stdout[-3000:]
  out = run_cmd([sys.executable, "-m", "train.hf_convert", "import",
                 f"--hf_dir={tmp_path / 'missing'}", f"--workdir={tmp_path / 'x'}"])
  assert out.returncode == 2 and "error: " in out.stdout and "config.json does not exist" \
      in out.stdout, out.stdout[-2000:]
