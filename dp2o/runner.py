"""Run a stage plan or the whole pipeline in this process, with no orchestrator.

`run_pipeline` owns the chaining (which stage feeds which, where each writes) and takes the executor as an
argument: `execute_plan` here runs shards in a plain loop, and `flows/` passes one that maps Prefect tasks. So
the Prefect flows and the local runner cannot drift apart, and the chaining is tested without Prefect.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from dp2o import stages
from dp2o.config import PipelineConfig
from dp2o.stages import StagePlan

Logger = Callable[[str], None]


@dataclass
class StageResult:
    stage: str
    url: str
    manifest: dict
    computed: int
    skipped: int
    seconds: float
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        """The JSON-able report the CLI prints and the stage flows return."""
        m = self.manifest
        return {
            "stage": self.stage,
            "url": self.url,
            "rows": m["rows"],
            "errors": m["errors"],
            "computed": self.computed,
            "skipped": self.skipped,
            "stats": m["stats"],
        }


def execute_plan(plan: StagePlan, *, workers: int = 1, log: Logger = print) -> StageResult:
    """prepare → run pending shards (a thread pool when workers > 1) → finalize."""
    t0 = time.perf_counter()
    pending = stages.pending_shards(plan)
    stages.prepare(plan, pending)
    skipped = len(plan.shards) - len(pending)
    log(f"{plan.stage}: {len(pending)} shard(s) to compute, {skipped} already committed -> {plan.out_url}")
    if plan.single_task:
        stages.run_single(plan, pending)
    elif workers > 1 and len(pending) > 1:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(lambda s: stages.run_shard(plan, s), pending))
    else:
        for spec in pending:
            stages.run_shard(plan, spec)
    manifest = stages.finalize(plan)
    return StageResult(plan.stage, plan.out_url, manifest, len(pending), skipped, time.perf_counter() - t0)


Executor = Callable[[StagePlan], StageResult]


def run_pipeline(
    cfg: PipelineConfig, execute: Executor | None = None, *, log: Logger = print, until: str | None = None
) -> dict[str, StageResult]:
    """degrade → sample → score → reward → pairs → train under `cfg.root`; each stage skips committed shards.

    until: stop after this stage (e.g. "pairs").
    """
    if execute is None:

        def execute(plan: StagePlan) -> StageResult:
            # only degrade shards run in parallel threads: sample and score share one model (and its
            # scheduler state) per process; use one process per GPU to parallelise them
            return execute_plan(plan, workers=cfg.workers if plan.stage == "degrade" else 1, log=log)

    root, so = cfg.root, cfg.storage_options
    results: dict[str, StageResult] = {}
    if until not in ("degrade",):
        stages.preflight(cfg)

    def step(plan: StagePlan) -> bool:
        results[plan.stage] = execute(plan)
        return plan.stage == until

    if step(stages.plan_degrade(cfg.degrade, root=root, storage_options=so)):
        return results
    if step(stages.plan_sample(cfg.sample, results["degrade"].url, root=root, storage_options=so)):
        return results
    if step(stages.plan_score(cfg.score, results["sample"].url, root=root, storage_options=so)):
        return results
    if step(stages.plan_reward(cfg.score, results["score"].url, root=root, storage_options=so)):
        return results
    if step(stages.plan_pairs(cfg.pairs, results["reward"].url, root=root, storage_options=so)):
        return results
    step(stages.plan_train(cfg.train, results["pairs"].url, root=root, storage_options=so))
    return results


def summary(results: dict[str, StageResult], wall_seconds: float | None = None) -> str:
    """A one-screen report: where each stage wrote, rows, errors, rewards, pairs, final loss."""
    lines = ["", "dp2o run summary", "=" * 78]
    lines.append(f"{'stage':<8} {'rows':>8} {'errors':>7} {'shards':>9} {'time':>7}  output")
    for name, r in results.items():
        m = r.manifest
        shards = f"{r.computed}+{r.skipped}c"
        lines.append(f"{name:<8} {m['rows']:>8} {m['errors']:>7} {shards:>9} {r.seconds:>6.1f}s  {r.url}")
    lines.append("-" * 78)
    if "degrade" in results:
        st = results["degrade"].manifest["stats"]
        lines.append(
            f"degrade: {st.get('sources', 0)} source files, {st.get('samples_ok', 0)} LR/HR pairs, "
            f"{results['degrade'].manifest['errors']} rejected (see `error` column)"
        )
    if "reward" in results:
        st = results["reward"].manifest["stats"]
        n = results["reward"].manifest["rows"]
        if n:
            lines.append(
                f"reward:  mean {st['reward_sum'] / n:.3f}  min {st['reward_min']:.3f}  "
                f"max {st['reward_max']:.3f}  over {n} candidates"
            )
    if "pairs" in results:
        st = results["pairs"].manifest["stats"]
        lines.append(
            f"pairs:   {results['pairs'].manifest['rows']} pairs from {st.get('groups_with_pairs')} of "
            f"{st.get('groups')} groups ({st.get('groups_zero_spread')} zero-spread skipped)"
        )
    if "train" in results:
        st = results["train"].manifest["stats"]
        w = st.get("window", 1)
        lines.append(
            f"train:   {st.get('steps')} steps; loss {st.get('loss_first_window'):.4f} -> "
            f"{st.get('loss_last_window'):.4f}, implicit acc {st.get('implicit_acc_last_window'):.3f} "
            f"(means of the first/last {w} steps)"
        )
        lines.append(f"         tuned model: {results['train'].url}/model")
    lines.append("(shards column: computed + already-committed (c); committed shards are never recomputed)")
    if wall_seconds is not None:
        lines.append(f"wall time: {wall_seconds:.1f}s")
    return "\n".join(lines)
