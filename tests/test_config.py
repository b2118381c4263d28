"""Configs: fingerprints move with anything that changes results and ignore runtime knobs; bad configs fail early."""

from __future__ import annotations

import pytest

from dp2o.config import (
    ConfigError,
    DegradeConfig,
    PipelineConfig,
    SampleConfig,
    fingerprint,
    load_config,
    parse_overrides,
)


def test_fingerprint_ignores_runtime_fields():
    a = SampleConfig(batch_size=4)
    b = SampleConfig(batch_size=64)
    assert fingerprint("sample", a, ["u"]) == fingerprint("sample", b, ["u"])


def test_fingerprint_changes_with_result_fields_and_upstream():
    base = fingerprint("sample", SampleConfig(), ["u"])
    assert fingerprint("sample", SampleConfig(num_candidates=16), ["u"]) != base
    assert fingerprint("sample", SampleConfig(seed=1), ["u"]) != base
    assert fingerprint("sample", SampleConfig(), ["v"]) != base
    nested = SampleConfig.model_validate({"backend": {"num_inference_steps": 7}})
    assert fingerprint("sample", nested, ["u"]) != base


def test_fingerprint_ignores_nested_runtime_fields():
    a = SampleConfig.model_validate({"backend": {"device": "cpu"}})
    b = SampleConfig.model_validate({"backend": {"device": "cuda"}})
    assert fingerprint("sample", a) == fingerprint("sample", b)


def test_unknown_field_is_named(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("sample:\n  num_candidate: 8\n")
    with pytest.raises(ConfigError, match=r"sample\.num_candidate"):
        load_config(PipelineConfig, p)


def test_bad_value_is_named(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("pairs:\n  n_top: zero\n")
    with pytest.raises(ConfigError, match=r"pairs\.n_top"):
        load_config(PipelineConfig, p)


def test_invalid_yaml_names_file(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("sample: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml"):
        load_config(PipelineConfig, p)


def test_cross_field_check_pairs_need_candidates():
    with pytest.raises(ConfigError, match="num_candidates"):
        load_config(PipelineConfig, None, {"sample": {"num_candidates": 4}, "pairs": {"n_top": 3}})


@pytest.mark.parametrize("bad", [(0.5, 0.5), (0.6, 0.2), (-0.1, 1.0), (0.0, 1.5)])
def test_timestep_range_must_be_an_ordered_part_of_the_schedule(bad):
    with pytest.raises(ConfigError, match="timestep_range"):
        load_config(PipelineConfig, None, {"train": {"timestep_range": list(bad)}})


def test_crop_must_be_multiple_of_scale():
    with pytest.raises(ValueError, match="multiple"):
        DegradeConfig(crop_size=130)


def test_overrides_parse_yaml_values():
    o = parse_overrides(["sample.num_candidates=8", "pairs.weighting=uniform", "score.metrics=[psnr, ssim]"])
    assert o == {
        "sample": {"num_candidates": 8},
        "pairs": {"weighting": "uniform"},
        "score": {"metrics": ["psnr", "ssim"]},
    }
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_overrides(["nonsense"])


def test_demo_config_is_valid():
    from dp2o.cli import DEMO_CONFIG

    cfg = load_config(PipelineConfig, DEMO_CONFIG)
    assert cfg.sample.backend.kind == "tiny"


def test_crop_too_small_for_the_chain_is_rejected_up_front():
    with pytest.raises(ValueError, match="too small"):
        DegradeConfig(crop_size=64)
