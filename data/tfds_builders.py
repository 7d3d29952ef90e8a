"""TFDS builders for the project's local datasets (the files under the data dir).

  import data.tfds_builders  # registers the names below (data.tfds_readers imports it)
  ds = tfds.load("lm_tiny_shakespeare", split="train", data_dir="~/tfds")

The first `tfds.load` (or `python -m data.tfds_prepare --data_dir=DIR`, which prepares all
of them) reads the local files (`readers.resolve_data_path`: $LM_DATA_DIR, else
../shared/data) and writes TFRecord shards under `data_dir/<name>/<config>/<version>`;
later loads read those. Nothing is downloaded.

| name | splits | features |
|---|---|---|
| lm_tiny_shakespeare | train (first 90% of the characters), validation (last 10%) | text |
| lm_wikitext2 | validation, test (one article each, the tokenised v1 release) | title, text |
| lm_instructions/{alpaca,dolly_hhrlhf,gsm8k} | train | the file's own fields (SFT formats) |
| lm_hh_preferences | train (the shared harmless-base pairs) | chosen, rejected |
| lm_eval_sets/{hellaswag,arc_easy,arc_challenge,piqa,winogrande,lambada,mmlu,gsm8k} | test | doc_id, contexts, continuations, gold, choices |

Examples keep the files' order (`disable_shuffling`). Names carry an `lm_` prefix so that they never shadow TFDS's own catalogue
(`tiny_shakespeare` there downloads the same text from the internet). The Shakespeare split
is nanoGPT's character split, so `data.source="tfds", tfds_name="lm_tiny_shakespeare"` gives
the same documents as the default `data.source="text"`. The evaluation sets hold exactly the
(context, continuation) requests `data/benchmarks.py` gives `eval/` (MMLU with its 5 dev examples in
the context), so a TFDS copy is scored like the file; GSM8K's continuation is the reference
solution and its single choice the final number.

Where the pipelines take TFDS names: pretraining `data.source="tfds"` with `data.tfds_name`;
SFT and preference `data.sources` entries "tfds:name[/config][:split]"; curation sources with
"path": "tfds:name[:split]".
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds

from data import benchmarks, readers

_HOMEPAGE = "https://github.com/ (see shared/data/README.md for each file's origin)"


def _jsonl(path: str) -> Iterator[tuple[int, dict[str, Any]]]:
  """(line number, JSON object) of a jsonl[.gz] file; bad lines are errors naming them."""
  return readers.jsonl_records(path, objects_only=True)


class LmTinyShakespeare(tfds.core.GeneratorBasedBuilder):
  """tiny Shakespeare (karpathy/char-rnn) from the local file, nanoGPT's 90/10 split."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First version."}
  FILE = "pretrain/tinyshakespeare.txt"
  VAL_FRACTION = 0.1

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description=self.__doc__, disable_shuffling=True,
        features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
        homepage=_HOMEPAGE)

  def _split_generators(self, dl_manager):
    del dl_manager  # local files only
    return {"train": self._generate_examples("train"),
            "validation": self._generate_examples("validation")}

  def _generate_examples(self, split: str):
    text = next(readers.read_text_file(readers.resolve_data_path(self.FILE)))
    # The split of `data.source="text"` (data/documents.py), so both give the same documents.
    cut = readers.train_end_index(len(text), self.VAL_FRACTION)
    yield 0, {"text": text[:cut] if split == "train" else text[cut:]}


class LmWikitext2(tfds.core.GeneratorBasedBuilder):
  """WikiText-2 (tokenised v1) validation and test files, one example per article."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First version."}
  FILES = {"validation": "pretrain/wikitext2_tokens_valid.txt",
           "test": "pretrain/wikitext2_tokens_test.txt"}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description=self.__doc__, disable_shuffling=True,
        features=tfds.features.FeaturesDict({"title": tfds.features.Text(),
                                             "text": tfds.features.Text()}),
        homepage=_HOMEPAGE)

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(path) for split, path in self.FILES.items()}

  def _generate_examples(self, path: str):
    text = next(readers.read_text_file(readers.resolve_data_path(path)))
    for n, article in enumerate(readers.split_wikitext_articles(text)):
      first = article.strip().split("\n", 1)[0]
      yield n, {"title": first.strip(" ="), "text": article}


class LmInstructions(tfds.core.GeneratorBasedBuilder):
  """The shared instruction files, one config each, records with the file's own fields."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First version."}
  FILES = {"alpaca": ("sft/alpaca_subset.jsonl", ("instruction", "input", "output")),
           "dolly_hhrlhf": ("sft/dolly_hhrlhf_1k.jsonl", ("prompt", "response")),
           "gsm8k": ("sft/gsm8k_train.jsonl.gz", ("question", "answer"))}
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=n, description=f"shared/data/{p}")
                     for n, (p, _) in FILES.items()]

  def _info(self) -> tfds.core.DatasetInfo:
    fields = self.FILES[self.builder_config.name][1]
    return tfds.core.DatasetInfo(
        builder=self, description=self.__doc__, disable_shuffling=True,
        features=tfds.features.FeaturesDict({f: tfds.features.Text() for f in fields}),
        homepage=_HOMEPAGE)

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    path, fields = self.FILES[self.builder_config.name]
    path = readers.resolve_data_path(path)
    for number, record in _jsonl(path):
      values = {f: record.get(f, "" if f == "input" else None) for f in fields}
      if values.get("input", "") is None:  # Alpaca's optional input: absent or null = ""
        values["input"] = ""
      missing = [f for f, v in values.items() if not isinstance(v, str)]
      if missing:
        raise ValueError(f"{path}:{number}: fields {missing} missing or not strings")
      yield number, values


class LmHhPreferences(tfds.core.GeneratorBasedBuilder):
  """The shared Anthropic HH harmless-base preference pairs (chosen / rejected)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First version."}
  FILE = "preference/hh_rlhf_harmless_base_test_shared.jsonl.gz"

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description=self.__doc__, disable_shuffling=True,
        features=tfds.features.FeaturesDict({"chosen": tfds.features.Text(),
                                             "rejected": tfds.features.Text()}),
        homepage=_HOMEPAGE)

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    path = readers.resolve_data_path(self.FILE)
    for number, record in _jsonl(path):
      if not all(isinstance(record.get(k), str) for k in ("chosen", "rejected")):
        raise ValueError(f"{path}:{number}: expected string fields 'chosen' and 'rejected'")
      yield number, {"chosen": record["chosen"], "rejected": record["rejected"]}


EVAL_TASKS = ("hellaswag", "arc_easy", "arc_challenge", "piqa", "winogrande", "lambada",
              "mmlu", "gsm8k")


class LmEvalSets(tfds.core.GeneratorBasedBuilder):
  """The shared evaluation sets as the (context, continuation) requests eval/ scores."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First version."}
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=t) for t in EVAL_TASKS]

  def _info(self) -> tfds.core.DatasetInfo:
    text_list = tfds.features.Sequence(tfds.features.Text())
    return tfds.core.DatasetInfo(
        builder=self, description=self.__doc__, disable_shuffling=True,
        features=tfds.features.FeaturesDict({
            "doc_id": tfds.features.Text(), "contexts": text_list,
            "continuations": text_list, "gold": tfds.features.Scalar(dtype=np.int32),
            "choices": text_list}),
        homepage=_HOMEPAGE)

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"test": self._generate_examples()}

  def _generate_examples(self):
    task = self.builder_config.name
    path = benchmarks.task_path(task)
    if task == "gsm8k":
      for n, record in _jsonl(path):
        number = benchmarks.GSM8K_ANSWER.search(record["answer"])
        yield n, {"doc_id": str(n), "contexts": [record["question"]],
                  "continuations": [record["answer"]], "gold": 0,
                  "choices": [benchmarks.normalize_number(number.group(1)) if number else ""]}
      return
    for k, item in enumerate(benchmarks.MC_READERS[task](path)):
      yield k, {"doc_id": item.doc_id, "contexts": item.contexts,
                "continuations": item.continuations, "gold": item.gold,
                "choices": item.choices}


BUILDERS = {"lm_tiny_shakespeare": [""], "lm_wikitext2": [""],
            "lm_instructions": list(LmInstructions.FILES), "lm_hh_preferences": [""],
            "lm_eval_sets": list(EVAL_TASKS)}


def prepare_all(data_dir: str) -> list[str]:
  """Builds every dataset and config into `data_dir`; returns their names."""
  done = []
  for name, configs in BUILDERS.items():
    for config in configs:
      full = f"{name}/{config}" if config else name
      tfds.builder(full, data_dir=data_dir).download_and_prepare()
      done.append(full)
  return done
