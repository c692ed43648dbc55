"""What streaming costs: decoding N tokens at batch 1 as one device program (`generate`), streamed by chunks of
tokens per device program (`stream_generate(chunk=K)`, one host round trip per chunk), and streamed from
inside one program through `jax.experimental.io_callback` (one host callback per token).

    python experiments/decode_stream.py                          # gpt2-small shapes, random weights, CPU
    JAX_PLATFORMS=cuda python experiments/decode_stream.py --weight-dtype bfloat16 --out $OUT/decode_stream_gpu

Tokens/s are medians of --rounds; every variant decodes the same greedy tokens (checked). Writes OUT.md/.json
(default experiments/results/decode_stream_<platform>).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from functools import partial
from pathlib import Path

from gptjax.runtime import setup

setup()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import io_callback  # noqa: E402

from gptjax.config import get_config  # noqa: E402
from gptjax.generate import decode_step, decoding_model, decoding_weights, generate, prefill, stream_generate  # noqa: E402
from gptjax.measure import device_info  # noqa: E402
from gptjax.model import init_params  # noqa: E402
from gptjax.options import Options  # noqa: E402

RESULTS = Path(__file__).parent / "results"


@partial(jax.jit, static_argnames=("cfg", "opts", "n"))
def callback_decode(params, idx_1T, key, *, cfg, opts, n):
    """Prefill + n - 1 decode steps in one program; each new token goes to the host through io_callback."""
    T0 = idx_1T.shape[1]
    tok_1, cache = prefill(params, idx_1T, jnp.int32(T0), key, cfg=cfg, max_len=T0 + n, opts=opts)

    def body(i, carry):
        cache, tok_1 = carry
        io_callback(_SINK.append, None, tok_1, ordered=True)
        nxt_1, cache = decode_step(params, cache, tok_1, T0 + i, key, cfg=cfg, opts=opts)
        return cache, nxt_1

    cache, tok_1 = jax.lax.fori_loop(0, n - 1, body, (cache, tok_1))
    io_callback(_SINK.append, None, tok_1, ordered=True)
    return tok_1


_SINK: list = []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="gpt2-small")
    ap.add_argument("--new-tokens", type=int, default=100)
    ap.add_argument("--prompt", type=int, default=8, help="prompt tokens")
    ap.add_argument("--chunks", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--weight-dtype", default=None, choices=["float32", "bfloat16", "int8"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    cfg = get_config(args.preset, qkv_bias=True, tie_embeddings=True, drop_rate=0.0)
    params, opts = decoding_model(init_params(cfg, jax.random.key(0)), cfg, Options())
    params, opts = decoding_weights(params, cfg, opts, args.weight_dtype)
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, args.prompt).tolist()
    N = args.new_tokens
    want = generate(params, cfg, [prompt], N, opts=opts)[0, args.prompt:].tolist()

    def one_program():
        return np.asarray(generate(params, cfg, [prompt], N, opts=opts))[0, args.prompt:].tolist()

    def streamed(chunk):
        return lambda: list(stream_generate(params, cfg, prompt, N, chunk=chunk, opts=opts))

    def callback():
        _SINK.clear()
        callback_decode(params, jnp.asarray([prompt], jnp.int32), jax.random.key(0), cfg=cfg, opts=opts,
                        n=N).block_until_ready()
        return [int(t[0]) for t in _SINK]

    variants = {"one program (generate)": one_program,
                **{f"stream, {c} token(s) per program": streamed(c) for c in args.chunks},
                "stream through io_callback, one program": callback}
    rows = []
    for name, fn in variants.items():
        assert fn() == want, name  # compiles, and checks the tokens
        times = []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        rows.append({"variant": name, "tokens_per_s": N / statistics.median(times), "s": statistics.median(times)})
        print(f"{name}: {rows[-1]['tokens_per_s']:.1f} tokens/s")
    base = rows[0]["tokens_per_s"]
    info = device_info()
    lines = [f"device: {info['platform']} {info['device_kind']}; {args.preset} (random weights), batch 1, prompt "
             f"{args.prompt}, {N} new tokens, weights {args.weight_dtype or 'float32'}, median of {args.rounds}", "",
             "| variant | tokens/s | vs one program |", "|---|---:|---:|"]
    lines += [f"| {r['variant']} | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / base:.2f} |" for r in rows]
    print("\n".join(lines))
    out = Path(args.out or RESULTS / f"decode_stream_{info['platform']}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"device": info, "config": vars(args), "rows": rows}, indent=1,
                                                   default=str))


if __name__ == "__main__":
    main()
