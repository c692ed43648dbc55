"""Where the memory and time of the chapter-5 run go: RSS and seconds through `gptjax pretrain`, by phase.

Runs the book's setting (124M, context 256, batch 2, float32) in this process for --epochs epochs, with a
thread that reads /proc/self/statm every 10 ms, and wraps the run's parts (the train step, evaluations,
the per-epoch sample, checkpoint saves, the final save and plot) to take the peak RSS inside each.
Then it asks XLA what the train step's program holds (arguments, outputs, temporaries).

    python experiments/ch05_memory.py --epochs 2 [--extra "--sync-checkpoints"]

Prints a table and writes experiments/results/ch05_memory[_TAG].md.
"""
from __future__ import annotations

import argparse
import collections
import functools
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class Sampler(threading.Thread):
    """The process's RSS every 10 ms; `peak` since the last `reset`."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.overall, self.stop = 0, 0, False

    def run(self):
        while not self.stop:
            r = rss()
            self.peak, self.overall = max(self.peak, r), max(self.overall, r)
            time.sleep(0.01)

    def reset(self) -> int:
        self.peak = rss()
        return self.peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--extra", default="", help="more `gptjax pretrain` flags")
    ap.add_argument("--tag", default="")
    ap.add_argument("--timing", action="store_true", help="wait for each train step to finish inside its phase, "
                    "so the seconds column charges the step's compute to the step (not to the next sync point)")
    args = ap.parse_args()

    sampler = Sampler()
    sampler.start()
    marks: list[tuple[str, int]] = [("python start", rss())]
    from gptjax import checkpoint, cli, engine, runs
    from gptjax.tasks import pretrain as pretrain_task

    marks.append(("imports", rss()))
    phases: dict[str, dict] = collections.defaultdict(lambda: {"n": 0, "s": 0.0, "entry": 0, "peak": 0, "after": 0})

    def wrap(owner, name: str, label: str):
        fn = getattr(owner, name)

        @functools.wraps(fn)
        def inner(*a, **k):
            p = phases[label]
            entry = sampler.reset()
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                p["n"] += 1
                p["s"] += time.perf_counter() - t0
                p["entry"] = max(p["entry"], entry)
                p["peak"] = max(p["peak"], sampler.peak, rss())
                p["after"] = max(p["after"], rss())
        setattr(owner, name, inner)

    if args.timing:
        import jax

        step = engine.Steps.train_step

        def blocking_step(self, state, batch):
            out = step(self, state, batch)
            jax.block_until_ready(out[1])
            return out
        engine.Steps.train_step = blocking_step
    wrap(engine.Steps, "train_step", "train step")
    wrap(engine._Loop, "evaluate", "evaluation")
    wrap(engine._Loop, "epoch_end", "sample (epoch end)")
    wrap(engine._Loop, "checkpoint", "checkpoint save")
    wrap(checkpoint.TrainCheckpoints, "wait", "checkpoint wait")
    wrap(pretrain_task, "init_state", "init state")
    wrap(pretrain_task, "create_dataloaders", "corpus + windows")
    wrap(pretrain_task, "save_run", "final params save")
    wrap(runs, "plot_history", "loss plot")

    with tempfile.TemporaryDirectory(prefix="ch05-memory-") as tmp:
        argv = ["pretrain", "--out", str(Path(tmp) / "run"), "--lr", "5e-4", "--eval-iter", "1", "--epochs",
                str(args.epochs), "--quiet", *args.extra.split()]
        t0 = time.perf_counter()
        code = cli.main(argv)
        wall = time.perf_counter() - t0
        marks.append(("end of run", rss()))
    sampler.stop = True
    if code:
        sys.exit(code)

    gb = 1e9
    lines = [f"# Peak RSS and seconds of `gptjax pretrain {' '.join(argv[3:])}` by phase{args.tag and ' (' + args.tag + ')'}", "",
             f"Whole run {wall:.1f} s; peak RSS {sampler.overall / gb:.2f} GB.", "",
             "| phase | calls | seconds | RSS at entry (GB) | peak inside (GB) | RSS after (GB) |",
             "|---|---:|---:|---:|---:|---:|"]
    for label, p in phases.items():
        lines.append(f"| {label} | {p['n']} | {p['s']:.1f} | {p['entry'] / gb:.2f} | {p['peak'] / gb:.2f} | "
                     f"{p['after'] / gb:.2f} |")
    lines += ["", "| mark | RSS (GB) |", "|---|---:|"] + [f"| {m} | {v / gb:.2f} |" for m, v in marks]
    lines += ["", f"Command: `python experiments/ch05_memory.py {' '.join(sys.argv[1:])}`", ""]
    md = "\n".join(lines)
    print(md)
    out = ROOT / "experiments" / "results" / ("ch05_memory" + (f"_{args.tag}" if args.tag else "") + ".md")
    out.write_text(md)


if __name__ == "__main__":
    main()
