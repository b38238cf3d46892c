"""seaking-proxy's parts. `addon.py` (beside this package) lists the mitmproxy addons in pipeline order; here is
where each thing happens. Each addon module holds one small mitmproxy addon class and the pure helpers it uses.

Addons (mitmproxy hooks):
  shutdown.py ........ GracefulShutdown: on SIGINT/SIGTERM, requests in flight may finish for server.shutdown_grace
  settings.py ........ Settings: the seaking_config option, config.yaml into the shared state and its reloads
  replays.py ......... Replays: mitmweb's Replay of a client flow starts afresh; refused if its client's key is gone
  redaction.py ....... Redaction: the client's keys off every flow from its first hook; scrubbing error text
  guard.py ........... AccessGuard: access key and body size before the body is read; the JSON body
  status.py .......... StatusEndpoint: GET /_seaking/status and the seaking.status command
  metrics.py ......... Metrics: GET /_seaking/metrics for Prometheus, from the flows' records and the targets
  exchange.py ........ Exchange: a request routed, retried and answered (whole, or handed to the relay)
  models_cache.py .... ModelsCache: /models answered from the last good list when the upstream is down
  flow_notes.py ...... FlowNotes: the mark and the attempt history mitmweb shows for a flow
  attempt_flows.py ... AttemptFlows: each upstream attempt as a flow of its own (mitmweb, -w recordings)
  health.py .......... HealthChecks: background probes of targets whose breaker is open
  relay.py ........... Relay: the loopback server mitmproxy streams answers from, and the flows bound to it

Libraries (no hooks):
  shared.py .......... Shared: the one object the addons share (config, targets, relay, upstream session)
  flows.py ........... which flows are the proxy's, and the record its addons keep on each (flow.metadata)
  config.py .......... config.yaml: schema, validation, errors that name the key
  routing.py ......... which upstream URL a client path maps to
  upstream.py ........ the exchange itself: attempts over targets and fallback models, one aiohttp request each
  outbound.py ........ outbound proxies (HTTP, HTTPS, SOCKS5): which one a target goes through, and how
  targets.py ......... circuit breakers, load balancing, the per-request order of targets
  streaming.py ....... SSE: the first event, heartbeats, piping with the idle timeout, every stream ended cleanly
  answers.py ......... the client's answer once the exchange is over: passed on, or why the proxy gave up
  errors.py .......... ProxyError: an error the proxy reports itself; reason phrases
  dialects.py ........ OpenAI's and Anthropic's wire shapes: error documents, SSE error events, stream endings
  replay_lab.py ...... the replay lab (replay.py): a recorded session reproduced against mitmdump -S
  lab_upstream.py .... LabFaults: the mitmdump -S script that plays each recorded attempt's timing and failure

The classification and retry strategies are in retry_policy.py, beside addon.py.
"""
