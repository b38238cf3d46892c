"""The official SDKs (openai, anthropic) as real clients: each in its own venv, run as a subprocess.

Why separate venvs: current SDKs need h11 >= 0.16 (through httpx/httpcore) while mitmproxy 11 pins h11 <= 0.14, so they
cannot share the project's .venv. Each SDK gets a venv built once and cached (cached_install.py), and a test runs a
small script with that venv's python while the proxy and the fault upstream serve in the test's event loop. The script
reads its request as JSON from argv[1] and prints its result as one JSON line, last.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from cached_install import check, install_once, run

VENV_TIMEOUT = 180  # python -m venv, with ensurepip: ~5 s
PIP_TIMEOUT = 600  # a cold install of an SDK and its dependencies: well under a minute
IMPORT_TIMEOUT = 60
SCRIPT_TIMEOUT = 60  # one SDK subprocess: interpreter start, the import (~1 s), its calls

_pythons: dict[Path, Path] = {}


def venv_dir(name: str, environment_variable: str) -> Path:
    """~/.cache/seaking-proxy/<name>, or where the environment variable says."""
    return Path(os.environ.get(environment_variable) or Path.home() / ".cache" / "seaking-proxy" / name)


async def ensure_sdk_python(root: Path, requirement: str, module: str) -> Path:
    """The python of the venv at `root` where `import module` works, creating it first (pip install requirement)."""
    if root not in _pythons:

        async def imports_module(candidate: Path) -> bool:
            python = candidate / "bin" / "python"
            return python.exists() and (await run([str(python), "-c", f"import {module}"], IMPORT_TIMEOUT))[0] == 0

        async def install(staging: Path) -> None:
            # sys.executable is always there; venv builds on its base interpreter, not on the project's .venv.
            check("python -m venv", *await run([sys.executable, "-m", "venv", str(staging)], VENV_TIMEOUT))
            pip = [str(staging / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check", "--no-input"]
            check(f"pip install {requirement}", *await run([*pip, "--retries", "2", requirement], PIP_TIMEOUT))

        # A renamed venv still works through `bin/python` (its prefix is found from pyvenv.cfg beside it); only the
        # shebangs of its console scripts keep the staging path, and nothing here uses them.
        _pythons[root] = (await install_once(root, imports_module, install, PIP_TIMEOUT)) / "bin" / "python"
    return _pythons[root]


async def run_sdk_script(python: Path, script: str, request: dict, env_prefix: str) -> dict:
    """Run `script` with the SDK's python; its result. Fails the test if the script hangs or crashes."""
    # httpx honours proxy variables, which would send these loopback calls elsewhere; the SDK's own variables
    # (OPENAI_*, ANTHROPIC_*) could change the client.
    env = {k: v for k, v in os.environ.items() if not (k.lower().endswith("_proxy") or k.startswith(env_prefix))}
    try:
        returncode, output = await run([str(python), "-c", script, json.dumps(request)], SCRIPT_TIMEOUT, env=env)
    except TimeoutError:
        pytest.fail(f"the SDK did not finish within {SCRIPT_TIMEOUT} s (it hangs)")
    assert returncode == 0, f"the SDK script crashed:\n{output}"
    result = json.loads(output.strip().splitlines()[-1])
    print(json.dumps(result))  # shown with -s or on failure
    return result
