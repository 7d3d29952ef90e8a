"""The one FLOP counter (model FLOPs, as used for MFU) and peak-FLOP/s references.

Model FLOPs per token follow the PaLM appendix convention, with the causal-attention
correction MaxText uses: 6 * (matmul parameters) for the weights, plus 6 * T * N * D per
layer for attention scores and values (12 * T * N * D halved because a causal mask needs
only the lower triangle). Embedding lookups are free; a tied or untied output projection
counts as a matmul. This is the work the model needs, not what an implementation executes
(e.g. the XLA reference attention computes the full square), so MFU is comparable across
implementations.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from model.config import ModelConfig

# Dense bf16 peak FLOP/s per device for accelerators we know (vendor figures).
KNOWN_PEAKS = {
    "H100": 989e12, "H200": 989e12, "A100": 312e12,
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12,
}


def flops_per_token(cfg: ModelConfig, seq_len: int, training: bool = True,
                    output_projection: bool = True) -> float:
  """Model FLOPs per token for a forward+backward (training) or forward pass.

  `output_projection=False` leaves out the vocabulary projection (scalar-head models).
  """
  e, hd = cfg.embed_dim, cfg.resolved_head_dim
  attn_proj = e * hd * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
  mlp = 3 * e * cfg.mlp_dim
  matmul_params = (cfg.num_layers * (attn_proj + mlp)
                   + (e * cfg.vocab_size if output_projection else 0))
  attention = cfg.num_layers * seq_len * cfg.num_heads * hd  # causal: half of 2*T*N*D*2
  forward = 2 * matmul_params + 2 * attention
  return 3 * forward if training else forward


def device_peak_flops(device: jax.Device | None = None) -> float | None:
  """Vendor peak for known accelerators; None for CPUs and unknown kinds."""
  device = device or jax.devices()[0]
  kind = getattr(device, "device_kind", "")
  for name, peak in KNOWN_PEAKS.items():
    if name.lower() in kind.lower():
      return peak
  return None


def measure_matmul_peak(n: int = 1024, dtype: str = "float32", repeats: int = 10,
                        devices: list[jax.Device] | None = None) -> float:
  """Measures the achievable matmul FLOP/s of `devices` together (default: local devices).

  One n x n x n matmul per device runs at once, sharded over the devices, so fake CPU
  devices that share the same cores are not counted twice. On CPUs there is no vendor
  figure that matches what XLA can reach, so MFU there is reported against this peak,
  measured on the same machine in the same run.
  """
  devices = devices or jax.local_devices()
  mesh = jax.sharding.Mesh(devices, ("d",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d"))
  a = jax.device_put(jnp.ones((len(devices), n, n), dtype), sharding)
  f = jax.jit(lambda x: jnp.einsum("bij,bjk->bik", x, x), out_shardings=sharding)
  f(a).block_until_ready()  # compile
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * len(devices) * n**3 / best
