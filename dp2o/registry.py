"""The stage registry: the one place that lists the stages. Every entry point is derived from it.

Each stage is one `Stage` object, defined in the stage's own module next to its algorithms
(`dp2o/<stage>/stage.py`) and registered here by name. The CLI subcommands, the Prefect flows (one per stage
and the end-to-end one), the local runner, the run summary and the deployment definitions all iterate over
`stages()`; none of them names a stage. A new stage is a new module plus one line in `BUILTIN`.

The design choice a reader would miss: the registry holds *declarations*, not behaviour of the executors.
A stage says whether its shards may run concurrently in one process (`concurrent`) and what each shard needs
(`resources`); every executor (local loop, Prefect, a distributed one) honours those, so a rule such as
"sample shards share one model, never run them in threads" lives on the stage, not in each executor.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from dp2o.errors import StageError
from dp2o.plan import ShardSpec, StagePlan
from dp2o.storage import ShardOutput, Storage

#: modules that define the built-in stages, in pipeline order (each has a module-level `STAGE`)
BUILTIN: tuple[str, ...] = (
    "dp2o.degrade.stage",
    "dp2o.sample.stage",
    "dp2o.score.stage",
    "dp2o.reward.stage",
    "dp2o.pairs.stage",
    "dp2o.train.stage",
    "dp2o.evaluate.stage",
)


@dataclass(frozen=True)
class Input:
    """An input folder of a stage: normally the output of an upstream stage.

    name:  the keyword the planner, the flow and the CLI use (e.g. `degraded`)
    stage: the stage whose output feeds it in the pipeline (None: never chained, e.g. a user's held-out folder)
    flag:  the CLI flag (e.g. `--input`)
    """

    name: str
    stage: str | None
    flag: str
    help: str
    required: bool = True


@dataclass(frozen=True)
class Flag:
    """A CLI shortcut for one config field of the stage's section, e.g. `--crop-size` -> `crop_size`."""

    flag: str
    key: str
    help: str
    type: Callable[[str], Any] = str
    choices: Sequence[str] | None = None


#: run one shard: (plan, spec, local scratch folder) -> the shard's files, ready for the driver to commit
ShardBody = Callable[[StagePlan, ShardSpec, Path], ShardOutput]
#: run a whole-dataset stage over its pending shards: -> one ShardOutput per pending shard
WholeBody = Callable[[StagePlan, list[ShardSpec], Path], list[ShardOutput]]


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline, declared once.

    planner(cfg, inputs, out, *, root, storage_options, runtime) -> StagePlan, with `inputs` mapping each
    `Input.name` to a URL (or None when optional and not given) and `runtime` the pipeline's runtime-only
    settings the stage may need (see `runtime_of`).
    Exactly one of `run_shard` (shards are independent) or `run_all` (needs the whole dataset) is set.
    """

    name: str
    version: int
    config: type
    #: the PipelineConfig section holding this stage's config (reward reads `score`)
    section: str
    inputs: tuple[Input, ...]
    planner: Callable[..., StagePlan]
    description: str
    run_shard: ShardBody | None = None
    run_all: WholeBody | None = None
    #: shards may run in parallel threads of one process (False when they share a model's mutable state)
    concurrent: bool = False
    #: what one shard (or the whole-dataset task) needs from a distributed executor
    resources: Literal["cpu", "gpu"] = "cpu"
    #: part of `dp2o run` (False: needs inputs the pipeline does not make, e.g. a held-out set)
    in_pipeline: bool = True
    #: load models/metrics before any work, so missing weights fail in seconds (cached per process)
    preflight: Callable[[Any], None] | None = None
    #: extra lines for the run summary, from the finished manifest
    summarize: Callable[[dict], list[str]] | None = None
    #: plain-data descriptions of a finished run for an orchestrator to show (tables, markdown, links; see
    #: `dp2o.describe`): (manifest, stage folder URL, its Storage) -> [{"kind": ..., "key": ..., ...}]
    describe: Callable[[dict, str, Storage], list[dict]] | None = None
    #: merge one per-shard statistic into the stage total: (key, total so far, shard's value) -> total
    combine: Callable[[str, Any, Any], Any] | None = None
    #: devices one task of this stage uses at once (e.g. train's data-parallel processes); None = 1
    devices_of: Callable[[Any], int] | None = None
    #: runtime-only settings the planner needs from the whole pipeline config (not fingerprinted)
    runtime_of: Callable[[Any], dict] | None = None
    flags: tuple[Flag, ...] = ()
    #: the CLI runs this stage right after this one, on its output (score -> reward)
    cli_then: str | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if (self.run_shard is None) == (self.run_all is None):
            raise ValueError(f"stage {self.name!r}: set exactly one of run_shard or run_all")

    @property
    def whole_dataset(self) -> bool:
        return self.run_all is not None

    def plan(
        self,
        cfg: Any,
        inputs: dict[str, str | None],
        out: str | None = None,
        *,
        root: str | None = None,
        storage_options: dict | None = None,
        runtime: dict | None = None,
    ) -> StagePlan:
        missing = [i.name for i in self.inputs if i.required and not inputs.get(i.name)]
        if missing:
            raise StageError(f"{self.name}: input(s) {missing} not given")
        return self.planner(
            cfg,
            inputs,
            out,
            root=root,
            storage_options=dict(storage_options or {}),
            runtime=dict(runtime or {}),
        )


_REGISTRY: dict[str, Stage] = {}
_loaded = False


def _load_builtin() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for module in BUILTIN:
            register(importlib.import_module(module).STAGE)


def register(stage: Stage) -> Stage:
    """Add a stage (built-in ones register themselves; a plugin or a test may add its own)."""
    _REGISTRY[stage.name] = stage
    return stage


def stages() -> list[Stage]:
    """Every registered stage, pipeline order first."""
    _load_builtin()
    return list(_REGISTRY.values())


def pipeline_stages() -> list[Stage]:
    return [s for s in stages() if s.in_pipeline]


def names() -> list[str]:
    return [s.name for s in stages()]


def get(name: str) -> Stage:
    _load_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise StageError(f"unknown stage {name!r}; known: {', '.join(_REGISTRY)}") from None


def version(name: str) -> int:
    """The code version of a stage, for fingerprints (bump it when the stage's code changes what it writes)."""
    return get(name).version
