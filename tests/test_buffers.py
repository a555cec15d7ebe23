"""bridge/buffers.py: shard buffers are exact-sized, reused by the next rank, and filled row by row."""

import torch

from bridge.plumbing.buffers import BufferPool, fill


def test_pool_reuses_buffers_of_the_previous_rank_and_drops_the_rest():
    pool = BufferPool()
    a = pool.tensor(torch.Size([4, 3]), torch.bfloat16)
    b = pool.tensor(torch.Size([5]), torch.float32)
    assert a.untyped_storage().nbytes() == 4 * 3 * 2 and b.untyped_storage().nbytes() == 5 * 4
    pointers = {a.data_ptr(), b.data_ptr()}
    del a, b
    pool.recycle()
    c = pool.tensor(torch.Size([12]), torch.bfloat16)  # 24 bytes: the bf16 [4, 3] buffer again
    assert c.data_ptr() in pointers
    pool.recycle()  # the unused 20-byte buffer is dropped now
    assert sum(len(v) for v in pool._free.values()) == 1


def test_fill_concatenates_pieces_on_dim0_with_cast(tmp_path):
    pool = BufferPool()
    pieces = [torch.arange(6.0).reshape(2, 3), torch.arange(6.0, 9.0).reshape(1, 3)]
    out = fill(pool.tensor(torch.Size([3, 3]), torch.bfloat16), pieces)
    assert torch.equal(out, torch.cat(pieces).to(torch.bfloat16))
    torch.save({"w": out}, tmp_path / "w.pt")
    assert torch.equal(torch.load(tmp_path / "w.pt", weights_only=True)["w"], out)
