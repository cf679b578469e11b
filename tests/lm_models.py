"""Tiny language models and token batches for tests: a GPT-2 layout in plain PyTorch
(float64-capable, for exact Hessians) and a Hugging Face GPT-2 built from a config
(no downloads). Everything seeded."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from dyndiag.data import IGNORE_INDEX


class Block(nn.Module):
    """Pre-LayerNorm transformer block: causal self-attention (SDPA) and an MLP."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        if mask is not None:  # (B, T) 1 = token, 0 = padding: keys that are padding are never attended
            causal = causal & mask.bool()[:, None, None, :]
            causal = causal | torch.eye(T, dtype=torch.bool, device=x.device)  # padded queries keep one key
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=causal)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.mlp(self.ln_2(x))


class TinyGPT(nn.Module):
    """GPT-2 layout: token + position embeddings, ``layers`` blocks, final LayerNorm,
    a head tied to the token embedding. ``forward(input_ids, attention_mask=None)``
    returns logits ``(B, T, vocab)``."""

    def __init__(self, vocab: int = 11, width: int = 8, layers: int = 2, heads: int = 2, context: int = 8) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, width)
        self.wpe = nn.Embedding(context, width)
        self.h = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.wte(input_ids) + self.wpe(pos)
        for block in self.h:
            x = block(x, attention_mask)
        return self.lm_head(self.ln_f(x))


def tiny_gpt(seed: int = 0, dtype: torch.dtype = torch.float64, **config) -> TinyGPT:
    torch.manual_seed(seed)
    return TinyGPT(**config).to(dtype)


def token_batch(
    batch: int = 3, length: int = 6, vocab: int = 11, seed: int = 0, pad: bool = True
) -> dict[str, torch.Tensor]:
    """A causal-LM batch ``{input_ids, attention_mask, labels}``: labels equal the
    inputs (the loss shifts them), right padding of different lengths with label
    ``-100`` when ``pad``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    if pad:
        for i in range(batch):
            mask[i, length - i:] = 0  # sequence i has i padding tokens
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def hf_gpt2(seed: int = 0, vocab: int = 11, width: int = 8, layers: int = 2, heads: int = 2, context: int = 8):
    """A Hugging Face ``GPT2LMHeadModel`` from a config, dropout on (as trained), float32."""
    import transformers

    config = transformers.GPT2Config(
        vocab_size=vocab, n_embd=width, n_layer=layers, n_head=heads, n_positions=context,
        bos_token_id=0, eos_token_id=0, loss_type="ForCausalLM",
    )
    transformers.set_seed(seed)
    return transformers.GPT2LMHeadModel(config)
