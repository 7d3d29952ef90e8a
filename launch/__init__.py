"""launch package.

The launchers import jax, Orbax and the model code (`train.checkpoint`, `model.sharding`,
`train.storage`) inside the functions that need them, so `--help` and `--dry_run` answer
without loading JAX; everything else is imported at module level.
"""
