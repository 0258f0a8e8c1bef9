"""How the platform's Ray Data executions are scheduled.

Two behaviours of Ray Data 2.60's streaming executor cost a short pipeline on a small
cluster much of its parallelism:

* **Resource limits start at zero.** An execution learns the cluster's resources from
  Ray Data's autoscaling coordinator, without blocking: its first answer arrives a few
  milliseconds later, but the executor keeps the empty one for
  ``ResourceManager.GLOBAL_LIMITS_UPDATE_INTERVAL_S`` (1 s), during which it runs one
  task at a time. A specs pass over a 100,000-event wide file takes about a second in
  all. :func:`refresh_limits_promptly` makes that refresh interval
  :data:`LIMITS_REFRESH_S`; the datasource module calls it when it is imported, so
  every process that reads ROOT files (the driver, and the actors that feed Ray Train)
  has it before its executor starts.
* **Per-operator reservation.** Each operator is held to its share of the CPUs and
  object store, and submits a task only once one of its tasks has finished, so the
  two cores of a laptop idle between tasks. That reservation is what bounds memory
  while a stream feeds a slower consumer, so the platform keeps it there, and turns it
  off (:func:`unreserved`) only for executions whose outputs are bounded anyway: the
  specs pass (a few kilobytes a block) and reading events into the object store once
  they were found to fit it (:func:`~mlaas4hep.data.datasource.read_events_once`).

A short data command on a machine where no Ray runs would spend most of its time
starting one (raylet, GCS, workers importing the data stack). :class:`ForkedWorkers`
runs such work in processes forked from the command itself, which has already imported
everything; :mod:`~mlaas4hep.data.datasets` gives them the same per-chunk functions
the Ray tasks run.
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import os
import pickle
import traceback
from collections.abc import Callable, Generator, Iterator
from multiprocessing.connection import Connection, wait
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import ray.data

#: Seconds between refreshes of an execution's resource limits (Ray Data's default: 1).
LIMITS_REFRESH_S = 0.1


def refresh_limits_promptly() -> None:
    """Refresh every Ray Data execution's resource limits of this process every
    :data:`LIMITS_REFRESH_S` instead of every second."""
    try:
        from ray.data._internal.execution.resource_manager import ResourceManager
    except ImportError:  # another Ray version: its executor is left as it is
        return
    if getattr(ResourceManager, "GLOBAL_LIMITS_UPDATE_INTERVAL_S", 0) > LIMITS_REFRESH_S:
        ResourceManager.GLOBAL_LIMITS_UPDATE_INTERVAL_S = LIMITS_REFRESH_S


def unreserved(ds: ray.data.Dataset) -> ray.data.Dataset:
    """Return ``ds`` with Ray Data's per-operator resource reservation off.

    Only for executions whose outputs are bounded (see the module's docstring): the
    setting travels with ``ds`` and the datasets derived from it.
    """
    ds.context.op_resource_reservation_enabled = False
    return ds


def materialize_unreserved(ds: ray.data.Dataset) -> ray.data.MaterializedDataset:
    """Materialize ``ds`` without the reservation; the datasets derived from the result
    (which may feed consumers of any speed) have the session's setting again."""
    from ray.data import DataContext

    materialized = unreserved(ds).materialize()
    default = DataContext.get_current().op_resource_reservation_enabled
    materialized.context.op_resource_reservation_enabled = default
    return materialized


@contextlib.contextmanager
def ordered_blocks(block_bytes: int) -> Iterator[None]:
    """Datasets created inside the block keep one block per read task, in the order of the
    read plan: order preserved (``preserve_order``), and Ray Data's
    ``target_max_block_size`` at least twice ``block_bytes`` (the plan's largest read
    task's estimate), so that no read task's block is split."""
    from ray.data import DataContext

    context = DataContext.get_current()
    before = context.execution_options.preserve_order, context.target_max_block_size
    context.execution_options.preserve_order = True
    context.target_max_block_size = max(before[1] or 0, 2 * block_bytes)
    try:
        yield
    finally:
        context.execution_options.preserve_order, context.target_max_block_size = before


#: A worker's work: a generator that yields one result per phase and receives, from
#: ``send()``, what the parent sends for the next phase.
Work = Callable[[int], Generator[Any, Any, None]]


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class WorkerError(RuntimeError):
    """An exception of a forked worker that could not be sent back as it was."""


def _serve(index: int, work: Work, conn: Connection) -> None:
    """A worker's loop: run ``work(index)`` phase by phase, sending each result back."""
    generator, message = work(index), None
    try:
        while True:
            result = generator.send(message)
            conn.send(("ok", result))
            try:
                message = conn.recv()
            except EOFError:  # the parent wants no further phase
                return
    except StopIteration:
        return
    except BaseException as error:  # every failure goes back to the parent, which raises it
        try:
            pickle.dumps(error)
        except Exception:
            error = WorkerError("".join(traceback.format_exception_only(error)).strip())
        conn.send(("error", error))


class ForkedWorkers:
    """``count`` worker processes forked from this one, run phase by phase.

    Worker ``i`` runs ``work(i)``, a generator: each value it yields is one phase's result,
    which :meth:`gather` collects from every worker (in worker order); :meth:`send` gives
    every worker the input of its next phase. The workers share this process's imported
    modules and memory at the fork (copy on write), so nothing is pickled but phase
    inputs and results. A worker's exception is raised by :meth:`gather`; leaving the
    ``with`` block stops the workers that are still running.

    Fork only from a process without threads that must survive (no Ray driver, no XRootD
    client): a forked child holds a copy of their state but not the threads.
    """

    def __init__(self, count: int, work: Work) -> None:
        if count < 1:
            raise ValueError(f"count must be at least 1, got {count}")
        self.count, self.work = count, work
        self.workers: list[tuple[multiprocessing.process.BaseProcess, Connection]] = []

    def __enter__(self) -> ForkedWorkers:
        context = multiprocessing.get_context("fork")
        # The objects the workers inherit are never garbage: frozen, the workers' cyclic
        # collections do not walk them (nor copy their pages by touching them).
        gc.freeze()
        try:
            for index in range(self.count):
                parent, child = context.Pipe()
                # The child closes the parent's ends it inherits (its own pipe's and the
                # earlier workers'): else no worker would see the parent close its pipe.
                inherited = [parent, *(conn for _, conn in self.workers)]
                process = context.Process(
                    target=_child_main, args=(index, self.work, child, inherited), daemon=True
                )
                process.start()
                child.close()
                self.workers.append((process, parent))
        finally:
            gc.unfreeze()
        return self

    def gather(self) -> list[Any]:
        """Each worker's result of the current phase; raises the first worker error."""
        results: dict[int, Any] = {}
        pending = {conn: i for i, (_, conn) in enumerate(self.workers)}
        while pending:
            for conn in wait(list(pending)):
                index = pending.pop(conn)
                try:
                    status, value = conn.recv()
                except EOFError:
                    code = self.workers[index][0].exitcode
                    message = f"worker {index} ended without an answer (exit {code})"
                    raise WorkerError(message) from None
                if status == "error":
                    raise value
                results[index] = value
        return [results[i] for i in range(self.count)]

    def send(self, message: Any) -> None:
        """Give every worker the input of its next phase."""
        for _, conn in self.workers:
            conn.send(message)

    def __exit__(self, *exc: object) -> None:
        for process, conn in self.workers:
            if exc[0] is not None and process.is_alive():
                process.terminate()
            conn.close()
        for process, _ in self.workers:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
                process.join()


def _child_main(index: int, work: Work, conn: Connection, inherited: list[Connection]) -> None:
    """Entry point of a forked worker; it ends without running the parent's exit handlers."""
    code = 0
    for other in inherited:
        other.close()
    try:
        _serve(index, work, conn)
    except BaseException:
        code = 1
    finally:
        conn.close()
        os._exit(code)
