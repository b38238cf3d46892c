"""redaction.py alone: what of the client's keys stays in the proxy's memory."""

from __future__ import annotations

from mitmproxy.test import tflow

from seaking import redaction
from seaking.redaction import Redaction


def test_only_the_last_flows_keys_are_kept_for_a_replay(monkeypatch):
    monkeypatch.setattr(redaction, "KEPT_FLOWS", 2)
    addon = Redaction()
    flows = [tflow.tflow() for _ in range(3)]
    for number, flow in enumerate(flows):
        flow.live = True
        flow.request.headers["authorization"] = f"Bearer sk-client-key-{number}"
        addon.requestheaders(flow)
        assert flow.request.headers["authorization"] != f"Bearer sk-client-key-{number}"  # off the flow at once
    assert [addon.missing_credentials(f) for f in flows] == [["authorization"], [], []]
    assert addon.client_secrets(flows[2]) == {"Bearer sk-client-key-2", "sk-client-key-2"}
