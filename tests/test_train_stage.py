"""train/stage.py: the startup line that names the attention kernel a run executes."""

from types import SimpleNamespace

from model.config import ModelConfig
from train.stage import attention_line


def _run(impl: str, seq_len: int, dtype: str = "float32"):
  cfg = ModelConfig.preset("tiny", attention_impl=impl, dtype=dtype)
  return SimpleNamespace(trainers=[SimpleNamespace(model_cfg=cfg)], seq_len=seq_len)


def test_attention_line_names_the_kernel_and_any_fallback_on_this_cpu():
  assert attention_line(_run("xla", 64)) == "attention: xla"
  assert attention_line(_run("cudnn", 64, "bfloat16")) == (
      "attention: cudnn (fallback to xla: backend is cpu, cuDNN needs a GPU)")
  assert attention_line(_run("splash", 4096)) == (
      "attention: splash (fallback to chunked: backend is cpu, splash attention is a TPU "
      "(Mosaic) kernel)")
  assert attention_line(_run("auto", 4096)) == "attention: auto (selects chunked on cpu)"
  assert attention_line(_run("auto", 256)) == "attention: auto (selects xla on cpu)"
