"""Command line: Hugging Face directories <-> checkpoints of the shared format.

  python -m train.hf_convert export --checkpoint=runs/sft --out=hf/sft [--merge]
  python -m train.hf_convert import --hf_dir=path/to/model --workdir=runs/imported

Export (`train/hf_export.py`) writes a directory of the checkpoint's family (Llama, Qwen2,
Qwen3, Mistral) that `transformers.AutoModelForCausalLM` loads. Import
(`train/hf_import.py`) streams a directory's weights onto this process's devices and writes a
step-0 checkpoint (stage "hf_import"); every stage can also start from the directory
directly with `--config.init_from=hf:<dir>`, with the same reader. The weight relayout is
`model/hf.py`, the config.json conversion `model/hf_config.py`.
"""

from __future__ import annotations

import sys

from absl import app, flags

from train import checkpoint as ckpt_lib
from train import quiet
from train.hf_export import export_checkpoint
from train.hf_import import import_hf


def main(argv: list[str]) -> None:
  FLAGS = flags.FLAGS
  quiet.set_library_logs(FLAGS.verbose)
  if len(argv) != 2 or argv[1] not in ("export", "import"):
    sys.exit("usage: python -m train.hf_convert export --checkpoint=DIR --out=DIR | "
             "import --hf_dir=DIR --workdir=DIR")
  try:
    if argv[1] == "export":
      if not FLAGS.checkpoint or not FLAGS.out:
        raise ValueError("export needs --checkpoint and --out")
      config = export_checkpoint(FLAGS.checkpoint, FLAGS.out, merge=FLAGS.merge)
      print(f"Wrote {FLAGS.out}: {config['architectures'][0]} "
            f"{config['num_hidden_layers']} layers x {config['hidden_size']}, vocab "
            f"{config['vocab_size']}")
    else:
      if not FLAGS.hf_dir or not FLAGS.workdir:
        raise ValueError("import needs --hf_dir and --workdir")
      path = import_hf(FLAGS.hf_dir, FLAGS.workdir, FLAGS.param_dtype)
      print(f"Wrote {path}: use it as --config.init_from (or init_from=hf:{FLAGS.hf_dir})")
  except (ckpt_lib.CheckpointError, ValueError, OSError) as e:
    print("error: " + " ".join(str(e).split()))
    sys.exit(2)


if __name__ == "__main__":
  flags.DEFINE_string("checkpoint", "", "export: checkpoint (workdir, checkpoints or step dir).")
  flags.DEFINE_string("out", "", "export: output directory.")
  flags.DEFINE_bool("merge", False, "export: fold a LoRA checkpoint's adapters into its weights.")
  flags.DEFINE_string("hf_dir", "", "import: Hugging Face model directory.")
  flags.DEFINE_string("workdir", "", "import: workdir to write checkpoints/0 into.")
  flags.DEFINE_string("param_dtype", "float32", "import: stored parameter dtype.")
  flags.DEFINE_bool("verbose", False, "Show the libraries' INFO/WARNING logs.")
  app.run(main)
