"""One Prefect flow per registered stage, each runnable alone with explicit input and output locations.

The flows are derived from `dp2o.registry`: `stage_flow(name)` builds (once) a flow whose parameters are the
stage's config class, one URL per stage input, `out`, `root`, `storage_options`, `workers` and `runtime`, so
the UI's form shows the stage's real config schema. `flows.stages.<name>` resolves through the module's
`__getattr__`, which is what a deployment entrypoint such as `flows/stages.py:degrade` imports.

`out=None` writes to `<root>/<stage>/<fingerprint>/`; an explicit `out` is used as the stage folder itself.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Literal

from prefect import Flow, flow

from dp2o import registry
from dp2o.config import RayConfig, apply_overrides
from dp2o.errors import StageError
from flows.cancel import stoppable
from flows.common import execute_with_prefect

_P = inspect.Parameter


def _signature(stage: registry.Stage) -> inspect.Signature:
    # a default instance: the UI form shows every default (a frozen model, safe to share)
    params = [_P("config", _P.KEYWORD_ONLY, annotation=stage.config, default=stage.config())]
    for i in stage.inputs:
        if i.required:
            params.append(_P(i.name, _P.KEYWORD_ONLY, annotation=str))
        else:
            params.append(_P(i.name, _P.KEYWORD_ONLY, annotation=str | None, default=None))
    params += [
        _P("out", _P.KEYWORD_ONLY, annotation=str | None, default=None),
        _P("root", _P.KEYWORD_ONLY, annotation=str, default="runs"),
        _P("storage_options", _P.KEYWORD_ONLY, annotation=dict[str, Any] | None, default=None),
        _P("workers", _P.KEYWORD_ONLY, annotation=int, default=1),
        _P("runtime", _P.KEYWORD_ONLY, annotation=dict[str, Any] | None, default=None),
        _P("executor", _P.KEYWORD_ONLY, annotation=Literal["local", "ray"], default="local"),
        _P("ray", _P.KEYWORD_ONLY, annotation=RayConfig | None, default=None),
        _P("shard_index", _P.KEYWORD_ONLY, annotation=int | None, default=None),
        _P("num_shards", _P.KEYWORD_ONLY, annotation=int, default=1),
        _P("overrides", _P.KEYWORD_ONLY, annotation=list[str] | None, default=None),
    ]
    return inspect.Signature(params, return_annotation=dict)


@functools.cache
def stage_flow(name: str) -> Flow:
    """The Prefect flow of one registered stage."""
    stage = registry.get(name)

    def run(**params) -> dict:
        plan = stage.plan(
            apply_overrides(params.get("config", stage.config()), params.get("overrides")),
            {i.name: params.get(i.name) for i in stage.inputs},
            params.get("out"),
            root=params.get("root", "runs"),
            storage_options=params.get("storage_options"),
            runtime=params.get("runtime"),
        )
        return stoppable(
            lambda: execute_with_prefect(
                plan,
                workers=params.get("workers", 1),
                executor=params.get("executor", "local"),
                ray=params.get("ray"),
                shard_index=params.get("shard_index"),
                num_shards=params.get("num_shards", 1),
            ).as_dict()
        )

    sig = _signature(stage)
    run.__signature__ = sig
    run.__annotations__ = {p.name: p.annotation for p in sig.parameters.values()} | {"return": dict}
    run.__name__ = run.__qualname__ = name
    run.__module__ = __name__
    run.__doc__ = f"{stage.description}.\n\nArgs:\n" + "\n".join(
        [
            *(f"    {i.name}: {i.help}" for i in stage.inputs),
            "    overrides: dotted KEY=VALUE changes of `config` (e.g. num_candidates=16), as the CLI's --set",
        ]
    )
    return flow(name=name, log_prints=True)(run)


def __getattr__(name: str) -> Flow:
    if name.startswith("_"):
        raise AttributeError(name)
    try:
        return stage_flow(name)
    except StageError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
