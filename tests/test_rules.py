"""Each TP rule against layouts built independently of it (loops, reference examples)."""

import pytest
import torch

from mappings import FalconH1Dims, ShardError
from mappings.rules import (
    COLUMN,
    GATED_MLP,
    MAMBA_CONV1D,
    MAMBA_IN_PROJ,
    QKV,
    REPLICATED,
    ROW,
    VOCAB,
    allocating,
)


def dims(**kw):
    base = dict(
        hidden=4,
        vocab=10,
        padded_vocab=16,
        ffn=6,
        n_heads=4,
        n_kv_heads=2,
        head_dim=2,
        d_ssm=8,
        mamba_heads=4,
        mamba_head_dim=2,
        mamba_groups=4,
        d_state=3,
    )
    return FalconH1Dims(**{**base, **kw})


def test_in_proj_matches_megatron_lm_hybrid_conversion_example():
    # Megatron-LM tools/checkpoint/hybrid_conversion.py, d_inner=8, G=4, N=3, H=4, tp=2:
    # rank 0 holds rows 0-3, 8-11, 16-21, 28-33, 40-41 of the HF in_proj.
    d = dims()
    w = torch.arange(44).float().unsqueeze(1)
    rank0 = MAMBA_IN_PROJ.shard([w], d, 2, 0).squeeze(1).long().tolist()
    expected = [*range(0, 4), *range(8, 12), *range(16, 22), *range(28, 34), *range(40, 42)]
    assert rank0 == expected
    assert not torch.equal(MAMBA_IN_PROJ.shard([w], d, 2, 0), w.chunk(2)[0])


def test_conv1d_blocks_split_separately():
    d = dims()
    w = torch.arange(32).float().view(32, 1, 1)
    rank1 = MAMBA_CONV1D.shard([w], d, 2, 1).flatten().long().tolist()
    assert rank1 == [*range(4, 8), *range(14, 20), *range(26, 32)]


def test_qkv_interleaves_query_groups():
    d = dims(n_heads=4, n_kv_heads=2, head_dim=2)
    q, k, v = torch.randn(8, 4), torch.randn(4, 4), torch.randn(4, 4)
    expected = []
    for g in range(2):  # [q heads of group g | k_g | v_g]
        expected += [q[g * 4 : (g + 1) * 4], k[g * 2 : (g + 1) * 2], v[g * 2 : (g + 1) * 2]]
    expected = torch.cat(expected)
    assert torch.equal(QKV.shard([q, k, v], d, 1, 0), expected)
    assert torch.equal(QKV.shard([q, k, v], d, 2, 1), expected[8:])
    bias = QKV.shard([q[:, 0], k[:, 0], v[:, 0]], d, 2, 0)
    assert torch.equal(bias, expected[:8, 0])


def test_gated_mlp_concats_gate_and_up_per_rank():
    d = dims(ffn=6)
    gate, up = torch.randn(6, 4), torch.randn(6, 4)
    r1 = GATED_MLP.shard([gate, up], d, 3, 1)
    assert torch.equal(r1, torch.cat([gate[2:4], up[2:4]]))


def test_vocab_padding_and_trim():
    d = dims(vocab=10, padded_vocab=16)
    w = torch.randn(10, 4)
    shards = VOCAB.to_megatron([w], d, 2)
    assert [s.shape[0] for s in shards] == [8, 8]
    assert torch.equal(shards[1][2:], torch.zeros(6, 4))
    assert torch.equal(VOCAB.to_hf(shards, d)[0], w)


RULE_SHAPES = [
    (REPLICATED, [(6,)]),
    (COLUMN, [(8, 4)]),
    (ROW, [(4, 8)]),
    (VOCAB, [(10, 4)]),
    (QKV, [(8, 4), (4, 4), (4, 4)]),
    (GATED_MLP, [(6, 4), (6, 4)]),
    (MAMBA_IN_PROJ, [(44, 4)]),
    (MAMBA_CONV1D, [(32, 1, 4)]),
]


@pytest.mark.parametrize("rule,shapes", RULE_SHAPES)
@pytest.mark.parametrize("tp", [1, 2])
def test_round_trip(rule, shapes, tp):
    d = dims()
    hf = [torch.randn(s) for s in shapes]
    back = rule.to_hf(rule.to_megatron(hf, d, tp), d)
    assert all(torch.equal(a, b) for a, b in zip(hf, back, strict=False))
    made = []

    def empty(shape, dtype):  # a pool's buffer holds anything: every element must be written
        made.append(shape)
        return torch.full(shape, float("nan"), dtype=dtype)

    with allocating(empty):  # merges built in memory the caller provides (re-sharding's reused buffers)
        pooled = rule.to_hf(rule.to_megatron(hf, d, tp), d)
    assert all(torch.equal(a, b) for a, b in zip(hf, pooled, strict=False))
    assert bool(made) == (tp > 1 and rule is not REPLICATED)
    shards, copied = rule.to_megatron(hf, d, tp), []
    with allocating(empty, copied.append):  # shard by shard, each handed back once copied
        stepwise = rule.to_hf(shards, d)
    assert all(torch.equal(a, b) for a, b in zip(hf, stepwise, strict=False))
    owners = {s.untyped_storage().data_ptr() for s in shards}
    assert all(c.untyped_storage().data_ptr() in owners for c in copied)  # pieces of the shards, nothing else
    assert bool(copied) == (tp > 1 and rule is not REPLICATED)


@pytest.mark.parametrize("rule,shapes", RULE_SHAPES)
@pytest.mark.parametrize("tp", [1, 2])
def test_meta_shards_have_the_real_shards_shape_and_dtype(rule, shapes, tp):
    """The planner's per-rank shapes come from meta tensors, whose pieces are joined without torch.cat."""
    d = dims()
    for rank in range(tp):
        real = rule.shard([torch.randn(s).bfloat16() for s in shapes], d, tp, rank)
        meta = rule.shard([torch.empty(s, dtype=torch.bfloat16, device="meta") for s in shapes], d, tp, rank)
        assert (meta.shape, meta.dtype, meta.device.type) == (real.shape, real.dtype, "meta")


def test_meta_pieces_that_torch_cannot_join_are_refused_as_by_torch():
    q, k, v = (torch.empty(s, device="meta") for s in [(8, 4), (4, 3), (4, 4)])
    with pytest.raises(RuntimeError, match="Sizes of tensors must match"):
        QKV.shard([q, k, v], dims(), 1, 0)


def test_replicated_merge_rejects_diverging_ranks():
    with pytest.raises(ShardError, match="differs between TP ranks"):
        REPLICATED.merge([torch.ones(3), torch.zeros(3)], dims())


def test_non_divisible_split_is_an_error():
    with pytest.raises(ShardError, match="not divisible by TP=3"):
        COLUMN.shard([torch.randn(8, 2)], dims(), 3, 0)


def padded_then_chunked(w, padded, tp):
    """Reference for the vocab rule: the whole padded matrix, then plain chunks."""
    return list(torch.cat([w, torch.zeros(padded - w.shape[0], *w.shape[1:])]).chunk(tp))


@pytest.mark.parametrize("vocab,padded,tp", [(10, 16, 2), (10, 64, 4), (16, 16, 4), (3, 32, 8), (30, 32, 8)])
def test_vocab_pieces_equal_pad_then_chunk(vocab, padded, tp):
    """Ranks wholly inside, straddling, or wholly past the real vocabulary (all-zero ranks)."""
    d = dims(vocab=vocab, padded_vocab=padded)
    w = torch.randn(vocab, 4)
    for rank, want in enumerate(padded_then_chunked(w, padded, tp)):
        assert torch.equal(VOCAB.shard([w], d, tp, rank), want)


def interleaved_then_chunked(q, k, v, groups, tp):
    """Reference for the QKV rule, by loops: [q heads of g | k_g | v_g] per group, then plain chunks."""
    rows = []
    qg, kg = q.shape[0] // groups, k.shape[0] // groups
    for g in range(groups):
        rows += [q[g * qg : (g + 1) * qg], k[g * kg : (g + 1) * kg], v[g * kg : (g + 1) * kg]]
    return list(torch.cat(rows).chunk(tp))


@pytest.mark.parametrize("n_heads,n_kv,tp", [(4, 2, 1), (4, 2, 2), (4, 2, 4), (8, 1, 4), (8, 2, 8), (4, 4, 2)])
def test_qkv_pieces_equal_interleave_then_chunk(n_heads, n_kv, tp):
    """Whole groups per rank, and groups spread over several ranks (megatron-core's kv < tp path)."""
    d = dims(n_heads=n_heads, n_kv_heads=n_kv, head_dim=2)
    q, k, v = torch.randn(n_heads * 2, 3), torch.randn(n_kv * 2, 3), torch.randn(n_kv * 2, 3)
    for rank, want in enumerate(interleaved_then_chunked(q, k, v, n_kv, tp)):
        assert torch.equal(QKV.shard([q, k, v], d, tp, rank), want)
    assert [t.equal(u) for t, u in zip(QKV.merge(QKV.to_megatron([q, k, v], d, tp), d), (q, k, v), strict=False)] == [
        True
    ] * 3


@pytest.mark.parametrize(
    "rule,shapes",
    [(COLUMN, [(8, 4)]), (ROW, [(4, 8)]), (VOCAB, [(10, 4)]), (QKV, [(8, 4), (4, 4), (4, 4)])]
    + [(GATED_MLP, [(6, 4), (6, 4)]), (MAMBA_IN_PROJ, [(44, 4)])],
)
def test_merging_fake_shards_gives_fake_tensors(rule, shapes):
    """A dry run merges data-less shards: the result must be data-less too, not real memory of garbage
    (which the torch_dist writer would then try to write for real)."""
    from bridge.plumbing.fake import fake, holds_data

    shards = [fake(s.shape, s.dtype) for s in rule.to_megatron([torch.zeros(s) for s in shapes], dims(), 2)]
    assert not any(holds_data(t) for t in rule.merge(shards, dims()))
