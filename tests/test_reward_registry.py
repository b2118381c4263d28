"""The metric registry's data agrees with the installed pyiqa / timm / torchvision, and names resolve helpfully."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import re
from pathlib import Path
from urllib.parse import urlparse

import pytest

from dp2o.reward import METRICS, PRESETS, resolve_metrics
from dp2o.reward.registry import missing_weights

pyiqa = pytest.importorskip("pyiqa")
from pyiqa.archs import ARCH_REGISTRY, _lazy_import_arch  # noqa: E402
from pyiqa.default_model_configs import DEFAULT_CONFIGS  # noqa: E402


@pytest.mark.parametrize("name", sorted(METRICS))
def test_kind_and_direction_match_pyiqa(name):
    spec = METRICS[name]
    config = DEFAULT_CONFIGS[spec.pyiqa_name]
    assert spec.kind == config["metric_mode"]
    assert spec.lower_better == config.get("lower_better", False)
    lo, hi = spec.score_range
    assert lo is None or hi is None or lo < hi


def _arch_type(spec):
    return DEFAULT_CONFIGS[spec.pyiqa_name]["metric_opts"]["type"]


def _arch_module(spec):
    arch_type = _arch_type(spec)
    if arch_type not in ARCH_REGISTRY:  # pyiqa imports arch modules on first use, as build_network does
        _lazy_import_arch(arch_type)
    return importlib.import_module(ARCH_REGISTRY.get(arch_type).__module__)


def _arch_source(spec):
    # read, not imported: pyiqa's Q-Align module imports `icecream`, which pyiqa does not declare
    origin = importlib.util.find_spec(f"pyiqa.archs.{_arch_type(spec).lower()}_arch").origin
    return Path(origin).read_text()


def _cached_name(url):
    """The file name pyiqa / torch.hub give a download: the URL path's last part, not unquoted."""
    return os.path.basename(urlparse(url).path)


def _torchvision_weight_files():
    import torchvision.models as tvm

    files = set()
    for model in tvm.list_models():
        for weights in tvm.get_model_weights(model):
            files.add(_cached_name(weights.url))
    return files


@pytest.mark.parametrize("name", sorted(n for n, s in METRICS.items() if s.needs_weights))
def test_listed_weight_files_are_the_ones_the_libraries_fetch(name):
    spec = METRICS[name]
    for weight in spec.weights:
        if weight.location == "pyiqa":
            urls = _arch_module(spec).default_model_urls.values()
            assert weight.name in {_cached_name(u) for u in urls}, (name, weight)
        elif weight.location == "clip":
            from pyiqa.archs.clip_model import _MODELS

            assert weight.name in {_cached_name(u) for u in _MODELS.values()}, (name, weight)
        elif weight.location == "dp2o":
            # shipped with dp2o instead of downloaded (dp2o.reward.classical); pyiqa still fetches a file for it
            from dp2o.reward.registry import weight_location

            assert os.path.isfile(weight_location(weight)), (name, weight)
            assert _arch_module(spec).default_model_urls, name
        elif weight.location == "torch_checkpoints":
            assert weight.name in _torchvision_weight_files(), (name, weight)
        elif weight.name.startswith("timm/"):
            import timm

            arch = weight.name.removeprefix("timm/").split(".")[0]
            assert timm.models.get_pretrained_cfg(arch).hf_hub_id == weight.name
            assert arch in inspect.getsource(_arch_module(spec)) or arch in str(
                DEFAULT_CONFIGS[spec.pyiqa_name]
            )
        else:
            assert weight.name in _arch_source(spec), (name, weight)


def test_presets():
    paper = resolve_metrics("paper")
    assert [s.kind for s in paper].count("FR") == 3
    assert [s.kind for s in paper].count("NR") == 6
    assert {s.pyiqa_name for s in paper} >= {"afine_fr", "afine_nr", "clipiqa+", "qalign"}
    offline = resolve_metrics("offline")
    # nothing to download: the only parameter file (BRISQUE's SVR) ships inside dp2o
    assert not missing_weights(offline)
    assert {w.location for s in offline for w in s.weights} <= {"dp2o"}
    assert not any(s.needs_weights for s in offline)
    assert {s.kind for s in offline} == {"FR", "NR"}
    assert set(PRESETS) == {"paper", "offline"}


def test_column_names_are_plain_identifiers():
    for name, spec in METRICS.items():
        assert name == spec.name
        assert re.fullmatch(r"[a-z][a-z0-9_]*", name), name


def test_resolve_accepts_lists_comma_strings_and_presets():
    assert [s.name for s in resolve_metrics("psnr, ssim")] == ["psnr", "ssim"]
    mixed = resolve_metrics(["offline", "vif"])
    assert [s.name for s in mixed] == [*PRESETS["offline"], "vif"]


@pytest.mark.parametrize(
    "query, hint",
    [
        ("lpip", "did you mean 'lpips'"),
        ("clipiqa+", "did you mean 'clipiqa_plus'"),
        ("papr", "did you mean 'paper'"),
    ],
)
def test_typos_get_suggestions(query, hint):
    with pytest.raises(ValueError, match=re.escape(hint)):
        resolve_metrics(query)


def test_duplicates_and_empty_lists_are_refused():
    with pytest.raises(ValueError, match="more than once"):
        resolve_metrics(["offline", "psnr"])
    with pytest.raises(ValueError, match="no metrics given"):
        resolve_metrics(" , ")


def test_a_preset_is_fingerprinted_by_the_metrics_it_holds(monkeypatch):
    """Changing what `offline` holds must give the score and reward stages new folders, never reuse old ones."""
    from dp2o.config import ScoreConfig, fingerprint
    from dp2o.reward import registry as reg
    from dp2o.score.stage import score_part

    cfg = ScoreConfig(metrics="offline")
    before = fingerprint("score", score_part(cfg))
    assert score_part(cfg)["metrics"] == list(PRESETS["offline"])
    monkeypatch.setitem(reg.PRESETS, "offline", ("psnr", "entropy"))
    assert fingerprint("score", score_part(cfg)) != before
    # the same metrics named one by one are the same computation
    assert fingerprint("score", score_part(ScoreConfig(metrics=("psnr", "entropy")))) == fingerprint(
        "score", score_part(cfg)
    )
