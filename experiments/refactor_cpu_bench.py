"""CPU speed before and after a refactor, alternated in one process: the gpt2-small train step (batch 2 x
256, float32, (out, in) kernels, as `gptjax bench` on CPU) and KV-cache decoding (batch 1, 8-token prompt,
200 new tokens, with the C++ matvec and with XLA's dot), old and new code taking turns in every round;
and whether XLA's optimized programs for both are the same text, source locations aside.

The old code is a checkout of an earlier gptjax (`--old`), copied to a temporary directory as the package
`gptjax_old` so both import side by side; both decoders must give the same tokens.

    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python experiments/refactor_cpu_bench.py --old OLD_CHECKOUT [--reverse]
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from gptjax.runtime import setup

setup(compilation_cache=False)

import jax  # noqa: E402
import numpy as np  # noqa: E402

import gptjax.bench as nb  # noqa: E402
import gptjax.cpu.matvec as nm  # noqa: E402
import gptjax.generate as ngen  # noqa: E402
import gptjax.model as nmodel  # noqa: E402


def import_old(checkout: str, tmp: Path):
    """The old package (`checkout`/gptjax) as `gptjax_old`, its own imports renamed."""
    dst = tmp / "gptjax_old"
    shutil.copytree(Path(checkout) / "gptjax", dst)
    for path in dst.rglob("*.py"):
        text = path.read_text()
        text = re.sub(r"from gptjax(\.| import)", r"from gptjax_old\1", text)
        text = re.sub(r"import gptjax\.", "import gptjax_old.", text)
        path.write_text(text.replace('"gptjax.bench"', '"gptjax_old.bench"'))
    sys.path.insert(0, str(tmp))
    import gptjax_old.bench as ob
    import gptjax_old.cpu_matvec as om
    import gptjax_old.generate as ogen
    import gptjax_old.model as omodel
    return ob, om, ogen, omodel


def _program(text: str) -> list[str]:
    """An optimized HLO module's instructions, without the file/stack-frame tables and their ids."""
    out, skip = [], False
    for line in text.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            skip = True
        elif skip and line.startswith(("HloModule", "%", "ENTRY", "}")):
            skip = False
        if not skip:
            out.append(re.sub(r",? ?stack_frame_id=\d+|, metadata=\{[^}]*\}", "", line))
    return [ln for ln in out if not ln.startswith("HloModule")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", required=True, help="a checkout of the old code (its gptjax/ is imported as gptjax_old)")
    ap.add_argument("--train-rounds", type=int, default=12)
    ap.add_argument("--decode-rounds", type=int, default=5)
    ap.add_argument("--reverse", action="store_true", help="the new code first in every round")
    args = ap.parse_args()
    order = (lambda d: dict(reversed(list(d.items())))) if args.reverse else (lambda d: d)
    with tempfile.TemporaryDirectory() as tmp:
        ob, om, ogen, omodel = import_old(args.old, Path(tmp))
        kw = dict(preset="gpt2-small", context_length=256, batch_size=2, dtype="float32", linear_layout="out_in")
        bo, bn = ob.BenchConfig(**kw), nb.BenchConfig(**kw)
        runs = order({"before": ob.JaxTrain(bo.model_config(), bo), "after": nb.JaxTrain(*bn.setup(), bn)})
        result = {"train_step_s": nb.alternate(runs, rounds=args.train_rounds, warmup=2)}
        same = {"train step": _program(runs["before"].step_fn.as_text()) == _program(runs["after"].step_fn.as_text())}
        del runs
        if om.available():  # one registration of the C++ kernel per process: the same source builds the same library
            nm._state.update(om._state)
        ocfg = bo.model_config(drop_rate=0.0, scan_layers=False, remat="none")
        ncfg, nopts = bn.setup(drop_rate=0.0, scan_layers=False, remat="none")
        op, oc = ogen.decoding_model(omodel.init_params(ocfg, jax.random.key(0)), ocfg)
        p, o = ngen.decoding_model(nmodel.init_params(ncfg, jax.random.key(0), nopts), ncfg, nopts)
        prompt = np.random.default_rng(0).integers(0, ncfg.vocab_size, (1, 8), dtype=np.int32)
        assert (ogen.generate(op, oc, prompt, 200) == ngen.generate(p, ncfg, prompt, 200, opts=o)).all()
        sampling = dict(max_new_tokens=200, temperature=0.0, top_k=None, top_p=None, eos_id=None)
        x = (prompt, np.int32(8), jax.random.key(0))
        same["decode loop"] = (_program(ogen._generate_cached.lower(op, *x, cfg=oc, **sampling).compile().as_text()) ==
                               _program(ngen._generate_cached.lower(p, *x, cfg=ncfg, opts=o, **sampling)
                                        .compile().as_text()))
        fns = {}
        for m in (oc.matvec, "xla"):
            old = lambda m=m: ogen.generate(op, oc.replace(matvec=m), prompt, 200)  # noqa: E731
            new = lambda m=m: ngen.generate(p, ncfg, prompt, 200, opts=o.replace(matvec=m))  # noqa: E731
            fns |= order({f"before kv-cache matvec={m}": old, f"after kv-cache matvec={m}": new})
        result["decode_s"] = nb.alternate(fns, rounds=args.decode_rounds, warmup=1)
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}; {'new' if args.reverse else 'old'} code first "
          f"in each round; medians (min)")
    print("| program | before | after | after / before |\n|---|---:|---:|---:|")
    for part, times in result.items():
        for name in [k for k in times if k.startswith("before")]:
            b, a = times[name], times[name.replace("before", "after", 1)]
            what = "train step, ms" if part == "train_step_s" else name.split(" ", 1)[1] + ", tokens/s"
            if part == "train_step_s":
                vb, va = 1e3 * statistics.median(b), 1e3 * statistics.median(a)
                mb, ma = 1e3 * min(b), 1e3 * min(a)
            else:
                vb, va = 200 / statistics.median(b), 200 / statistics.median(a)
                mb, ma = 200 / min(b), 200 / min(a)
            print(f"| {what} | {vb:,.1f} ({mb:,.1f}) | {va:,.1f} ({ma:,.1f}) | {va / vb:.3f} |")
    print("optimized programs identical (source locations aside): " + ", ".join(f"{k} {v}" for k, v in same.items()))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
