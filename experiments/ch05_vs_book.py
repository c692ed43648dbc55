"""The chapter-5 run, the book's PyTorch script against `gptjax pretrain`, side by side on one machine.

Each side runs in a child process of its own, one after the other: the book's loop as
ch05/01_main-chapter-code/gpt_train.py has it (GPT-2 124M, context 256, batch 2, AdamW lr 5e-4 and
weight decay 0.1, 10 epochs, evaluation every 5 steps on 1 batch, a 50-token sample after each epoch,
the loss plot and model.pth at the end; the model is gptjax.book_torch's GPTModel), then
`gptjax pretrain` with the same settings. The parent takes each child's wall time and its own peak
RSS (`os.wait4`), and reads steps/s and the final losses from what the child wrote.

    python experiments/ch05_vs_book.py                 # both sides, float32
    python experiments/ch05_vs_book.py --rows book gptjax bf16 default   # plus bfloat16 matmuls (labelled)
                                                       # and plain `gptjax pretrain` (its own defaults)
    python experiments/ch05_vs_book.py --epochs 1 --rows gptjax   # a quick look

Writes experiments/results/ch05_vs_book.md (and .json); --tag appends to the file name.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
BOOK_FLAGS = ["--lr", "5e-4", "--eval-iter", "1"]  # gpt_train.py's settings that differ from gptjax's defaults


# --- the book's side (runs in the child) ------------------------------------------------------------

def book_child(corpus: str, out: str, epochs: int) -> None:
    """gpt_train.py's main(): seed 123, the book's loaders, train_model_simple, plot, model.pth."""
    import torch
    from torch.utils.data import DataLoader, Dataset

    from gptjax.book_torch import book_gpt_model
    from gptjax.tokenizer import get_gpt2_tokenizer

    cfg = {"vocab_size": 50257, "context_length": 256, "emb_dim": 768, "n_heads": 12, "n_layers": 12,
           "drop_rate": 0.1, "qkv_bias": False}
    settings = {"learning_rate": 5e-4, "num_epochs": epochs, "batch_size": 2, "weight_decay": 0.1}
    t_start = time.perf_counter()
    torch.manual_seed(123)
    text = Path(corpus).read_text(encoding="utf-8")
    model = book_gpt_model(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings["learning_rate"],
                                  weight_decay=settings["weight_decay"])
    tokenizer = get_gpt2_tokenizer()  # tiktoken's "gpt2" encoding (the book's), also from a local copy offline

    class GPTDatasetV1(Dataset):  # the book's chapter-2 dataset: windows of max_length, targets shifted by one
        def __init__(self, txt, max_length, stride):
            ids = tokenizer.encode(txt, allowed_special={"<|endoftext|>"})
            self.x = [torch.tensor(ids[i:i + max_length]) for i in range(0, len(ids) - max_length, stride)]
            self.y = [torch.tensor(ids[i + 1:i + max_length + 1]) for i in range(0, len(ids) - max_length, stride)]

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return self.x[i], self.y[i]

    def loader(txt, shuffle, drop_last):
        ds = GPTDatasetV1(txt, cfg["context_length"], cfg["context_length"])
        return DataLoader(ds, batch_size=settings["batch_size"], shuffle=shuffle, drop_last=drop_last, num_workers=0)

    split = int(0.90 * len(text))
    train_loader, val_loader = loader(text[:split], True, True), loader(text[split:], False, False)

    def loss_batch(x, y):
        return torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())

    def loss_loader(dl, num_batches):
        total, n = 0.0, min(num_batches, len(dl))
        for i, (x, y) in enumerate(dl):
            if i >= n:
                break
            total += loss_batch(x, y).item()
        return total / n

    def sample(start="Every effort moves you", max_new_tokens=50):
        model.eval()
        idx = torch.tensor(tokenizer.encode(start)).unsqueeze(0)
        with torch.no_grad():
            for _ in range(max_new_tokens):  # generate_text_simple
                logits = model(idx[:, -cfg["context_length"]:])[:, -1, :]
                idx = torch.cat((idx, torch.argmax(logits, dim=-1, keepdim=True)), dim=1)
        print(tokenizer.decode(idx.squeeze(0).tolist()).replace("\n", " "), flush=True)
        model.train()

    train_losses, val_losses, step_s = [], [], []
    global_step, t_loop = -1, time.perf_counter()
    for epoch in range(settings["num_epochs"]):
        model.train()
        for x, y in train_loader:
            t0 = time.perf_counter()
            optimizer.zero_grad()
            loss = loss_batch(x, y)
            loss.backward()
            optimizer.step()
            step_s.append(time.perf_counter() - t0)
            global_step += 1
            if global_step % 5 == 0:
                model.eval()
                with torch.no_grad():
                    train_losses.append(loss_loader(train_loader, 1))
                    val_losses.append(loss_loader(val_loader, 1))
                model.train()
                print(f"Ep {epoch + 1} (Step {global_step:06d}): Train loss {train_losses[-1]:.3f}, "
                      f"Val loss {val_losses[-1]:.3f}", flush=True)
        sample()
    loop_s = time.perf_counter() - t_loop
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(train_losses, label="Training loss")
    ax.plot(val_losses, linestyle="-.", label="Validation loss")
    ax.legend()
    fig.savefig(Path(out) / "loss.pdf")
    torch.save(model.state_dict(), Path(out) / "model.pth")
    summary = {"steps": global_step + 1, "step_s": step_s, "loop_s": loop_s, "train_loss": train_losses[-1],
               "val_loss": val_losses[-1], "total_s": time.perf_counter() - t_start, "torch": torch.__version__,
               "threads": torch.get_num_threads()}
    (Path(out) / "summary.json").write_text(json.dumps(summary))


# --- the parent -------------------------------------------------------------------------------------

def run_child(cmd: list[str], log: Path, env: dict | None = None) -> dict:
    """Wall time and the child's own peak RSS (wait4's rusage), its output in `log`."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {code}; its output: {log}\n" + log.read_text()[-3000:])
    return {"wall_s": wall, "peak_rss_gb": usage.ru_maxrss * 1024 / 1e9}


def gptjax_side(corpus: str, work: Path, epochs: int, name: str, extra: list[str]) -> dict:
    out = work / name
    cmd = [sys.executable, "-m", "gptjax.cli", "pretrain", "--corpus", corpus, "--out", str(out), "--epochs",
           str(epochs), "--quiet", *extra]
    r = run_child(cmd, work / f"{name}.log")
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    config = json.loads((out / "config.json").read_text())
    disk = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return {**r, "steps": len(steps), "train_loss": metrics[-1]["train_loss"], "val_loss": metrics[-1]["val_loss"],
            "loop_s": config.get("result", {}).get("wall_s"), "disk_gb": disk / 1e9, "command": " ".join(cmd[2:])}


def book_side(corpus: str, work: Path, epochs: int) -> dict:
    out = work / "book"
    out.mkdir()
    r = run_child([sys.executable, __file__, "--book-child", corpus, str(out), str(epochs)], work / "book.log",
                  env={**os.environ, "PYTHONPATH": str(ROOT)})
    s = json.loads((out / "summary.json").read_text())
    disk = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return {**r, "steps": s["steps"], "train_loss": s["train_loss"], "val_loss": s["val_loss"], "loop_s": s["loop_s"],
            "disk_gb": disk / 1e9, "command": "the book's gpt_train.py loop (experiments/ch05_vs_book.py)",
            "torch": s["torch"], "threads": s["threads"]}


def table(rows: dict[str, dict], book: str | None) -> str:
    lines = ["| run | wall (s) | peak RSS (GB) | steps/s (whole run) | final train / val loss | disk left (GB) |"
             " wall vs book | RSS vs book |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        ratio = (lambda k: f"{r[k] / rows[book][k]:.2f}x") if book and book in rows else (lambda k: "")
        lines.append(f"| {name} | {r['wall_s']:.1f} | {r['peak_rss_gb']:.2f} | {r['steps'] / r['wall_s']:.3f} | "
                     f"{r['train_loss']:.3f} / {r['val_loss']:.3f} | {r['disk_gb']:.2f} | {ratio('wall_s')} | "
                     f"{ratio('peak_rss_gb')} |")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--book-child":
        book_child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", default=None, help="the-verdict.txt (default: the copy shipped with gptjax)")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--rows", nargs="+", choices=["book", "gptjax", "bf16", "default"], default=["book", "gptjax"],
                    help="book: the book's loop; gptjax: `gptjax pretrain` with the book script's settings; bf16: "
                    "the same with bfloat16 matmuls; default: plain `gptjax pretrain` (lr 4e-4, eval on 5 batches)")
    ap.add_argument("--bf16-row", action="store_true", help="same as adding bf16 to --rows")
    ap.add_argument("--extra", default="", help="more gptjax pretrain flags for the float32 row")
    ap.add_argument("--tag", default="", help="suffix of the results file name")
    args = ap.parse_args()
    from gptjax.data import VERDICT_PATH

    corpus = args.corpus or str(VERDICT_PATH)
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="ch05-vs-book-") as tmp:
        work = Path(tmp)
        wanted = set(args.rows) | ({"bf16"} if args.bf16_row else set())
        if "book" in wanted:
            print("the book's loop (PyTorch) ...", flush=True)
            rows["book (PyTorch, float32)"] = book_side(corpus, work, args.epochs)
        if "gptjax" in wanted:
            print("gptjax pretrain ...", flush=True)
            rows["gptjax pretrain (float32)"] = gptjax_side(corpus, work, args.epochs, "gptjax",
                                                            [*BOOK_FLAGS, *args.extra.split()])
        if "bf16" in wanted:
            rows["gptjax pretrain (bfloat16 matmuls)"] = gptjax_side(
                corpus, work, args.epochs, "gptjax-bf16", [*BOOK_FLAGS, "--matmul-precision", "bfloat16"])
        if "default" in wanted:
            rows["`gptjax pretrain` (its defaults, float32)"] = gptjax_side(corpus, work, args.epochs, "default", [])
        for name, r in rows.items():
            print(name, r, flush=True)
    book = "book (PyTorch, float32)" if "book (PyTorch, float32)" in rows else None
    import jax
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, jax {jax.__version__}"
    md = "\n".join([f"# Chapter 5 on a laptop: the book's PyTorch script vs `gptjax pretrain`{args.tag and ' (' + args.tag + ')'}",
                    "", f"{args.epochs} epochs on the-verdict, 124M, context 256, batch 2, lr 5e-4, eval every 5 "
                    f"steps on 1 batch (the defaults row: `gptjax pretrain`'s own, lr 4e-4, eval on 5 batches); "
                    f"one child process per row, one after the other; {machine}; "
                    f"{time.strftime('%Y-%m-%d %H:%M')}.", "", table(rows, book), "",
                    "Wall: the child's whole life (start-up, compile, steps, evaluations, samples, checkpoints, "
                    "plot). Peak RSS: the child's own maximum resident set (`os.wait4`). Disk left: what the "
                    "run directory holds at the end.", "",
                    "Command: `python experiments/ch05_vs_book.py " + " ".join(sys.argv[1:]) + "`", ""])
    print(md)
    name = "ch05_vs_book" + (f"_{args.tag}" if args.tag else "")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.md").write_text(md)
    (RESULTS / f"{name}.json").write_text(json.dumps({"rows": rows, "machine": machine, "argv": sys.argv[1:]},
                                                     indent=1))


if __name__ == "__main__":
    main()
