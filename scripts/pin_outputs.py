"""Hash every output a finished run wrote, to show that a refactor changed no result.

    python -m scripts.pin_outputs runs/demo > before.json      # before the change
    python -m scripts.pin_outputs runs/demo --check before.json # after: lists every difference, exit 1 if any

Per stage: its fingerprint and the sha256 of every file its shard markers list. Wall-clock fields are the only
exclusion, listed in WALL_CLOCK: a Parquet file holding such a column is hashed over its other columns
(their values, not the file bytes). Markers and manifests are not hashed: they hold timings by design.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import pyarrow.parquet as pq

#: columns that hold wall-clock time, per file name (train metrics had `seconds` before it moved to the marker)
WALL_CLOCK = {"metrics.parquet": ("seconds",)}


def _hash_file(path: Path) -> str:
    drop = WALL_CLOCK.get(path.name)
    if drop:
        table = pq.read_table(path)
        keep = [c for c in table.column_names if c not in drop]
        payload = json.dumps(table.select(keep).to_pylist(), sort_keys=True, default=str).encode()
        return "table:" + hashlib.sha256(payload).hexdigest()
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pin(root: Path) -> dict:
    out: dict[str, dict] = {}
    for manifest in sorted(root.glob("*/*/_MANIFEST.json")):
        folder = manifest.parent
        m = json.loads(manifest.read_text())
        files = {}
        for shard in m["shards"]:
            for rel in shard["files"]:
                files[rel] = _hash_file(folder / rel)
        out[m["stage"]] = {"fingerprint": m["fingerprint"], "files": files}
    return out


def diff(before: dict, after: dict) -> list[str]:
    lines = []
    for stage in sorted(set(before) | set(after)):
        b, a = before.get(stage), after.get(stage)
        if b is None or a is None:
            lines.append(f"{stage}: only in {'after' if b is None else 'before'}")
            continue
        if b["fingerprint"] != a["fingerprint"]:
            lines.append(f"{stage}: fingerprint {b['fingerprint']} -> {a['fingerprint']}")
        for rel in sorted(set(b["files"]) | set(a["files"])):
            if b["files"].get(rel) != a["files"].get(rel):
                lines.append(f"{stage}: {rel} differs")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", type=Path, help="a run root holding <stage>/<fingerprint>/ folders")
    ap.add_argument("--check", type=Path, help="a JSON written before; print the differences")
    args = ap.parse_args(argv)
    now = pin(args.root)
    if args.check is None:
        print(json.dumps(now, indent=2, sort_keys=True))
        return 0
    lines = diff(json.loads(args.check.read_text()), now)
    files = sum(len(s["files"]) for s in now.values())
    print("\n".join(lines) or f"identical: {len(now)} stages, {files} files")
    return 1 if lines else 0


if __name__ == "__main__":
    sys.exit(main())
