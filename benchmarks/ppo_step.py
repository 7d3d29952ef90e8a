"""Benchmark: time of one PPO iteration, split into rollout / scoring / update, per phase.

  python benchmarks/ppo_step.py --sft=runs/chain/sft --rm=runs/chain/rm [--iterations=4]

Builds the PPO run of configs/ppo/hh.py (the given SFT and reward-model checkpoints,
rollout batch 32 x 64 new tokens, 4 epochs x 2 minibatches) in a temporary workdir, runs
`--iterations` iterations and reports the mean over all but the first (compilation) of:
  rollout_s / scoring_s / update_s   wall seconds per phase
  *_tokens_per_sec                   generated tokens (rollout) or sequence tokens processed
                                     (scoring: every pass over the batch; update: per epoch)
  *_mfu                              model FLOPs / wall / the machine's matmul peak
Last line: one JSON object with `rollout_s`, `scoring_s`, `update_s`,
`rollout_tokens_per_sec` and the rest.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

FLAGS = flags.FLAGS
flags.DEFINE_string("sft", "runs/chain/sft", "SFT checkpoint (policy and reference).")
flags.DEFINE_string("rm", "runs/chain/rm", "Reward-model checkpoint (reward and value).")
flags.DEFINE_integer("iterations", 4, "Iterations run (the first is not counted).")
flags.DEFINE_string("config", "configs/ppo/hh.py", "PPO config file.")


def main(argv):
  del argv
  import importlib.util
  import numpy as np
  from rlhf.ppo import PPO
  spec = importlib.util.spec_from_file_location("ppo_cfg", os.path.join(REPO, FLAGS.config))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.init_from, config.reward_from = FLAGS.sft, FLAGS.rm
  config.ppo.iterations = FLAGS.iterations
  with tempfile.TemporaryDirectory() as workdir:
    ppo = PPO(config, workdir)
    p_state, _ = ppo.policy.restore_or_init()
    v_state, _ = ppo.value.restore_or_init()
    ppo.policy.setup_throughput(1, config.data.seq_len)  # measures the matmul peak for MFU
    rows = []
    for i in range(FLAGS.iterations):
      p_state, v_state, m, _ = ppo.iteration(i, p_state, v_state)
      print(f"iteration {i + 1}: rollout {m['time/rollout']:.2f}s "
            f"({m['time/rollout_tokens_per_sec']:,.0f} tok/s), scoring "
            f"{m['time/scoring']:.2f}s ({m['time/scoring_tokens_per_sec']:,.0f} tok/s), "
            f"update {m['time/update']:.2f}s ({m['time/update_tokens_per_sec']:,.0f} tok/s)"
            + (" [compilation]" if i == 0 else ""), flush=True)
      if i:
        rows.append(m)
    ppo.policy.close()
    ppo.value.close()
  mean = lambda k: float(np.mean([r[k] for r in rows]))
  out = {
      "rollout_s": round(mean("time/rollout"), 3),
      "scoring_s": round(mean("time/scoring"), 3),
      "update_s": round(mean("time/update"), 3),
      "rollout_tokens_per_sec": round(mean("time/rollout_tokens_per_sec"), 1),
      "scoring_tokens_per_sec": round(mean("time/scoring_tokens_per_sec"), 1),
      "update_tokens_per_sec": round(mean("time/update_tokens_per_sec"), 1),
      "rollout_mfu": round(mean("time/rollout_mfu"), 4),
      "scoring_mfu": round(mean("time/scoring_mfu"), 4),
      "update_mfu": round(mean("time/update_mfu"), 4),
      "rollout_batch_size": config.ppo.rollout_batch_size,
      "max_new_tokens": config.ppo.max_new_tokens, "iterations_timed": len(rows),
  }
  print(json.dumps(out))


if __name__ == "__main__":
  app.run(main)
