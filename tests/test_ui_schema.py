"""What the Prefect UI sends means what the CLI means: each deployment's parameter schema, filled the way the
UI's "Custom run" form fills it (every field not given by the deployment from its schema default), gives the
same config — and the same stage fingerprints — as the CLI; `until` is an enum; `overrides` changes one value."""

from __future__ import annotations

import importlib

import pytest
from prefect.utilities.callables import parameter_schema

from dp2o import registry
from dp2o.config import PipelineConfig, apply_overrides, load_config
from dp2o.deployments import CONFIGS, definitions


def _resolve(node: dict, defs: dict) -> dict:
    """A schema node with $ref / allOf / Optional (anyOf with null) resolved to the object it describes."""
    while True:
        if "$ref" in node:
            node = {**defs[node["$ref"].rsplit("/", 1)[-1]], **{k: v for k, v in node.items() if k != "$ref"}}
        elif "allOf" in node and len(node["allOf"]) == 1:
            node = {**node["allOf"][0], **{k: v for k, v in node.items() if k != "allOf"}}
        elif "anyOf" in node:
            real = [n for n in node["anyOf"] if n.get("type") != "null"]
            if len(real) != 1:
                return node
            node = {**real[0], **{k: v for k, v in node.items() if k != "anyOf"}}
        else:
            return node


def form_value(node: dict, defs: dict, given):
    """The value the form submits for one field: what the deployment gave, completed field by field with the
    schema's defaults; a field with no default is built from its type's own field defaults (what the UI does,
    and what silently turned the second degradation round into the first one's)."""
    node = _resolve(node, defs)
    props = node.get("properties")
    if props is None:
        return given if given is not None else node.get("default")
    given = dict(given or {})
    base = node.get("default") if not given and "default" in node else None
    if base is not None:
        return base
    out = {}
    for name, sub in props.items():
        if name in given:
            sub_given = given[name]
            out[name] = form_value(sub, defs, sub_given) if isinstance(sub_given, dict) else sub_given
        else:
            sub = {**sub}
            value = sub.get("default") if "default" in sub else form_value(sub, defs, None)
            out[name] = value
    return out


def _flow(entrypoint: str):
    path, name = entrypoint.split(":")
    return getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), name)


def _schema(entrypoint: str) -> dict:
    return parameter_schema(_flow(entrypoint).fn).model_dump_for_openapi()


def _fingerprints(cfg: PipelineConfig, root, monkeypatch) -> dict:
    import dp2o.driver
    from dp2o.driver import run_pipeline
    from tests.test_demo_pin import _plan_only

    monkeypatch.setattr(dp2o.driver, "preflight", lambda cfg, until=None: None)
    results = run_pipeline(cfg.model_copy(update={"root": str(root)}), _plan_only)
    return {s: r.manifest["fingerprint"] for s, r in results.items()}


def _cli_config(deployment: dict) -> PipelineConfig:
    """The config the CLI builds for what a pipeline deployment runs: its YAML, with the same root."""
    name = deployment["name"]
    root = deployment["parameters"]["config"]["root"]
    return load_config(PipelineConfig, CONFIGS / f"{name}.yaml", {"root": root})


@pytest.mark.parametrize("name", ["demo", "nightly"])
def test_a_pipeline_deployment_run_from_the_ui_form_is_the_cli_config(name, tmp_path, monkeypatch):
    (dep,) = [d for d in definitions()["deployments"] if d["name"] == name]
    schema = _schema(dep["entrypoint"])
    defs = schema.get("definitions", {}) | schema.get("$defs", {})
    submitted = form_value(schema["properties"]["config"], defs, dep["parameters"]["config"])
    ui = PipelineConfig.model_validate(submitted)
    cli = _cli_config(dep)
    assert ui == cli
    if name == "demo":  # the nightly input folder does not exist here; its configs are compared above
        assert _fingerprints(ui, tmp_path / "ui", monkeypatch) == _fingerprints(
            cli, tmp_path / "cli", monkeypatch
        )


def test_a_stage_deployment_run_from_the_ui_form_is_the_stage_default():
    for stage in registry.stages():
        (dep,) = [d for d in definitions()["deployments"] if d["name"] == stage.name]
        schema = _schema(dep["entrypoint"])
        defs = schema.get("definitions", {}) | schema.get("$defs", {})
        submitted = form_value(schema["properties"]["config"], defs, dep["parameters"]["config"])
        assert stage.config.model_validate(submitted) == stage.config(), stage.name


def test_every_config_field_has_a_default_in_the_schema():
    """No field relies on a default_factory the schema cannot show (the UI would invent a value)."""
    schema = _schema("flows/pipeline.py:pipeline")
    defs = schema.get("definitions", {}) | schema.get("$defs", {})
    missing = []
    for def_name, d in defs.items():
        for field, sub in d.get("properties", {}).items():
            if "default" not in sub and field not in d.get("required", []):
                missing.append(f"{def_name}.{field}")
    assert not missing, missing


def _descriptions(node, path=""):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "description" and isinstance(v, str):
                yield path, v
            else:
                yield from _descriptions(v, f"{path}/{k}")
    elif isinstance(node, list):
        for v in node:
            yield from _descriptions(v, path)


def test_no_description_holds_text_the_ui_form_would_eat():
    """The form renders descriptions as HTML: `<root>/<stage>` became "///" (seen in a real browser)."""
    import re

    tag = re.compile(r"<[A-Za-z/!][^>]*>")
    bad = []
    for dep in definitions()["deployments"]:
        for path, text in _descriptions(_schema(dep["entrypoint"])):
            if tag.search(text):
                bad.append(f"{dep['entrypoint']}{path}: {text!r}")
    assert not bad, bad


def test_until_and_executor_are_enums():
    props = _schema("flows/pipeline.py:pipeline")["properties"]
    until = _resolve(props["until"], {})
    assert until["enum"] == [s.name for s in registry.pipeline_stages()]
    assert "overrides" in props


def test_overrides_change_one_nested_value():
    cfg = load_config(PipelineConfig, CONFIGS / "demo.yaml")
    changed = apply_overrides(cfg, ["sample.num_candidates=16", "degrade.degradation.second.blur_prob=0.5"])
    assert changed.sample.num_candidates == 16 and changed.degrade.degradation.second.blur_prob == 0.5
    assert (
        changed.model_copy(update={"sample": cfg.sample, "degrade": cfg.degrade}) == cfg
    )  # nothing else moved
    from dp2o.config import ConfigError

    with pytest.raises(ConfigError, match="num_candidates"):
        apply_overrides(cfg, ["sample.num_candidates=0"])


@pytest.mark.slow
def test_a_stage_flow_takes_overrides(tmp_path, prefect_harness):
    from dp2o.config import DegradeConfig
    from flows.stages import stage_flow
    from tests.helpers import make_hr_folder

    hr = make_hr_folder(tmp_path / "hr", n=2)
    res = stage_flow("degrade")(
        config=DegradeConfig(input=str(hr)), out=str(tmp_path / "d"), overrides=["crop_size=96"]
    )
    assert res["rows"] == 2
    import json

    assert json.loads((tmp_path / "d" / "config.json").read_text())["config"]["crop_size"] == 96
