"""Depth versus width at a fixed parameter count (~0.79M without the embeddings).

  python -m launch.sweep --config=configs/ablations/depth_width.py --workdir=runs/ablations/depth_width

The baby GPT of configs/pretrain/shakespeare_char.py (4 layers x 128) against 2 x 176,
8 x 88 and 16 x 64, each with 4 heads and the SwiGLU width ~2.69 x the model width (a
block holds ~12.1 d^2 parameters), 1000 steps x seeds 0 and 1: 8 runs. The table's
`params` column is each model's exact count (embeddings included). Results in README
"Ablations".
"""

from configs import common

# (layers, width, SwiGLU width): 12.1 * layers * width^2 ~ 0.79M.
SHAPES = ((2, 176, 472), (4, 128, 344), (8, 88, 240), (16, 64, 176))


def get_config(arg=None):
  common.parse_arg(arg)  # no variants: any argument is an error
  c = common.baby_gpt_sweep()
  c.points = [{"name": f"{layers}x{width}", "model.num_layers": layers,
               "model.embed_dim": width, "model.mlp_dim": mlp}
              for layers, width, mlp in SHAPES]
  return c
