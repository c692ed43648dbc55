"""gptjax: the book "Build a Large Language Model (From Scratch)" in JAX/Flax.

    import gptjax
    model = gptjax.load_model("gpt2-small")          # a run directory, GPT-2 size or safetensors path
    print(gptjax.generate_text(model, "Every effort moves you", max_new_tokens=25))

The names below are imported on first use, so `import gptjax` stays light.
"""
from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("gptjax")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

_EXPORTS = {
    "Model": "gptjax.model_io", "load_model": "gptjax.model_io",
    "generate_text": "gptjax.generate",
    "GPTConfig": "gptjax.config", "get_config": "gptjax.config",
    "Options": "gptjax.options", "OptimConfig": "gptjax.optim",
    "get_gpt2_tokenizer": "gptjax.tokenizer", "load_corpus": "gptjax.data",
    "load_labeled_texts": "gptjax.tasks.classify_data", "load_instruction_data": "gptjax.tasks.instruct_data",
    "load_preference_data": "gptjax.tasks.dpo",
    "PretrainConfig": "gptjax.tasks.pretrain", "pretrain_corpus": "gptjax.tasks.pretrain",
    "ClassifierTrainConfig": "gptjax.tasks.classify", "finetune_classifier": "gptjax.tasks.classify",
    "Classifier": "gptjax.tasks.classify",
    "InstructTrainConfig": "gptjax.tasks.instruct", "finetune_instruct": "gptjax.tasks.instruct",
    "DPOTrainConfig": "gptjax.tasks.dpo", "finetune_dpo": "gptjax.tasks.dpo",
    "LoRAConfig": "gptjax.lora",
}
# gptjax.train: `gptjax pretrain` as one call (corpus -> tokens -> windows -> the engine's run)
_ALIASES = {"train": ("gptjax.tasks.pretrain", "pretrain_corpus")}

__all__ = ["__version__", "train", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _ALIASES:
        module, attr = _ALIASES[name]
        value = getattr(importlib.import_module(module), attr)
    else:
        raise AttributeError(f"module 'gptjax' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
