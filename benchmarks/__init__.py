"""Benchmarks: what the proxy costs, measured, never asserted. A package, run as modules from the project's root with
the project's venv (`.venv/bin/python -m benchmarks.bench --quick`); the fake upstream and the harness come from the
lab, seaking/lab/.

Commands:
  bench.py ........... python -m benchmarks.bench: every way side by side, round by round; writes docs/benchmark.md,
                       its JSON and PNG (the rounds and the command line; method and setup in its docstring)
  profile.py ......... python -m benchmarks.profile: where a request's cost goes inside the proxy process
  daily_ops.py ....... python -m benchmarks.daily_ops: how quickly a config reload and a shutdown act
  plot.py ............ python -m benchmarks.plot RAW.json OUT.png: the report's chart (needs matplotlib)
  bench_upstream.py .. python -m benchmarks.bench_upstream: the benchmark's upstream, as a process of its own
  soak.py ............ python -m benchmarks.soak [--minutes 30] [--streams 200]: the chaos soak, every fault at once
                       with upstreams killed and the config reloaded; writes docs/soak.md, its JSON and PNG (not in
                       CI: it runs for minutes)
  soak_upstream.py ... python -m benchmarks.soak_upstream: the soak's upstream process, and the recipe of each case
  soak_plot.py ....... python -m benchmarks.soak_plot SOAK.json OUT.png: the soak report's chart (needs matplotlib)

The parts of bench.py:
  scenarios.py ....... what one round measures, and the load generator (chat and stream clients)
  processes.py ....... the processes (log file, process group, "listening at"), the upstream, the ways of reaching
                       it, memory and open files watched during a run
  stats.py ........... percentiles, summaries, medians and ranges of the rounds, ratios, the goals
  report.py .......... progress lines, the markdown tables and summary, the environment of a run

Beside them:
  floor_addon.py ..... a mitmdump script (`mitmdump -s benchmarks/floor_addon.py`): the floor of the proxy's design
  litellm_way.py ..... the LiteLLM proxy as one more way: its own venv (requirements.txt), config and command
"""
