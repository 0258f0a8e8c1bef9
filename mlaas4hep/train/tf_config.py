"""Ray Train's TensorFlow set-up (``TF_CONFIG`` on every worker), without TensorFlow in the
Train controller.

The same set-up as Ray's ``TensorflowConfig``, whose package (``ray.train.tensorflow``)
imports TensorFlow: the Train controller unpickles the backend config, so with Ray's class
every run spent seconds importing TensorFlow in a process that never uses it before it
asked for its workers. Here only the workers (which train) import it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import ray
from ray._common.network_utils import build_address
from ray.train._internal.utils import get_address_and_port
from ray.train.backend import Backend, BackendConfig
from ray.train.v2._internal.util import TrainingFramework


@dataclass
class MultiWorkerConfig(BackendConfig):
    """Backend config of a ``TensorflowTrainer``: each worker gets the ``TF_CONFIG`` that
    ``MultiWorkerMirroredStrategy`` reads (every worker's address and its own rank)."""

    @property
    def backend_cls(self) -> type[Backend]:
        return _MultiWorkerBackend

    @property
    def framework(self) -> TrainingFramework:
        return TrainingFramework.TENSORFLOW

    def to_dict(self) -> dict[str, Any]:
        return {}


def _set_tf_config(worker_addresses: list[str], index: int) -> None:
    """On a worker: the cluster of ``worker_addresses`` with this worker at ``index``."""
    tf_config = {
        "cluster": {"worker": worker_addresses},
        "task": {"type": "worker", "index": index},
    }
    os.environ["TF_CONFIG"] = json.dumps(tf_config)
    os.environ["TF_USE_LEGACY_KERAS"] = "1"


def _worker_address() -> str:
    return build_address(*get_address_and_port())


class _MultiWorkerBackend(Backend):
    def on_start(self, worker_group: Any, backend_config: MultiWorkerConfig) -> None:
        urls = worker_group.execute(_worker_address)
        ray.get(
            [
                worker_group.execute_single_async(i, _set_tf_config, worker_addresses=urls, index=i)
                for i in range(len(worker_group))
            ]
        )
