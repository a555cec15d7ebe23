"""The handful of sizes the tensor-parallel rules need, derived once from an HF config.

Rules never read a config object: they get these plain numbers, which keeps them pure
functions that can be tested on their own and run on meta tensors for shape planning.
"""

from __future__ import annotations

from dataclasses import dataclass


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Megatron pads the vocabulary to a multiple of ``make_vocab_size_divisible_by * tp``."""
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


@dataclass(frozen=True)
class FalconH1Dims:
    hidden: int
    vocab: int
    padded_vocab: int
    ffn: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ssm: int
    mamba_heads: int
    mamba_head_dim: int
    mamba_groups: int
    d_state: int
    d_conv: int = 4

    @classmethod
    def from_hf_config(cls, cfg, padded_vocab: int | None = None) -> FalconH1Dims:
        d_ssm = cfg.mamba_d_ssm if cfg.mamba_d_ssm is not None else cfg.mamba_expand * cfg.hidden_size
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return cls(
            hidden=cfg.hidden_size,
            vocab=cfg.vocab_size,
            padded_vocab=padded_vocab or cfg.vocab_size,
            ffn=cfg.intermediate_size,
            n_heads=cfg.num_attention_heads,
            n_kv_heads=cfg.num_key_value_heads,
            head_dim=head_dim,
            d_ssm=d_ssm,
            mamba_heads=cfg.mamba_n_heads,
            mamba_head_dim=cfg.mamba_d_head,
            mamba_groups=cfg.mamba_n_groups,
            d_state=cfg.mamba_d_state,
            d_conv=cfg.mamba_d_conv,
        )

    @property
    def in_proj_blocks(self) -> list[int]:
        """Row blocks of Mamba-2 ``in_proj``: z | x | B | C | dt."""
        gn = self.mamba_groups * self.d_state
        return [self.d_ssm, self.d_ssm, gn, gn, self.mamba_heads]

    @property
    def conv_blocks(self) -> list[int]:
        """Channel blocks of Mamba-2 ``conv1d``: x | B | C."""
        gn = self.mamba_groups * self.d_state
        return [self.d_ssm, gn, gn]

    @property
    def mlp_blocks(self) -> list[int]:
        """Row blocks of the fused SwiGLU ``linear_fc1``: gate | up."""
        return [self.ffn, self.ffn]
