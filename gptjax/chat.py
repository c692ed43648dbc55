"""`gptjax chat`: talk to an instruction-tuned GPT; each message is wrapped in the training prompt template
and the answer is printed token by token as it is generated.

Each turn stands alone (the book's templates hold one instruction, no history). Tokens come from
`gptjax.generate.stream_generate` (KV cache; the book's window past the context).
"""
from __future__ import annotations

import codecs
import sys
from typing import Any, Callable, TextIO

import jax

from gptjax.config import GPTConfig
from gptjax.generate import decoding_model, stream_generate
from gptjax.options import Options
from gptjax.tasks.instruct_data import PAD_TOKEN_ID, encode, format_input, response_prefix

QUIT = ("/quit", "/exit", "/bye")


def _token_bytes(tokenizer: Any, t: int) -> bytes:
    if hasattr(tokenizer, "decode_single_token_bytes"):  # tiktoken: a token may hold part of a UTF-8 character
        return tokenizer.decode_single_token_bytes(t)
    return tokenizer.decode([t]).encode("utf-8")


def chat(params: dict, cfg: GPTConfig, tokenizer: Any, *, style: str = "alpaca", max_new_tokens: int = 256,
         temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None, seed: int = 123,
         eos_id: int | None = PAD_TOKEN_ID, input_fn: Callable[[str], str] = input, out: TextIO | None = None,
         opts: Options | None = None) -> int:
    """Read messages until EOF or /quit; answer each one, streamed. Returns the number of answered messages.

    `params` are laid out by `opts` (default: canonical); they are laid out for decoding once here."""
    out = out or sys.stdout
    params, opts = decoding_model(params, cfg, opts)  # once for the session, not per answer
    key = jax.random.key(seed)
    turns = 0
    print(f"Chatting with a {cfg.n_layers}-layer GPT ({style} prompts, up to {max_new_tokens} tokens per answer"
          f"{', greedy' if temperature == 0 else f', temperature {temperature}'}). Empty line: skip; "
          f"{QUIT[0]} or Ctrl-D: quit.", file=out, flush=True)
    while True:
        try:
            message = input_fn("You: ")
        except (EOFError, KeyboardInterrupt):
            print(file=out)
            return turns
        message = message.strip()
        if not message:
            continue
        if message.lower() in QUIT:
            return turns
        prompt = format_input({"instruction": message, "input": ""}, style) + response_prefix(style)
        ids = encode(tokenizer, prompt)
        if len(ids) >= cfg.context_length:
            print(f"(message too long: {len(ids)} tokens with the template, the model reads {cfg.context_length}; "
                  f"shorten it)", file=out, flush=True)
            continue
        print("Model: ", end="", file=out, flush=True)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        for t in stream_generate(params, cfg, ids, max_new_tokens, temperature=temperature, top_k=top_k,
                                 top_p=top_p, eos_id=eos_id, key=jax.random.fold_in(key, turns), opts=opts):
            print(decoder.decode(_token_bytes(tokenizer, t)), end="", file=out, flush=True)
        print(decoder.decode(b"", final=True), file=out, flush=True)
        turns += 1
