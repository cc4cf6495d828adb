"""Where candidate evaluations run: in this process (default) or on a Ray cluster.

    executor.map(fn, items, shared)  ->  [fn(shared, item) for item in items]   (in order)

``shared`` is what every evaluation needs and is computed once (the reference's outputs and
value, the held-out feeds: qcompile.evaluators.ReferenceRun): Ray ships it to the object store
once (``ray.put``) and each task reads it from there; items are small (model paths), so the
models themselves travel by path: on a cluster, put them on storage every node sees (NFS, a
bucket mount) and give ``--work-dir`` there. ``fn`` must be a module-level function.

    --executor inprocess          this process, one evaluation at a time
    --executor ray                a local Ray instance (ray.init(), all local CPUs)
    --executor ray:ADDRESS        an existing cluster: ray:auto, ray:ray://HEAD:10001, ray:HEAD:6379
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from qcompile.errors import DependencyError, InputSpecError

EXECUTORS = ("inprocess", "ray", "ray:ADDRESS")


class InProcess:
    """Evaluations one after another in this process."""

    name = "inprocess"
    parallelism = 1

    def map(self, fn: Callable[[Any, Any], Any], items: Sequence[Any], shared: Any = None) -> list[Any]:
        return [fn(shared, item) for item in items]

    def close(self) -> None:
        pass


class RayExecutor:
    """Evaluations as Ray tasks (one CPU each... or ``num_cpus`` per task), results in order."""

    name = "ray"

    def __init__(self, address: str | None = None, num_cpus: int | None = None, cpus_per_task: float = 1.0) -> None:
        try:
            import ray
        except ImportError:
            raise DependencyError("--executor ray needs the 'ray' package", fix="pip install 'qcompile-onnx[ray]'") \
                from None
        self.ray, self.cpus_per_task = ray, cpus_per_task
        self.started = not ray.is_initialized()
        if self.started:
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            if address:
                kwargs["address"] = address
            elif num_cpus:
                kwargs["num_cpus"] = num_cpus
            try:
                ray.init(**kwargs)
            except ConnectionError as exc:
                raise InputSpecError(f"cannot reach the Ray cluster at {address!r}: {exc}", where="--executor",
                                     fix="start it (`ray start --head`) or give its address as ray:HOST:PORT") \
                    from None
        self.parallelism = max(1, int(ray.cluster_resources().get("CPU", 1) // cpus_per_task))

    def map(self, fn: Callable[[Any, Any], Any], items: Sequence[Any], shared: Any = None) -> list[Any]:
        if not items:
            return []
        remote = self.ray.remote(num_cpus=self.cpus_per_task)(fn)
        shared_ref = self.ray.put(shared)  # once, not once per task
        return self.ray.get([remote.remote(shared_ref, item) for item in items])

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()


def make_executor(spec: str | None) -> InProcess | RayExecutor:
    """The executor a CLI ``--executor`` value names (module docstring)."""
    if spec in (None, "", "inprocess"):
        return InProcess()
    if spec == "ray":
        return RayExecutor()
    if spec.startswith("ray:"):
        return RayExecutor(address=spec[4:])
    raise InputSpecError(f"unknown executor {spec!r}", where="--executor", fix="choose: " + " | ".join(EXECUTORS))
