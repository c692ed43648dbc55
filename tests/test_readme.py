"""The README's Python quick starts run as written, in order, on tiny stand-ins for their inputs.

Each snippet is executed in one temporary working directory (so `checkpoints/...` from one is there for
the next), after the replacements below: GPT-2 sizes become a tiny saved model with GPT-2's
vocabulary, downloaded datasets become small local files, the 124M config becomes a tiny one and
epochs become 1. Everything else (every call, argument and result key) is the README's.
"""
import json
import re
from pathlib import Path

import jax
import numpy as np
import pytest

from gptjax.model_io import save_run
from gptjax.config import GPTConfig
from gptjax.model import init_params

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)

SPAM = ["WIN a FREE prize now!! call 555", "CLAIM your FREE cash prize today", "URGENT! You have won a reward",
        "Free entry in a weekly draw, text WIN"]
HAM = ["see you at lunch today, ok?", "running late, be there soon", "can you pick up milk on the way home",
       "thanks for dinner last night", "the meeting moved to three", "call me when you land"]
RECORDS = [{"instruction": f"Rewrite the number {i} in words.", "input": "", "output": f"The number is {i}.",
            "chosen": f"The number is {i}.", "rejected": f"Number {i}, obviously."} for i in range(40)]


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    cfg = GPTConfig(vocab_size=50257, context_length=256, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0,
                    qkv_bias=True)
    save_run(d / "tiny-gpt2", init_params(cfg, jax.random.key(0)), cfg)
    (d / "spam.tsv").write_text("".join(f"spam\t{t}\n" for t in SPAM * 4) + "".join(f"ham\t{t}\n" for t in HAM * 4))
    (d / "instructions.json").write_text(json.dumps(RECORDS))
    return d


def replacements(d: Path) -> list[tuple[str, str]]:
    tiny = f'"{d / "tiny-gpt2"}"'
    return [('load_model("gpt2-small")', f"load_model({tiny})"), ('load_model("gpt2-medium")', f"load_model({tiny})"),
            ('"gpt2-small", context_length=256', '"gpt2-small", context_length=32, emb_dim=32, n_layers=2, n_heads=2'),
            ("epochs=10, batch_size=2", "epochs=1, batch_size=16"), ("epochs=15", "epochs=1, batch_size=16"),
            ("load_labeled_texts()", f'load_labeled_texts("{d / "spam.tsv"}")'),
            ("load_instruction_data()", f'load_instruction_data("{d / "instructions.json"}")'),
            ("load_preference_data()", f'load_preference_data("{d / "instructions.json"}")')]


def test_the_readme_has_a_python_quick_start_per_chapter():
    assert len(SNIPPETS) >= 7 and all("import gptjax" in s for s in SNIPPETS)


@pytest.mark.slow
def test_the_readme_python_quick_starts_run(stand_ins, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for i, code in enumerate(SNIPPETS):
        for old, new in replacements(stand_ins):
            code = code.replace(old, new)
        assert "gpt2-small\")" not in code and "gpt2-medium" not in code, code  # nothing left to download
        namespace: dict = {}
        exec(compile(code, f"README.md python block {i + 1}", "exec"), namespace)
    out = capsys.readouterr().out
    assert "Every effort moves you" in out
    for run in ("pretrain", "spam", "instruct", "dpo", "spam-lora", "appendix_d"):
        assert (tmp_path / "checkpoints" / run / "config.json").is_file(), run
    assert json.loads((tmp_path / "checkpoints" / "spam-lora" / "config.json").read_text())["classify"]["lora"]
    assert np.isfinite(json.loads((tmp_path / "checkpoints" / "dpo" / "config.json").read_text())["dpo"]["steps"])
