"""Safety filters: a blocklist and a reward-model score threshold, on input and output.

  safety = SafetyFilter.from_config(SafetyConfig.from_json("safety.json"))
  verdict = safety.check_input(messages)            # None = allowed
  verdict = safety.check_output(messages, response)

A deployment's config (JSON file, `--safety_config`; the flags `--blocklist` and
`--safety_checkpoint` / `--safety_threshold` set the same fields):

  {"blocklist": ["badword", "re:how to (build|make) a bomb"],
   "blocklist_file": "blocklist.txt",
   "reward_checkpoint": "runs/rm", "reward_threshold": -2.0,
   "check_input": true, "check_output": true,
   "refusal_message": "I can't help with that request."}

- Blocklist terms (from the list and the file, one per line, `#` comments) are matched
  case-insensitively: a plain term as a whole word or phrase (not inside a longer word; the
  matching of data/filters.py, which the continual loop's gate uses too), a term starting
  with `re:` as a Python regular expression.
- The reward check scores the conversation with any reward-model checkpoint of the project
  (`eval.loading.load_checkpoint` of a RewardModel): the input check the conversation so far,
  encoded by the model's chat template, read at its last token; the output check the
  conversation + response, read at the response's end-of-turn token (as rlhf/rollout.py
  `end_scores` reads rewards in PPO). A score below `reward_threshold` refuses.
- A refused request gets `refusal_message` as its answer with finish_reason
  "content_filter" (HTTP 200, as OpenAI does); the server logs which check refused and why
  (the term, or the score and threshold).
"""

from __future__ import annotations

import dataclasses
import json
import re
import threading
from typing import Any, Mapping, Sequence

import numpy as np

from data import filters
from data.chat import get_template
from eval.loading import LoadedCheckpoint, load_checkpoint
from model.heads import RewardModel

DEFAULT_REFUSAL = "I can't help with that request."
REGEX_PREFIX = "re:"
Conversation = Sequence[Mapping[str, str]]


@dataclasses.dataclass(frozen=True)
class SafetyConfig:
  """What a deployment checks (module doc). Empty = no filter."""
  blocklist: tuple[str, ...] = ()
  blocklist_file: str = ""
  reward_checkpoint: str = ""
  reward_threshold: float = 0.0
  check_input: bool = True
  check_output: bool = True
  refusal_message: str = DEFAULT_REFUSAL

  @classmethod
  def from_dict(cls, data: Mapping[str, Any], source: str = "safety config") -> "SafetyConfig":
    """Raises ValueError naming an unknown field or a wrong type."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(known)
    if unknown:
      raise ValueError(f"{source}: unknown field(s) {sorted(unknown)}; known: {sorted(known)}")
    values = dict(data)
    if "blocklist" in values:
      if not isinstance(values["blocklist"], list) or \
          not all(isinstance(t, str) for t in values["blocklist"]):
        raise ValueError(f"{source}: blocklist must be a list of strings")
      values["blocklist"] = tuple(values["blocklist"])
    for name, kind in (("blocklist_file", str), ("reward_checkpoint", str),
                       ("reward_threshold", (int, float)), ("check_input", bool),
                       ("check_output", bool), ("refusal_message", str)):
      if name in values and not isinstance(values[name], kind):
        raise ValueError(f"{source}: {name} must be {getattr(kind, '__name__', 'a number')}, "
                         f"got {values[name]!r}")
    return cls(**values)

  @classmethod
  def from_json(cls, path: str) -> "SafetyConfig":
    """Raises OSError (unreadable) or ValueError (not JSON, bad field)."""
    with open(path, encoding="utf-8") as f:
      try:
        data = json.load(f)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(data, dict):
      raise ValueError(f"{path}: expected a JSON object")
    return cls.from_dict(data, path)

  @property
  def enabled(self) -> bool:
    return bool(self.blocklist or self.blocklist_file or self.reward_checkpoint)


@dataclasses.dataclass(frozen=True)
class Verdict:
  """Why a request was refused: the check ("blocklist" / "reward_score"), where
  ("input" / "output") and the detail (the term, or the score and threshold)."""
  check: str
  where: str
  detail: str

  def __str__(self) -> str:
    return f"{self.check} on {self.where}: {self.detail}"


class Blocklist:
  """Plain terms (data/filters.py's whole-word, any-case matching, the one the continual
  loop's gate uses too) and `re:` regular expressions (case-insensitive)."""

  def __init__(self, terms: Sequence[str]):
    words: list[str] = []
    self.regexes: list[tuple[str, re.Pattern]] = []
    for term in terms:
      term = term.strip()
      if not term or term.startswith("#"):
        continue
      if term.startswith(REGEX_PREFIX):
        try:
          self.regexes.append((term, re.compile(term[len(REGEX_PREFIX):], re.IGNORECASE)))
        except re.error as e:
          raise ValueError(f"blocklist regex {term!r}: {e}") from e
      else:
        words.append(term)
    self.words = filters.Blocklist(words)

  @classmethod
  def from_config(cls, cfg: SafetyConfig) -> "Blocklist":
    terms = list(cfg.blocklist)
    if cfg.blocklist_file:
      with open(cfg.blocklist_file, encoding="utf-8") as f:
        terms += f.read().splitlines()
    return cls(terms)

  def __len__(self) -> int:
    return len(self.words.terms) + len(self.regexes)

  def find(self, text: str) -> str | None:
    """A term matching `text` (a plain term lower-cased), or None."""
    words = self.words.matches(text)
    if words:
      return words[0]
    return next((term for term, pattern in self.regexes if pattern.search(text)), None)


def _last_token_scores(model: RewardModel, batch: Mapping[str, Any]) -> Any:
  """Scores [B] of right-padded rows read at `score_index` (Runtime.apply function)."""
  return model.score(batch["tokens"], batch["positions"], batch["segment_ids"],
                     batch["score_index"])


class RewardScorer:
  """Scores conversations with a reward-model checkpoint (one at a time, thread-safe)."""

  BUCKET = 64  # rows padded to a multiple: one compiled program per bucket

  def __init__(self, loaded: LoadedCheckpoint):
    self.loaded = loaded
    self.template = get_template("auto", loaded.tokenizer)
    self.context = loaded.model_cfg.max_seq_len
    self._lock = threading.Lock()

  @classmethod
  def from_checkpoint(cls, path: str) -> "RewardScorer":
    """Raises CheckpointError: missing, unreadable or not a reward model."""
    return cls(load_checkpoint(path, expect=RewardModel))

  def ids(self, messages: Conversation, response: str | None = None) -> np.ndarray:
    """The conversation's ids (ending at the response's end of turn if one is given)."""
    if response is None:
      return self.template.encode(messages)[0]
    prompt, reply = self.template.encode_response(messages, response)
    return np.concatenate([prompt, reply])

  def score(self, messages: Conversation, response: str | None = None) -> float:
    """The reward at the last token (the oldest tokens are cut to fit the context)."""
    ids = self.ids(messages, response)[-self.context:]
    n = len(ids)
    width = min(self.context, -(-n // self.BUCKET) * self.BUCKET)
    row = {"tokens": np.zeros((1, width), np.int32), "positions": np.zeros((1, width), np.int32),
           "segment_ids": np.zeros((1, width), np.int32),
           "score_index": np.array([n - 1], np.int32)}
    row["tokens"][0, :n] = ids
    row["positions"][0, :n] = np.arange(n)
    row["segment_ids"][0, :n] = 1
    with self._lock:
      out = self.loaded.runtime.apply(_last_token_scores, self.loaded.params, row, 1)
    return float(np.asarray(out)[0])


class SafetyFilter:
  """The checks of one deployment (module doc)."""

  def __init__(self, cfg: SafetyConfig, blocklist: Blocklist | None = None,
               scorer: RewardScorer | None = None):
    self.cfg = cfg
    self.blocklist = blocklist if blocklist is not None else Blocklist(())
    self.scorer = scorer

  @classmethod
  def from_config(cls, cfg: SafetyConfig) -> "SafetyFilter":
    """Reads the blocklist file and loads the reward model.

    Raises:
      OSError: an unreadable blocklist file. ValueError: a bad regex.
      CheckpointError: the reward checkpoint is missing or not a reward model.
    """
    scorer = RewardScorer.from_checkpoint(cfg.reward_checkpoint) if cfg.reward_checkpoint \
        else None
    return cls(cfg, Blocklist.from_config(cfg), scorer)

  @property
  def refusal(self) -> str:
    return self.cfg.refusal_message

  def describe(self) -> str:
    """One line for the server's start-up log."""
    parts = [f"blocklist of {len(self.blocklist)} term(s)"] if len(self.blocklist) else []
    if self.scorer:
      parts.append(f"reward score < {self.cfg.reward_threshold:g} "
                   f"({self.cfg.reward_checkpoint})")
    where = [w for w, on in (("input", self.cfg.check_input), ("output", self.cfg.check_output))
             if on]
    return f"safety: {', '.join(parts) or 'off'} on {' and '.join(where) or 'nothing'}"

  @property
  def checks_output(self) -> bool:
    return self.cfg.check_output and bool(len(self.blocklist) or self.scorer)

  def _check(self, where: str, text: str, messages: Conversation,
             response: str | None) -> Verdict | None:
    term = self.blocklist.find(text)
    if term is not None:
      return Verdict("blocklist", where, f"term {term!r}")
    if self.scorer is not None:
      score = self.scorer.score(messages, response)
      if score < self.cfg.reward_threshold:
        return Verdict("reward_score", where,
                       f"score {score:.4f} < threshold {self.cfg.reward_threshold:g}")
    return None

  def check_input(self, messages: Conversation) -> Verdict | None:
    """None if the conversation may be answered, else why not."""
    if not self.cfg.check_input:
      return None
    return self._check("input", "\n".join(m["content"] for m in messages), messages, None)

  def check_output(self, messages: Conversation, response: str) -> Verdict | None:
    """None if `response` to the conversation may be returned, else why not."""
    if not self.cfg.check_output:
      return None
    return self._check("output", response, messages, response)
