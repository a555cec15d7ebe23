"""bridge/plumbing/recycled.py: a buffer is reused only once no tensor, view or array of it is left."""

from __future__ import annotations

import threading

import torch

from bridge.plumbing.recycled import RecycledMemory


def test_memory_comes_back_only_when_nothing_uses_it():
    memory = RecycledMemory()
    a = memory.empty((10, 5), torch.bfloat16)  # 100 bytes
    assert a.shape == (10, 5) and a.dtype == torch.bfloat16 and a.untyped_storage().nbytes() == 100
    first = a.data_ptr()
    view, array = a[2:], a[:1].view(torch.int16).numpy()
    del a
    b = memory.empty((25,), torch.float32)  # same bytes, but the view still uses the first buffer
    assert b.data_ptr() != first and memory.unused_bytes() == 0
    del view
    assert memory.unused_bytes() == 0  # the numpy array still does
    del array
    assert memory.unused_bytes() == 100
    c = memory.empty((100,), torch.uint8)
    assert c.data_ptr() == first and memory.unused_bytes() == 0
    c.fill_(7)
    assert b.data_ptr() != c.data_ptr()  # b was never handed back, so c did not get its memory
    assert memory.empty((99,), torch.uint8).data_ptr() not in (first, b.data_ptr())  # other size: new


def test_at_most_keep_bytes_stay_unused():
    memory = RecycledMemory(keep_bytes=250)
    tensors = [memory.empty((100,), torch.uint8) for _ in range(4)]
    del tensors
    assert memory.unused_bytes() == 200
    assert memory.empty((0, 3), torch.float32).shape == (0, 3)


def test_tensors_dropped_on_another_thread_come_back():
    memory = RecycledMemory()
    t = memory.empty((64,), torch.float32)
    ptr = t.data_ptr()
    box = [t]
    del t
    worker = threading.Thread(target=box.clear)
    worker.start()
    worker.join()
    assert memory.empty((256,), torch.uint8).data_ptr() == ptr
