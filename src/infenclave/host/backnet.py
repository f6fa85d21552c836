"""The BackNet on the host: ONNX Runtime (CPU, or CUDA with ``--device cuda``), batched.

Why batching here: the BackNet is the heavy middle of the network and the only part that
runs on the host's (possibly accelerated) hardware. Concurrent requests reach it at
different times, each with one IR1 of shape (1, C, H, W); running them one by one wastes
the batch efficiency of the runtime. The batcher is *dynamic*: while one batch runs, new
inputs queue; the next batch takes everything queued (up to `max_batch`). At concurrency 1
there is no waiting at all (no fixed time window), so latency does not pay for batching.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from infenclave.errors import ServerError, UsageError

__all__ = ["BackNet", "BackNetBatcher", "check_device"]


def check_device(device: str) -> list[str]:
    """The ONNX Runtime providers for *device*, or a `UsageError` when this build lacks it."""
    if device == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise UsageError(
                "--device cuda: this onnxruntime build has no CUDA provider "
                "(install onnxruntime-gpu, or use --device cpu)"
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "cpu":
        return ["CPUExecutionProvider"]
    raise UsageError(f"unknown device {device!r} (cpu or cuda)")


class BackNet:
    """One ONNX Runtime session over the clear BackNet graph."""

    def __init__(self, model_bytes: bytes, *, device: str = "cpu", threads: int = 0) -> None:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        providers = check_device(device)
        self.device = device
        self._session = ort.InferenceSession(model_bytes, opts, providers=providers)
        (inp,) = self._session.get_inputs()
        # Output 0 is IR2; a verified BackNet (`infenclave.verify_build`) also outputs every
        # tensor the enclave checks, in the order the enclave expects them.
        self._input = inp.name
        self._outputs = [o.name for o in self._session.get_outputs()]

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        """[IR2, *checked intermediates] for a batch of IR1s, each (B, ...)."""
        return [np.ascontiguousarray(y, dtype=np.float32) for y in self._session.run(self._outputs, {self._input: x})]


@dataclass
class _Item:
    x: np.ndarray  # (1, C, H, W)
    future: asyncio.Future[list[np.ndarray]]


class BackNetBatcher:
    """Queue IR1 tensors from concurrent requests and run them through the BackNet in batches.

    `observe(batch_size, seconds)` is called after each batch (metrics).
    """

    def __init__(
        self,
        backnet: Callable[[np.ndarray], list[np.ndarray]],
        *,
        max_batch: int = 32,
        observe: Callable[[int, float], None] | None = None,
    ) -> None:
        self._backnet = backnet
        self._max_batch = max_batch
        self._observe = observe
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        # One thread: batches run one after another; ORT itself uses the cores.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="backnet")
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the batching loop on the running event loop."""
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        """Stop the loop and fail whatever is still queued."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if not item.future.done():
                item.future.set_exception(ServerError("the server is stopping"))
        self._executor.shutdown(wait=False)

    async def run(self, x: np.ndarray) -> list[np.ndarray]:
        """BackNet outputs ([IR2, *checked intermediates]) for one IR1 of shape (1, ...)."""
        future: asyncio.Future[list[np.ndarray]] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Item(x, future))
        return await future

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = [await self._queue.get()]
            while len(items) < self._max_batch and not self._queue.empty():
                items.append(self._queue.get_nowait())
            items = [i for i in items if not i.future.done()]  # the caller gave up
            if not items:
                continue
            batch = items[0].x if len(items) == 1 else np.concatenate([i.x for i in items])  # (B, C, H, W)
            started = time.perf_counter()
            try:
                out = await loop.run_in_executor(self._executor, self._backnet, batch)
            except Exception as exc:  # noqa: BLE001 - every waiter must hear about it
                for item in items:
                    if not item.future.done():
                        item.future.set_exception(ServerError(f"BackNet failed ({type(exc).__name__})"))
                continue
            if self._observe is not None:
                self._observe(len(items), time.perf_counter() - started)
            for row, item in enumerate(items):
                if not item.future.done():
                    item.future.set_result([y[row : row + 1] for y in out])  # each (1, ...)
