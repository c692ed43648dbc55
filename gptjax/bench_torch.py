"""The benchmark's PyTorch side: transformers' GPT2LMHeadModel train steps (eager or torch.compile'd) and
greedy generation. torch and transformers are optional: each function imports them itself, so a missing one
raises ImportError there. `bc` below is a `gptjax.bench.BenchConfig`.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Callable

import jax
import numpy as np

from gptjax.config import GPTConfig
from gptjax.measure import in_fresh_process, load_average, random_batch, timed


def _hf_gpt2(cfg: GPTConfig, drop_rate: float) -> Any:
    """transformers' GPT2LMHeadModel of `cfg`'s shape, attention through torch's SDPA."""
    from transformers import GPT2Config, GPT2LMHeadModel

    hf = GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.context_length, n_embd=cfg.emb_dim,
                    n_layer=cfg.n_layers, n_head=cfg.n_heads, resid_pdrop=drop_rate, embd_pdrop=drop_rate,
                    attn_pdrop=drop_rate, layer_norm_epsilon=1e-5, tie_word_embeddings=cfg.tie_embeddings)
    hf._attn_implementation = "sdpa"
    return GPT2LMHeadModel(hf)


class TorchTrain:
    """transformers' GPT2LMHeadModel, same shape/batch/dtype/optimizer, eager or torch.compile'd."""

    def __init__(self, cfg: GPTConfig, bc: Any, compiled: bool, device: str):
        import torch

        torch.manual_seed(bc.seed)
        if bc.matmul_precision == "bfloat16":  # float32 matmuls may run in bfloat16 (oneDNN on a CPU)
            torch.set_float32_matmul_precision("medium")
        elif device == "cuda":  # as the book's fastest setup: TF32 for what autocast leaves in float32
            torch.set_float32_matmul_precision("high")
        self.torch, self.device = torch, device
        model = _hf_gpt2(cfg, cfg.drop_rate).to(device).train()
        self.n_params = sum(p.numel() for p in model.parameters())
        # fused AdamW where this torch has it for the device (it does for CPU and CUDA since 2.4)
        kw = dict(lr=bc.lr, weight_decay=bc.weight_decay, betas=(0.9, 0.999), eps=1e-8)
        try:
            self.opt = torch.optim.AdamW(model.parameters(), fused=True, **kw)
        except (RuntimeError, TypeError):
            self.opt = torch.optim.AdamW(model.parameters(), **kw)
        self.model = torch.compile(model) if compiled else model
        self.x, self.y = (torch.tensor(np.asarray(a), dtype=torch.long, device=device)
                          for a in random_batch(cfg, bc.batch_size, bc.seed))
        self.autocast, self.amp_dtype = bc.dtype != "float32", getattr(torch, bc.dtype)
        _, self.first_step_s = timed(self)  # eager warm-up, or torch.compile's compilation
        if device == "cuda":  # hand back what the warm-up cached, for the other runners in this process
            torch.cuda.empty_cache()

    def __call__(self) -> None:
        torch = self.torch
        with torch.autocast(self.device.split(":")[0], dtype=self.amp_dtype, enabled=self.autocast):
            logits = self.model(input_ids=self.x).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), self.y.flatten())
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        loss.item()  # blocks until done, as float(metrics["loss"]) does


def torch_device() -> str:
    """Where PyTorch runs: CUDA when JAX runs on a GPU and torch sees one, else the CPU."""
    import torch
    return "cuda" if jax.devices()[0].platform == "gpu" and torch.cuda.is_available() else "cpu"


@dataclass
class Timed:
    """What the rows need of a PyTorch runner timed in another process."""
    n_params: int
    first_step_s: float
    device: str = "cpu"


def torch_runners(cfg: GPTConfig, bc: Any, log: Callable[[str], None], device: str | None = None) -> tuple[dict, dict]:
    """PyTorch eager (and torch.compile) train runners on `device` (default: `torch_device()`), and the errors of
    those that could not be built."""
    runners, errors = {}, {}
    try:
        device = device or torch_device()
        log("building PyTorch eager ...")
        runners["pytorch eager"] = TorchTrain(cfg, bc, compiled=False, device=device)
        if bc.torch_compile:
            log("torch.compile (first step compiles) ...")
            try:
                runners["pytorch compile"] = TorchTrain(cfg, bc, compiled=True, device=device)
            except Exception as e:  # inductor needs a C++ compiler on CPU; report, don't fail
                errors["pytorch compile"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    except ImportError as e:
        errors["pytorch"] = f"not installed ({e.name})"
    return runners, errors


def torch_train_apart(cfg: GPTConfig, bc: Any, log: Callable[[str], None]) -> tuple[dict, dict, dict]:
    """PyTorch's train runners timed in a process of their own (`python -m gptjax.bench --torch-train-probe`):
    Timed records, their step times, and the errors."""
    log(f"PyTorch train rows in a process of their own, {bc.steps} steps each (load {load_average()}) ...")
    spec = {"bc": dataclasses.asdict(bc), "cfg": cfg.to_dict()}
    got = in_fresh_process("gptjax.bench", "--torch-train-probe", json.dumps(spec))
    if "error" in got:
        return {}, {}, {"pytorch": "its process failed: " + got["error"]}
    return {k: Timed(**v) for k, v in got["runners"].items()}, got["times"], got["errors"]


def torch_generate_model(cfg: GPTConfig) -> Callable:
    """transformers' GPT2LMHeadModel of `cfg`'s shape, for eval: run(prompt_BT, n, use_cache) generates n
    new tokens greedily and blocks until done."""
    import torch

    device = torch_device()
    model = _hf_gpt2(cfg, 0.0).to(device).eval()

    def run(prompt_BT: np.ndarray, n: int, use_cache: bool) -> None:
        ids = torch.from_numpy(prompt_BT).long().to(device)
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, use_cache=use_cache, pad_token_id=0)
        if device == "cuda":
            torch.cuda.synchronize()

    return run


def torch_version() -> str | None:
    """The installed torch's version, or None."""
    try:
        import torch
        return torch.__version__
    except ImportError:
        return None
