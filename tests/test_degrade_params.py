"""Degradation config and sampled parameters: Real-ESRGAN defaults, strict config, and rows that round-trip."""

from __future__ import annotations

import math
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from dp2o.degrade import DegradationConfig, DegradationParams, RoundConfig, params_arrow_fields, sample_params


def test_defaults_are_the_published_realesrgan_x4_configuration():
    cfg = DegradationConfig()
    assert cfg.scale == 4
    for rnd in (cfg.first, cfg.second):
        assert rnd.kernel_sizes == (7, 9, 11, 13, 15, 17, 19, 21)
        assert rnd.kernel_probs == {
            "iso": 0.45,
            "aniso": 0.25,
            "generalized_iso": 0.12,
            "generalized_aniso": 0.03,
            "plateau_iso": 0.12,
            "plateau_aniso": 0.03,
        }
        assert rnd.sinc_prob == 0.1 and rnd.betag_range == (0.5, 4.0) and rnd.betap_range == (1.0, 2.0)
        assert (
            rnd.gaussian_noise_prob == 0.5 and rnd.gray_noise_prob == 0.4 and rnd.jpeg_range == (30.0, 95.0)
        )
        assert rnd.resize_modes == ("area", "bilinear", "bicubic")
    first, second = cfg.first, cfg.second
    assert (first.blur_prob, first.blur_sigma, first.resize_range) == (1.0, (0.2, 3.0), (0.15, 1.5))
    assert first.resize_probs == {"up": 0.2, "down": 0.7, "keep": 0.1}
    assert (first.noise_range, first.poisson_scale_range) == ((1.0, 30.0), (0.05, 3.0))
    assert (second.blur_prob, second.blur_sigma, second.resize_range) == (0.8, (0.2, 1.5), (0.3, 1.2))
    assert second.resize_probs == {"up": 0.3, "down": 0.4, "keep": 0.3}
    assert (second.noise_range, second.poisson_scale_range) == ((1.0, 25.0), (0.05, 2.5))
    assert (first.resize_reference, second.resize_reference) == ("input", "output")
    assert cfg.second_order_prob == 1.0 and cfg.final_sinc_prob == 0.8 and cfg.final_jpeg_last_prob == 0.5
    assert cfg.final_sinc_omega == (math.pi / 3, math.pi)
    assert (cfg.usm.radius, cfg.usm.weight, cfg.usm.threshold) == (51, 0.5, 10.0)


def test_config_is_frozen_and_rejects_unknown_and_suffixed_keys():
    with pytest.raises(ValidationError, match="noise_range2"):
        DegradationConfig(noise_range2=(1, 25))
    with pytest.raises(ValidationError):
        DegradationConfig().scale = 2
    cfg = DegradationConfig.model_validate({"second": {"noise_range": [1, 10]}})
    assert cfg.second.noise_range == (1.0, 10.0) and cfg.second.blur_prob == 1.0  # a given round is complete


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"kernel_sizes": (7, 8)}, "kernel_sizes"),
        ({"resize_range": (1.2, 1.5)}, "resize_range"),
        ({"jpeg_range": (90, 30)}, "jpeg_range"),
        ({"kernel_probs": {"iso": -1.0}}, "kernel_probs"),
        ({"resize_modes": ()}, "resize_modes"),
        ({"resize_modes": ("nearest",)}, "resize_modes"),
    ],
)
def test_bad_round_settings_fail_naming_the_field(kwargs, field):
    with pytest.raises(ValidationError, match=field):
        RoundConfig(**kwargs)


def test_same_seed_same_params_and_seeds_differ():
    cfg = DegradationConfig()
    assert sample_params(cfg, 123) == sample_params(cfg, 123)
    assert len({repr(sample_params(cfg, s)) for s in range(50)}) == 50


def test_rows_have_fixed_keys_and_round_trip_through_parquet(tmp_path):
    cfg = DegradationConfig(second_order_prob=0.5, final_sinc_prob=0.5)
    params = [sample_params(cfg, s) for s in range(64)]
    names = [f.name for f in params_arrow_fields()]
    rows = [p.to_row() for p in params]
    assert all(list(r) == names for r in rows)
    assert {r["second_order"] for r in rows} == {True, False}
    assert {r["final_sinc_kind"] for r in rows} == {"sinc", None}
    schema = pa.schema(params_arrow_fields())
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp_path / "p.parquet")
    back = pq.read_table(tmp_path / "p.parquet").to_pylist()
    assert [DegradationParams.from_row(r) for r in back] == params


def test_from_row_names_missing_columns():
    row = sample_params(DegradationConfig(), 0).to_row()
    del row["r1_jpeg_quality"]
    with pytest.raises(KeyError, match="r1_jpeg_quality"):
        DegradationParams.from_row(row)


def test_every_random_choice_is_recorded():
    row = sample_params(DegradationConfig(), 7).to_row()
    for prefix in ("r1_", "r2_"):
        for key in (
            "blur_kind",
            "blur_size",
            "blur_sigma_x",
            "blur_sigma_y",
            "blur_theta",
            "blur_beta",
            "blur_omega",
        ):
            assert prefix + key in row
        for key in (
            "resize",
            "resize_scale",
            "resize_mode",
            "noise",
            "noise_sigma",
            "poisson_scale",
            "noise_gray",
        ):
            assert prefix + key in row
        assert isinstance(row[prefix + "noise_seed"], int) and isinstance(row[prefix + "jpeg_quality"], float)
    assert {"final_sinc_size", "final_sinc_omega", "final_resize_mode", "final_jpeg_last"} <= set(row)


def test_sampled_frequencies_follow_the_config():
    cfg = DegradationConfig()
    params = [sample_params(cfg, s) for s in range(3000)]
    kinds = Counter(p.first.blur.kind for p in params)
    n = len(params)
    assert abs(kinds["sinc"] / n - 0.1) < 0.02
    assert abs(kinds["iso"] / n - 0.9 * 0.45) < 0.03
    assert abs(kinds["aniso"] / n - 0.9 * 0.25) < 0.03
    assert abs(sum(p.second.blur is None for p in params) / n - 0.2) < 0.025
    assert abs(sum(p.final_sinc is not None for p in params) / n - 0.8) < 0.025
    assert abs(sum(p.first.noise == "gaussian" for p in params) / n - 0.5) < 0.03
    assert abs(sum(p.first.noise_gray for p in params) / n - 0.4) < 0.03
    resize = Counter(p.first.resize for p in params)
    assert abs(resize["down"] / n - 0.7) < 0.03 and abs(resize["keep"] / n - 0.1) < 0.02
    assert all(0.15 <= p.first.resize_scale <= 1.5 and 30 <= p.first.jpeg_quality <= 95 for p in params)
    small = [p.first.blur.omega for p in params if p.first.blur.kind == "sinc" and p.first.blur.size < 13]
    assert small and min(small) >= math.pi / 3
    plateau = [p.first.blur.beta for p in params if p.first.blur.kind.startswith("plateau")]
    # BasicSR draws half the plateau betas from [1, 1]: a point mass at 1 that we reproduce
    assert 0.35 < sum(b == 1.0 for b in plateau) / len(plateau) < 0.65
    assert all(1.0 <= b <= 2.0 for b in plateau)


def test_one_knob_does_not_reshuffle_the_other_draws():
    a = [sample_params(DegradationConfig(), s) for s in range(20)]
    b = [sample_params(DegradationConfig(second_order_prob=0.3), s) for s in range(20)]
    assert [p.first for p in a] == [p.first for p in b]
    assert any(p.second is None for p in b)


def test_parameters_do_not_depend_on_the_key_order_of_probability_tables():
    # a config read back from YAML has its keys sorted; its fingerprint equals the original's, so its draws must too
    from dp2o.degrade.config import DegradationConfig
    from dp2o.degrade.params import sample_params

    cfg = DegradationConfig()
    data = cfg.model_dump()
    for rnd in ("first", "second"):
        data[rnd]["kernel_probs"] = dict(reversed(list(data[rnd]["kernel_probs"].items())))
        data[rnd]["resize_probs"] = dict(reversed(list(data[rnd]["resize_probs"].items())))
    shuffled = DegradationConfig.model_validate(data)
    for seed in range(50):
        assert sample_params(cfg, seed).to_row() == sample_params(shuffled, seed).to_row()
