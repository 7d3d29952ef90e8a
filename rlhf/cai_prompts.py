"""Constitutional AI, the pure part: the constitution, principle sampling, every prompt the
model and the judge see, the both-order soft label, and the records written for the stages.

Nothing here touches a model: `rlhf/cai.py` runs the model on these conversations, so every
prompt can be checked by a unit test (tests/test_rlhf_cai.py).

Constitution file (JSON, configs/cai/constitution.json):

  {"principles": [{"name": "harm",
                   "critique": "<request to critique the last answer>",
                   "revision": "<request to rewrite it>",
                   "comparison": "<question asking which of two answers is better>"}, ...]}

Supervised phase (Bai et al. 2022, SL-CAI): for a red-team prompt the model answers; it is
asked, in the same chat, the principle's critique request; then its revision request. Each
step is one more chat turn (`critique_conversation`, `revision_conversation`); the revision,
as the answer to the original prompt, becomes an SFT example (`sft_record`: the HH transcript
format that `data.sft_sources` reads).

Feedback phase (RL-CAI): the judge sees the conversation, the principle's comparison question
and the two answers as options "(A)" and "(B)" (`judge_conversation`) and the log-likelihood
of its answer being "(A)" or "(B)" is read. Each pair is asked in both orders and the two
probabilities are averaged (`soft_label`), so a judge that only prefers a position gives
exactly 0.5. The pair is written chosen/rejected by the averaged probability, with the soft
label kept (`preference_record`: the prompt_chosen_rejected format of `data.preferences`).

Principles are drawn per prompt by a seeded hash of (seed, phase, prompt key): the same seed
gives the same principle for a prompt whatever the order or number of prompts.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from typing import Any, Mapping, NamedTuple, Sequence

from data.chat import ASSISTANT, USER

Message = Mapping[str, str]
PRINCIPLE_FIELDS = ("name", "critique", "revision", "comparison")
OPTIONS = ("(A)", "(B)")
# A turn header that a model may run into (it then talks for the human): cut there.
RUN_ON = re.compile(r"(?:^|\n)\s*(Human|Assistant|User)\s*:")


class Principle(NamedTuple):
  """One principle of the constitution."""
  name: str
  critique: str     # asked after the model's answer (supervised phase)
  revision: str     # asked after its critique
  comparison: str   # the judge's question (feedback phase)


# ------------------------------------------------------------------------------ constitution
def parse_constitution(text: str, path: str) -> list[Principle]:
  """The principles of a constitution file's text; errors name the file and field.

  Raises:
    ValueError: invalid JSON (with line), no `principles` list, an empty list, a principle
      that is not an object, a missing or empty string field, or a repeated name.
  """
  try:
    data = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from e
  if not isinstance(data, dict) or not isinstance(data.get("principles"), list):
    raise ValueError(f"{path}: field 'principles': expected a list of objects with fields "
                     f"{list(PRINCIPLE_FIELDS)}")
  if not data["principles"]:
    raise ValueError(f"{path}: field 'principles' is empty; expected at least one principle")
  out, names = [], set()
  for i, item in enumerate(data["principles"]):
    where = f"{path}: principles[{i}]"
    if not isinstance(item, dict):
      raise ValueError(f"{where}: expected an object with fields {list(PRINCIPLE_FIELDS)}, "
                       f"got {type(item).__name__}")
    for field in PRINCIPLE_FIELDS:
      value = item.get(field)
      if not isinstance(value, str) or not value.strip():
        got = "missing" if field not in item else f"{type(value).__name__} {value!r}"
        raise ValueError(f"{where}.{field}: expected a non-empty string, got {got}")
    unknown = sorted(set(item) - set(PRINCIPLE_FIELDS))
    if unknown:
      raise ValueError(f"{where}: unknown field {unknown[0]!r}; expected "
                       f"{list(PRINCIPLE_FIELDS)}")
    if item["name"] in names:
      raise ValueError(f"{where}.name: {item['name']!r} is used twice")
    names.add(item["name"])
    out.append(Principle(*(item[f].strip() for f in PRINCIPLE_FIELDS)))
  return out


def load_constitution(path: str) -> list[Principle]:
  """Reads and checks a constitution file (see `parse_constitution`)."""
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
  except FileNotFoundError as e:
    raise FileNotFoundError(f"config.constitution: no such file {path}") from e
  except UnicodeDecodeError as e:
    raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
  return parse_constitution(text, path)


def principle_index(seed: int, phase: str, key: str, count: int) -> int:
  """Index in [0, count) drawn by a hash of (seed, phase, key): deterministic per seed."""
  digest = hashlib.sha256(f"{seed}\0{phase}\0{key}".encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") % count


def sample_principles(principles: Sequence[Principle], keys: Sequence[str], seed: int,
                      phase: str) -> list[Principle]:
  """One principle per prompt key (see `principle_index`)."""
  return [principles[principle_index(seed, phase, k, len(principles))] for k in keys]


# ------------------------------------------------------------------------------ prompts
def critique_conversation(prompt: Sequence[Message], response: str,
                          principle: Principle) -> list[dict[str, str]]:
  """The chat after the model's answer, asking for its critique (the next turn is the
  model's critique)."""
  return [*map(dict, prompt), {"role": ASSISTANT, "content": response},
          {"role": USER, "content": principle.critique}]


def revision_conversation(prompt: Sequence[Message], response: str, critique: str,
                          principle: Principle) -> list[dict[str, str]]:
  """The chat after the critique, asking for the revision (the next turn is the revised
  answer)."""
  return [*critique_conversation(prompt, response, principle),
          {"role": ASSISTANT, "content": critique},
          {"role": USER, "content": principle.revision}]


def transcript(messages: Sequence[Message]) -> str:
  """Messages as the HH transcript "\\n\\nHuman: ...\\n\\nAssistant: ..." (system
  messages are left out: the HH format has no such turn)."""
  names = {USER: "Human", ASSISTANT: "Assistant"}
  return "".join(f"\n\n{names[m['role']]}: {m['content']}" for m in messages
                 if m["role"] in names)


def judge_conversation(prompt: Sequence[Message], first: str, second: str,
                       principle: Principle) -> list[dict[str, str]]:
  """The judge's one user turn: the conversation, the comparison question and the two
  answers as options (A) and (B). The judge's reply is scored as "(A)" or "(B)"."""
  text = ("Consider the following conversation between a human and an assistant:\n"
          f"{transcript(prompt).strip()}\n\n"
          f"{principle.comparison}\n"
          "Options:\n"
          f"{OPTIONS[0]} {first.strip()}\n"
          f"{OPTIONS[1]} {second.strip()}\n"
          f"Answer with {OPTIONS[0]} or {OPTIONS[1]}.")
  return [{"role": USER, "content": text}]


def clean_response(text: str) -> str:
  """A generated answer cut where the model starts a new turn of its own, stripped."""
  match = RUN_ON.search(text)
  return (text[:match.start()] if match else text).strip()


# ------------------------------------------------------------------------------ labels
def soft_label(logp_forward: Sequence[float], logp_backward: Sequence[float]) -> float:
  """P(response 1 is better), averaged over both presentation orders.

  Args:
    logp_forward: the judge's log-likelihoods of "(A)" and "(B)" with response 1 as (A).
    logp_backward: the same with response 2 as (A) (the order swapped).

  With d = log p(A) - log p(B) in each order, P(1 better) is sigmoid(d_forward) in the
  first and sigmoid(-d_backward) in the second; their mean is
  0.5 + (tanh(d_forward / 2) - tanh(d_backward / 2)) / 4, written so that a judge with a
  pure position preference (d_forward == d_backward) gives exactly 0.5.
  """
  d_fwd = float(logp_forward[0]) - float(logp_forward[1])
  d_bwd = float(logp_backward[0]) - float(logp_backward[1])
  return 0.5 + (math.tanh(d_fwd / 2) - math.tanh(d_bwd / 2)) / 4


def first_order_probability(logp: Sequence[float]) -> float:
  """P("(A)") among the two options in one order (position bias diagnostics)."""
  return 0.5 + math.tanh((float(logp[0]) - float(logp[1])) / 2) / 2


# ------------------------------------------------------------------------------ records
def sft_record(prompt: Sequence[Message], revision: str, principle: Principle
               ) -> dict[str, Any]:
  """An SFT example in the HH transcript format (`data.sft_sources`: {"text"})."""
  return {"text": transcript([*prompt, {"role": ASSISTANT, "content": revision}]),
          "principle": principle.name}


def preference_record(prompt: Sequence[Message], response_1: str, response_2: str,
                      p_1_better: float, principle: Principle) -> dict[str, Any]:
  """A preference pair (prompt_chosen_rejected format of `data.preferences`): chosen is the
  response the averaged judge probability favours; `soft_label` = P(chosen is better)."""
  chosen, rejected, p = ((response_1, response_2, p_1_better) if p_1_better >= 0.5 else
                         (response_2, response_1, 1.0 - p_1_better))
  return {"prompt": [dict(m) for m in prompt], "chosen": chosen, "rejected": rejected,
          "soft_label": p, "principle": principle.name}


def wilson_interval(successes: float, n: int, z: float = 1.959964) -> tuple[float, float]:
  """The Wilson score interval of a proportion (95% by default); (nan, nan) for n = 0."""
  if n <= 0:
    return float("nan"), float("nan")
  p = successes / n
  denom = 1 + z * z / n
  centre = (p + z * z / (2 * n)) / denom
  half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
  return max(0.0, centre - half), min(1.0, centre + half)
