"""Throughput of GPT-2 tokenization into shards: a plain single-threaded tiktoken loop vs gptjax.shards.prepare.

    python experiments/prepare_throughput.py [--max-mb 40] [--workers 2] [--keep-shards DIR]

The corpus is built offline from the text of the .py, .rst and .txt files of the installed Python standard
library and site-packages (one file = one document, in a seeded random order, up to --max-mb of UTF-8),
written as JSONL into a temporary folder and deleted afterwards. Each measurement runs in a fresh process:
(a) read the JSONL and `encode_ordinary` every document in one thread; (b) `prepare` with --workers worker
processes (reading, tokenizing, shard writing, sha256s, meta.json), and (c) `prepare` in-process (workers=0),
which against (a) shows what the pipeline itself costs. Peak RSS is ru_maxrss of the measuring
process (and, for prepare, of its largest worker). Writes experiments/results/prepare_throughput.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def build_corpus(out: Path, max_mb: float, seed: int = 0) -> dict:
    """JSONL files of {"text": file contents} from the stdlib and site-packages; returns their sizes."""
    roots = sorted({sysconfig.get_paths()[k] for k in ("stdlib", "purelib", "platlib")})
    files = sorted({os.path.join(d, f) for r in roots for d, _, fs in os.walk(r) for f in fs
                    if f.endswith((".py", ".rst", ".txt"))})
    random.Random(seed).shuffle(files)
    budget, n_bytes, n_docs, part, fh = int(max_mb * 1e6), 0, 0, 0, None
    for path in files:
        try:
            text = Path(path).read_bytes().decode("utf-8", errors="replace")
        except OSError:
            continue
        if not text.strip():
            continue
        if fh is None or n_docs % 2000 == 0:  # several files, so the sources list is realistic
            if fh:
                fh.close()
            fh, part = open(out / f"corpus_{part:03d}.jsonl", "w", encoding="utf-8"), part + 1
        fh.write(json.dumps({"text": text}) + "\n")
        n_bytes, n_docs = n_bytes + len(text.encode()), n_docs + 1
        if n_bytes >= budget:
            break
    fh.close()
    return {"roots": roots, "documents": n_docs, "text_bytes": n_bytes, "jsonl_files": part,
            "candidate_files": len(files)}


def _peak(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # KiB on Linux -> MiB


def child(mode: str, corpus: Path, out: Path, workers: int) -> dict:
    """One measurement in this (fresh) process."""
    from gptjax.tokenizer import get_gpt2_tokenizer

    enc = get_gpt2_tokenizer()
    files = sorted(corpus.glob("*.jsonl"))
    t0 = time.perf_counter()
    if mode == "tiktoken_loop":
        tokens = docs = 0
        for f in files:
            with open(f, encoding="utf-8") as fh:
                for line in fh:
                    tokens += len(enc.encode_ordinary(json.loads(line)["text"])) + 1  # + the <|endoftext|>
                    docs += 1
    else:
        from gptjax.shards import prepare

        meta = prepare([str(f) for f in files], out, workers=workers, val_fraction=0.005, progress=False)
        tokens = sum(s["tokens"] for s in meta["splits"].values())
        docs = sum(s["documents"] for s in meta["splits"].values())
    wall = time.perf_counter() - t0
    cpu = sum(r.ru_utime + r.ru_stime for r in map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)))
    return {"wall_s": wall, "cpu_s": cpu, "tokens": tokens, "documents": docs, "peak_rss_mib": _peak(resource.RUSAGE_SELF),
            "worker_peak_rss_mib": _peak(resource.RUSAGE_CHILDREN) if mode == "prepare" and workers else None}


def run_child(*args: str) -> dict:
    cmd = [sys.executable, __file__, "--child", *args]
    res = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--max-mb", type=float, default=40.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--keep-shards", help="write prepare's shards here (kept), e.g. for loader_grain_vs_memmap.py")
    ap.add_argument("--child", nargs=4, metavar=("MODE", "CORPUS", "OUT", "WORKERS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        mode, corpus, out, workers = args.child
        print(json.dumps(child(mode, Path(corpus), Path(out), int(workers))))
        return
    import tiktoken

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="gptjax-prepare-") as tmp:
        corpus = Path(tmp) / "corpus"
        corpus.mkdir()
        info = build_corpus(corpus, args.max_mb)
        out = Path(args.keep_shards) if args.keep_shards else Path(tmp) / "shards"
        rows = {"tiktoken_loop (1 thread)": run_child("tiktoken_loop", str(corpus), str(out), "0"),
                f"prepare (workers={args.workers})": run_child("prepare", str(corpus), str(out), str(args.workers)),
                "prepare (workers=0: in-process, the pipeline's own cost)":
                    run_child("prepare", str(corpus), str(Path(tmp) / "shards0"), "0")}
    mb = info["text_bytes"] / 1e6
    for r in rows.values():
        r.update(mb_per_s=mb / r["wall_s"], tokens_per_s=r["tokens"] / r["wall_s"])
    report = {"corpus": info, "cpus": os.cpu_count(), "load_avg_1min": [load_before, os.getloadavg()[0]], "python": platform.python_version(),
              "tiktoken": tiktoken.__version__, "workers": args.workers, "results": rows,
              "command": "python experiments/prepare_throughput.py " + " ".join(sys.argv[1:])}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "prepare_throughput.json").write_text(json.dumps(report, indent=1))
    lines = ["# GPT-2 tokenization throughput: tiktoken loop vs `gptjax.shards.prepare`\n",
             f"Corpus: {info['documents']:,} documents ({mb:.1f} MB of UTF-8) from the .py/.rst/.txt files of the "
             f"standard library and site-packages, as {info['jsonl_files']} JSONL files. {os.cpu_count()} CPUs, "
             f"Python {report['python']}, tiktoken {report['tiktoken']}; 1-minute load average {load_before:.1f} before, "
             f"{os.getloadavg()[0]:.1f} after (the machine is shared: wall times move with the load, CPU seconds "
             f"less so; CPU s counts the process and its workers, startup included).\n",
             "| method | wall s | MB text/s | tokens/s | CPU s | MB text/CPU s | tokens | peak RSS MiB (main) | "
             "peak RSS MiB (largest worker) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        worker = f"{r['worker_peak_rss_mib']:.0f}" if r["worker_peak_rss_mib"] is not None else "-"
        lines.append(f"| {name} | {r['wall_s']:.1f} | {r['mb_per_s']:.2f} | {r['tokens_per_s']:,.0f} | "
                     f"{r['cpu_s']:.1f} | {mb / r['cpu_s']:.2f} | {r['tokens']:,} | {r['peak_rss_mib']:.0f} | {worker} |")
    same = len({r["tokens"] for r in rows.values()}) == 1
    lines += ["", f"Token counts {'match' if same else 'DIFFER'} (prepare counts one <|endoftext|> per document, "
              "so does the loop).", "", f"Command: `{report['command']}`", ""]
    (RESULTS / "prepare_throughput.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
