"""Training: the stage driver, the Trainer core, checkpoints, metrics, the stages.

TensorFlow (tf.data, gfile, TensorBoard) prints C++ start-up lines when first imported
unless TF_CPP_MIN_LOG_LEVEL is set before that import; the default here keeps them off the
console (`--verbose` or an explicit TF_CPP_MIN_LOG_LEVEL brings them back, train/quiet.py).
TF 2.21 prints its oneDNN notice whatever that level says, so TF_ENABLE_ONEDNN_OPTS=0 is the
default too: TF runs only host-side tf.data and summaries here, never oneDNN math kernels.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
