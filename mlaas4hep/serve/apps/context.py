"""What the routes of the pipeline API use: settings, storage, runs, registry, jobs, auth."""

from dataclasses import dataclass
from typing import Self

from mlaas4hep.auth.oidc import AuthConfig, TokenValidator
from mlaas4hep.data.access import DataAccessPolicy
from mlaas4hep.pipeline.jobs import PipelineJobs
from mlaas4hep.pipeline.rayjob import pipeline_jobs
from mlaas4hep.pipeline.reconcile import RunSettler
from mlaas4hep.settings import Settings
from mlaas4hep.store.registry import ModelRegistry
from mlaas4hep.store.runs import RunStore
from mlaas4hep.store.storage import Storage


@dataclass
class ApiContext:
    """Everything the routes use, built once per replica."""

    settings: Settings
    storage: Storage
    runs: RunStore
    registry: ModelRegistry
    jobs: PipelineJobs
    validator: TokenValidator
    policy: DataAccessPolicy

    @property
    def settler(self) -> RunSettler:
        """Settles run records with their jobs (:mod:`mlaas4hep.pipeline.reconcile`)."""
        return RunSettler(self.storage, self.runs, self.jobs, self.settings.reconcile_grace_s)

    @classmethod
    def from_settings(cls, settings: Settings) -> Self:
        storage = Storage(settings.storage)
        return cls(
            settings=settings,
            storage=storage,
            runs=RunStore(storage),
            registry=ModelRegistry(storage),
            jobs=pipeline_jobs(settings),
            validator=TokenValidator(AuthConfig.from_settings(settings)),
            policy=DataAccessPolicy.from_settings(settings, storage),
        )
