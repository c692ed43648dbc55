"""Decoding from float32, bfloat16 and int8 weights on CPU: speed, and what the smaller weights cost.

Speed: gpt2-small with random weights laid out by `decoding_model` (on CPU: (out, in) kernels, the
C++ matvec kernel), each weight dtype prepared by `generate.decoding_weights` exactly as
`gptjax generate --weight-dtype` does (bfloat16: weight-only, float32 compute; int8: a float32 scale
per out row, float32 compute), greedy decoding of 200 tokens after an 8-token prompt at batch 1,
timed side by side round after round (medians), against the bandwidth roofline of each (half the
best 1 GiB in-place copy, measured before and after; bytes = matmul weights + float32 KV cache).

Quality (with --model, a trained model: a run directory or a GPT-2 size): on --text split as
`gptjax pretrain` splits it (the run's training text and its held-out tail), the next-token
cross-entropy with each weight dtype, and how often its argmax next token agrees with float32's,
in windows of the model's context length.

    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python experiments/cpu_decode_weight_dtypes.py \\
        [--model checkpoints/pretrain] [--text default] [--rounds 5]
"""
import argparse
import statistics

from gptjax.runtime import setup

setup(compilation_cache=False)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from gptjax import generate as gen  # noqa: E402
from gptjax.bench import BenchConfig  # noqa: E402
from gptjax.measure import alternate, decode_bytes_per_step, memory_bandwidth, roofline_bandwidth  # noqa: E402
from gptjax.model import GPT, init_params  # noqa: E402

NEW_TOKENS = 200
PROMPT = 8
DTYPES = ("float32", "bfloat16", "int8")
BYTES = {"float32": 4, "bfloat16": 2, "int8": 1}


def speed(rounds: int) -> None:
    cfg = BenchConfig(preset="gpt2-small", context_length=256).model_config(drop_rate=0.0)
    params, opts = gen.decoding_model(init_params(cfg, jax.random.key(0)), cfg)
    runs = {wd: gen.decoding_weights(params, cfg, opts, wd) for wd in DTYPES}
    prompt = np.zeros((1, PROMPT), np.int32)
    bws = [memory_bandwidth()]
    times = alternate({wd: lambda p=p, o=o: gen.generate(p, cfg, prompt, NEW_TOKENS, opts=o)
                       for wd, (p, o) in runs.items()}, rounds=rounds)
    bws.append(memory_bandwidth())
    roof = roofline_bandwidth(*bws)
    base = statistics.median(times["float32"])
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}; gpt2-small with its own head (random weights), "
          f"batch 1, {NEW_TOKENS} new tokens, matvec={opts.matvec}; roofline {roof:.1f} GB/s; {rounds} rounds, medians")
    print("| weights (compute float32) | tokens/s | vs float32 | roofline tokens/s | of the roofline |")
    print("|---|---:|---:|---:|---:|")
    for wd, ts in times.items():
        s = statistics.median(ts)
        need = decode_bytes_per_step(cfg, 1, PROMPT + NEW_TOKENS, BYTES[wd], 4)
        print(f"| {wd} | {NEW_TOKENS / s:.1f} | {base / s:.2f} | {roof * 1e9 / need:.0f} "
              f"| {NEW_TOKENS / s / (roof * 1e9 / need):.2f} |")


def quality(model: str, text_path: str, train_ratio: float, max_windows: int) -> None:
    from gptjax.model_io import load_model
    from gptjax.data import load_corpus, split_text
    from gptjax.tokenizer import get_gpt2_tokenizer

    params, cfg = load_model(model)
    params, opts = gen.decoding_model(params, cfg)
    tok = get_gpt2_tokenizer()
    T = cfg.context_length
    runs = {wd: gen.decoding_weights(params, cfg, opts, wd) for wd in DTYPES}
    fwd = {wd: jax.jit(lambda p, x, o=o: GPT(cfg, o).apply({"params": p}, x)) for wd, (_, o) in runs.items()}
    print(f"{model} on {text_path!r} split at {train_ratio} as `gptjax pretrain` splits it, windows of up to {T} "
          f"tokens (at most {max_windows})")
    print("| text | weights | tokens | cross-entropy | vs float32 | argmax next token = float32's |")
    print("|---|---|---:|---:|---:|---:|")
    for split, text in zip(("train", "held-out"), split_text(load_corpus(text_path), train_ratio)):
        ids = tok.encode(text, allowed_special={"<|endoftext|>"})
        windows = [w for w in (ids[i:i + T + 1] for i in range(0, len(ids) - 1, T)) if len(w) > 1][:max_windows]
        n_tokens = sum(len(w) - 1 for w in windows)
        results = {}
        for wd, (p, _) in runs.items():
            nll, argmax = 0.0, []
            for w in windows:
                x, y = jnp.asarray([w[:-1]]), np.asarray(w[1:])
                logp = np.asarray(jax.nn.log_softmax(fwd[wd](p, x)[0], axis=-1))
                nll -= logp[np.arange(len(y)), y].sum()
                argmax.append(logp.argmax(-1))
            results[wd] = (nll / n_tokens, np.concatenate(argmax))
        ref_loss, ref_arg = results["float32"]
        for wd, (loss, arg) in results.items():
            print(f"| {split} | {wd} | {n_tokens} | {loss:.4f} | {loss - ref_loss:+.4f} | {np.mean(arg == ref_arg):.4f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--model", default=None, help="a trained model for the quality table (run dir or GPT-2 size)")
    ap.add_argument("--text", default="default", help="what `gptjax pretrain --corpus` takes: a file, URL, "
                    "or 'default' (the-verdict, shipped with gptjax)")
    ap.add_argument("--train-ratio", type=float, default=0.9, help="the quality table reads the text after this")
    ap.add_argument("--max-windows", type=int, default=64)
    ap.add_argument("--skip-speed", action="store_true")
    args = ap.parse_args()
    if not args.skip_speed:
        speed(args.rounds)
    if args.model:
        quality(args.model, args.text, args.train_ratio, args.max_windows)


if __name__ == "__main__":
    main()
