"""Cross-validated tuning for the miniature reproduction: leave-photos-out folds of `bundled://train`.

    python -m scripts.mini_repro_cv --methods 16:1:uniform 16:4:hpo 32:8:hpo --seeds 5 --eval-inputs 8

Each fold leaves some photos of `bundled://train` out of training and evaluates on them: it runs
`python -m scripts.mini_repro --split photo-val --val-photos FOLD ...` with every other option passed through. The
default folds leave out one natural photograph each (astronaut, chelsea, motorcycle), because the held-out photos
the reproduction reports on are natural photographs too; `--folds` takes others (`a.png+b.png` leaves two out).

The report gives, per method, Mean/Best/Worst@M minus the base model's, first per fold and then averaged over
the folds per training seed (the same seed index in every fold), with 95 % t-intervals over training seeds.
`bundled://heldout` is never read. A fold whose folder already holds results for the same command is not rerun,
so an interrupted invocation resumes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
from pyarrow import csv

from dp2o.evaluate import AT_M_STATS, markdown_table, summarize_over_seeds
from scripts import mini_repro

#: natural photographs of bundled://train, like the photos of bundled://heldout
DEFAULT_FOLDS = ("astronaut.png", "chelsea.png", "motorcycle_left.png")


def fold_differences(evals: pa.Table, fold: str) -> pa.Table:
    """Rows (fold, method, train_seed, best, mean, worst) of run − base from one fold's evaluation rows."""
    diffs = mini_repro.runs_minus_base(evals).select(["method", "train_seed", *AT_M_STATS])
    return diffs.add_column(0, "fold", pa.array([fold] * diffs.num_rows))


def average_over_folds(diffs: pa.Table) -> pa.Table:
    """(method, train_seed) → the fold-mean of each difference; only seeds present in every fold count."""
    folds = pc.count_distinct(diffs["fold"]).as_py()
    means = diffs.group_by(["method", "train_seed"], use_threads=False).aggregate(
        [(s, "mean") for s in AT_M_STATS] + [("fold", "count_distinct")]
    )
    complete = means.filter(pc.equal(means["fold_count_distinct"], folds))
    return complete.rename_columns({f"{s}_mean": s for s in AT_M_STATS}).select(
        ["method", "train_seed", *AT_M_STATS]
    )


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--folds",
        nargs="+",
        default=list(DEFAULT_FOLDS),
        help="one fold per item: the photo names it leaves out, joined by '+'",
    )
    p.add_argument("--cv-dir", type=Path, default=Path("runs/cv"), help="folder of the folds' outputs")
    p.add_argument("--out", type=Path, default=None, help="markdown report (default: CV_DIR/cv.md)")
    return p.parse_known_args(argv)


def main(argv: list[str] | None = None) -> pa.Table:
    args, passthrough = parse_args(argv)
    if any(a in passthrough for a in ("--split", "--val-photos", "--plot-dir", "--merge")):
        raise SystemExit("mini_repro_cv.py sets --split, --val-photos, --plot-dir and --out itself")
    all_diffs = []
    for fold in args.folds:
        photos = fold.split("+")
        folder = args.cv_dir / fold.replace("+", "_")
        fold_argv = [*passthrough, "--split", "photo-val", "--val-photos", *photos]
        fold_argv += ["--plot-dir", str(folder), "--out", str(folder / "report.md")]
        stamp = folder / "argv.json"
        done = (
            (folder / "results.json").exists()
            and stamp.exists()
            and json.loads(stamp.read_text()) == fold_argv
        )
        if done:
            print(f"fold {fold}: results present, not rerun", flush=True)
        else:
            print(f"fold {fold}: python -m scripts.mini_repro {' '.join(fold_argv)}", flush=True)
            mini_repro.main(fold_argv)
            stamp.write_text(json.dumps(fold_argv))
        all_diffs.append(fold_differences(csv.read_csv(folder / "eval_rewards.csv"), fold))
    diffs = pa.concat_tables(all_diffs)
    per_fold = summarize_over_seeds(diffs, group_by=("fold", "method"))
    pooled = summarize_over_seeds(average_over_folds(diffs), group_by=("method",))
    out = args.out or args.cv_dir / "cv.md"
    command = "python -m scripts.mini_repro_cv " + " ".join(argv if argv is not None else sys.argv[1:])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        "\n".join(
            [
                "# Cross-validated tuning of the miniature reproduction",
                "",
                f"    {command}",
                "",
                f"Folds (photos of `bundled://train` left out of training and evaluated on): {', '.join(args.folds)}.",
                "Differences to the base model (run − base); 95 % t-intervals over training seeds.",
                "",
                "## Averaged over folds (per training seed, then over seeds)",
                "",
                markdown_table(pooled),
                "## Per fold",
                "",
                markdown_table(per_fold, label_columns=("fold", "method")),
            ]
        )
    )
    (out.with_suffix(".json")).write_text(
        json.dumps({"pooled": pooled.to_pylist(), "per_fold": per_fold.to_pylist()}, indent=2) + "\n"
    )
    print(markdown_table(pooled))
    print(f"wrote {out}")
    return pooled


if __name__ == "__main__":
    main()
