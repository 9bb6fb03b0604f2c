"""service.api.batching.Batcher: concurrent items share a write, results go to the right
callers, a bad item fails alone, and no caller is ever left waiting."""

from __future__ import annotations

import asyncio

import pytest

from service.api.batching import Batcher


class Writes:
    def __init__(self, fail_on=None, shared=False, short=False):
        self.batches: list[list[int]] = []
        self.fail_on, self.shared, self.short = fail_on, shared, short

    async def __call__(self, items):
        self.batches.append(list(items))
        await asyncio.sleep(0.01)
        if self.fail_on == "all" or (self.fail_on is not None and self.fail_on in items):
            raise (ConnectionError("down") if self.shared else ValueError(f"bad {self.fail_on}"))
        results = [item * 10 for item in items]
        return results[:-1] if self.short else results


async def test_concurrent_items_share_writes_and_get_their_own_results():
    writes = Writes()
    batcher = Batcher(writes, max_batch=8, parallel=1)
    results = await asyncio.gather(*(batcher.submit(i) for i in range(20)))
    assert results == [i * 10 for i in range(20)]
    assert len(writes.batches) < 20 and max(len(b) for b in writes.batches) == 8
    assert sorted(i for b in writes.batches for i in b) == list(range(20))  # each written once


async def test_a_bad_item_fails_only_its_caller():
    batcher = Batcher(Writes(fail_on=3), parallel=1)
    results = await asyncio.gather(*(batcher.submit(i) for i in range(6)), return_exceptions=True)
    assert isinstance(results[3], ValueError)
    assert [r for i, r in enumerate(results) if i != 3] == [0, 10, 20, 40, 50]


async def test_a_shared_failure_fails_the_whole_batch_without_retrying_each():
    writes = Writes(fail_on="all", shared=True)  # the server is down
    batcher = Batcher(writes, parallel=1, shared=lambda exc: isinstance(exc, ConnectionError))
    results = await asyncio.gather(*(batcher.submit(i) for i in range(4)), return_exceptions=True)
    assert all(isinstance(r, ConnectionError) for r in results)
    assert writes.batches == [[0], [1, 2, 3]]  # no item-by-item retry of a shared failure


async def test_a_write_with_missing_results_is_an_error_not_a_hang():
    batcher = Batcher(Writes(short=True), parallel=1)
    with pytest.raises(RuntimeError):
        await asyncio.wait_for(batcher.submit(1), timeout=2)


async def test_a_cancelled_caller_does_not_stop_the_write():
    writes = Writes()
    batcher = Batcher(writes, parallel=1)
    caller = asyncio.create_task(batcher.submit(7))
    await asyncio.sleep(0)
    caller.cancel()
    assert await batcher.submit(8) == 80
    assert [7] in writes.batches or any(7 in b for b in writes.batches)
