"""Multi-host start-up: `jax.distributed.initialize` from flags or the environment.

Resolution: explicit flags (`--coordinator_address`, `--num_processes`, `--process_id`),
else the environment variables LM_COORDINATOR_ADDRESS / LM_NUM_PROCESSES / LM_PROCESS_ID
(what `launch/local.py` sets), else `--distributed=auto` lets JAX detect a Cloud TPU VM pod
or SLURM. Nothing is initialised for a plain single-process run.

On CPU, processes exchange collectives through gloo, and `local_devices` sets how many CPU
devices each process exposes (the CPU analogue of chips per host; default one per core,
rounded down to a power of two and at most 4, unless XLA_FLAGS already forces a count).
"""

from __future__ import annotations

import os

import jax


def default_local_devices(cores: int) -> int:
  """CPU devices for a process on a machine with `cores` cores.

  One device per core: data parallelism over cores beats one device whose matmuls use every
  core (README "Performance"). Rounded down to a power of two and capped at 4, so the CPU
  configs' batch sizes (12, 8; eval 64) divide on any machine. Affects the CPU backend only.
  """
  cores = max(1, min(cores, 4))
  return 1 << (cores.bit_length() - 1)


def initialize(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1,
               local_devices: int = 0, auto: bool = False) -> None:
  """Initialises jax.distributed when a multi-process run is requested; else does nothing."""
  coordinator_address = coordinator_address or os.environ.get("LM_COORDINATOR_ADDRESS", "")
  num_processes = num_processes or int(os.environ.get("LM_NUM_PROCESSES", "0"))
  if process_id < 0:
    process_id = int(os.environ.get("LM_PROCESS_ID", "-1"))
  local_devices = local_devices or int(os.environ.get("LM_LOCAL_DEVICES", "0"))
  if not local_devices and "device_count" not in os.environ.get("XLA_FLAGS", ""):
    local_devices = default_local_devices(os.cpu_count() or 1)
  if local_devices:
    jax.config.update("jax_num_cpu_devices", local_devices)
  if coordinator_address:
    if num_processes <= 0 or process_id < 0:
      raise ValueError(f"coordinator_address={coordinator_address!r} needs num_processes > 0 "
                       f"and process_id >= 0 (got {num_processes}, {process_id})")
    if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS") == "cpu":
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes=num_processes,
                               process_id=process_id)
  elif auto:
    jax.distributed.initialize()
