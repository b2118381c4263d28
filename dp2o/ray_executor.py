"""The Ray executor: a stage's pending shards fanned out over the workers of a Ray cluster.

It is a `map_shards` for the one driver (`dp2o.driver.run_stage`), so commits, markers and manifests are the
same as with the local executor and outputs are byte-identical. Without an address it starts a local Ray
instance on this machine's GPUs (or CPUs).

The design choices a reader would miss:
* Workers are Ray *actors*, one per GPU (or per `ray.gpus_per_worker` share of one) for GPU stages and one per
  `ray.cpus_per_worker` CPUs for CPU stages. An actor is one long-lived process pinned to its device, so a
  model loaded by a shard (cached per process, e.g. `dp2o.sample.stage.sampling_backend`) serves every later
  shard of that actor: one load per GPU worker, not one per shard. (Plain Ray tasks, and so Prefect's Ray task
  runner, get a fresh process per GPU task by default and would reload the model every shard.)
* Each actor runs one shard at a time, which is what `Stage.concurrent=False` asks for (no two shards share a
  model object at once); parallelism comes from the number of actors.
* Retries are ours, per shard and bounded (`ray.max_retries`): a worker killed mid-shard (its process
  SIGKILLed, its node lost) is replaced by a new actor and the shard rerun; a shard whose body raises is
  rerun too, and after the last attempt the stage fails naming the shard, once every other shard has finished
  and committed. Nothing a dead worker half-wrote is visible: only committed shards have markers, and its
  scratch folder is reclaimed later (`dp2o.storage.reclaim_scratch`).
* The Stage object travels with each call and is registered in the worker, so stages registered by a plugin
  (or a test) run on the cluster as long as their module is importable there.
* Workers never talk to Prefect: under Prefect the flow run is the Ray driver, and only it reports.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

from dp2o import registry, stopping
from dp2o.config import RayConfig
from dp2o.errors import Dp2oError, StageError
from dp2o.progress import ProgressLog

log = logging.getLogger("dp2o")


class ShardWorker:
    """The body of a Ray actor: runs driver functions (run_shard / run_all) one call at a time."""

    def run(self, stage: registry.Stage, fn: Callable[..., Any], args: tuple) -> Any:
        registry.register(stage)  # the caller's declaration wins (a plugin's stage, a test's)
        return fn(*args)

    def where(self) -> dict:
        """Process id and device assignment of this worker (for logs and tests)."""
        import ray

        return {
            "pid": os.getpid(),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "node": ray.get_runtime_context().get_node_id(),
        }


def ensure_ray(cfg: RayConfig) -> None:
    """Connect to `cfg.address`, or start a local instance, unless this process is already connected."""
    try:
        import ray
    except ImportError:
        raise Dp2oError("executor=ray needs Ray: pip install 'dp2o[ray]' (or pip install ray)") from None
    if ray.is_initialized():
        return
    if cfg.address:
        ray.init(address=cfg.address, log_to_driver=True)
    else:
        # address="local": a new instance on this machine, never a cluster someone else started here
        ray.init(
            address="local",
            num_cpus=cfg.num_cpus,
            num_gpus=cfg.num_gpus,
            include_dashboard=False,
            log_to_driver=True,
        )


def _call_name(args: tuple) -> str:
    spec = args[1]
    return spec.name if hasattr(spec, "name") else "all pending shards"


class RayExecutor:
    """`map_shards` over Ray actors; one instance per run (it creates actors per stage and removes them after)."""

    def __init__(self, cfg: RayConfig | None = None):
        self.cfg = cfg or RayConfig()

    def worker_count(self, stage: registry.Stage, calls: int, config: Any = None) -> tuple[int, dict]:
        """How many actors a stage gets, and the resources each requests (a task that uses several devices at
        once, e.g. data-parallel training, gets `Stage.devices_of(config)` GPU shares)."""
        import ray

        total = ray.cluster_resources()
        gpus = total.get("GPU", 0.0)
        devices = stage.devices_of(config) if stage.devices_of and config is not None else 1
        if stage.resources == "gpu" and gpus > 0:
            per_worker = self.cfg.gpus_per_worker * devices
            if per_worker > gpus:
                raise StageError(
                    f"{stage.name}: one task needs {per_worker:g} GPUs ({devices} devices x ray.gpus_per_worker="
                    f"{self.cfg.gpus_per_worker:g}) but the Ray cluster has {gpus:g}; lower the devices (e.g. "
                    "train.num_processes) or add GPUs"
                )
            options = {"num_gpus": per_worker, "num_cpus": 0}
            n = math.floor(gpus / per_worker + 1e-9)
        else:
            if stage.resources == "gpu":
                log.warning("%s: the Ray cluster has no GPUs; its workers run on CPUs", stage.name)
            options = {"num_cpus": self.cfg.cpus_per_worker}
            n = math.floor(total.get("CPU", 1.0) / self.cfg.cpus_per_worker + 1e-9)
        n = max(1, min(n, calls, self.cfg.max_workers or calls))
        return n, options

    def __call__(self, fn: Callable[..., Any], calls: Sequence[tuple], concurrency: int) -> list:
        """Run `fn(*args)` for every call on Ray actors; results in call order. `concurrency` (a per-process
        limit) is met by construction: each actor is one process running one call at a time."""
        if not calls:
            return []
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        ensure_ray(self.cfg)
        stage = registry.get(calls[0][0].stage)
        n, options = self.worker_count(stage, len(calls), calls[0][0].config)
        actor_cls = ray.remote(max_restarts=0, max_task_retries=0, **options)(ShardWorker)
        actors = [actor_cls.remote() for _ in range(n)]
        log.info("%s: %d call(s) on %d Ray worker(s) %s", stage.name, len(calls), n, options)
        results: list[Any] = [None] * len(calls)
        attempts = [0] * len(calls)
        failed: dict[int, str] = {}
        queue = list(range(len(calls)))
        free = list(actors)
        inflight: dict[Any, tuple[int, Any]] = {}
        progress = ProgressLog(stage.name, len(calls))
        try:
            while queue or inflight:
                stopping.check()  # a stop request: no new shard starts, and `finally` kills the running ones
                while queue and free:
                    i, actor = queue.pop(0), free.pop()
                    attempts[i] += 1
                    inflight[actor.run.remote(stage, fn, calls[i])] = (i, actor)
                done, _ = ray.wait(list(inflight), num_returns=1, timeout=1.0)
                for ref in done:
                    i, actor = inflight.pop(ref)
                    try:
                        results[i] = ray.get(ref)
                        free.append(actor)
                        progress.update(results[i])
                        continue
                    except RayActorError as e:  # the worker process died: replace it
                        ray.kill(actor)
                        actors.remove(actor)
                        actor = actor_cls.remote()
                        actors.append(actor)
                        free.append(actor)
                        error = f"worker died ({type(e).__name__})"
                    except RayTaskError as e:  # the shard's body raised
                        free.append(actor)
                        cause = e.cause if getattr(e, "cause", None) is not None else e
                        error = f"{type(cause).__name__}: {cause}"
                    name = _call_name(calls[i])
                    if attempts[i] <= self.cfg.max_retries:
                        log.warning(
                            "%s: %s failed (attempt %d): %s; retrying", stage.name, name, attempts[i], error
                        )
                        queue.append(i)
                    else:
                        failed[i] = error
        finally:
            for actor in actors:
                ray.kill(actor)
        if failed:
            lines = [f"  {_call_name(calls[i])}: {err}" for i, err in sorted(failed.items())]
            raise StageError(
                f"{stage.name}: {len(failed)} shard(s) failed after {self.cfg.max_retries + 1} attempt(s) each "
                f"(the other shards are committed; rerun to retry only these):\n" + "\n".join(lines)
            )
        return results
