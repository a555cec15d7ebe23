"""The project's own model of how Megatron computes Falcon-H1, run directly on TP rank shards.

Nothing here uses the mapping rules, only the sizes in ``FalconH1Dims``. Each TP rank computes
with its own shard only, using the TP-local sizes megatron-core uses (``MambaMixer``: d_inner/tp,
ngroups/tp, nheads/tp; ``Attention``: query groups/tp, or one group shared by tp/groups ranks),
and the collectives are written out: column-parallel outputs stay on their rank, row-parallel
partial sums are added as an all-reduce would, vocab-parallel logits are gathered and the padding
dropped. A row on the wrong rank or in the wrong order makes this forward compute something else,
so comparing its logits with transformers' tests the converter's layout, not just its round trip.

A rank's weights are a dict of fp32 tensors keyed by canonical (``bridge`` layout) Megatron names
with global layer numbers (pipeline stages already merged). Activations are ``[batch, seq, ...]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bridge.engine.config import rope_theta
from mappings import FalconH1Dims

Tensor = torch.Tensor
Rank = dict[str, Tensor]
EMBEDDING = "embedding.word_embeddings.weight"
OUTPUT = "output_layer.weight"
FINAL_NORM = "decoder.final_norm.weight"


def all_reduce(partials: list[Tensor]) -> Tensor:
    """What a TP all-reduce (sum) leaves on every rank."""
    return torch.stack(partials).sum(0)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def embedding(ids: Tensor, ranks: list[Rank], multiplier: float) -> Tensor:
    """Vocab-parallel lookup: rank r owns rows [r*Vp/tp, (r+1)*Vp/tp); other tokens give zeros there."""
    parts = []
    for r, rank in enumerate(ranks):
        table = rank[EMBEDDING]
        local = ids - r * table.shape[0]
        owned = (local >= 0) & (local < table.shape[0])
        parts.append(F.embedding(local.clamp(0, table.shape[0] - 1), table) * owned[..., None])
    return all_reduce(parts) * multiplier


def causal_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Depthwise conv over time with k-1 zeros of left padding, then SiLU (Mamba-2 x|B|C)."""
    k = weight.shape[-1]
    out = F.conv1d(F.pad(x.transpose(1, 2), (k - 1, 0)), weight, bias, groups=weight.shape[0])
    return F.silu(out).transpose(1, 2)


def ssm_scan(x: Tensor, dt: Tensor, a_log: Tensor, b: Tensor, c: Tensor, d: Tensor, dt_bias: Tensor) -> Tensor:
    """The Mamba-2 recurrence, one step at a time (no chunking: the slow, obvious form).

    x [b,t,h,p], dt [b,t,h], B/C [b,t,g,n]; head i reads the B/C of group i // (h/g).
    state_t = exp(dt*A) * state_{t-1} + dt * x_t ⊗ B_t;  y_t = state_t · C_t + D * x_t.
    dt is not clamped: megatron-core calls the scan without ``dt_limit`` (HF's time_step_limit).
    """
    heads = x.shape[2]
    dt = F.softplus(dt + dt_bias)
    decay = torch.exp(dt * -torch.exp(a_log))
    b = b.repeat_interleave(heads // b.shape[2], dim=2)
    c = c.repeat_interleave(heads // c.shape[2], dim=2)
    state = x.new_zeros(x.shape[0], heads, x.shape[3], b.shape[3])
    ys = []
    for t in range(x.shape[1]):
        state = state * decay[:, t, :, None, None] + (dt[:, t, :, None] * x[:, t])[..., None] * b[:, t, :, None, :]
        ys.append((state * c[:, t, :, None, :]).sum(-1) + d[:, None] * x[:, t])
    return torch.stack(ys, 1)


def gated_norm(y: Tensor, z: Tensor, weight: Tensor | None, groups: int, eps: float) -> Tensor:
    """Output gate of the mixer: y*silu(z), then (with ``mamba_rms_norm``) the grouped RMSNorm.

    megatron-core's ``MambaMixer`` gates before the norm whatever ``norm_before_gate`` says (it
    asserts it False), so the config's ``mamba_norm_before_gate`` is not read here: the conversion
    refuses the one config where it matters (``check_megatron_runs``).
    """
    y = y * F.silu(z)
    if weight is None:
        return y
    g = y.view(*y.shape[:-1], groups, -1)
    return (g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + eps)).view_as(y) * weight


def mamba_rank(h: Tensor, rank: Rank, prefix: str, cfg, dims: FalconH1Dims, tp: int) -> Tensor:
    """One rank's Mamba-2 mixer up to its out_proj partial sum (row parallel, before the reduce)."""
    d, heads, groups = dims.d_ssm // tp, dims.mamba_heads // tp, dims.mamba_groups // tp
    gn = groups * dims.d_state
    p = prefix + "mamba_mixer."
    zxbcdt = F.linear(h * cfg.ssm_in_multiplier, rank[p + "in_proj.weight"], rank.get(p + "in_proj.bias"))
    z, x, b, c, dt = (s * m for s, m in zip(zxbcdt.split([d, d, gn, gn, heads], -1), cfg.ssm_multipliers, strict=False))
    xbc = causal_conv1d(torch.cat([x, b, c], -1), rank[p + "conv1d.weight"], rank.get(p + "conv1d.bias"))
    x, b, c = xbc.split([d, gn, gn], -1)
    bt = x.shape[:2]
    y = ssm_scan(
        x.reshape(*bt, heads, dims.mamba_head_dim),
        dt,
        rank[p + "A_log"],
        b.reshape(*bt, groups, -1),
        c.reshape(*bt, groups, -1),
        rank[p + "D"],
        rank[p + "dt_bias"],
    )
    y = gated_norm(y.reshape(*bt, d), z, rank.get(p + "norm.weight"), groups, cfg.rms_norm_eps)
    return F.linear(y, rank[p + "out_proj.weight"])


def rope_tables(seq: int, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos/sin [seq, head_dim] of non-interleaved RoPE (frequencies repeated over both halves)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    freqs = torch.arange(seq, dtype=torch.float)[:, None] * inv_freq
    emb = torch.cat([freqs, freqs], -1)
    return emb.cos(), emb.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half convention: the first half of each head pairs with the second half."""
    x1, x2 = x.chunk(2, -1)
    return x * cos + torch.cat([-x2, x1], -1) * sin


def rank_qkv(mixed: list[Tensor], r: int, dims: FalconH1Dims) -> tuple[Tensor, Tensor, Tensor]:
    """Rank r's q [b,t,hq,d], k, v [b,t,g,d] from the linear_qkv outputs, as get_query_key_value_tensors.

    Each group is stored as [its q heads | k | v]. With fewer groups than ranks, megatron-core
    all-gathers the outputs, keeps the rank's group and then the rank's share of its q heads.
    """
    tp, groups, hd = len(mixed), dims.n_kv_heads, dims.head_dim
    q_per_group = dims.n_heads // groups
    local = mixed[r]
    if groups < tp:
        ranks_per_group = tp // groups
        full = torch.cat(mixed, -1)
        size = full.shape[-1] // groups
        local = full[..., r // ranks_per_group * size : (r // ranks_per_group + 1) * size]
    rows = local.view(*local.shape[:-1], -1, (q_per_group + 2) * hd)
    q, k, v = rows.split([q_per_group * hd, hd, hd], -1)
    q = q.reshape(*q.shape[:2], -1, hd)
    if groups < tp:
        share = dims.n_heads // tp
        q = q[:, :, r % ranks_per_group * share : (r % ranks_per_group + 1) * share]
    return q, k, v


def core_attention(q: Tensor, k: Tensor, v: Tensor, head_dim: int) -> Tensor:
    """Causal softmax attention; each q head reads the k/v of its group. In/out [b,t,heads,d]."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = q @ k.transpose(-1, -2) * head_dim**-0.5
    seq = q.shape[2]
    scores = scores.masked_fill(torch.ones(seq, seq, dtype=torch.bool).triu(1), float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2)


def attention(
    hs: list[Tensor], ranks: list[Rank], prefix: str, cfg, dims: FalconH1Dims, rope: tuple[Tensor, Tensor]
) -> list[Tensor]:
    """Every rank's self-attention partial sum (linear_proj is row parallel)."""
    p = prefix + "self_attention."
    mixed = [
        F.linear(h * cfg.attention_in_multiplier, rank[p + "linear_qkv.weight"], rank.get(p + "linear_qkv.bias"))
        for h, rank in zip(hs, ranks, strict=False)
    ]
    cos, sin = rope
    partials = []
    for r, rank in enumerate(ranks):
        q, k, v = rank_qkv(mixed, r, dims)
        q = apply_rope(q.transpose(1, 2), cos, sin).transpose(1, 2)
        k = apply_rope((k * cfg.key_multiplier).transpose(1, 2), cos, sin).transpose(1, 2)
        out = core_attention(q, k, v, dims.head_dim)
        partials.append(F.linear(out.flatten(2), rank[p + "linear_proj.weight"]))
    return partials


def mlp_rank(x: Tensor, rank: Rank, prefix: str, cfg) -> Tensor:
    """Pre-FF norm fused into linear_fc1, rank-local [gate_r; up_r], SwiGLU, fc2 partial sum."""
    p = prefix + "mlp."
    h = rms_norm(x, rank[p + "linear_fc1.layer_norm_weight"], cfg.rms_norm_eps)
    gate, up = F.linear(h, rank[p + "linear_fc1.weight"], rank.get(p + "linear_fc1.bias")).chunk(2, -1)
    return F.linear(F.silu(gate * cfg.mlp_multipliers[0]) * up, rank[p + "linear_fc2.weight"])


def _reduced(partials: list[Tensor], ranks: list[Rank], bias_key: str) -> Tensor:
    """Row-parallel output: partial sums reduced, then the (replicated) bias added once."""
    out = all_reduce(partials)
    bias = ranks[0].get(bias_key)
    return out if bias is None else out + bias


def decoder_layer(
    x: Tensor, ranks: list[Rank], layer: int, cfg, dims: FalconH1Dims, rope: tuple[Tensor, Tensor]
) -> Tensor:
    """Parallel hybrid layer: x + ssm_out*mamba(h) + attn_out*attn(h), then x + mlp(x)."""
    p, tp = f"decoder.layers.{layer}.", len(ranks)
    hs = [rms_norm(x, rank[p + "norm.weight"], cfg.rms_norm_eps) for rank in ranks]
    m = _reduced(
        [mamba_rank(h, rank, p, cfg, dims, tp) for h, rank in zip(hs, ranks, strict=False)],
        ranks,
        p + "mamba_mixer.out_proj.bias",
    )
    a = _reduced(attention(hs, ranks, p, cfg, dims, rope), ranks, p + "self_attention.linear_proj.bias")
    x = x + m * cfg.ssm_out_multiplier + a * cfg.attention_out_multiplier
    f = _reduced([mlp_rank(x, rank, p, cfg) for rank in ranks], ranks, p + "mlp.linear_fc2.bias")
    return x + f * cfg.mlp_multipliers[1]


def output_logits(x: Tensor, ranks: list[Rank], cfg) -> Tensor:
    """Each rank's vocab slice of the logits (output_layer, or the embedding when tied), gathered."""
    parts = [
        F.linear(rms_norm(x, rank[FINAL_NORM], cfg.rms_norm_eps), rank[OUTPUT if OUTPUT in rank else EMBEDDING])
        for rank in ranks
    ]
    return torch.cat(parts, -1)[..., : cfg.vocab_size] * cfg.lm_head_multiplier


@torch.no_grad()
def forward(ids: Tensor, ranks: list[Rank], cfg) -> Tensor:
    """Logits [batch, seq, vocab] of token ids, computed from the TP rank shards as Megatron would."""
    dims = FalconH1Dims.from_hf_config(cfg)
    rope = rope_tables(ids.shape[1], dims.head_dim, rope_theta(cfg))
    x = embedding(ids, ranks, cfg.embedding_multiplier)
    for layer in range(cfg.num_hidden_layers):
        x = decoder_layer(x, ranks, layer, cfg, dims, rope)
    return output_logits(x, ranks, cfg)
