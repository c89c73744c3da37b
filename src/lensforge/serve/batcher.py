"""Micro-batching: concurrent requests share one inference, off the event loop.

Requests put their images into a bounded queue (counted in images); one consumer task
takes up to ``max_batch`` images, or what has arrived ``max_wait_ms`` after the first
one, runs the model in a single worker thread (ONNX Runtime already uses every core
for one batch, so batches run one after another) and hands each request its rows.
A request's images may be split over consecutive batches; its rows come back in order.
``max_batch=1`` is one inference per image, the baseline that batching is measured against.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

Size = tuple[int, int]  # decoded (width, height) before resizing
InferFn = Callable[[np.ndarray, list[Size]], Sequence[Any]]  # uint8 (N, C, H, W), sizes -> N rows


class Overloaded(Exception):
    """The queue cannot take the request's images now; retry after ``retry_after_s``."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class TimedOut(Exception):
    """The request's images were not all predicted within its timeout."""


class BatcherClosed(Exception):
    """The batcher is not running (not started yet, or shutting down)."""


@dataclass(eq=False)
class _Job:
    images: np.ndarray
    sizes: list[Size]
    future: asyncio.Future[list[Any]]
    enqueued_s: float
    taken: int = 0  # images handed to a batch so far
    rows: list[Any] = field(default_factory=list)


class Batcher:
    """Groups images from concurrent :meth:`submit` calls into batches for ``infer``.

    Args:
        infer: runs one batch in the worker thread; returns one row per image.
        max_batch: images per inference at most.
        max_wait_ms: how long the first queued image waits for others before its batch runs.
        queue_size: images that may wait at once; more raise :class:`Overloaded`.
        on_batch: called on the event loop with each batch's size and inference seconds.
    """

    def __init__(
        self,
        infer: InferFn,
        *,
        max_batch: int = 32,
        max_wait_ms: float = 5.0,
        queue_size: int = 256,
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        if max_batch < 1 or queue_size < 1 or max_wait_ms < 0:
            raise ValueError("max_batch and queue_size must be >= 1 and max_wait_ms >= 0")
        self.infer = infer
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self.queue_size = queue_size
        self.on_batch = on_batch
        self._jobs: deque[_Job] = deque()
        self._depth = 0  # images queued and not yet taken into a batch
        self._arrived: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self.batches_run = 0
        self.last_batch_s = 0.0

    @property
    def queue_depth(self) -> int:
        """Images waiting for a batch (read from any thread; an int read is atomic)."""
        return self._depth

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        """Start the consumer task on the running event loop."""
        if self.running:
            return
        self._arrived = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lensforge-infer")
        self._task = asyncio.get_running_loop().create_task(self._consume(), name="lensforge-batcher")

    async def stop(self) -> None:
        """Stop the consumer; requests still queued fail with :class:`BatcherClosed`."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        while self._jobs:
            job = self._jobs.popleft()
            if not job.future.done():
                job.future.set_exception(BatcherClosed("the server is shutting down"))
        self._depth = 0
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    async def run_in_worker(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` in the inference thread, after the batch in progress (used for warm-up)."""
        if self._executor is None:
            raise BatcherClosed("the batcher is not running")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    async def submit(self, images: np.ndarray, sizes: list[Size], timeout_s: float) -> list[Any]:
        """Queue ``images`` (uint8 (N, C, H, W)) and wait for their N rows.

        Raises:
            Overloaded: the queue has no room for N more images.
            TimedOut: the rows were not all ready within ``timeout_s``.
            BatcherClosed: the batcher is not running.
        """
        count = len(images)
        if count == 0:
            return []
        if not self.running or self._arrived is None:
            raise BatcherClosed("the batcher is not running")
        if self._depth + count > self.queue_size:
            raise Overloaded(
                f"the queue holds {self._depth} of {self.queue_size} images and cannot take {count} more",
                retry_after_s=self._retry_after_s(),
            )
        job = _Job(images, list(sizes), asyncio.get_running_loop().create_future(), time.monotonic())
        self._jobs.append(job)
        self._depth += count
        self._arrived.set()
        try:
            # shield: a timeout must not cancel the future the consumer may be filling
            return await asyncio.wait_for(asyncio.shield(job.future), timeout=max(timeout_s, 0.0))
        except asyncio.TimeoutError:
            raise TimedOut(f"no answer within {timeout_s:.3g} s") from None
        finally:
            self._withdraw(job)

    def _withdraw(self, job: _Job) -> None:
        """Drop a finished, timed-out or cancelled job's images that no batch has taken."""
        if not job.future.done():
            job.future.cancel()
        if job.taken < len(job.images) and job in self._jobs:
            self._jobs.remove(job)
            self._depth -= len(job.images) - job.taken
            job.taken = len(job.images)

    def _retry_after_s(self) -> int:
        # the time to drain the queue at the last batch's pace, at least one second
        batches = -(-self._depth // self.max_batch)
        return max(1, round(batches * self.last_batch_s + 0.5))

    async def _consume(self) -> None:
        assert self._arrived is not None
        while True:
            while not self._jobs:
                self._arrived.clear()
                await self._arrived.wait()
            await self._gather()
            parts = self._take()
            if parts:
                await self._run(parts)

    async def _gather(self) -> None:
        """Wait until a full batch is queued or ``max_wait_s`` has passed since the first image."""
        assert self._arrived is not None
        deadline = self._jobs[0].enqueued_s + self.max_wait_s
        while self._depth < self.max_batch and self._jobs:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._arrived.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), timeout=remaining)

    def _take(self) -> list[tuple[_Job, int, int]]:
        """Pop up to ``max_batch`` images from the front jobs: (job, start, stop) slices."""
        parts: list[tuple[_Job, int, int]] = []
        room = self.max_batch
        while self._jobs and room:
            job = self._jobs[0]
            stop = min(len(job.images), job.taken + room)
            parts.append((job, job.taken, stop))
            room -= stop - job.taken
            self._depth -= stop - job.taken
            job.taken = stop
            if stop == len(job.images):
                self._jobs.popleft()
        return parts

    async def _run(self, parts: list[tuple[_Job, int, int]]) -> None:
        images = np.concatenate([job.images[start:stop] for job, start, stop in parts])
        sizes = [size for job, start, stop in parts for size in job.sizes[start:stop]]
        started = time.perf_counter()
        try:
            rows = await self.run_in_worker(lambda: list(self.infer(images, sizes)))
            if len(rows) != len(images):
                raise RuntimeError(f"infer returned {len(rows)} rows for {len(images)} images")
        except asyncio.CancelledError:  # stop() during the batch: its requests get an answer too
            for job, _, _ in parts:
                self._fail(job, BatcherClosed("the server is shutting down"))
            raise
        except Exception as e:  # a failed batch fails its requests, never the consumer
            for job, _, _ in parts:
                self._fail(job, e)
            return
        self.last_batch_s = time.perf_counter() - started
        self.batches_run += 1
        if self.on_batch is not None:
            self.on_batch(len(images), self.last_batch_s)
        offset = 0
        for job, start, stop in parts:
            job.rows.extend(rows[offset : offset + stop - start])
            offset += stop - start
            if len(job.rows) == len(job.images) and not job.future.done():
                job.future.set_result(job.rows)

    def _fail(self, job: _Job, error: Exception) -> None:
        if not job.future.done():
            job.future.set_exception(error)
        if job in self._jobs:  # the rest of a split job will not be run
            self._jobs.remove(job)
            self._depth -= len(job.images) - job.taken
            job.taken = len(job.images)
