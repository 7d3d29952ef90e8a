"""The local TFDS builders (data/tfds_builders.py) give exactly what the file readers give,
and the pipelines take their names: pretraining (data.source="tfds"), SFT and preference
sources ("tfds:..."), curation sources."""

import pytest

from data import documents, readers, tfds_readers


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def test_shakespeare_via_tfds_equals_the_text_file(tfds_dir):
  from data.config import default_data_config
  text_cfg = default_data_config()
  tfds_cfg = default_data_config()
  tfds_cfg.source = "tfds"
  tfds_cfg.tfds_name = "lm_tiny_shakespeare"
  tfds_cfg.tfds_data_dir = tfds_dir
  assert documents.load_split_documents(tfds_cfg) == documents.load_split_documents(text_cfg)


def test_wikitext_articles_and_curation_source(tfds_dir):
  from data.curate import read_source
  path = readers.resolve_data_path("pretrain/wikitext2_tokens_valid.txt")
  articles = readers.split_wikitext_articles(next(readers.read_text_file(path)))
  via_tfds = [r["text"] for _, r in tfds_readers.tfds_records("lm_wikitext2", "validation",
                                                         tfds_dir)]
  assert via_tfds == articles and len(articles) == 60
  docs, _ = read_source({"name": "w", "path": "tfds:lm_wikitext2:validation"}, {},
                        tfds_data_dir=tfds_dir)
  assert [d.text for d in docs] == articles


def test_instruction_and_preference_names_feed_the_sft_and_preference_readers(tfds_dir):
  from data import preferences, sft_sources
  file_convs, _ = sft_sources.read_sft_sources("sft/dolly_hhrlhf_1k.jsonl")
  tfds_convs, files = sft_sources.read_sft_sources("tfds:lm_instructions/dolly_hhrlhf",
                                                   tfds_dir)
  assert tfds_convs == file_convs and files[0].format == "prompt_response"
  file_pairs, _ = preferences.read_sources(
      "preference/hh_rlhf_harmless_base_test_shared.jsonl.gz")
  tfds_pairs, _ = preferences.read_sources("tfds:lm_hh_preferences", tfds_dir)
  assert tfds_pairs == file_pairs and len(file_pairs) > 1000


def test_eval_sets_hold_the_scored_requests(tfds_dir):
  from data import benchmarks as tasks
  items = tasks.arc(tasks.task_path("arc_challenge"))
  records = [r for _, r in tfds_readers.tfds_records("lm_eval_sets/arc_challenge", "test",
                                                tfds_dir)]
  assert len(records) == len(items) == 922
  for item, r in zip(items, records):
    assert (r["doc_id"], r["contexts"], r["continuations"], r["gold"], r["choices"]) == \
        (item.doc_id, item.contexts, item.continuations, item.gold, item.choices)


def test_unknown_tfds_name_is_refused(tfds_dir):
  with pytest.raises(Exception, match="lm_no_such_set"):
    tfds_readers.load_tfds("lm_no_such_set", "train", tfds_dir)
