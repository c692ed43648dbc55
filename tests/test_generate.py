import jax
import numpy as np
import pytest

from gptjax.generate import generate, generate_text_simple, sample_logits, trim_at_eos
from gptjax.model import GPT, init_params


@pytest.fixture
def model(tiny_cfg):
    return init_params(tiny_cfg, jax.random.key(0)), tiny_cfg


def naive_greedy(params, cfg, idx, n):
    """The book's generate_text_simple, step by step on the host."""
    idx = np.asarray(idx)
    apply = jax.jit(lambda p, x: GPT(cfg).apply({"params": p}, x))
    for _ in range(n):
        logits = apply(params, idx[:, -cfg.context_length:])
        idx = np.concatenate([idx, np.argmax(np.asarray(logits[:, -1]), -1)[:, None]], axis=1)
    return idx


def test_greedy_matches_the_books_loop(model):
    params, cfg = model
    idx = np.array([[1, 2, 3], [4, 5, 6]])
    np.testing.assert_array_equal(generate(params, cfg, idx, 15), naive_greedy(params, cfg, idx, 15))
    np.testing.assert_array_equal(generate_text_simple(params, cfg, idx, 5), naive_greedy(params, cfg, idx, 5))


def test_prompt_longer_than_context_is_cropped_from_the_left(model):
    params, cfg = model
    idx = np.arange(1, 2 * cfg.context_length + 4)[None] % cfg.vocab_size
    out = generate(params, cfg, idx, 6)
    assert out.shape == (1, idx.shape[1] + 6)
    np.testing.assert_array_equal(out, naive_greedy(params, cfg, idx, 6))


def test_eos_stops_each_row_on_its_own(model):
    params, cfg = model
    idx = np.array([[1, 2, 3], [7, 8, 9]])
    free = generate(params, cfg, idx, 12)
    eos = int(free[0, 5])  # row 0 emits this token at its third step
    assert eos not in free[1, 3:].tolist(), "pick a prompt where row 1 never emits row 0's token"
    out = generate(params, cfg, idx, 12, eos_id=eos)
    assert trim_at_eos(out[0, 3:], eos) == free[0, 3:5].tolist()
    assert (out[0, 5:] == eos).all()
    np.testing.assert_array_equal(out[1], free[1])  # row 1 unaffected


def test_loop_ends_when_every_row_is_done(model):
    params, cfg = model
    idx = np.array([[1, 2, 3]])
    eos = int(generate(params, cfg, idx, 1)[0, -1])
    out = generate(params, cfg, idx, 30, eos_id=eos)
    assert out.shape == (1, 4)


def test_sampling_reproducible_and_key_dependent(model):
    params, cfg = model
    idx = np.array([[1, 2, 3]])
    a = generate(params, cfg, idx, 10, temperature=1.5, key=jax.random.key(1))
    b = generate(params, cfg, idx, 10, temperature=1.5, key=jax.random.key(1))
    c = generate(params, cfg, idx, 10, temperature=1.5, key=jax.random.key(2))
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    greedy = generate(params, cfg, idx, 10)
    np.testing.assert_array_equal(generate(params, cfg, idx, 10, temperature=1.0, top_k=1, key=jax.random.key(3)), greedy)


def test_top_k_and_top_p_restrict_the_support():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], np.float32))
    keys = jax.random.split(jax.random.key(0), 400)
    draw = lambda **kw: set(np.asarray(jax.vmap(lambda k: sample_logits(logits, k, temperature=1.0, **kw))(keys)).ravel().tolist())
    assert draw() == {0, 1, 2, 3}
    assert draw(top_k=2) == {0, 1}
    assert draw(top_p=0.7) == {0, 1}
    assert draw(top_p=0.5) == {0}
    assert draw(top_p=0.81) == {0, 1, 2}


@pytest.mark.parametrize("kwargs, match", [
    (dict(idx=[[]]), "non-empty prompt"),
    (dict(idx=[[1, 500]]), r"token ids must lie in \[0, 97\)"),
    (dict(temperature=-1.0), "temperature must be >= 0"),
    (dict(temperature=0.8), "needs a PRNG key"),
    (dict(top_p=1.5), "top_p must be in"),
    (dict(max_new_tokens=-2), "max_new_tokens must be >= 0"),
])
def test_bad_generation_arguments(model, kwargs, match):
    params, cfg = model
    args = dict(idx=[[1, 2]], max_new_tokens=3)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        generate(params, cfg, np.array(args.pop("idx")), args.pop("max_new_tokens"), **args)
