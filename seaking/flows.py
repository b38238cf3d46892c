"""Which flows are the proxy's, whether anyone can look at flows, and where a flow shows it went."""

from __future__ import annotations

from urllib.parse import SplitResult, urlsplit

from mitmproxy import connection, ctx, http


def is_client_flow(flow: http.HTTPFlow) -> bool:
    """A live request: from a client, or replayed from mitmweb (which makes the flow live again). Not a flow made by
    an addon and loaded into the view, such as an attempt flow: those are never live."""
    return flow.live


def is_replay(flow: http.HTTPFlow) -> bool:
    """A flow replayed from mitmweb (or `replay.client`): nobody is waiting for it on a client connection."""
    return flow.is_replay == "request"


def flows_are_listed() -> bool:
    """Whether a flow list keeps flows (mitmweb, mitmproxy's console): only there can a flow be replayed."""
    return ctx.master.addons.get("view") is not None


def flows_are_seen() -> bool:
    """Whether flows are shown to anyone: a flow list (mitmweb, mitmproxy's console) or a recording (-w). Plain
    mitmdump without -w prints a line per flow and keeps none, so what only a flow shows need not be made there."""
    return flows_are_listed() or bool(ctx.options.save_stream_file)


def show_upstream(flow: http.HTTPFlow, url: str) -> None:
    """Show `url` as where the flow went, in its URL and in its server connection (mitmweb's Connection tab).

    The flow gets a server connection of its own: the one mitmproxy used (the relay's, for a streamed answer) stays
    as it is for mitmproxy, which may reuse it."""
    if flow.request.url != url:
        flow.request.url = url
    if flow.server_conn.address == _address(urlsplit(url)) and not flow.server_conn.peername:
        return  # mitmproxy's own (unused) server connection already names it: the common, single-target case
    shown = upstream_server(url)
    shown.timestamp_start = flow.server_conn.timestamp_start
    shown.timestamp_tcp_setup = flow.server_conn.timestamp_tcp_setup
    flow.server_conn = shown


def upstream_server(url: str) -> connection.Server:
    """A server connection as mitmweb shows one: the upstream's host and port."""
    parts = urlsplit(url)
    server = connection.Server(address=_address(parts))
    if parts.scheme == "https":
        server.sni = parts.hostname
    return server


def _address(parts: SplitResult) -> tuple[str, int]:
    return parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
