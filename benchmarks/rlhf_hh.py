"""Benchmark: the PPO and DPO acceptance runs on the HH prompts, judged by two reward models.

  python benchmarks/rlhf_hh.py --sft=runs/chain/sft --root=runs/rlhf

From one SFT checkpoint (configs/sft/chat.py, e.g. the chain of benchmarks/reward_hh.py)
it runs, each stage only if `<root>/<stage>` has not finished yet (minutes in
`<root>/minutes.json`, logs in `<root>/<stage>.log`):

  rm_a  python -m rlhf.reward --config=configs/reward/hh.py --config.data.train_part=a
  rm_b  python -m rlhf.reward --config=configs/reward/hh.py --config.data.train_part=b
        two reward models from the SFT model on prompt-disjoint halves of the training
        pairs: rm_a is the one PPO trains against, rm_b the second judge
  ppo   python -m rlhf.ppo --config=configs/ppo/hh.py --config.reward_from=<root>/rm_a
  dpo   python -m rlhf.dpo --config=configs/dpo/hh.py --config.data.train_part=a
        (DPO learns from the same pairs as rm_a)

then `eval.winrate` on the held-out prompts (the 10% of HH prompts no run trained on, at
most ppo.max_prompt_tokens long), `--samples_per_prompt` responses each from the SFT, PPO
and DPO policies at the PPO temperature, judged by rm_a ("train") and rm_b ("second"),
KL measured to the SFT policy. Last line: one JSON object with
  score_gain_std        PPO's mean rm_a score gain in std units of the SFT policy's scores
  kl                    PPO's mean KL to the SFT policy on the held-out prompts (nats per
                        response; `kl_bound` is the config's ppo.max_kl)
  distinct2_ratio       PPO's distinct-2 / the SFT policy's
  winrate_train_rm      PPO vs SFT judged by rm_a;  winrate_second_rm: judged by rm_b
  dpo_winrate_train_rm, dpo_winrate_second_rm   the same for DPO
and the counts, intervals, DPO's gain / KL / distinct-2 and the stage minutes beside them.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

FLAGS = flags.FLAGS
flags.DEFINE_string("sft", "runs/chain/sft", "SFT checkpoint: policy init and reference.")
flags.DEFINE_string("root", "runs/rlhf", "Directory of the rm_a, rm_b, ppo and dpo workdirs.")
flags.DEFINE_list("stages", ["rm_a", "rm_b", "ppo", "dpo"], "Stages that may run.")
flags.DEFINE_integer("samples_per_prompt", 8, "Responses per held-out prompt and policy.")
flags.DEFINE_multi_string("ppo_flag", [], "Extra flags for the PPO run (e.g. "
                          "--config.ppo.kl_coef=0.1).")
flags.DEFINE_multi_string("dpo_flag", [], "Extra flags for the DPO run.")


def main(argv):
  del argv
  from launch.stages import Chain, run_json
  chain = Chain(FLAGS.root)
  sft = os.path.abspath(FLAGS.sft)
  for part in ("a", "b"):
    chain.ensure(f"rm_{part}", [
        "-m", "rlhf.reward", "--config=configs/reward/hh.py",
        f"--workdir={chain.workdir('rm_' + part)}", f"--config.init_from={sft}",
        f"--config.data.train_part={part}"], allowed=f"rm_{part}" in FLAGS.stages)
  chain.ensure("ppo", ["-m", "rlhf.ppo", "--config=configs/ppo/hh.py",
                       f"--workdir={chain.workdir('ppo')}", f"--config.init_from={sft}",
                       f"--config.reward_from={chain.workdir('rm_a')}", *FLAGS.ppo_flag],
               allowed="ppo" in FLAGS.stages)
  chain.ensure("dpo", ["-m", "rlhf.dpo", "--config=configs/dpo/hh.py",
                       f"--workdir={chain.workdir('dpo')}", f"--config.init_from={sft}",
                       "--config.data.train_part=a", *FLAGS.dpo_flag],
               allowed="dpo" in FLAGS.stages)
  # The PPO run's own config (flags included) sets the prompts, lengths and temperature.
  from train import checkpoint as ckpt_lib
  p = ckpt_lib.read_metadata(os.path.join(chain.workdir("ppo"), "policy"))["config"]["ppo"]
  result = run_json([
      "-m", "eval.winrate", f"--policy=sft={sft}",
      f"--policy=ppo={os.path.join(chain.workdir('ppo'), 'policy')}",
      f"--policy=dpo={chain.workdir('dpo')}", "--baseline=sft", f"--reference={sft}",
      f"--judge=train={chain.workdir('rm_a')}", f"--judge=second={chain.workdir('rm_b')}",
      f"--max_prompt_tokens={p['max_prompt_tokens']}",
      f"--max_new_tokens={p['max_new_tokens']}", f"--temperature={p['temperature']}",
      f"--samples_per_prompt={FLAGS.samples_per_prompt}",
      f"--output={os.path.join(chain.root, 'compare.jsonl')}"])
  ppo, dpo, base = (result["policies"][k] for k in ("ppo", "dpo", "sft"))
  summary = {
      "score_gain_std": round(ppo["gain_std/train"], 3),
      "kl": round(ppo["kl"], 3),
      "distinct2_ratio": round(ppo["distinct2_ratio"], 3),
      "winrate_train_rm": round(ppo["winrate/train"], 4),
      "winrate_second_rm": round(ppo["winrate/second"], 4),
      "dpo_winrate_train_rm": round(dpo["winrate/train"], 4),
      "dpo_winrate_second_rm": round(dpo["winrate/second"], 4),
      "kl_bound": p["max_kl"],
      "score_gain_std_second_rm": round(ppo["gain_std/second"], 3),
      "dpo_score_gain_std": round(dpo["gain_std/train"], 3),
      "dpo_kl": round(dpo["kl"], 3), "dpo_distinct2_ratio": round(dpo["distinct2_ratio"], 3),
      "sft_distinct2": round(base["distinct2"], 4),
      **{f"{name}_wins_ties_losses_{j}": result["policies"][name][f"winrate/{j}/wins_ties_losses"]
         for name in ("ppo", "dpo") for j in ("train", "second")},
      "comparisons": result["num_prompts"] * result["samples_per_prompt"],
      "num_prompts": result["num_prompts"],
      **{f"minutes_{k}": round(v, 1) for k, v in chain.minutes.items()},
  }
  print(json.dumps(summary))


if __name__ == "__main__":
  app.run(main)
