"""The micro-batcher alone, with a fake model: grouping, splitting, back-pressure, timeouts, failures."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from lensforge.serve.batcher import Batcher, BatcherClosed, Overloaded, TimedOut


class FakeModel:
    """Returns each image's first pixel as its row; records batch sizes; can hold a batch at a gate."""

    def __init__(self, fail: bool = False) -> None:
        self.batches: list[int] = []
        self.sizes_seen: list[tuple[int, int]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.fail = fail

    def __call__(self, images: np.ndarray, sizes: list[tuple[int, int]]) -> list[int]:
        self.entered.set()
        assert self.gate.wait(10), "the test never opened the gate"
        self.batches.append(len(images))
        self.sizes_seen.extend(sizes)
        if self.fail:
            raise RuntimeError("model exploded")
        return [int(image[0, 0, 0]) for image in images]


def images(*ids: int) -> np.ndarray:
    """uint8 (N, 1, 2, 2) whose first pixel is the id."""
    return np.array(ids, np.uint8).reshape(-1, 1, 1, 1) * np.ones((1, 1, 2, 2), np.uint8)


def sizes(n: int) -> list[tuple[int, int]]:
    return [(10 + i, 20 + i) for i in range(n)]


async def running(model: FakeModel, **options) -> Batcher:
    batcher = Batcher(model, **options)
    await batcher.start()
    return batcher


async def wait_until(condition, timeout_s: float = 5.0) -> None:
    for _ in range(int(timeout_s / 0.005)):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition not reached")


def test_concurrent_requests_share_batches_and_get_their_own_rows():
    async def scenario():
        model = FakeModel()
        seen: list[int] = []
        batcher = await running(model, max_batch=4, max_wait_ms=10_000, queue_size=64,
                                on_batch=lambda size, seconds: seen.append(size))
        # a long wait, but full batches run at once: 8 single-image requests make exactly 2 batches
        rows = await asyncio.gather(*(batcher.submit(images(i), sizes(1), 5.0) for i in range(8)))
        await batcher.stop()
        return model, seen, rows

    model, seen, rows = asyncio.run(scenario())
    assert model.batches == [4, 4] and seen == [4, 4]
    assert rows == [[i] for i in range(8)]


def test_max_batch_1_runs_one_inference_per_image():
    async def scenario():
        model = FakeModel()
        batcher = await running(model, max_batch=1, max_wait_ms=50, queue_size=64)
        rows = await asyncio.gather(*(batcher.submit(images(i), sizes(1), 5.0) for i in range(5)))
        await batcher.stop()
        return model, rows

    model, rows = asyncio.run(scenario())
    assert model.batches == [1] * 5
    assert rows == [[i] for i in range(5)]


def test_a_lone_image_runs_after_max_wait():
    async def scenario():
        model = FakeModel()
        batcher = await running(model, max_batch=32, max_wait_ms=20, queue_size=64)
        rows = await batcher.submit(images(7), sizes(1), 5.0)
        await batcher.stop()
        return model, rows

    model, rows = asyncio.run(scenario())
    assert rows == [7] and model.batches == [1]


def test_a_large_request_is_split_over_batches_in_order():
    async def scenario():
        model = FakeModel()
        batcher = await running(model, max_batch=2, max_wait_ms=0, queue_size=64)
        rows = await batcher.submit(images(*range(5)), sizes(5), 5.0)
        await batcher.stop()
        return model, rows

    model, rows = asyncio.run(scenario())
    assert rows == [0, 1, 2, 3, 4]
    assert model.batches == [2, 2, 1]
    assert model.sizes_seen == sizes(5)  # the decoded sizes travel with their images


def test_waiting_requests_join_the_next_batch():
    async def scenario():
        model = FakeModel()
        model.gate.clear()
        batcher = await running(model, max_batch=32, max_wait_ms=0, queue_size=64)
        first = asyncio.ensure_future(batcher.submit(images(0), sizes(1), 5.0))
        await wait_until(model.entered.is_set)  # the first batch is in the model
        rest = [asyncio.ensure_future(batcher.submit(images(i), sizes(1), 5.0)) for i in range(1, 6)]
        await wait_until(lambda: batcher.queue_depth == 5)
        model.gate.set()
        rows = [await first] + [await task for task in rest]
        await batcher.stop()
        return model, rows

    model, rows = asyncio.run(scenario())
    assert model.batches == [1, 5]  # the five that queued behind the first ran together
    assert rows == [[i] for i in range(6)]


def test_a_full_queue_raises_overloaded_with_retry_after():
    async def scenario():
        model = FakeModel()
        model.gate.clear()
        batcher = await running(model, max_batch=1, max_wait_ms=0, queue_size=2)
        busy = asyncio.ensure_future(batcher.submit(images(0), sizes(1), 5.0))
        await wait_until(model.entered.is_set)
        queued = [asyncio.ensure_future(batcher.submit(images(i), sizes(1), 5.0)) for i in (1, 2)]
        await wait_until(lambda: batcher.queue_depth == 2)
        with pytest.raises(Overloaded) as refused:
            await batcher.submit(images(3), sizes(1), 5.0)
        model.gate.set()
        rows = [await busy] + [await task for task in queued]
        await batcher.stop()
        return refused.value, rows

    refused, rows = asyncio.run(scenario())
    assert refused.retry_after_s >= 1 and "queue" in str(refused)
    assert rows == [[0], [1], [2]]  # the queued requests were not disturbed


def test_timeout_withdraws_the_waiting_images():
    async def scenario():
        model = FakeModel()
        model.gate.clear()
        batcher = await running(model, max_batch=1, max_wait_ms=0, queue_size=8)
        busy = asyncio.ensure_future(batcher.submit(images(0), sizes(1), 5.0))
        await wait_until(model.entered.is_set)
        with pytest.raises(TimedOut):
            await batcher.submit(images(1, 2), sizes(2), 0.05)
        depth_after_timeout = batcher.queue_depth
        model.gate.set()
        rows = await busy
        await asyncio.sleep(0.05)
        await batcher.stop()
        return model, depth_after_timeout, rows

    model, depth_after_timeout, rows = asyncio.run(scenario())
    assert depth_after_timeout == 0 and rows == [0]
    assert model.batches == [1]  # the timed-out images never reached the model


def test_a_failing_batch_fails_its_requests_and_the_batcher_goes_on():
    async def scenario():
        model = FakeModel(fail=True)
        batcher = await running(model, max_batch=8, max_wait_ms=0, queue_size=8)
        with pytest.raises(RuntimeError, match="exploded"):
            await batcher.submit(images(1), sizes(1), 5.0)
        model.fail = False
        rows = await batcher.submit(images(2), sizes(1), 5.0)
        await batcher.stop()
        return rows

    assert asyncio.run(scenario()) == [2]


def test_stop_fails_queued_requests_and_refuses_new_ones():
    async def scenario():
        model = FakeModel()
        model.gate.clear()
        batcher = await running(model, max_batch=1, max_wait_ms=0, queue_size=8)
        running_now = asyncio.ensure_future(batcher.submit(images(0), sizes(1), 5.0))
        await wait_until(model.entered.is_set)
        queued = asyncio.ensure_future(batcher.submit(images(1), sizes(1), 5.0))
        await wait_until(lambda: batcher.queue_depth == 1)
        await batcher.stop()
        model.gate.set()
        for task in (running_now, queued):  # both answered at once, not left to time out
            with pytest.raises(BatcherClosed):
                await asyncio.wait_for(task, 1.0)
        with pytest.raises(BatcherClosed):
            await batcher.submit(images(2), sizes(1), 5.0)

    asyncio.run(scenario())


@pytest.mark.parametrize("options", [dict(max_batch=0), dict(queue_size=0), dict(max_wait_ms=-1)])
def test_bad_options_are_refused(options):
    with pytest.raises(ValueError):
        Batcher(FakeModel(), **options)
