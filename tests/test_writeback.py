"""Write buffers: ranges, overlays, and the pooled buffers that sequential writes stream into."""

from __future__ import annotations

import os
import random

from casfs.fuse import writeback
from casfs.fuse.writeback import WriteBuffers


def model_apply(model: bytearray, offset: int, data: bytes) -> None:
    if len(model) < offset + len(data):
        model.extend(bytes(offset + len(data) - len(model)))
    model[offset : offset + len(data)] = data


def buffered(buffers: WriteBuffers, ino: int, size: int) -> bytes:
    out = bytearray(size)
    buffers.get(ino).overlay(0, out)
    return bytes(out)


def test_a_stream_moves_to_a_pooled_buffer_and_reads_back(monkeypatch):
    monkeypatch.setattr(writeback, "STREAM_BYTES", 64 << 10)
    monkeypatch.setattr(writeback, "POOL_BUFFER_BYTES", 1 << 20)
    buffers = WriteBuffers(64 << 20)
    model = bytearray()
    rng = random.Random(1)
    for off in range(0, 900 << 10, 16 << 10):  # sequential: one range, into a pooled buffer
        data = rng.randbytes(16 << 10)
        buffers.add(1, off, data)
        model_apply(model, off, data)
    (r,) = buffers.get(1).ranges.values()
    assert r.pooled and len(r) == len(model)
    for _ in range(50):  # overwrites inside it stay in place
        off = rng.randrange(len(model) - 5000)
        data = rng.randbytes(rng.randrange(1, 5000))
        assert buffers.get(1).can_take(off, len(data))
        buffers.add(1, off, data)
        model_apply(model, off, data)
    assert buffered(buffers, 1, len(model)) == model
    assert bytes(r.view()) == model
    for off in range(len(model), 1536 << 10, 16 << 10):  # outgrows the pooled buffer
        data = rng.randbytes(16 << 10)
        buffers.add(1, off, data)
        model_apply(model, off, data)
    assert not r.pooled and bytes(r.view()) == model
    assert buffers.total == len(model)


def test_a_reused_buffer_never_shows_old_bytes(monkeypatch):
    monkeypatch.setattr(writeback, "STREAM_BYTES", 64 << 10)
    buffers = WriteBuffers(64 << 20)
    old = os.urandom(256 << 10)
    buffers.add(1, 0, old[: 128 << 10])
    buffers.add(1, 128 << 10, old[128 << 10 :])
    dirty = buffers.take(1)
    (r,) = dirty.ranges.values()
    mem = r.mem
    buffers.pool.give_back(list(dirty.ranges.values()))
    assert len(r) == 0 and buffers.pool.free == [mem]

    new = b"n" * (100 << 10)
    buffers.add(2, 4096, new[: 80 << 10])
    buffers.add(2, 4096 + (80 << 10), new[80 << 10 :])
    (r2,) = buffers.get(2).ranges.values()
    assert r2.mem is mem  # the kept buffer, reused
    assert bytes(r2.view()) == new  # of the same length as written, none of the old bytes
    out = bytearray(300 << 10)
    buffers.get(2).overlay(0, out)
    assert out[:4096] == bytes(4096) and out[4096 : 4096 + len(new)] == new
    assert out[4096 + len(new) :] == bytes(len(out) - 4096 - len(new))


def test_the_pool_keeps_a_few_buffers_and_gives_them_back_when_idle(monkeypatch):
    monkeypatch.setattr(writeback, "STREAM_BYTES", 4096)
    buffers = WriteBuffers(64 << 20)
    for ino in range(1, 5):
        buffers.add(ino, 0, b"a" * 4096)
        buffers.add(ino, 4096, b"b" * 4096)
    for ino in range(1, 5):
        buffers.pool.give_back(list(buffers.take(ino).ranges.values()))
    assert len(buffers.pool.free) == writeback.POOL_KEEP
    buffers.pool.trim()
    assert len(buffers.pool.free) == writeback.POOL_KEEP  # used a moment ago
    buffers.pool.last_use -= writeback.POOL_IDLE
    buffers.pool.trim()
    assert buffers.pool.free == []
