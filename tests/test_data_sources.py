"""Tests for data/sources.py: readers, their errors, path resolution and splits."""

import gzip
import json
import os

import pytest

from data import sources
from data.config import default_data_config

SHAKESPEARE = "pretrain/tinyshakespeare.txt"


def _write_jsonl(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
  return str(path)


def test_read_text_file_whole_and_split(tmp_path):
  path = tmp_path / "a.txt"
  path.write_text("one\n\ntwo\n\n\n\nthree", encoding="utf-8")
  assert list(sources.read_text_file(str(path))) == ["one\n\ntwo\n\n\n\nthree"]
  assert list(sources.read_text_file(str(path), split_on="\n\n")) == ["one", "two", "three"]


def test_missing_and_empty_files_name_the_path(tmp_path):
  missing = str(tmp_path / "missing.txt")
  with pytest.raises(FileNotFoundError, match="missing.txt"):
    sources.read_text_file(missing)
  with pytest.raises(FileNotFoundError, match="missing.txt"):
    sources.read_jsonl(missing, "text")
  empty = tmp_path / "empty.jsonl"
  empty.write_text("")
  with pytest.raises(ValueError, match="empty.jsonl"):
    sources.read_text_file(str(empty))
  with pytest.raises(ValueError, match="empty.jsonl"):
    sources.read_jsonl(str(empty), "text")
  blank = tmp_path / "blank.jsonl"
  blank.write_text("\n\n")
  with pytest.raises(ValueError, match="No records in .*blank.jsonl"):
    list(sources.read_jsonl(str(blank), "text"))
  separators = tmp_path / "seps.txt"
  separators.write_text("||||")
  with pytest.raises(ValueError, match="seps.txt"):
    sources.read_text_file(str(separators), split_on="||")


def test_read_jsonl_plain_and_gzip(tmp_path):
  records = [{"text": f"doc {i}", "id": i} for i in range(3)]
  plain = _write_jsonl(tmp_path / "a.jsonl", records)
  gz = str(tmp_path / "a.jsonl.gz")
  with gzip.open(gz, "wt", encoding="utf-8") as f:
    f.write("".join(json.dumps(r) + "\n" for r in records))
  assert list(sources.read_jsonl(plain, "text")) == ["doc 0", "doc 1", "doc 2"]
  assert list(sources.read_jsonl(gz, "text")) == ["doc 0", "doc 1", "doc 2"]


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_text('{"text": "ok"}\n\n{"text": "broken"\n{"text": "ok"}\n')
  with pytest.raises(ValueError, match=r"bad\.jsonl:3: malformed JSON"):
    list(sources.read_jsonl(str(path), "text"))


def test_missing_field_names_file_line_and_field(tmp_path):
  path = _write_jsonl(tmp_path / "f.jsonl", [{"text": "a"}, {"body": "b"}])
  with pytest.raises(ValueError, match=r"f\.jsonl:2: record has no field 'text'"):
    list(sources.read_jsonl(path, "text"))
  wrong_type = _write_jsonl(tmp_path / "g.jsonl", [{"text": 5}])
  with pytest.raises(ValueError, match=r"g\.jsonl:1: field 'text' is int"):
    list(sources.read_jsonl(wrong_type, "text"))


def test_resolve_data_path(tmp_path, monkeypatch):
  monkeypatch.delenv(sources.LM_DATA_DIR_ENV, raising=False)
  default = sources.resolve_data_path(SHAKESPEARE)
  repo_root = os.path.dirname(os.path.dirname(os.path.abspath(sources.__file__)))
  assert default == os.path.join(os.path.dirname(repo_root), "shared", "data", SHAKESPEARE)
  assert os.path.isfile(default)
  monkeypatch.setenv(sources.LM_DATA_DIR_ENV, str(tmp_path))
  assert sources.resolve_data_path("x/y.txt") == str(tmp_path / "x" / "y.txt")
  assert sources.resolve_data_path("/abs/file.txt") == "/abs/file.txt"


def test_lm_data_dir_is_used_by_load_split_documents(tmp_path, monkeypatch):
  (tmp_path / "pretrain").mkdir()
  (tmp_path / "pretrain" / "mine.txt").write_text("abcdefghij")
  monkeypatch.setenv(sources.LM_DATA_DIR_ENV, str(tmp_path))
  cfg = default_data_config()
  cfg.path = "pretrain/mine.txt"
  assert sources.load_split_documents(cfg) == (["abcdefghi"], ["j"])


def test_text_split_matches_nanogpt(monkeypatch):
  monkeypatch.delenv(sources.LM_DATA_DIR_ENV, raising=False)
  with open(sources.resolve_data_path(SHAKESPEARE), encoding="utf-8") as f:
    data = f.read()
  n = len(data)
  train, val = sources.load_split_documents(default_data_config())
  # nanoGPT data/shakespeare_char/prepare.py: data[:int(n*0.9)], data[int(n*0.9):].
  assert train == [data[:int(n * 0.9)]]
  assert val == [data[int(n * 0.9):]]


def test_jsonl_split_by_records(tmp_path):
  path = _write_jsonl(tmp_path / "d.jsonl", [{"t": str(i)} for i in range(10)])
  cfg = default_data_config()
  cfg.update(source="jsonl", path=path, field="t", val_fraction=0.2)
  train, val = sources.load_split_documents(cfg)
  assert train == [str(i) for i in range(8)] and val == ["8", "9"]


def test_fallback_error_names_both_options(tmp_path):
  cfg = default_data_config()
  cfg.path = str(tmp_path / "no_such_file.txt")
  cfg.fallback_tfds = "no_such_tfds_dataset_xyz"
  cfg.tfds_data_dir = str(tmp_path / "tfds")
  with pytest.raises(FileNotFoundError) as info:
    sources.load_split_documents(cfg)
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
    sources.load_split_documents(cfg)
  cfg.source = "parquet"
  with pytest.raises(ValueError, match="parquet"):
    sources.load_split_documents(cfg)
  cfg.update(source="text", path=SHAKESPEARE, val_fraction=1.0)
  with pytest.raises(ValueError, match="val_fraction"):
    sources.load_split_documents(cfg)
