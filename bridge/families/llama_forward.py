"""The project's own model of how megatron-core's GPTModel computes a Llama, run on TP rank shards.

Nothing here uses the mapping rules, only sizes from the config. Each TP rank computes with its own
shard: the vocab-parallel embedding (rank r owns rows [r*Vp/tp, (r+1)*Vp/tp)), column-parallel
``linear_qkv`` (query groups / tp, or one group shared by tp / groups ranks), RoPE, causal attention
with GQA, row-parallel ``linear_proj`` partial sums added as an all-reduce would, the RMSNorms,
[gate_r; up_r] SwiGLU per rank, row-parallel ``linear_fc2``, and vocab-parallel logits gathered with
the padding dropped. A row on the wrong rank or in the wrong order computes another model.

A rank's weights are a dict of fp32 tensors keyed by canonical (``te`` layout) Megatron names with
global layer numbers. Activations are ``[batch, seq, ...]``.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F

from bridge.families.falcon_h1_forward import all_reduce, apply_rope, core_attention, embedding, rank_qkv, rms_norm
from bridge.families.llama_args import LLAMA3_FIXED, check_megatron_runs, head_dim, rope

Tensor = torch.Tensor
Rank = dict[str, Tensor]
EMBEDDING = "embedding.word_embeddings.weight"
OUTPUT = "output_layer.weight"
FINAL_NORM = "decoder.final_layernorm.weight"


def rope_tables(cfg, seq: int) -> tuple[Tensor, Tensor]:
    """cos/sin [seq, head_dim] of non-interleaved RoPE; ``linear`` divides positions by the factor,
    ``llama3`` rescales the low frequencies (megatron-core's ``RotaryEmbedding._apply_scaling``, whose
    constants other than the factor are fixed: ``check_megatron_runs`` refuses other values)."""
    d = head_dim(cfg)
    r = rope(cfg)
    inv_freq = 1.0 / (float(r.get("rope_theta", 10000.0)) ** (torch.arange(0, d, 2, dtype=torch.float) / d))
    positions = torch.arange(seq, dtype=torch.float)
    kind = r.get("rope_type", "default")
    if kind == "linear":
        positions = positions / float(r["factor"])
    elif kind == "llama3":
        factor, low, high, old = float(r["factor"]), *(float(v) for v in LLAMA3_FIXED.values())
        wavelen = 2 * torch.pi / inv_freq
        smooth = (old / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old / low, inv_freq / factor, inv_freq)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        inv_freq = torch.where((wavelen >= old / high) & (wavelen <= old / low), mid, scaled)
    freqs = positions[:, None] * inv_freq
    emb = torch.cat([freqs, freqs], -1)
    return emb.cos(), emb.sin()


def attention(hs: list[Tensor], ranks: list[Rank], prefix: str, dims, rope_cs) -> list[Tensor]:
    """Every rank's self-attention partial sum (linear_proj is row parallel)."""
    p = prefix + "self_attention."
    mixed = [
        F.linear(h, rank[p + "linear_qkv.weight"], rank.get(p + "linear_qkv.bias"))
        for h, rank in zip(hs, ranks, strict=True)
    ]
    cos, sin = rope_cs
    partials = []
    for r, rank in enumerate(ranks):
        q, k, v = rank_qkv(mixed, r, dims)
        q = apply_rope(q.transpose(1, 2), cos, sin).transpose(1, 2)
        k = apply_rope(k.transpose(1, 2), cos, sin).transpose(1, 2)
        out = core_attention(q, k, v, dims.head_dim)
        partials.append(F.linear(out.flatten(2), rank[p + "linear_proj.weight"]))
    return partials


def _reduced(partials: list[Tensor], ranks: list[Rank], bias_key: str) -> Tensor:
    out = all_reduce(partials)
    bias = ranks[0].get(bias_key)
    return out if bias is None else out + bias


def decoder_layer(x: Tensor, ranks: list[Rank], layer: int, cfg, dims, rope_cs) -> Tensor:
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)); each norm fused into the next linear."""
    p, eps = f"decoder.layers.{layer}.", cfg.rms_norm_eps
    hs = [rms_norm(x, rank[p + "self_attention.linear_qkv.layer_norm_weight"], eps) for rank in ranks]
    x = x + _reduced(attention(hs, ranks, p, dims, rope_cs), ranks, p + "self_attention.linear_proj.bias")
    partials = []
    for rank in ranks:
        h = rms_norm(x, rank[p + "mlp.linear_fc1.layer_norm_weight"], eps)
        gate, up = F.linear(h, rank[p + "mlp.linear_fc1.weight"], rank.get(p + "mlp.linear_fc1.bias")).chunk(2, -1)
        partials.append(F.linear(F.silu(gate) * up, rank[p + "mlp.linear_fc2.weight"]))
    return x + _reduced(partials, ranks, p + "mlp.linear_fc2.bias")


@torch.no_grad()
def forward(ids: Tensor, ranks: list[Rank], cfg) -> Tensor:
    """Logits [batch, seq, vocab] of token ids, computed from the TP rank shards as megatron-core would."""
    check_megatron_runs(cfg)
    dims = SimpleNamespace(
        n_heads=cfg.num_attention_heads,
        n_kv_heads=cfg.num_key_value_heads or cfg.num_attention_heads,
        head_dim=head_dim(cfg),
    )
    rope_cs = rope_tables(cfg, ids.shape[1])
    x = embedding(ids, ranks, 1.0)
    for layer in range(cfg.num_hidden_layers):
        x = decoder_layer(x, ranks, layer, cfg, dims, rope_cs)
    parts = [
        F.linear(rms_norm(x, rank[FINAL_NORM], cfg.rms_norm_eps), rank[OUTPUT if OUTPUT in rank else EMBEDDING])
        for rank in ranks
    ]
    return torch.cat(parts, -1)[..., : cfg.vocab_size]
