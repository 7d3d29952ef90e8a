"""Tests for data/readers.py: readers, their errors (never a bare UnicodeDecodeError), the
counting mode of the jsonl reader, and data path resolution."""

import gzip
import json
import os

import pytest

from data import benchmarks, corpus, preferences, readers, sft_sources, tokenizer

SHAKESPEARE = "pretrain/tinyshakespeare.txt"


def _write_jsonl(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
  return str(path)


def test_read_text_file_whole_and_split(tmp_path):
  path = tmp_path / "a.txt"
  path.write_text("one\n\ntwo\n\n\n\nthree", encoding="utf-8")
  assert list(readers.read_text_file(str(path))) == ["one\n\ntwo\n\n\n\nthree"]
  assert list(readers.read_text_file(str(path), split_on="\n\n")) == ["one", "two", "three"]


def test_missing_and_empty_files_name_the_path(tmp_path):
  missing = str(tmp_path / "missing.txt")
  with pytest.raises(FileNotFoundError, match="missing.txt"):
    readers.read_text_file(missing)
  with pytest.raises(FileNotFoundError, match="missing.txt"):
    readers.read_jsonl(missing, "text")
  empty = tmp_path / "empty.jsonl"
  empty.write_text("")
  with pytest.raises(ValueError, match="empty.jsonl"):
    readers.read_text_file(str(empty))
  with pytest.raises(ValueError, match="empty.jsonl"):
    readers.read_jsonl(str(empty), "text")
  blank = tmp_path / "blank.jsonl"
  blank.write_text("\n\n")
  with pytest.raises(ValueError, match="No records in .*blank.jsonl"):
    list(readers.read_jsonl(str(blank), "text"))
  separators = tmp_path / "seps.txt"
  separators.write_text("||||")
  with pytest.raises(ValueError, match="seps.txt"):
    readers.read_text_file(str(separators), split_on="||")


def test_read_jsonl_plain_and_gzip(tmp_path):
  records = [{"text": f"doc {i}", "id": i} for i in range(3)]
  plain = _write_jsonl(tmp_path / "a.jsonl", records)
  gz = str(tmp_path / "a.jsonl.gz")
  with gzip.open(gz, "wt", encoding="utf-8") as f:
    f.write("".join(json.dumps(r) + "\n" for r in records))
  assert list(readers.read_jsonl(plain, "text")) == ["doc 0", "doc 1", "doc 2"]
  assert list(readers.read_jsonl(gz, "text")) == ["doc 0", "doc 1", "doc 2"]


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_text('{"text": "ok"}\n\n{"text": "broken"\n{"text": "ok"}\n')
  with pytest.raises(ValueError, match=r"bad\.jsonl:3: malformed JSON"):
    list(readers.read_jsonl(str(path), "text"))


def test_missing_field_names_file_line_and_field(tmp_path):
  path = _write_jsonl(tmp_path / "f.jsonl", [{"text": "a"}, {"body": "b"}])
  with pytest.raises(ValueError, match=r"f\.jsonl:2: record has no field 'text'"):
    list(readers.read_jsonl(path, "text"))
  wrong_type = _write_jsonl(tmp_path / "g.jsonl", [{"text": 5}])
  with pytest.raises(ValueError, match=r"g\.jsonl:1: field 'text' is int"):
    list(readers.read_jsonl(wrong_type, "text"))


def test_resolve_data_path(tmp_path, monkeypatch):
  monkeypatch.delenv(readers.LM_DATA_DIR_ENV, raising=False)
  default = readers.resolve_data_path(SHAKESPEARE)
  repo_root = os.path.dirname(os.path.dirname(os.path.abspath(readers.__file__)))
  assert default == os.path.join(os.path.dirname(repo_root), "shared", "data", SHAKESPEARE)
  assert os.path.isfile(default)
  monkeypatch.setenv(readers.LM_DATA_DIR_ENV, str(tmp_path))
  assert readers.resolve_data_path("x/y.txt") == str(tmp_path / "x" / "y.txt")
  assert readers.resolve_data_path("/abs/file.txt") == "/abs/file.txt"


# Failure 4: a binary / non-UTF-8 file is an error naming the file, the line and the byte.
# Each reader gets two good records of its format, then a line with the byte 0xff.
BAD_LINE = b'{"x": "caf\xff"}\n'


@pytest.mark.parametrize("read, record", [
    (lambda p: list(readers.read_jsonl(p, "text")), {"text": "ok"}),
    (lambda p: list(readers.jsonl_records(p)), {"text": "ok"}),
    (lambda p: list(readers.documents_from_files([p])), {"text": "ok"}),
    (sft_sources.read_sft_file, {"prompt": "p", "response": "r"}),
    (preferences.read_source, {"prompt": "p", "chosen": "a", "rejected": "b"}),
    (lambda p: corpus.read_transcript_documents(p, 0.1, 0), {"chosen": "a"}),
    (benchmarks.arc, {"query": "Question: q", "choices": ["a", "b"], "gold": 0}),
    (benchmarks.gsm8k, {"question": "q", "answer": "#### 1"}),
], ids=["read_jsonl", "jsonl_records", "documents_from_files", "read_sft_file",
        "preferences", "corpus_transcript", "benchmarks_arc", "benchmarks_gsm8k"])
@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_jsonl_readers_name_the_file_line_and_byte_of_non_utf8(tmp_path, read, record, gz):
  good = (json.dumps(record) + "\n").encode()
  content = good * 2 + BAD_LINE
  offset = 2 * len(good) + BAD_LINE.index(b"\xff")  # bytes before 0xff (uncompressed)
  path = tmp_path / ("x.jsonl.gz" if gz else "x.jsonl")
  path.write_bytes(gzip.compress(content) if gz else content)
  with pytest.raises(ValueError, match=rf"x\.jsonl(\.gz)?: line 3 is not UTF-8 text "
                                       rf"\(byte 0xff at offset {offset}\)") as info:
    read(str(path))
  assert not isinstance(info.value, UnicodeDecodeError)


@pytest.mark.parametrize("read", [
    lambda p: list(readers.read_text_file(p)),
    readers.read_text,
    lambda p: list(readers.documents_from_files([p])),
    corpus.read_text_documents,
])
def test_text_readers_name_the_file_line_and_byte_of_non_utf8(tmp_path, read):
  path = tmp_path / "x.txt"
  path.write_bytes(b"one\ntwo\nthree \xff four\n")
  with pytest.raises(ValueError,
                     match=r"x\.txt: line 3 is not UTF-8 text \(byte 0xff at offset 14\)"):
    read(str(path))


def test_a_binary_file_fails_tokenizer_training_naming_it(tmp_path):
  path = tmp_path / "model.bin"
  path.write_bytes(bytes(range(256)) * 4)  # b"\n" is byte 10: 0x80 is on line 2
  with pytest.raises(ValueError,
                     match=r"model\.bin: line 2 is not UTF-8 text \(byte 0x80 at offset 128\)"):
    tokenizer.train_tokenizer([str(path)], str(tmp_path / "t.model"), 0, "char")


def test_benchmark_csv_and_label_files_name_the_file(tmp_path):
  mmlu = tmp_path / "mmlu"
  (mmlu / "test").mkdir(parents=True)
  (mmlu / "dev").mkdir()
  header = b"question,choice0,choice1,choice2,choice3,answer\n"
  (mmlu / "dev" / "x_dev.csv").write_bytes(header + b"q,a,b,c,d,0\n")
  (mmlu / "test" / "x_test.csv").write_bytes(header + b"q\xfe,a,b,c,d,1\n")
  with pytest.raises(ValueError, match=r"x_test\.csv: line 2 is not UTF-8 text \(byte 0xfe"):
    benchmarks.mmlu(str(mmlu))
  piqa = _write_jsonl(tmp_path / "p.jsonl", [{"goal": "g", "sol1": "a", "sol2": "b"}])
  (tmp_path / "p-labels.lst").write_bytes(b"\xff\n")
  with pytest.raises(ValueError, match=r"p-labels\.lst: line 1 is not UTF-8 text"):
    benchmarks.piqa(piqa)


def test_jsonl_records_counts_bad_lines_instead_of_raising(tmp_path):
  path = tmp_path / "mixed.jsonl"
  path.write_bytes(b'{"a": 1}\n\xff\xfe\n{broken\n[1, 2]\n\n{"a": 2}\n')
  counts = {}
  got = list(readers.jsonl_records(str(path), objects_only=True, on_bad="count",
                                   bad_counts=counts))
  assert got == [(1, {"a": 1}), (6, {"a": 2})]
  assert counts == {"undecodable": 1, "not_json": 1, "not_an_object": 1}
  # Without objects_only a list is a record; raising mode names the first bad line.
  assert len(list(readers.jsonl_records(str(path), on_bad="count", bad_counts={}))) == 3
  with pytest.raises(ValueError, match=r"mixed\.jsonl: line 2 is not UTF-8"):
    list(readers.jsonl_records(str(path)))
  with pytest.raises(ValueError, match="bad_counts"):
    list(readers.jsonl_records(str(path), on_bad="count"))
  with pytest.raises(ValueError, match="on_bad='skip'"):
    list(readers.jsonl_records(str(path), on_bad="skip"))


def test_read_text_counting_keeps_the_readable_rest(tmp_path):
  path = tmp_path / "t.txt"
  path.write_bytes(b"caf\xe9 ok")
  counts = {}
  assert readers.read_text(str(path), on_bad="count", bad_counts=counts) == "caf ok"
  assert counts == {"undecodable": 1}
