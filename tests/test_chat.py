import io

import jax
import pytest

from gptjax.chat import chat
from gptjax.generate import generate_batch
from gptjax.model import init_params
from gptjax.tasks.finetune import encode
from gptjax.tasks.instruct_data import format_input, response_prefix
from test_instruct import EOT, CharTokenizer, char_cfg


def feed(*lines):
    """An input() that returns `lines`, then signals end of input."""
    it = iter(lines)

    def read(prompt):
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None

    return read


@pytest.fixture(scope="module")
def model():
    cfg = char_cfg(context_length=64)
    return init_params(cfg, jax.random.key(3)), cfg


def test_chat_streams_answers_in_the_prompt_template(model):
    params, cfg = model
    tok = CharTokenizer()
    cfg = cfg.replace(context_length=256)
    params = {**params, "wpe": {"embedding": jax.numpy.tile(params["wpe"]["embedding"], (4, 1))}}
    out = io.StringIO()
    n = chat(params, cfg, tok, max_new_tokens=6, eos_id=EOT, input_fn=feed("", "Name a color.", "/quit", "x"), out=out)
    assert n == 1
    ids = encode(tok, format_input({"instruction": "Name a color.", "input": ""}) + response_prefix("alpaca"))
    want = tok.decode(generate_batch(params, cfg, [ids], 6, eos_id=EOT)[0])
    assert "Chatting with a 1-layer GPT" in out.getvalue()
    assert out.getvalue().endswith(f"Model: {want}\n")
    out = io.StringIO()
    assert chat(params, cfg, tok, input_fn=feed("x" * 300), out=out) == 0  # then end of input
    assert "message too long: 440 tokens" in out.getvalue()


def test_chat_keeps_the_conversation_in_the_window_and_resets(model, monkeypatch):
    import gptjax.chat as chat_mod

    params, cfg = model  # context 64 characters
    tok = CharTokenizer()
    prompts = []

    def fake_stream(params, cfg, ids, max_new_tokens, **kw):
        prompts.append(tok.decode(ids))
        yield from tok.encode("ok")

    monkeypatch.setattr(chat_mod, "stream_generate", fake_stream)
    cfg = cfg.replace(context_length=1024)
    out = io.StringIO()
    n = chat(params, cfg, tok, max_new_tokens=8, input_fn=feed("Hi.", "Again?", "/reset", "New."), out=out)

    def block(m, answer=""):
        return format_input({"instruction": m, "input": ""}) + response_prefix("alpaca") + answer

    assert n == 3 and "(conversation reset)" in out.getvalue()
    assert prompts == [block("Hi."), block("Hi.", "ok") + "\n\n" + block("Again?"), block("New.")]
    # a window too small for the whole past keeps the newest turns that fit, oldest out first
    prompts.clear()
    room = len(block("b", "ok") + "\n\n" + block("c")) + 8
    chat(params, cfg.replace(context_length=room), tok, max_new_tokens=8, input_fn=feed("a", "b", "c"),
         out=io.StringIO())
    assert prompts[2] == block("b", "ok") + "\n\n" + block("c")
