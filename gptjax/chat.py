"""`gptjax chat`: talk to an instruction-tuned GPT; each message goes in the training prompt template and the
answer is printed token by token as `gptjax.generate.stream_generate` decodes it.

The conversation so far goes before each new message, one template block per turn, as much of it as fits
in the context window with room for the answer (the oldest turns drop out first); /reset starts over.
"""
from __future__ import annotations

import sys
from typing import Any, Callable, TextIO

import jax

from gptjax.config import GPTConfig
from gptjax.generate import decoding_model, stream_generate, text_pieces
from gptjax.options import Options
from gptjax.tasks.finetune import PAD_TOKEN_ID, encode
from gptjax.tasks.instruct_data import format_input, response_prefix

QUIT = ("/quit", "/exit", "/bye")
RESET = "/reset"


def fit_history(tokenizer: Any, turns: list[tuple[str, str]], message: str, style: str,
                room: int) -> tuple[list[int], int]:
    """(prompt ids, past turns kept): `message`'s template block after the newest past turns that fit in
    `room` tokens."""
    def block(instruction: str, answer: str = "") -> str:
        return format_input({"instruction": instruction, "input": ""}, style) + response_prefix(style) + answer

    blocks = [block(message)]
    ids = encode(tokenizer, blocks[0])
    for instruction, answer in reversed(turns):
        longer = encode(tokenizer, "\n\n".join([block(instruction, answer), *blocks]))
        if len(longer) > room:
            break
        blocks.insert(0, block(instruction, answer))
        ids = longer
    return ids, len(blocks) - 1


def chat(params: dict, cfg: GPTConfig, tokenizer: Any, *, style: str = "alpaca", max_new_tokens: int = 256,
         temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None, seed: int = 123,
         eos_id: int | None = PAD_TOKEN_ID, input_fn: Callable[[str], str] = input, out: TextIO | None = None,
         opts: Options | None = None) -> int:
    """Read messages until EOF or /quit; answer each one, streamed, after as much of the conversation as fits
    the context window; /reset forgets it. Returns the number of answered messages. `params` are laid out
    by `opts` (default: canonical)."""
    out = out or sys.stdout
    params, opts = decoding_model(params, cfg, opts)  # once for the session, not per answer
    key = jax.random.key(seed)
    # the prompt leaves room for the answer (at most half the window, so a long answer does not crowd out the past)
    room = cfg.context_length - min(max_new_tokens, cfg.context_length // 2)
    history: list[tuple[str, str]] = []
    answered = 0
    print(f"Chatting with a {cfg.n_layers}-layer GPT ({style} prompts, up to {max_new_tokens} tokens per answer"
          f"{', greedy' if temperature == 0 else f', temperature {temperature}'}). Empty line: skip; {RESET}: "
          f"forget the conversation; {QUIT[0]} or Ctrl-D: quit.", file=out, flush=True)
    while True:
        try:
            message = input_fn("You: ").strip()
        except (EOFError, KeyboardInterrupt):
            print(file=out)
            return answered
        if not message:
            continue
        if message.lower() in QUIT:
            return answered
        if message.lower() == RESET:
            history = []
            print("(conversation reset)", file=out, flush=True)
            continue
        ids, kept = fit_history(tokenizer, history, message, style, room)
        if len(ids) >= cfg.context_length:
            print(f"(message too long: {len(ids)} tokens with the template, the model reads {cfg.context_length}; "
                  f"shorten it)", file=out, flush=True)
            continue
        history = history[len(history) - kept:] if kept else []
        print("Model: ", end="", file=out, flush=True)
        tokens = stream_generate(params, cfg, ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                 eos_id=eos_id, key=jax.random.fold_in(key, answered), opts=opts)
        answer = []
        for piece in text_pieces(tokenizer, tokens):
            answer.append(piece)
            print(piece, end="", file=out, flush=True)
        print(file=out, flush=True)
        history.append((message, "".join(answer).strip()))
        answered += 1
