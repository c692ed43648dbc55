"""The chunked LM head + cross-entropy (Options.loss_chunk): the same loss and gradients as the full logits,
without the (B, T, V) float32 logits in memory."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax.config import GPTConfig
from gptjax.engine import cross_entropy
from gptjax.measure import xla_memory_bytes
from gptjax.model import GPT, init_params
from gptjax.optim import OptimConfig
from gptjax.options import Options
from gptjax.tasks.pretrain import init_state, make_loss_fn, make_steps


@pytest.mark.parametrize("tie, layout, multiple, chunk", [(True, "in_out", 1, 5), (False, "in_out", 64, 16),
                                                          (False, "out_in", 1, 16), (True, "out_in", 64, 5)])
def test_chunked_loss_equals_the_full_logits_loss_and_gradients(tie, layout, multiple, chunk):
    cfg = GPTConfig(vocab_size=97, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0,
                    tie_embeddings=tie)
    full = Options(linear_layout=layout, vocab_multiple=multiple)
    chunked = full.replace(loss_chunk=chunk)
    params = init_params(cfg, jax.random.key(0), full)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.integers(0, 97, (3, 16)), jnp.int32)
    y = jnp.asarray(rng.integers(0, 97, (3, 16)), jnp.int32).at[0, :4].set(-100)  # SFT's ignored targets too

    def loss(p, opts):
        return make_loss_fn(cfg, opts)(p, None, (x, y), None)[0]

    (a, ga), (b, gb) = (jax.value_and_grad(loss)(params, o) for o in (full, chunked))
    np.testing.assert_allclose(b, a, rtol=1e-6)
    np.testing.assert_allclose(a, cross_entropy(GPT(cfg, full).apply({"params": params}, x), y), rtol=1e-6)
    for leaf_a, leaf_b in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        np.testing.assert_allclose(leaf_b, leaf_a, rtol=1e-4, atol=1e-6)


def test_chunked_loss_keeps_the_logits_out_of_the_train_steps_memory():
    cfg = GPTConfig(vocab_size=50257, context_length=512, emb_dim=64, n_heads=4, n_layers=1, drop_rate=0.0,
                    tie_embeddings=True)
    x = jnp.zeros((4, 512), jnp.int32)
    memory = {}
    for chunk in (0, 64):
        opts = Options(loss_chunk=chunk)
        steps = make_steps(cfg, OptimConfig(), opts=opts, share=False)
        state = init_state(steps, cfg, 0, opts=opts)
        memory[chunk] = xla_memory_bytes(steps.lower(state, (x, x)).compile())
    logits = 4 * 512 * 50257 * 4  # (B, T, V) float32: 412 MB
    assert memory[0] > 2 * logits and memory[64] < memory[0] - 1.5 * logits, memory
