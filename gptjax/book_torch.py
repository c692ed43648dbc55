"""The book's chapter-4 GPTModel in PyTorch, condensed: the independent reference that gptjax's model and
training loop are checked against (tests/test_train.py, tests/test_gpt2_weights.py,
experiments/ch05_loss_spike.py). Imports torch; nothing in gptjax imports this module.

Load gptjax params into it with `gpt2_export.export_book` (state-dict names as the book's).
"""
from __future__ import annotations

import math
from typing import Any

from gptjax.gpt2_export import book_config, export_book


def book_gpt_model(c: dict[str, Any]):
    """The book's GPTModel for a GPT_CONFIG dict (`gpt2_export.book_config`), with its three dropouts."""
    import torch
    nn = torch.nn

    class LayerNorm(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.eps, self.scale, self.shift = 1e-5, nn.Parameter(torch.ones(d)), nn.Parameter(torch.zeros(d))

        def forward(self, x):
            mean, var = x.mean(-1, keepdim=True), x.var(-1, keepdim=True, unbiased=False)
            return self.scale * (x - mean) / torch.sqrt(var + self.eps) + self.shift

    class GELU(nn.Module):
        def forward(self, x):
            return 0.5 * x * (1 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))

    class FeedForward(nn.Module):
        def __init__(self):
            super().__init__()
            D = c["emb_dim"]
            self.layers = nn.Sequential(nn.Linear(D, 4 * D), GELU(), nn.Linear(4 * D, D))

        def forward(self, x):
            return self.layers(x)

    class MultiHeadAttention(nn.Module):
        def __init__(self):
            super().__init__()
            D, self.H = c["emb_dim"], c["n_heads"]
            self.W_query, self.W_key, self.W_value = (nn.Linear(D, D, bias=c["qkv_bias"]) for _ in range(3))
            self.out_proj, self.dropout = nn.Linear(D, D), nn.Dropout(c["drop_rate"])
            self.register_buffer("mask", torch.triu(torch.ones(c["context_length"], c["context_length"]), diagonal=1))

        def forward(self, x):
            B, T, D = x.shape
            q, k, v = (w(x).view(B, T, self.H, D // self.H).transpose(1, 2)
                       for w in (self.W_query, self.W_key, self.W_value))
            att = (q @ k.transpose(2, 3)).masked_fill(self.mask.bool()[:T, :T], -torch.inf)
            att = self.dropout(torch.softmax(att / k.shape[-1] ** 0.5, dim=-1))
            return self.out_proj((att @ v).transpose(1, 2).reshape(B, T, D))

    class TransformerBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.att, self.ff = MultiHeadAttention(), FeedForward()
            self.norm1, self.norm2 = LayerNorm(c["emb_dim"]), LayerNorm(c["emb_dim"])
            self.drop_shortcut = nn.Dropout(c["drop_rate"])

        def forward(self, x):
            x = x + self.drop_shortcut(self.att(self.norm1(x)))
            return x + self.drop_shortcut(self.ff(self.norm2(x)))

    class GPTModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok_emb = nn.Embedding(c["vocab_size"], c["emb_dim"])
            self.pos_emb = nn.Embedding(c["context_length"], c["emb_dim"])
            self.drop_emb = nn.Dropout(c["drop_rate"])
            self.trf_blocks = nn.Sequential(*[TransformerBlock() for _ in range(c["n_layers"])])
            self.final_norm = LayerNorm(c["emb_dim"])
            self.out_head = nn.Linear(c["emb_dim"], c["vocab_size"], bias=False)

        def forward(self, idx):
            x = self.drop_emb(self.tok_emb(idx) + self.pos_emb(torch.arange(idx.shape[1])))
            return self.out_head(self.final_norm(self.trf_blocks(x)))

    return GPTModel()


def calc_loss_batch(input_batch, target_batch, model):
    """The book's chapter-5 batch loss: mean cross-entropy of `model`'s logits (int token arrays in)."""
    import torch

    logits = model(torch.as_tensor(input_batch, dtype=torch.long))
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1),
                                             torch.as_tensor(target_batch, dtype=torch.long).flatten())


def book_from_params(params: dict, cfg, path) -> Any:
    """The book's GPTModel holding gptjax `params` (written to `path` by export_book, loaded strictly)."""
    from safetensors.torch import load_file  # needs torch

    model = book_gpt_model(book_config(cfg))
    model.load_state_dict(load_file(str(export_book(params, cfg, path))), strict=True)
    return model
