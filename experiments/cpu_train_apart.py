"""gptjax and PyTorch train steps each alone in its own process (no shared thread pools), one after
the other: the chapter-5 setting (gpt2-small, context 256, batch 2, float32, AdamW, dropout 0.1).

Alternated in one process, the two frameworks slowed each other down on a 2-core CPU; this measures
each on its own (as `gptjax bench` now does on CPU, `--torch-process auto`), without the rest of the
benchmark. gptjax runs with its kernels stored as `gptjax pretrain` stores
them on this backend (out_in on CPU) and as (in, out), alternated. Medians of 10 steps after warm-up.

    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python experiments/cpu_train_apart.py
"""
import json
import subprocess
import sys

GPTJAX = r'''
import json, statistics
from gptjax.runtime import setup
setup(compilation_cache=False)
from gptjax.bench import BenchConfig, JaxTrain
from gptjax.measure import alternate
from gptjax.cpu import fastest_linear_layout
bc = BenchConfig(preset="gpt2-small", context_length=256, batch_size=2, dtype="float32")
runs = {f"gptjax {layout}": JaxTrain(*bc.setup(linear_layout=layout), bc)
        for layout in dict.fromkeys([fastest_linear_layout(), "in_out"])}
t = alternate(runs, rounds=10, warmup=2)
print(json.dumps({k: statistics.median(v) for k, v in t.items()}))
'''
TORCH = r'''
import json, statistics
from gptjax.bench import BenchConfig
from gptjax.bench_torch import TorchTrain
from gptjax.measure import alternate
bc = BenchConfig(preset="gpt2-small", context_length=256, batch_size=2, dtype="float32")
cfg = bc.model_config()
t = alternate({"pytorch eager": TorchTrain(cfg, bc, False, "cpu"), "pytorch compile": TorchTrain(cfg, bc, True, "cpu")},
              rounds=10, warmup=1)
print(json.dumps({k: statistics.median(v) for k, v in t.items()}))
'''


def main() -> None:
    medians = {}
    for code in (GPTJAX, TORCH):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        medians.update(json.loads(out.stdout.strip().splitlines()[-1]))
    best = min(v for k, v in medians.items() if k.startswith("pytorch"))
    for name, s in medians.items():
        print(f"{name:16s} {1e3 * s:8.1f} ms median step")
    for name in (k for k in medians if k.startswith("gptjax")):
        print(f"{name} / PyTorch's best: {best / medians[name]:.2f}x")


if __name__ == "__main__":
    main()
