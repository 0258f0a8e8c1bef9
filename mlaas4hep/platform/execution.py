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
  they were found to fit it (:func:`~mlaas4hep.platform.datasource.read_events_once`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

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
