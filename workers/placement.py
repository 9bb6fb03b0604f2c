"""Where a job can run: what it needs (`Needs`: CPUs and GPUs per worker, and how many
workers), whether a cluster's nodes can ever hold it, and the dispatcher's cached view of
those nodes. Moved out of workers/dispatcher.py unchanged."""

from __future__ import annotations

from dataclasses import dataclass

import ray

from trainer.config import ResourcesConfig


@dataclass(frozen=True)
class Needs:
    cpus: float  # per worker
    gpus: float
    workers: int = 1  # data-parallel ranks (workers/ddp.py), each with cpus and gpus

    @classmethod
    def of(cls, resources: ResourcesConfig) -> Needs:
        return cls(resources.cpus, resources.gpus, resources.workers)

    def fits(self, resources: dict[str, float]) -> bool:
        """The whole group fits in these (summed) resources."""
        n = self.workers
        return resources.get("CPU", 0.0) >= n * self.cpus - 1e-9 and resources.get("GPU", 0.0) >= n * self.gpus - 1e-9

    def fits_nodes(self, nodes: list[dict[str, float]]) -> bool:
        """Some placement of every worker, whole, on these nodes exists."""
        def slots(node: dict[str, float]) -> int:
            counts = [int(node.get(key, 0.0) / need + 1e-9) for key, need in (("CPU", self.cpus), ("GPU", self.gpus)) if need > 0]
            return min(counts) if counts else self.workers
        return sum(slots(node) for node in nodes) >= self.workers

    def reserve(self) -> bool:
        """A group's resources are free at once now (a placement group, released at once:
        Ray Train reserves its own, all or nothing). Single workers: nothing to do."""
        if self.workers == 1:
            return True
        from workers.ddp import group_is_placeable

        return group_is_placeable(self.cpus, self.gpus, self.workers)

    def describe(self) -> str:
        gpus = f" and {self.gpus:g} GPU" if self.gpus else ""
        group = f"{self.workers} workers of " if self.workers > 1 else ""
        return f"{group}{self.cpus:g} CPU{gpus}"


@dataclass(frozen=True)
class ClusterView:
    nodes: list[dict[str, float]]  # each alive node's resources
    totals: dict[str, float]  # the cluster's
    at: float  # monotonic time asked


def node_totals() -> list[dict[str, float]]:
    return [node["Resources"] for node in ray.nodes() if node.get("Alive")]
