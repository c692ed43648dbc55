import os

# Tests never touch the network: loaders go straight to their local options.
os.environ.setdefault("GPTJAX_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One set of XLA flags for the test process and the CLI subprocesses it starts: bitwise comparisons
# across a process boundary (exact resume) need the same compiled numerics on both sides.
os.environ.setdefault("GPTJAX_NO_XLA_FLAGS", "1")
# On a GPU (JAX_PLATFORMS=cuda) float32 matmuls default to TF32; the tests' float32 tolerances assume float32
if os.environ["JAX_PLATFORMS"] not in ("", "cpu"):
    os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")

import pytest  # noqa: E402

from gptjax.config import GPTConfig  # noqa: E402


@pytest.fixture
def tiny_cfg() -> GPTConfig:
    return GPTConfig(vocab_size=97, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0)
