"""The IQA metrics the reward can use, as one table of data: what each measures, which way is better, and
which downloaded files it needs.

Every fact the reward and the scorer rely on — full-reference or no-reference, lower-is-better, nominal
range, required weight files — is a field of a `MetricSpec` row in `METRICS`, never an `if name == ...`
branch elsewhere. The rows were written from pyiqa 0.1.16's own registry and arch sources, and
tests/test_reward_registry.py re-checks them against the installed pyiqa, timm and torchvision, so a
library upgrade that moves a file or flips a direction fails a test instead of silently mis-ranking.

The design choice a reader might miss: weight files are listed per metric so that a missing one is reported
*before* any model is built (`missing_weights`), with the exact path where it must go. pyiqa itself would
try to download it at construction time, which on an offline worker fails minutes into a stage, one metric
at a time.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from dp2o.errors import Dp2oError

WeightLocation = Literal["pyiqa", "torch_checkpoints", "clip", "hf", "dp2o"]


@dataclass(frozen=True)
class WeightFile:
    """One downloaded file (or Hugging Face repo) a metric needs.

    location: where the library that loads it looks —
      "pyiqa":             pyiqa's cache, `$TORCH_HOME/hub/pyiqa/<name>` (fixed when pyiqa is imported)
      "torch_checkpoints": torchvision / timm URL weights, `$TORCH_HOME/hub/checkpoints/<name>`
      "clip":              OpenAI CLIP backbones loaded by pyiqa, `$TORCH_HOME/hub/clip/<name>`
      "hf":                a Hugging Face Hub repo id, in the HF cache (`$HF_HOME/hub`)
      "dp2o":              parameters shipped inside dp2o, `dp2o/weights/iqa/<name>` (never downloaded; pyiqa
                           gets them through `dp2o.reward.classical`)
    """

    location: WeightLocation
    name: str


@dataclass(frozen=True)
class MetricSpec:
    """One IQA metric as the reward sees it.

    name:         the raw score's column in the score table (a plain identifier)
    pyiqa_name:   the name `pyiqa.create_metric` takes
    kind:         "FR" compares the output with the HR image (fidelity); "NR" judges the output alone (realism)
    lower_better: True when a smaller raw score is better (the reward flips these)
    score_range:  nominal raw range (None = open end), from pyiqa's metadata; informative, never used to clip
    weights:      files that must be present before the metric can be built (empty for analytic metrics)
    side_multiple: height and width must be multiples of this (A-FINE's ViT-B/32 patches)
    min_side:     smallest height/width the metric accepts
    note:         what the metric is, for listings and docs
    """

    name: str
    pyiqa_name: str
    kind: Literal["FR", "NR"]
    lower_better: bool
    score_range: tuple[float | None, float | None]
    weights: tuple[WeightFile, ...] = ()
    side_multiple: int = 1
    min_side: int = 1
    note: str = ""

    @property
    def needs_weights(self) -> bool:
        """Whether a weight file must be downloaded (parameter files that ship inside dp2o do not count)."""
        return any(w.location != "dp2o" for w in self.weights)


def _pyiqa(name: str) -> WeightFile:
    return WeightFile("pyiqa", name)


_ALEXNET = WeightFile("torch_checkpoints", "alexnet-owt-7be5be79.pth")
_RESNET50 = WeightFile("hf", "timm/resnet50.a1_in1k")
_VIT_B8 = WeightFile("hf", "timm/vit_base_patch8_224.augreg2_in21k_ft_in1k")
_CLIP_RN50 = WeightFile("clip", "RN50.pt")
_CLIP_VIT_B32 = WeightFile("clip", "ViT-B-32.pt")
_AFINE = (_pyiqa("afine.pth"), _CLIP_VIT_B32)
# LIVE's NIQE and BRISQUE parameters, stored as numbers in dp2o/weights/iqa/ (provenance: PROVENANCE.md there)
_NIQE_PARAMS = WeightFile("dp2o", "niqe_pris_params.safetensors")
_BRISQUE_SVR = WeightFile("dp2o", "brisque_live_svr.safetensors")

METRICS: dict[str, MetricSpec] = {
    spec.name: spec
    for spec in (
        # ---- the paper's reward: full-reference ------------------------------------------------------------
        MetricSpec(
            "lpips",
            "lpips",
            "FR",
            True,
            (0.0, 1.0),
            (_pyiqa("LPIPS_v0.1_alex-df73285e.pth"), _ALEXNET),
            note="LPIPS v0.1, AlexNet features",
        ),
        MetricSpec(
            "topiq_fr",
            "topiq_fr",
            "FR",
            False,
            (0.0, 1.0),
            (_pyiqa("cfanet_fr_kadid_res50-2c4cc61d.pth"), _RESNET50),
            note="TOPIQ full-reference, trained on KADID-10k",
        ),
        MetricSpec(
            "afine_fr",
            "afine_fr",
            "FR",
            True,
            (-2.0, 2.0),
            _AFINE,
            side_multiple=32,
            note="A-FINE fidelity term (output vs HR), scaled",
        ),
        # ---- the paper's reward: no-reference --------------------------------------------------------------
        MetricSpec(
            "maniqa",
            "maniqa",
            "NR",
            False,
            (0.0, 1.0),
            (_pyiqa("ckpt_koniq10k.pt"), _VIT_B8),
            note="MANIQA trained on KonIQ-10k",
        ),
        MetricSpec(
            "musiq",
            "musiq",
            "NR",
            False,
            (0.0, 100.0),
            (_pyiqa("musiq_koniq_ckpt-e95806b9.pth"),),
            note="MUSIQ trained on KonIQ-10k",
        ),
        MetricSpec(
            "clipiqa_plus",
            "clipiqa+",
            "NR",
            False,
            (0.0, 1.0),
            # pyiqa names cached files after the URL's path without unquoting it, hence "%2B" for "+"
            (_pyiqa("CLIP-IQA%2B_learned_prompts-603f3273.pth"), _CLIP_RN50),
            note="CLIP-IQA+ (learned prompts, CLIP RN50)",
        ),
        MetricSpec(
            "topiq_nr",
            "topiq_nr",
            "NR",
            False,
            (0.0, 1.0),
            (_pyiqa("cfanet_nr_koniq_res50-9a73138b.pth"), _RESNET50),
            note="TOPIQ no-reference, trained on KonIQ-10k",
        ),
        MetricSpec(
            "afine_nr",
            "afine_nr",
            "NR",
            True,
            (-2.0, 2.0),
            _AFINE,
            side_multiple=32,
            note="A-FINE naturalness term of the output alone, scaled",
        ),
        MetricSpec(
            "qalign",
            "qalign",
            "NR",
            False,
            (1.0, 5.0),
            (WeightFile("hf", "q-future/one-align"),),
            note="Q-Align quality score (mPLUG-Owl2 on LLaMA-2 7B; GPU only in practice; needs `icecream`)",
        ),
        # ---- analytic metrics: no downloads ----------------------------------------------------------------
        MetricSpec(
            "psnr", "psnr", "FR", False, (0.0, None), note="PSNR on RGB, dB (80 for identical images)"
        ),
        MetricSpec("psnry", "psnry", "FR", False, (0.0, None), note="PSNR on the Y channel, dB"),
        MetricSpec("ssim", "ssim", "FR", False, (0.0, 1.0), note="SSIM on the Y channel"),
        MetricSpec("ssimc", "ssimc", "FR", False, (0.0, 1.0), note="SSIM on RGB"),
        MetricSpec("ms_ssim", "ms_ssim", "FR", False, (0.0, 1.0), min_side=161, note="multi-scale SSIM (Y)"),
        MetricSpec("cw_ssim", "cw_ssim", "FR", False, (0.0, 1.0), note="complex-wavelet SSIM (Y)"),
        MetricSpec("fsim", "fsim", "FR", False, (0.0, 1.0), note="feature similarity, chromatic (FSIMc)"),
        MetricSpec("gmsd", "gmsd", "FR", True, (0.0, None), note="gradient magnitude similarity deviation"),
        MetricSpec("nlpd", "nlpd", "FR", True, (0.0, 1.0), note="normalised Laplacian pyramid distance"),
        MetricSpec("vif", "vif", "FR", False, (0.0, None), note="visual information fidelity"),
        MetricSpec("vsi", "vsi", "FR", False, (0.0, 1.0), note="visual saliency-induced index"),
        MetricSpec("mad", "mad", "FR", True, (0.0, None), note="most apparent distortion (slow: ~1 s/image)"),
        MetricSpec("piqe", "piqe", "NR", True, (0.0, 100.0), note="perception-based image quality evaluator"),
        MetricSpec(
            "entropy", "entropy", "NR", False, (0.0, 8.0), note="grey-level entropy, bits (detail proxy)"
        ),
        # ---- classical NR metrics whose parameters ship with dp2o (docs/reward.md) -------------------------
        MetricSpec(
            "niqe",
            "niqe",
            "NR",
            True,
            (0.0, 100.0),
            (_NIQE_PARAMS,),
            min_side=96,
            note="NIQE, LIVE pristine model; 96 px blocks (one block below 192 px, the rest of the crop unused)",
        ),
        MetricSpec(
            "brisque",
            "brisque",
            "NR",
            True,
            (0.0, 150.0),
            (_BRISQUE_SVR,),
            note="BRISQUE, LIVE-trained SVR",
        ),
    )
}

PRESETS: dict[str, tuple[str, ...]] = {
    # DP²O-SR's hybrid reward (METHOD.md): 3 full-reference + 6 no-reference metrics
    "paper": (
        "lpips",
        "topiq_fr",
        "afine_fr",
        "maniqa",
        "musiq",
        "clipiqa_plus",
        "topiq_nr",
        "afine_nr",
        "qalign",
    ),
    # runs anywhere with no downloaded weights (BRISQUE's SVR ships inside dp2o), ~0.1 s per 128 px image on one
    # CPU core. Its NR metrics are the ones that rank the candidates of an input stably at the demo's 128 px
    # (Spearman >= 0.8 between windows shifted by 1-4 px, scores centred per input; docs/reward.md): entropy
    # 0.975, brisque 0.855. PIQE (0.347) left it for BRISQUE; NIQE (0.771) did not join.
    "offline": ("psnr", "ssim", "fsim", "gmsd", "brisque", "entropy"),
}


def _did_you_mean(name: str) -> str:
    by_pyiqa = [s.name for s in METRICS.values() if s.pyiqa_name == name]
    lowered = [n for n in [*METRICS, *PRESETS] if n == name.lower().strip()]
    close = by_pyiqa or lowered or difflib.get_close_matches(name, [*METRICS, *PRESETS], n=3, cutoff=0.6)
    return f"{name!r}" + (f" (did you mean {', '.join(map(repr, close))}?)" if close else "")


def metric_names(names_or_preset: str | Sequence[str]) -> list[str]:
    """The metric names of a preset name ("paper", "offline"), a comma-separated string, or a list of names
    (presets may be mixed with names in a list), checked against `METRICS`.

    Raises ValueError naming unknown or repeated names, with close matches. Pure data: imports no model code,
    so configs are checked before torch or pyiqa is loaded."""
    if isinstance(names_or_preset, str):
        items = [s.strip() for s in names_or_preset.split(",") if s.strip()]
    else:
        items = list(names_or_preset)
    if not items:
        raise ValueError(f"no metrics given; name a preset ({', '.join(PRESETS)}) or metrics from METRICS")
    bad_items = [i for i in items if not isinstance(i, str) or not i.strip()]
    if bad_items:
        raise ValueError(f"metric names must be non-empty strings, got {bad_items!r}")
    names: list[str] = []
    for item in items:
        names.extend(PRESETS.get(item, (item,)))
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(
            f"unknown metric(s) {', '.join(map(_did_you_mean, unknown))}; known metrics: {', '.join(METRICS)}; "
            f"presets: {', '.join(PRESETS)}"
        )
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ValueError(f"metric(s) {', '.join(duplicated)} listed more than once")
    return names


def resolve_metrics(names_or_preset: str | Sequence[str]) -> list[MetricSpec]:
    """Specs for a preset name ("paper", "offline"), a comma-separated string, or a list of metric names.

    Presets may be mixed with names in a list. Unknown names raise ValueError with close matches.
    """
    return [METRICS[n] for n in metric_names(names_or_preset)]


def unknown_metric_names(names: Sequence[str]) -> list[str]:
    """`names` that are not metrics of the table, each with its close matches (for messages)."""
    return [_did_you_mean(n) for n in names if n not in METRICS]


def check_metric_weights(weights: dict[str, float], metrics: str | Sequence[str]) -> None:
    """A reward's `metric_weights` may only name metrics that are scored (`metrics`: a preset or names), and
    must leave the FR and the NR metrics each a positive total weight. Raises ValueError saying which."""
    names = metric_names(metrics)
    extra = [k for k in weights if k not in names]
    if extra:
        it = "it" if len(extra) == 1 else "them"
        raise ValueError(
            f"reward.metric_weights names {', '.join(map(repr, extra))}, not among the metrics this section scores "
            f"({', '.join(names)}); drop {it} from metric_weights or add {it} to the section's metrics"
        )
    for kind in ("FR", "NR"):
        of_kind = [n for n in names if METRICS[n].kind == kind]
        if of_kind and sum(float(weights.get(n, 1.0)) for n in of_kind) <= 0:
            raise ValueError(
                f"reward.metric_weights gives the {kind} metrics ({', '.join(of_kind)}) a total weight of 0; "
                "raise one of them above 0"
            )


class MetricWeightsMissing(Dp2oError, RuntimeError):
    """A metric's weight files are not on this machine (and were not, or could not be, downloaded)."""


def _torch_hub_dir() -> str:
    import torch.hub

    return torch.hub.get_dir()


def _pyiqa_cache_dir() -> str:
    # pyiqa fixes its cache folder from TORCH_HOME when it is first imported; ask it rather than recompute.
    from pyiqa.utils.download_util import DEFAULT_CACHE_DIR

    return DEFAULT_CACHE_DIR


def weight_location(weight: WeightFile) -> str:
    """Where `weight` must be on this machine: a file path, or for "hf" the repo's folder in the HF cache."""
    if weight.location == "pyiqa":
        return os.path.join(_pyiqa_cache_dir(), weight.name)
    if weight.location == "torch_checkpoints":
        return os.path.join(_torch_hub_dir(), "checkpoints", weight.name)
    if weight.location == "clip":
        return os.path.join(_torch_hub_dir(), "clip", weight.name)
    if weight.location == "dp2o":
        from dp2o.reward.classical import PARAMS_DIR

        return str(PARAMS_DIR / weight.name)
    from huggingface_hub import constants

    return os.path.join(constants.HF_HUB_CACHE, "models--" + weight.name.replace("/", "--"))


def _is_present(weight: WeightFile) -> bool:
    if weight.location != "hf":
        return os.path.isfile(weight_location(weight))
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(weight.name, "config.json"), str)


def missing_weights(specs: Sequence[MetricSpec]) -> dict[str, list[str]]:
    """For each metric with absent weights, the locations that are missing (empty dict: all present)."""
    missing: dict[str, list[str]] = {}
    for spec in specs:
        absent = [weight_location(w) for w in spec.weights if not _is_present(w)]
        if absent:
            missing[spec.name] = absent
    return missing


def missing_weights_message(missing: dict[str, list[str]]) -> str:
    """The MetricWeightsMissing text: what is missing, where it goes, and how to fill the caches."""
    lines = ["IQA metric weights are missing on this machine:"]
    for name, paths in missing.items():
        lines.extend(f"  {name}: {p}" for p in paths)
    names = ",".join(missing)
    lines += [
        "pyiqa files go in $TORCH_HOME/hub/pyiqa/, torchvision/CLIP files in $TORCH_HOME/hub/checkpoints/ and",
        "$TORCH_HOME/hub/clip/, Hugging Face repos (timm backbones, Q-Align) in the HF cache ($HF_HOME/hub).",
        "To fill them, on a machine with internet and the same TORCH_HOME/HF_HOME, run",
        f"  python -c \"from dp2o.reward import prefetch_weights; prefetch_weights('{names}')\"",
        "then copy those folders here (or point TORCH_HOME/HF_HOME at a shared copy);",
        "files under dp2o/weights/iqa/ ship with dp2o itself: reinstall dp2o (or restore them from git);",
        "or choose metrics that need no weights (preset 'offline').",
    ]
    return "\n".join(lines)


#: units of the raw scores that have one (the others are dimensionless scores)
_UNITS = {"psnr": "dB", "psnry": "dB", "entropy": "bits"}


def column_doc(name: str):
    """The Parquet column doc (`dp2o.schemas.Column`) of a metric's raw score column: what it is, its unit,
    which direction is better and its nominal range; a name not in the registry gets a generic doc."""
    from dp2o.schemas import Column

    spec = METRICS.get(name)
    if spec is None:
        return Column(f"raw score of metric {name}")
    role = (
        "full-reference: fidelity to the HR crop"
        if spec.kind == "FR"
        else "no-reference: realism of the output"
    )
    lo, hi = spec.score_range
    rng = f"nominal range [{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
    note = spec.note or spec.pyiqa_name
    return Column(
        f"raw {spec.pyiqa_name} score, pyiqa ({note}; {role}; {rng})",
        _UNITS.get(name, ""),
        "lower" if spec.lower_better else "higher",
    )
