"""Packaging for the JAX LLM lifecycle codebase (pretrain -> SFT -> RM -> PPO/DPO -> eval)."""
from setuptools import find_packages, setup

HF = ["torch==2.13.0", "transformers>=4.50,<6", "safetensors>=0.4"]

setup(
    name="lmlife",
    version="0.1.0",
    description="Train a language model through its whole lifecycle in JAX/Flax NNX.",
    python_requires=">=3.10",
    packages=find_packages(include=["model*", "data*", "train*", "rlhf*", "eval*", "configs*", "launch*", "serve*"]),
    install_requires=[
        # Versions tested together on CPU (see README 'Dependencies'); ranges stay within
        # the minor releases whose APIs this code uses (NNX out_sharding metadata, Orbax
        # CheckpointManager args API).
        "jax>=0.10.2,<0.11",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.8,<0.13",
        "tensorflow-cpu>=2.21,<2.22",
        "tensorflow-datasets>=4.9.10,<5",
        # tensorflow-datasets 4.9.10 imports importlib_resources but does not declare it.
        "importlib_resources>=6",
        # Not 0.2.3: its model-proto module is protobuf-7 generated code, which refuses the
        # protobuf 6 runtime that apache-beam (<7) requires.
        "sentencepiece>=0.2.1,<0.2.3",
        # Hugging Face tokenizer.json backend (data/hf_backend.py) and imported models' Jinja
        # chat templates (data/jinja_chat.py; >=3.1.6: earlier ones have sandbox escapes).
        "tokenizers>=0.22,<0.24",
        "jinja2>=3.1.6,<4",
        "absl-py>=2.1,<3",
        "ml-collections>=1.1,<2",
        "tensorboard>=2.21,<2.22",
        # PNG curves of RLHF runs (score / KL / entropy per iteration).
        "matplotlib>=3.8,<4",
        "numpy>=1.26",
        # serve/: the OpenAI-compatible server (FastAPI on uvicorn: request validation by
        # pydantic, server-sent events, a well-kept ASGI stack) and its Prometheus /metrics.
        "fastapi>=0.115,<1",
        "uvicorn>=0.30,<1",
        # uvicorn's C HTTP parser (its `standard` extra's): h11, the pure-Python default,
        # cost the server about a tenth of its CPU at 16 streaming clients.
        "httptools>=0.6,<1",
        "prometheus-client>=0.20,<1",
        # data.curate runs as an Apache Beam pipeline (DirectRunner locally, Dataflow / Flink /
        # Spark at scale); 2.77 resolves together with the pinned TensorFlow, JAX and Orbax.
        "apache-beam>=2.77,<3",
        # crc32c of the TFRecord frames the curation writes (data/curate/files.py), in C: a
        # per-byte Python loop over every record cost seconds per run.
        "google-crc32c>=1.5,<2",
        # MinHash signatures of the near-dedup step (data/filters.py), set up to equal the
        # hand-written version it replaced (benchmarks/minhash_speed.py has the figures).
        "datasketch>=2.0,<3",
    ],
    extras_require={
        # Hugging Face interop (model/hf.py) and its parity tests against transformers.
        # Exactly this torch: the CPU wheel available here; any other version pulls
        # gigabytes of CUDA packages.
        "hf": HF,
        # Cloud TPU VMs (launch/tpu_vm.py setup): JAX with its TPU runtime (libtpu).
        "tpu": ["jax[tpu]>=0.10.2,<0.11"],
        # The tests include the transformers parity checks, so they need the hf extra.
        # import-linter: tests/test_layering.py checks the import layers in .importlinter
        # (2.17 tested; its acyclic_siblings contract is recent).
        # tiktoken: Meta's reference encoder for the Llama-3 tokenizer parity test.
        # openai: the real client drives the server in tests/test_serve_*.py (on localhost).
        # httpx: those tests also send raw bodies the client would refuse to build (bad JSON,
        # no key) and read /metrics; named here because openai 3.x moved to httpx2.
        # lm-eval: tests/test_eval_lm_eval_adapter.py runs its evaluator on the lmlife adapter;
        # with accelerate (its hf model needs it) tests/test_eval_safety.py compares our
        # CrowS-Pairs / BBQ with `lm_eval --model hf` on the exported model (slow tier).
        "test": ["pytest>=8,<10", "import-linter>=2.17,<3", "tiktoken>=0.7,<0.15",
                 "openai>=1.40,<4", "httpx>=0.27,<1", "lm-eval>=0.4.9,<0.5",
                 "accelerate>=1.0,<2", *HF],
        # benchmarks/lm_eval_parity.py: EleutherAI's harness, run offline on local files.
        "parity": [*HF, "lm-eval>=0.4.9,<0.5", "accelerate>=1.0,<2"],
        # benchmarks/curate_peer.py: datatrove, the peer curation library, without its
        # `processing` extra (trafilatura, fasttext, ... unused here): orjson for its jsonl
        # reader/writer, spaCy for its English word tokenizer (--word_tokenizer=spacy), and
        # xxhash < 4 as that extra pins it (its n-gram hash passes str, which xxhash 4
        # refuses). benchmarks/minhash_speed.py: datasketch's MinHash / MinHashLSH.
        # All resolve without changing the pinned JAX, TensorFlow, protobuf or numpy.
        "peers": ["datatrove>=0.10.1,<0.11", "orjson>=3.10,<4", "spacy>=3.8,<4",
                  "xxhash>=3.5,<4", "datasketch>=2.0,<3"],
    },
)
