from __future__ import annotations

import asyncio

from ambient.proto import workload_pb2
from ambient.xds.source import MemorySource
from ambient.xds.types import ADDRESS_TYPE_URL as ADDR
from ambient.xds.types import address_resource

A = address_resource(workload_pb2.Workload(uid="a"))
A2 = address_resource(workload_pb2.Workload(uid="a", name="renamed"))


def test_only_real_changes_move_the_generation() -> None:
    source = MemorySource()
    assert source.update(ADDR, [A]) and source.generation == 1
    assert not source.update(ADDR, [A]) and not source.replace(ADDR, [A]) and not source.update(ADDR, removals=["x"])
    assert source.generation == 1
    before = source.snapshot(ADDR)
    assert source.update(ADDR, [A2]) and source.generation == 2
    assert before["a"] is A and source.snapshot(ADDR)["a"] is A2  # snapshots are never mutated
    assert source.replace(ADDR, []) and dict(source.snapshot(ADDR)) == {}


async def test_wait_changed_returns_once_past_the_given_generation_and_can_be_cancelled() -> None:
    source = MemorySource()
    assert await source.wait_changed(-1) == 0
    waiter = asyncio.create_task(source.wait_changed(0))
    await asyncio.sleep(0)
    assert not waiter.done()
    source.update(ADDR, [A])
    assert await asyncio.wait_for(waiter, 1) == 1
    with_timeout = asyncio.create_task(source.wait_changed(1))
    await asyncio.sleep(0)
    with_timeout.cancel()
    source.update(ADDR, [A2])  # still works after a cancelled waiter
    assert await asyncio.wait_for(source.wait_changed(1), 1) == 2
