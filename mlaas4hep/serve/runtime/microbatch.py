"""Concurrent small predictions of one model merged into one model call.

A TensorFlow graph call costs about the same for one row as for 32 (a few hundred
microseconds, mostly fixed overhead), so 32 clients sending one event each pay 32 times
what one call of 32 rows would. :class:`MicroBatcher` sits in front of one loaded model
in the ingress: while a model call runs (in a worker thread, so the event loop keeps
reading and parsing requests), the rows of requests that arrive queue up, and the next
call takes all of them at once. Nothing waits for a batch to fill: an idle model is
called at once, so a lone request pays no delay.

Batching pays only when the model call is expensive: a numpy forward pass of a Dense
stack costs microseconds, less than the thread hop. So the first calls of each model run
directly on the event loop and are timed; only a model whose cheapest probe call took at
least ``batch_above_s`` is batched from then on.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import numpy as np

#: Calls timed on the event loop before a model is judged cheap or expensive.
PROBE_CALLS = 8

Predict = Callable[[np.ndarray], np.ndarray]


class MicroBatcher:
    """Merges concurrent :meth:`predict` calls of one model into single model calls.

    ``predict`` is the model call (``[rows, features] -> [rows, outputs]``); a merged call
    takes at most ``max_rows`` rows (a request over that is called alone). Each caller gets
    its own rows back; when a merged call fails, each caller's rows are predicted alone, so
    a caller gets its own answer or its own error. ``batch_above_s <= 0`` batches every
    model (no probe calls).
    """

    def __init__(
        self, predict: Predict, max_rows: int = 256, batch_above_s: float = 100e-6
    ) -> None:
        self._predict = predict
        self.max_rows = max_rows
        self.batch_above_s = batch_above_s
        #: the cheapest probe call's seconds (None before the first)
        self.probe_s: float | None = None
        self._probes = 0
        self._pending: list[tuple[np.ndarray, asyncio.Future[np.ndarray]]] = []
        self._draining = False
        #: model calls made, and the rows they took (for tests and figures)
        self.calls = 0
        self.rows = 0

    @property
    def batching(self) -> bool:
        """Whether predictions of this model are merged (decided after the probe calls)."""
        if self.batch_above_s <= 0:
            return True
        return self._probes >= PROBE_CALLS and (self.probe_s or 0.0) >= self.batch_above_s

    async def predict(self, matrix: np.ndarray) -> np.ndarray:
        """The model's ``[rows, outputs]`` for ``matrix``, maybe computed in one call with
        other callers' rows; raises what the model call raised for these rows."""
        if not self.batching:
            if self._probes >= PROBE_CALLS:
                return self._call(matrix)
            start = time.perf_counter()
            out = self._call(matrix)
            spent = time.perf_counter() - start
            self._probes += 1
            self.probe_s = spent if self.probe_s is None else min(self.probe_s, spent)
            return out
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self._pending.append((matrix, future))
        if not self._draining:
            self._draining = True
            asyncio.get_running_loop().create_task(self._drain())
        return await future

    def _call(self, matrix: np.ndarray) -> np.ndarray:
        self.calls += 1
        self.rows += len(matrix)
        return self._predict(matrix)

    async def _drain(self) -> None:
        """Call the model for the queued requests, batch after batch, until none is left."""
        try:
            while self._pending:
                await self._run(self._take())
        except BaseException as error:  # cancelled with the loop: fail who still waits
            for _, future in self._pending:
                if not future.done():
                    future.set_exception(error)
            self._pending.clear()
            raise
        finally:
            self._draining = False

    def _take(self) -> list[tuple[np.ndarray, asyncio.Future[np.ndarray]]]:
        """The next batch: queued requests in arrival order, up to ``max_rows`` rows (at
        least one request)."""
        taken, rows = 0, 0
        for matrix, _ in self._pending:
            if taken and rows + len(matrix) > self.max_rows:
                break
            taken += 1
            rows += len(matrix)
        batch, self._pending = self._pending[:taken], self._pending[taken:]
        return batch

    async def _run(self, batch: list[tuple[np.ndarray, asyncio.Future[np.ndarray]]]) -> None:
        """One model call for ``batch``; each caller's future gets its rows or an error."""
        matrices = [matrix for matrix, _ in batch]
        try:
            merged = matrices[0] if len(batch) == 1 else np.concatenate(matrices)
            out = await asyncio.to_thread(self._call, merged)
        except Exception as error:
            if len(batch) == 1:
                _settle(batch[0][1], error=error)
                return
            for matrix, future in batch:  # whose rows failed: each caller alone
                try:
                    _settle(future, await asyncio.to_thread(self._call, matrix))
                except Exception as own:
                    _settle(future, error=own)
            return
        start = 0
        for matrix, future in batch:
            _settle(future, out[start : start + len(matrix)])
            start += len(matrix)


def _settle(
    future: asyncio.Future[np.ndarray],
    result: np.ndarray | None = None,
    error: BaseException | None = None,
) -> None:
    """Give ``future`` its ``result`` or ``error`` unless its caller went away."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)  # type: ignore[arg-type]
