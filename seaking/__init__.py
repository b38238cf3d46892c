"""seaking-proxy's parts: the one map of the package. `addon.py` (beside it) lists the mitmproxy addons in pipeline
order and points here; the README points here too.

Where a request is ...
  refused ......... guard.py (AccessGuard: access key, body size, a JSON body), shutdown.py (while stopping)
  routed .......... routing.py (a client path onto a target's base), targets.py (breakers, load balancing)
  sent ............ exchange.py (Exchange, the request hook) → upstream_run.py (UpstreamRun: attempts over targets and
                    fallback models) → attempt.py (one attempt) → connections.py (aiohttp's pools)
  classified ...... retry_policy.py (beside addon.py: verdicts, waits, stopping; pure) and connections.py (exceptions)
  retried ......... upstream_run.py, with retry_policy.run_with_retries (tenacity)
  streamed ........ stream_answer.py (StreamAnswer: the relay job of a stream request) → streaming.py (SSE: the first
                    event, piping with the idle timeout, every stream ended cleanly) → relay.py (the loopback server)
  continued ....... stream_answer.py (after a break) → resume.py (can it be, and the request) → splice.py (the seam)
  answered ........ answers.py (what the client gets: passed on, or why the proxy gave up), dialects.py (OpenAI's and
                    Anthropic's shapes), models_cache.py (/models from the last good list)
  shown ........... records.py (the flow's record), flow_notes.py (mark and comment), attempt_flows.py (each attempt a
                    flow), metrics.py, status.py

Addons (mitmproxy hooks), each one small class:
  shutdown.py ........ GracefulShutdown: on SIGINT/SIGTERM, requests in flight may finish for server.shutdown_grace
  settings.py ........ Settings: the seaking_config option, config.yaml as the shared snapshot, and its reloads
  replays.py ......... Replays: mitmweb's Replay of a client flow starts afresh; refused if its client's key is gone
  redaction.py ....... Redaction: the client's keys off every flow from its first hook; scrubbing error text
  guard.py ........... AccessGuard: access key and body size before the body is read; the JSON body
  status.py .......... StatusEndpoint: GET /_seaking/status and the seaking.status command
  metrics.py ......... Metrics: GET /_seaking/metrics for Prometheus, from the flows' records and the targets
  exchange.py ........ Exchange: a request routed upstream and answered (whole, or handed to the relay)
  models_cache.py .... ModelsCache: /models answered from the last good list when the upstream is down
  flow_notes.py ...... FlowNotes: the mark and the attempt history mitmweb shows for a flow
  attempt_flows.py ... AttemptFlows: upstream attempts as flows of their own (mitmweb, -w recordings)
  health.py .......... HealthChecks: background probes of targets whose breaker is open
  memory.py .......... AllocatorTrim: memory freed after bursts given back to the system (glibc's malloc_trim)
  relay.py ........... Relay: the loopback server mitmproxy streams answers from, and the flows bound to it
  records.py ......... Records: each client flow's typed record, written into its metadata when it ends

Libraries (no hooks):
  shared.py .......... Shared: the parts the addons share; Snapshot: the loaded config, swapped whole by a reload
  config.py .......... config.yaml: schema, validation, errors that name the key
  flows.py ........... which flows are the proxy's; where a flow shows it went
  upstream_run.py .... UpstreamRun: one request's attempts over targets and fallback models; its UpstreamResult
  attempt.py ......... one attempt: the request sent to one target, its frozen Attempt, an open stream handed over
  connections.py ..... ConnectionPools (aiohttp sessions, outbound proxies), upstream headers, exceptions classified
  outbound.py ........ outbound proxies (HTTP, HTTPS, SOCKS5): which one a target goes through, and how
  targets.py ......... circuit breakers, load balancing, the per-request order of targets
  stream_answer.py ... StreamAnswer: a stream request's answer, owning its run and its upstream stream
  streaming.py ....... SSE: following events, the first event judged, piping with the idle timeout, clean endings
  answers.py ......... the client's answer once the run is over: passed on, or why the proxy gave up
  errors.py .......... ProxyError: an error the proxy reports itself; reason phrases
  dialects.py ........ OpenAI's and Anthropic's wire shapes: errors, what an event says, stream endings
  sse.py ............. server-sent events framed from bytes, and written back
  resume.py .......... whether a broken reply can be continued, and the continuation request (a prefill)
  splice.py .......... a continuation's events spliced into the client's stream; the seam between the two texts

Tools, beside the product (never loaded by the addon):
  lab/ ............... the replay lab (replay.py), the fault-injecting upstream and the process harness that tests,
                       the lab and the benchmarks share
"""
