"""How one model views the blocks of the shared pool."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KVLayout:
    """A model's view of a physical block: which tokens of one KV head of one layer it holds.

    A physical block is `block_bytes` of K and V for one (layer, KV head); a model with head
    size d and dtype of b bytes fits `block_bytes // (2 * d * b)` tokens in it. A logical block
    of a sequence is `num_layers * num_kv_heads` physical blocks covering the same tokens.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype_bytes: int
    block_bytes: int

    def __post_init__(self) -> None:
        if self.tokens_per_block < 1:
            raise ValueError(
                f"block_bytes ({self.block_bytes}) cannot hold one token of K and V "
                f"(2 x head_dim {self.head_dim} x {self.dtype_bytes} bytes)"
            )

    @property
    def tokens_per_block(self) -> int:
        return self.block_bytes // (2 * self.head_dim * self.dtype_bytes)

    @property
    def blocks_per_logical(self) -> int:
        """Physical blocks in one logical block."""
        return self.num_layers * self.num_kv_heads

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes

    def logical_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.tokens_per_block)

    def physical_blocks_for(self, num_tokens: int) -> int:
        return self.logical_blocks_for(num_tokens) * self.blocks_per_logical
