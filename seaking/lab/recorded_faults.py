"""The replay lab's fake upstream: a `mitmdump -S` script that gives recorded answers the timing and failures of
the recording (replay.py passes it to mitmdump with -s).

mitmproxy's server replay answers each request from the recording, at once and whole. A recorded attempt also took
its time, and may have failed in ways a whole response cannot say: a reset, a hang, a stream that broke off or went
silent. The lab writes that into each recorded answer as a LAB_HEADER, and this addon plays it from the response
hook (server replay answers in the request hook, before any script's request hook could see the answer): it waits as
long as the upstream took, then kills the flow (a reset), waits for ever (a hang), or sends the recorded body under a
Content-Length one byte longer, so that the client reads what the upstream sent and then waits for the rest — until
the connection closes (a drop) or for ever (a stall).
"""

from __future__ import annotations

import asyncio
import json

from mitmproxy import http

LAB_HEADER = "x-seaking-lab"
HANG_SECONDS = 3600.0  # "for ever": until the proxy gives up on the attempt, or the lab stops this process


class LabFaults:
    """mitmproxy addon, after server replay: recorded timing and failures for each recorded answer."""

    name = "seaking.lab_faults"

    async def response(self, flow: http.HTTPFlow) -> None:
        # Every answer comes from the recording (server_replay_extra=kill), with its instructions.
        lab = json.loads(flow.response.headers.pop(LAB_HEADER))
        await asyncio.sleep(lab.get("delay", 0))
        fault = lab.get("fault")
        if fault == "hang":
            await asyncio.sleep(HANG_SECONDS)
        if fault in ("reset", "hang"):
            flow.kill()
        elif fault in ("drop", "stall"):
            flow.response.headers.pop("transfer-encoding", None)
            flow.response.headers["content-length"] = str(len(flow.response.raw_content or b"") + 1)
            if fault == "drop":
                flow.response.headers["connection"] = "close"


addons = [LabFaults()]
