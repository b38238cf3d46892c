"""The lab: tools to run, test and measure the proxy with, kept apart from its runtime (nothing the proxy runs
imports them). Used by replay.py, the tests and the benchmarks; run from the project's root.

  replay.py ........... the replay lab (replay.py at the top level): a recorded session reproduced offline against
                        `mitmdump -S`, the recorded and replayed attempt histories compared
  recorded_faults.py .. LabFaults: the `mitmdump -S` script of the replay lab's upstream, which plays each recorded
                        attempt's timing and failure (loaded by path with -s)
  fault_upstream.py ... FaultyUpstream: an OpenAI- and Anthropic-compatible server on 127.0.0.1 that fails as a test
                        scripts it (`python -m seaking.lab.fault_upstream --port 9000` runs one alone)
  harness.py .......... Mitmdump: mitmdump or mitmweb as a subprocess; mitmproxy's "listening at" line; free ports;
                        running_upstreams(): FaultyUpstreams for as long as a block runs
  haproxy.py .......... HAProxy in front of several seaking-proxy processes, configured as docs/haproxy.cfg
"""
