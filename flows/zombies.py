"""Zombie flow runs: a run whose process was SIGKILLed or whose machine died must not stay Running forever.

Nothing in the dying process can report its end, so the server decides: every flow run engine sends a
`prefect.flow-run.heartbeat` event every PREFECT_FLOWS_HEARTBEAT_FREQUENCY seconds while it runs (`flows`
sets 30 s, Prefect's minimum, unless set; Prefect's default is 180 s), and this automation marks a flow run
Crashed when, after a heartbeat, neither another heartbeat nor a final state (Completed, Failed, Cancelled,
Crashed) arrives within `within` seconds (default `DEFAULT_WITHIN_SECONDS`, three missed heartbeats). The
stage subflows of a pipeline send their own heartbeats and are marked Crashed the same way. Runs of clients
that send no heartbeats never start the timer, so they are never marked.

Create or update it (idempotent, by name) against the server PREFECT_API_URL points at:

    python -m flows.zombies --apply               # within 90 s
    python -m flows.zombies --apply --within 120  # a slower heartbeat (PREFECT_FLOWS_HEARTBEAT_FREQUENCY=40)
    python -m flows.zombies                       # print the automation, change nothing

`within` must exceed the heartbeat period of every client, with room for a busy machine's delays; the
automation is server-wide (it watches every flow run that sends heartbeats, dp2o's or not).
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import timedelta

#: the automation's name (the key that makes --apply idempotent)
NAME = "dp2o: crash zombie flow runs"
#: seconds without a heartbeat after which a flow run is marked Crashed: three missed 30 s heartbeats
DEFAULT_WITHIN_SECONDS = 90
#: the events that show a flow run alive or finished
ALIVE_OR_FINAL = (
    "prefect.flow-run.heartbeat",
    "prefect.flow-run.Completed",
    "prefect.flow-run.Failed",
    "prefect.flow-run.Cancelled",
    "prefect.flow-run.Crashed",
)
MESSAGE = "No heartbeat for {within} s: the flow run's process died (SIGKILL, lost machine); marked Crashed"


def zombie_automation(within: float = DEFAULT_WITHIN_SECONDS):
    """The automation (not yet created): after a heartbeat, no heartbeat or final state within `within`."""
    from prefect.automations import Automation, ChangeFlowRunState, EventTrigger, Posture
    from prefect.client.schemas.objects import StateType

    if within < 10:
        raise ValueError(f"within={within}: Prefect's proactive triggers need at least 10 seconds")
    return Automation(
        name=NAME,
        description=(
            "Marks a flow run Crashed when its heartbeats stop without a final state (dp2o: "
            "python -m flows.zombies --apply)"
        ),
        trigger=EventTrigger(
            match={"prefect.resource.id": "prefect.flow-run.*"},
            after={"prefect.flow-run.heartbeat"},
            expect=set(ALIVE_OR_FINAL),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=within),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED, name="Crashed", message=MESSAGE.format(within=f"{within:g}")
            )
        ],
    )


def apply(within: float = DEFAULT_WITHIN_SECONDS) -> tuple[str, str]:
    """Create the automation, or update the one of the same name; returns (its id, "created" | "updated")."""
    from prefect.automations import Automation

    wanted = zombie_automation(within)
    try:
        existing = Automation.read(name=NAME)
    except ValueError:  # not found
        existing = None
    if existing is None:
        return str(wanted.create().id), "created"
    wanted.id = existing.id
    wanted.update()
    return str(existing.id), "updated"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flows.zombies", description=__doc__.split("\n\n")[0])
    ap.add_argument("--apply", action="store_true", help="create or update the automation on the server")
    ap.add_argument(
        "--within",
        type=float,
        default=DEFAULT_WITHIN_SECONDS,
        help=f"seconds without a heartbeat before a run is marked Crashed (default {DEFAULT_WITHIN_SECONDS})",
    )
    args = ap.parse_args(argv)
    try:
        automation = zombie_automation(args.within)
    except ValueError as e:
        print(f"flows.zombies: {e}", file=sys.stderr)
        return 2
    if not args.apply:
        print(json.dumps(automation.model_dump(mode="json", exclude={"id"}), indent=2))
        return 0
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        print(
            "flows.zombies: PREFECT_API_URL is not set; point it at the server that should watch the runs",
            file=sys.stderr,
        )
        return 2
    automation_id, what = apply(args.within)
    print(
        f"{what} automation {NAME!r} ({automation_id}) on {PREFECT_API_URL.value()}: within {args.within:g} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
