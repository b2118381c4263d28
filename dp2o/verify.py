"""`dp2o verify [--repair]`: re-hash every committed file of a stage folder against its markers, and withdraw
the shards whose files do not match.

The design choice a reader would miss: repair never touches a data file. It withdraws the bad shard's marker,
so the shard is pending and the next run of the stage recomputes that shard alone and commits it the usual way
(a new file moved over the damaged one in one step, never written in place under a worker that may be
reading it), and it withdraws the manifest, which lists the shard and would let a downstream stage start on a
folder that is no longer whole. The per-shard check is `storage.check_shard`, the same one `read_marker` runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from dp2o.errors import StageError
from dp2o.storage import MANIFEST, MARKERS, ShardCheck, Storage, check_shard, repair_command

CONFIG = "config.json"


@dataclass
class VerifyReport:
    """What `verify_stage` found in one stage folder and, with repair, what it withdrew."""

    url: str
    checks: list[ShardCheck]
    #: the folder's manifest: "ok", "missing" (an unfinished stage, or withdrawn by repair) or "unreadable"
    manifest: str = "ok"
    #: files removed by repair, relative to the folder
    withdrawn: list[str] = field(default_factory=list)

    @property
    def bad(self) -> list[ShardCheck]:
        return [c for c in self.checks if not c.ok]

    @property
    def ok(self) -> bool:
        """Every shard verified and the folder finished. A repaired folder is not ok: it needs a rerun."""
        return not self.bad and self.manifest == "ok"

    def lines(self) -> list[str]:
        n, bad = len(self.checks), self.bad
        head = f"{self.url}: {n - len(bad)} of {n} shards verified"
        if self.manifest != "ok":
            head += f"; {MANIFEST} {self.manifest}" + (
                " (unfinished, or withdrawn)" if self.manifest == "missing" else ""
            )
        out = [head]
        out += [f"  BAD {c.name}: {'; '.join(c.problems)}" for c in bad]
        names = ", ".join(c.name for c in bad)
        if self.withdrawn:
            out.append(
                f"withdrew {', '.join(self.withdrawn)}; rerun the stage (or the pipeline): it recomputes "
                + (f"{names} only" if bad else "nothing it has not already committed")
            )
        elif bad or self.manifest == "unreadable":
            out.append(
                f"run `{repair_command(self.url)}` to withdraw them; the next run then recomputes only those shards"
            )
        elif self.manifest == "missing":
            out.append("rerun the stage to finish it")
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())


def verify_stage(
    url: str, storage_options: dict[str, Any] | None = None, repair: bool = False
) -> VerifyReport:
    """Check every shard of the stage folder at `url` (or the one stage folder under it): marker present and of
    the folder's config, every file's size and sha256 as recorded (a damaged tar also names its bad members).
    repair=True withdraws each bad shard's marker and the manifest, so the next run recomputes those shards."""
    st = _stage_folder(url, storage_options)
    manifest, manifest_state = _read_json(st, MANIFEST)
    config, _ = _read_json(st, CONFIG)
    if manifest is not None:
        fingerprint = manifest["fingerprint"]
        names = [s["name"] for s in manifest["shards"]]
    elif config is not None:
        fingerprint, names = config["fingerprint"], []
    else:
        raise StageError(f"{st.url}: neither {MANIFEST} nor {CONFIG} is readable; not a stage folder")
    # shards committed after the manifest was withdrawn (or before it was written) are checked too
    names += [m[: -len(".json")] for m in st.listdir(MARKERS) if m.endswith(".json") and m[:-5] not in names]
    checks = [check_shard(st, name, fingerprint=fingerprint, verify_hash=True) for name in names]
    report = VerifyReport(st.url, checks, manifest_state)
    if repair and (report.bad or manifest_state == "unreadable"):
        # the manifest first: no downstream planner starts on the folder while its shards are withdrawn
        if st.exists(MANIFEST):
            st.rm(MANIFEST)
            report.withdrawn.append(MANIFEST)
        for c in report.bad:
            if st.exists(MARKERS, f"{c.name}.json"):
                st.rm(MARKERS, f"{c.name}.json")
                report.withdrawn.append(f"{MARKERS}/{c.name}.json")
    return report


def _read_json(st: Storage, name: str) -> tuple[Any, str]:
    """(content, "ok"), (None, "missing") or (None, "unreadable")."""
    try:
        return st.read_json(name), "ok"
    except FileNotFoundError:
        return None, "missing"
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None, "unreadable"


def _stage_folder(url: str, storage_options: dict[str, Any] | None) -> Storage:
    """The stage folder at `url`: the folder itself, or its only child holding a stage (`<root>/<stage>`)."""
    st = Storage(url, storage_options)
    if st.exists(CONFIG) or st.exists(MANIFEST):
        return st
    found = [name for name in st.listdir() if st.exists(name, CONFIG)]
    if len(found) == 1:
        return st.child(found[0])
    if found:
        raise StageError(f"{url} holds several stage folders {found}; verify one of them")
    raise StageError(f"{url} is not a stage folder (no {CONFIG}, no {MANIFEST})")
