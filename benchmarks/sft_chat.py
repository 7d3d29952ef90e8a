"""Benchmark: does the SFT model answer in the chat format? (held-out prompts, end-of-turn rate)

The chain it measures (about 30 + 9 minutes on the 2-core CPU):
  python -m train.pretrain --config=configs/pretrain/english_bpe.py --workdir=runs/english_bpe
  python -m train.sft --config=configs/sft/chat.py --workdir=runs/sft --config.init_from=runs/english_bpe
  python benchmarks/sft_chat.py --checkpoint=runs/sft

Takes the first `--num_prompts` held-out conversations of the SFT run (the same sources,
validation fraction and seed as the run, read from the checkpoint's config) whose prompt
fits the context with `--max_new_tokens`, samples one assistant turn for each
(`eval.sample.respond`) and reports the fraction that end with the end-of-turn token within
the length limit, the mean response length, and a few samples (the SFT run itself logs the
held-out response loss of the base model at step 0 and of the SFT model after).
Last line: one JSON object with `ended_fraction`, `num_prompts`, `mean_response_tokens`,
`max_new_tokens`, `temperature`.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "SFT run (workdir or checkpoint directory).")
flags.DEFINE_integer("num_prompts", 200, "Held-out prompts to answer.")
flags.DEFINE_integer("max_new_tokens", 128, "Response length limit (tokens).")
flags.DEFINE_float("temperature", 0.7, "Sampling temperature (0 = greedy).")
flags.DEFINE_float("top_p", 0.9, "Nucleus sampling threshold.")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_integer("show", 5, "Samples printed.")
flags.mark_flag_as_required("checkpoint")


def held_out_prompts(run_config: dict, template, max_prompt_tokens: int, n: int):
  """The first n held-out conversations' prompts (all turns before the final answer)."""
  from data import sft_sources
  data = run_config["data"]
  examples, _ = sft_sources.read_sft_sources(data["sources"])
  _, val = sft_sources.split_examples(examples, data["val_fraction"], data["seed"])
  out = []
  for conv in val:
    if conv and conv[-1]["role"] == "assistant":
      prompt = conv[:-1]
      if len(template.prompt_ids(prompt)) <= max_prompt_tokens:
        out.append((prompt, conv[-1]["content"]))
    if len(out) == n:
      break
  return out


def main(argv):
  del argv
  from data.chat import ChatTemplate
  from eval.sample import load_for_sampling, respond
  from model.sampling import SamplingConfig

  sampler, params, tokenizer, meta = load_for_sampling(FLAGS.checkpoint)
  template = ChatTemplate(tokenizer)
  context = sampler.model_cfg.max_seq_len
  prompts = held_out_prompts(meta["config"], template, context - FLAGS.max_new_tokens,
                             FLAGS.num_prompts)
  if len(prompts) < FLAGS.num_prompts:
    print(f"note: only {len(prompts)} held-out prompts fit {context - FLAGS.max_new_tokens} "
          "prompt tokens", file=sys.stderr)
  scfg = SamplingConfig(max_new_tokens=FLAGS.max_new_tokens, temperature=FLAGS.temperature,
                        top_p=FLAGS.top_p)
  replies = respond(sampler, params, template, [p for p, _ in prompts], scfg, seed=FLAGS.seed)
  ended = sum(r["ended"] for r in replies) / len(replies)
  mean_tokens = sum(r["tokens"] for r in replies) / len(replies)
  for (prompt, reference), reply in list(zip(prompts, replies))[:FLAGS.show]:
    print(f"--- user: {prompt[-1]['content'][:300]!r}\n    model ({reply['tokens']} tokens, "
          f"ended={reply['ended']}): {reply['response'][:400]!r}\n    reference: "
          f"{reference[:200]!r}")
  print(f"{FLAGS.checkpoint}: {100 * ended:.1f}% of {len(replies)} held-out prompts answered "
        f"with an assistant turn ending in <|end|> within {FLAGS.max_new_tokens} tokens; mean "
        f"response {mean_tokens:.1f} tokens (temperature {FLAGS.temperature})")
  print(json.dumps({"ended_fraction": ended, "num_prompts": len(replies),
                    "mean_response_tokens": mean_tokens, "max_new_tokens": FLAGS.max_new_tokens,
                    "temperature": FLAGS.temperature, "checkpoint": FLAGS.checkpoint}))


if __name__ == "__main__":
  app.run(main)
