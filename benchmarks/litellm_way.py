"""The LiteLLM proxy as one more way of reaching the benchmark's upstream: its own venv, its config, its command.

LiteLLM is installed into a venv of its own (its pins conflict with the project's), kept between runs at
$XDG_CACHE_HOME/seaking-proxy/litellm-venv (default ~/.cache/...). The venv is built in a temporary directory beside
it and renamed into place once it works, so an interrupted install never leaves a half-built venv where a later run
would take it for a good one. It is reused as long as `litellm --version` works there and reports the pinned
version. (Console scripts of a renamed venv point at the temporary path, so the `litellm` script's code is run as
`<venv>/bin/python -c ...`: the interpreter itself does not care where its venv lives.)

What goes into the venv is benchmarks/requirements.txt: LiteLLM's proxy, pinned exactly, and matplotlib for
benchmarks/plot.py. The pin matters: litellm 1.82.7 and 1.82.8 on PyPI were malicious (a hijacked publishing account,
March 2026; 1.82.8 shipped a litellm_init.pth that ran on every interpreter start-up), and 1.107.x is missing from the
index; 1.82.6 is the release many projects pinned as the last known-good one. After installing, the venv is checked
for that .pth file anyway. A cached venv that lacks matplotlib gets it added in place.

The proxy is a plain OpenAI-compatible passthrough: every model name ("*", and model-a explicitly) goes to
openai/<name> at the upstream, with retries comparable to seaking-proxy's defaults (3 retries after the first
attempt, ~1 s before the first retry, 30 s per attempt). Telemetry, the model-cost-map download, the database, the
admin UI and the API docs are off; the proxy binds 127.0.0.1 only.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from seaking.lab.harness import free_port

REQUIREMENTS = Path(__file__).resolve().parent / "requirements.txt"
VERSION = re.search(r"^litellm\[proxy\]==(\S+)", REQUIREMENTS.read_text(), re.MULTILINE).group(1)
# What the `litellm` console script runs; a renamed venv's console scripts point at its old path, so not them.
ENTRY = 'import sys; sys.argv[0] = "litellm"; from litellm import run_server; sys.exit(run_server())'
MALICIOUS_PTH = "litellm_init.pth"
INSTALL_TIMEOUT = 1200  # seconds for pip; a registry that does not answer must not hang the benchmark
VERSION_TIMEOUT = 120  # `--version` imports the whole proxy: several seconds on a small machine
READY = re.compile(r"Uvicorn running on http://127\.0\.0\.1:(?P<port>\d+)")
START_TIMEOUT = 180.0
MODEL_NAMES = ("model-a",)


class Unavailable(Exception):
    """LiteLLM cannot be installed or run here; the benchmark skips the way with this message."""


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "seaking-proxy"


def venv_dir() -> Path:
    return cache_dir() / "litellm-venv"


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def environment() -> dict[str, str]:
    """The LiteLLM process's environment: nothing that phones home, no database, no UI, no keys of the user's."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SEAKING_", "LITELLM_", "OPENAI_", "AZURE_", "ANTHROPIC_", "DATABASE_", "REDIS_"))
           and k not in ("DATABASE_URL", "DIRECT_URL", "PYTHONPATH")}
    env.update({
        "PYTHONUNBUFFERED": "1",
        "LITELLM_TELEMETRY": "False",  # older releases' anonymous usage ping
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # use the bundled cost map instead of downloading it at import
        "DISABLE_ADMIN_UI": "True",
        "NO_DOCS": "True",
        "NO_REDOC": "True",
        "LITELLM_DONT_SHOW_FEEDBACK_BOX": "True",
        "USE_PRISMA_MIGRATE": "False",
        "DISABLE_SCHEMA_UPDATE": "True",
        "LITELLM_MODE": "PRODUCTION",  # do not look for a .env file
    })
    return env


def installed_version(venv: Path) -> str | None:
    """The version `--version` reports in `venv`, or None if it does not run there."""
    python = venv_python(venv)
    if not python.exists():
        return None
    try:
        done = subprocess.run([str(python), "-c", ENTRY, "--version"], capture_output=True,
                              text=True, timeout=VERSION_TIMEOUT, env=environment(), cwd=tempfile.gettempdir(),
                              check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = re.search(r"(\d+\.\d+\.\d+\S*)", done.stdout + done.stderr)
    return found.group(1) if done.returncode == 0 and found else None


def _check_not_compromised(venv: Path) -> None:
    for pth in venv.glob("lib/python*/site-packages/*.pth"):
        if pth.name == MALICIOUS_PTH:
            raise Unavailable(f"{pth} is the file of the compromised litellm releases; refusing to use this venv")


def ensure_venv(progress=lambda message: None) -> tuple[Path, float]:
    """The venv's python, installing LiteLLM first if no good venv is cached; and the seconds the install took (0 if
    the cached venv was reused). Raises Unavailable when it cannot be had."""
    venv = venv_dir()
    if installed_version(venv) == VERSION:
        _check_not_compromised(venv)
        if not has_matplotlib(venv_python(venv)):
            progress(f"adding the rest of {REQUIREMENTS.name} (matplotlib) to {venv} ...")
            _pip_install(venv_python(venv))
        return venv_python(venv), 0.0
    cache_dir().mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix="litellm-venv.building-", dir=cache_dir()))
    started = time.monotonic()
    try:
        progress(f"installing litellm[proxy]=={VERSION} and matplotlib into a venv of their own (once; kept at "
                 f"{venv}) ...")
        base = getattr(sys, "_base_executable", sys.executable)
        _run([base, "-m", "venv", str(building)], "creating the venv", 120)
        _pip_install(venv_python(building))
        _check_not_compromised(building)
        reported = installed_version(building)
        if reported != VERSION:
            raise Unavailable(f"after installing, `litellm --version` says {reported!r}, not {VERSION}")
        if venv.exists():  # an old or broken venv: out of the way first, then removed
            stale = Path(tempfile.mkdtemp(prefix="litellm-venv.stale-", dir=cache_dir()))
            venv.rename(stale / "venv")
            shutil.rmtree(stale, ignore_errors=True)
        try:
            building.rename(venv)
        except OSError:  # another run got there first; use its venv if it is good
            if installed_version(venv) != VERSION:
                raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return venv_python(venv), round(time.monotonic() - started, 1)


def _pip_install(python: Path) -> None:
    _run([str(python), "-m", "pip", "install", "--disable-pip-version-check", "--no-input", "--quiet",
          "-r", str(REQUIREMENTS)], f"pip install -r {REQUIREMENTS}", INSTALL_TIMEOUT)


def plotting_python(litellm_python: Path) -> Path | None:
    """A Python that can import matplotlib, for the plots: SEAKING_PLOT_PYTHON, this one, or the LiteLLM venv's."""
    if os.environ.get("SEAKING_PLOT_PYTHON"):
        return Path(os.environ["SEAKING_PLOT_PYTHON"])
    if importlib.util.find_spec("matplotlib") is not None:
        return Path(sys.executable)
    if litellm_python.exists() and has_matplotlib(litellm_python):
        return litellm_python
    return None


def has_matplotlib(python: Path) -> bool:
    try:
        done = subprocess.run([str(python), "-c", "import matplotlib"], capture_output=True, timeout=60, check=False)
        return done.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _run(argv: list[str], what: str, timeout: float) -> None:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                              check=False)
    except subprocess.TimeoutExpired:
        raise Unavailable(f"{what}: no result within {timeout:.0f} s") from None
    except OSError as e:
        raise Unavailable(f"{what}: {e}") from None
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-8:])
        raise Unavailable(f"{what} failed ({done.returncode}):\n{tail}")


def config_yaml(upstream: str) -> str:
    """model_list: every name to openai/<name> at the upstream; retries like seaking-proxy's defaults."""
    api_base = upstream.rstrip("/") + "/v1"
    # max_retries: 0 turns the OpenAI SDK's own retries off; the router's num_retries do the retrying.
    params = ('      api_base: "{base}"\n      api_key: "sk-bench-dummy"\n      timeout: 30\n'
              '      stream_timeout: 60\n      max_retries: 0\n')
    models = "".join(
        f'  - model_name: "{name}"\n    litellm_params:\n      model: "openai/{target}"\n'
        + params.format(base=api_base)
        for name, target in [*((n, n) for n in MODEL_NAMES), ("*", "*")]
    )
    return (
        "model_list:\n" + models
        + "router_settings:\n"
        "  num_retries: 3\n"  # like seaking-proxy's max_retries: 3
        "  retry_after: 1\n"  # at least 1 s before a retry, like seaking-proxy's base_delay
        "  timeout: 300\n"  # all attempts of one request together, like seaking-proxy's deadline
        "litellm_settings:\n"
        "  num_retries: 3\n"
        "  request_timeout: 30\n"
        "  telemetry: false\n"
        "  drop_params: true\n"
        "general_settings:\n"
        "  disable_spend_logs: true\n"
        "  disable_reset_budget: true\n"
        "  disable_adding_master_key_hash_to_db: true\n"
    )


def command(python: Path, upstream: str, workdir: Path) -> list[str]:
    port = free_port()  # LiteLLM's CLI cannot be told to pick one itself and report it
    config = workdir / f"litellm-{port}.yaml"
    config.write_text(config_yaml(upstream))
    return [str(python), "-c", ENTRY, "--config", str(config), "--host", "127.0.0.1",
            "--port", str(port), "--num_workers", "1", "--telemetry", "False"]
