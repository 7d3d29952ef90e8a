"""Tests for data/documents.py: a data config -> (train, val) documents for every source kind."""

import importlib.util
import json
import os

import pytest

from conftest import REPO_ROOT
from data import documents, readers, tfds_readers
from data.config import default_data_config

SHAKESPEARE = "pretrain/tinyshakespeare.txt"


def _write_jsonl(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
  return str(path)


def test_lm_data_dir_is_used_by_load_split_documents(tmp_path, monkeypatch):
  (tmp_path / "pretrain").mkdir()
  (tmp_path / "pretrain" / "mine.txt").write_text("abcdefghij")
  monkeypatch.setenv(readers.LM_DATA_DIR_ENV, str(tmp_path))
  cfg = default_data_config()
  cfg.path = "pretrain/mine.txt"
  assert documents.load_split_documents(cfg) == (["abcdefghi"], ["j"])


def test_text_split_matches_nanogpt(monkeypatch):
  monkeypatch.delenv(readers.LM_DATA_DIR_ENV, raising=False)
  with open(readers.resolve_data_path(SHAKESPEARE), encoding="utf-8") as f:
    data = f.read()
  n = len(data)
  train, val = documents.load_split_documents(default_data_config())
  # nanoGPT data/shakespeare_char/prepare.py: data[:int(n*0.9)], data[int(n*0.9):].
  assert train == [data[:int(n * 0.9)]]
  assert val == [data[int(n * 0.9):]]


def test_jsonl_split_by_records(tmp_path):
  path = _write_jsonl(tmp_path / "d.jsonl", [{"t": str(i)} for i in range(10)])
  cfg = default_data_config()
  cfg.update(source="jsonl", path=path, field="t", val_fraction=0.2)
  train, val = documents.load_split_documents(cfg)
  assert train == [str(i) for i in range(8)] and val == ["8", "9"]


def test_fallback_error_names_both_options(tmp_path):
  cfg = default_data_config()
  cfg.path = str(tmp_path / "no_such_file.txt")
  cfg.fallback_tfds = "no_such_tfds_dataset_xyz"
  cfg.tfds_data_dir = str(tmp_path / "tfds")
  with pytest.raises(FileNotFoundError) as info:
    documents.load_split_documents(cfg)
  message = str(info.value)
  for expected in ("no_such_file.txt", "LM_DATA_DIR", "--config.data.path",
                   "no_such_tfds_dataset_xyz", "internet"):
    assert expected in message
  assert info.value.__cause__ is not None
  assert type(info.value.__cause__).__name__ in message  # The TFDS error itself.


def test_missing_file_without_fallback_and_bad_config(tmp_path):
  cfg = default_data_config()
  cfg.update(path=str(tmp_path / "gone.txt"), fallback_tfds="")
  with pytest.raises(FileNotFoundError, match="gone.txt"):
    documents.load_split_documents(cfg)
  cfg.source = "parquet"
  with pytest.raises(ValueError, match="parquet"):
    documents.load_split_documents(cfg)
  cfg.update(source="text", path=SHAKESPEARE, val_fraction=1.0)
  with pytest.raises(ValueError, match="val_fraction"):
    documents.load_split_documents(cfg)


def _record_tfds(monkeypatch):
  """Replaces TFDS with a recorder: every dataset has one document per split."""
  tried = []

  def read_tfds(name, split, field, data_dir=None):
    tried.append((name, split, field))
    return iter([f"{name} {split}"])

  monkeypatch.setattr(tfds_readers, "read_tfds", read_tfds)
  return tried


def test_a_missing_file_fails_at_once_without_trying_tfds(tmp_path, monkeypatch):
  # Failure 5: the default config used to try a TFDS download of tiny_shakespeare here,
  # which offline takes minutes to fail and leaves partial files.
  tried = _record_tfds(monkeypatch)
  assert default_data_config().fallback_tfds == ""
  for source, name in (("text", "gone.txt"), ("jsonl", "gone.jsonl")):
    cfg = default_data_config()
    cfg.update(source=source, path=str(tmp_path / name))
    with pytest.raises(FileNotFoundError, match=rf"^data\.path: no file \S*{name} ") as info:
      documents.load_split_documents(cfg)
    assert "--config.data.fallback_tfds" in str(info.value)
  assert not tried


def test_the_tfds_fallback_is_tried_only_when_asked_for(tmp_path, monkeypatch):
  tried = _record_tfds(monkeypatch)
  cfg = default_data_config()
  cfg.update(path=str(tmp_path / "gone.txt"), fallback_tfds="tiny_shakespeare")
  assert documents.load_split_documents(cfg) == (["tiny_shakespeare train"],
                                                 ["tiny_shakespeare validation"])
  assert tried == [("tiny_shakespeare", "train", "text"),
                   ("tiny_shakespeare", "validation", "text")]
  cfg.path = SHAKESPEARE  # the file exists: the fallback is not used
  tried.clear()
  documents.load_split_documents(cfg)
  assert not tried


@pytest.mark.parametrize("name, tfds_name", [("gpt_125m", "lm1b"), ("llama_1b", "c4/en"),
                                             ("llama3_8b", "c4/en")])
def test_tfds_pretraining_configs_ask_for_tfds_explicitly(monkeypatch, name, tfds_name):
  path = os.path.join(REPO_ROOT, "configs", "pretrain", f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"cfg_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  tried = _record_tfds(monkeypatch)
  data_cfg = module.get_config().data
  assert data_cfg.source == "tfds" and data_cfg.tfds_name == tfds_name
  train, _ = documents.load_split_documents(data_cfg)
  assert train == [f"{tfds_name} train"] and tried[0] == (tfds_name, "train", "text")


def test_every_source_kind_has_a_loader():
  assert set(documents.SOURCE_KINDS) == {"text", "jsonl", "tfds", "corpus", "curated"}
  cfg = default_data_config()
  cfg.source = "curated"
  with pytest.raises(ValueError, match="already tokenized"):
    documents.load_split_documents(cfg)
