"""The Python front door: `import gptjax`, load a model, generate text."""
import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import gptjax
from gptjax.model_io import save_run
from gptjax.config import get_config
from gptjax.generate import generate
from gptjax.model import init_params
from gptjax.tokenizer import get_gpt2_tokenizer

PROMPT = "Every effort moves you"


@pytest.fixture(scope="module")
def small():
    cfg = get_config("gpt2-small", n_layers=2, emb_dim=64, n_heads=4, context_length=32, drop_rate=0.0)
    return gptjax.Model(init_params(cfg, jax.random.key(7)), cfg)


def test_version_is_the_installed_distributions():
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert gptjax.__version__ == importlib.metadata.version("gptjax")
    assert f'version = "{gptjax.__version__}"' in pyproject


def test_every_exported_name_resolves_and_import_stays_light():
    for name in gptjax.__all__:
        assert getattr(gptjax, name) is not None, name
    assert gptjax.train is gptjax.pretrain_corpus
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        gptjax.nope  # noqa: B018
    # `import gptjax` alone imports neither jax nor the model
    code = "import sys, gptjax; print(sorted(m for m in ('jax', 'flax', 'gptjax.model') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_generate_text_is_the_books_pipeline(small):
    tok = get_gpt2_tokenizer()
    ids = tok.encode(PROMPT)
    out = generate(small.params, small.config, [ids], 10, eos_id=tok.eot_token, use_cache=False)
    book = tok.decode([int(i) for i in out[0] if i != tok.eot_token])  # text_to_token_ids -> generate -> decode
    text = gptjax.generate_text(small, PROMPT, max_new_tokens=10)
    assert text == book and text.startswith(PROMPT) and len(text) > len(PROMPT)
    # sampling is a pure function of the seed
    a = gptjax.generate_text(small, PROMPT, 10, temperature=1.5, top_k=50, seed=1)
    assert a == gptjax.generate_text(small, PROMPT, 10, temperature=1.5, top_k=50, seed=1)
    assert a != gptjax.generate_text(small, PROMPT, 10, temperature=1.5, top_k=50, seed=2)


def test_load_model_from_a_run_directory_then_generate(small, tmp_path):
    save_run(tmp_path / "run", small.params, small.config)
    model = gptjax.load_model(tmp_path / "run")
    params, cfg = model  # unpacks as the (params, cfg) pair every function takes
    assert isinstance(model, gptjax.Model) and cfg == small.config
    jax.tree.map(np.testing.assert_array_equal, params, small.params)
    # a path is loaded and laid out for decoding (on CPU: another kernel layout): the same greedy text
    assert gptjax.generate_text(str(tmp_path / "run"), PROMPT, 8) == gptjax.generate_text(model, PROMPT, 8)


def test_generate_text_refuses_an_empty_prompt(small):
    with pytest.raises(ValueError, match=re.escape("the prompt '' is empty after tokenization")):
        gptjax.generate_text(small, "", 5)
