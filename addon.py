"""seaking-proxy: makes a flaky OpenAI-compatible (or Anthropic) upstream look reliable to SillyTavern.

    mitmdump -s addon.py --mode reverse:https://api.example.com

mitmproxy is the front door (listening, the client side, mitmweb, options, flow recording); the upstream exchange is
the proxy's own. The list below is the whole pipeline: mitmproxy calls each hook on these addons in this order. Where
each thing happens is in the package map, seaking/__init__.py.
"""

from __future__ import annotations

from seaking.exchange import Exchange
from seaking.flow_notes import FlowNotes
from seaking.guard import AccessGuard
from seaking.health import HealthChecks
from seaking.memory import AllocatorTrim
from seaking.metrics import Metrics
from seaking.models_cache import ModelsCache
from seaking.replays import Replays
from seaking.settings import Settings
from seaking.shared import Shared
from seaking.shutdown import GracefulShutdown
from seaking.status import StatusEndpoint


def pipeline() -> list:
    shared = Shared()
    return [
        GracefulShutdown(shared),  # done: requests in flight may finish before the addons below close their parts
        Settings(shared),  # config.yaml as the shared snapshot, and its reloads; mitmproxy options the proxy needs
        Replays(shared),  # requestheaders: a replayed flow starts afresh; request: refused if its client's key is gone
        shared.redaction,  # requestheaders: the client's keys off the flow, kept in memory for its exchange and replays
        AccessGuard(shared),  # requestheaders: access key, body size; request: the body is a JSON object
        StatusEndpoint(shared),  # request: GET /_seaking/status; the seaking.status command
        Metrics(shared),  # request: GET /_seaking/metrics; response, error: each client request counted as it ends
        Exchange(shared),  # request: the upstream run and the answer (a stream: handed to the relay)
        ModelsCache(shared),  # request: keep good /models lists; answer from them when the upstream is down
        FlowNotes(shared.records),  # response, error: mark and comment for mitmweb, the attempt history in the log
        shared.attempt_flows,  # response, error: upstream attempts loaded as flows of their own
        HealthChecks(shared),  # running .. done: background probes of targets that are down or unknown
        AllocatorTrim(),  # running .. done: memory freed after bursts given back to the system (glibc)
        shared.relay,  # request: whole answers for flows bound to the relay; responseheaders: show the upstream
        shared.records,  # response, error: each client flow's record written into its metadata, for recordings
    ]


addons = pipeline()
