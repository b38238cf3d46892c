"""Make docs/sillytavern-resume.png: SillyTavern 1.19 in headless Chromium, its upstream's stream dropped mid-reply and
continued by the proxy — the user sees one whole reply and no error toast.

    python3 -m venv /tmp/pw-st && /tmp/pw-st/bin/pip install playwright aiohttp pyyaml
    /tmp/pw-st/bin/python docs/sillytavern_screenshot.py [--mitmdump .venv/bin/mitmdump]

The fault upstream (seaking/lab/fault_upstream.py, in this process) drops its first stream after 12 words of a 60-word
reply and answers the proxy's continuation request (the reply so far as a trailing assistant message) with the rest.
SillyTavern 1.19.0 comes from the tests' npm cache (tests/sillytavern.py: ~/.cache/seaking-proxy/sillytavern-1.19.0,
installed there if missing) with a fresh data directory under /tmp; its first start on a machine builds its frontend
bundle (~35 s). The script checks that the page's last message is the whole reply and that no error toast shows, and
exits 1 if not. Uses Debian's chromium (/usr/bin/chromium), never a downloaded browser. Everything listens on
127.0.0.1, and every process it starts is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
from pathlib import Path

import aiohttp
from playwright.async_api import Page, async_playwright
from playwright.async_api import TimeoutError as PlaywrightTimeout

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a file by another venv's python (playwright's)
sys.path.insert(0, str(ROOT / "tests"))  # SillyTavern's install and config, as the tests have them

from cached_install import kill_group  # noqa: E402
from seaking.lab.fault_upstream import FaultyUpstream, Stream, split_words  # noqa: E402
from seaking.lab.harness import Mitmdump, free_port  # noqa: E402
from sillytavern import _config, ensure_installed  # noqa: E402

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
MESSAGE = "Tell me about the sea king, please."
REPLY = (
    "Far beyond the last lighthouse, where the charts give up and the water turns the colour of old glass, the sea king "
    "keeps his court. He wears a crown of barnacles and listens to every ship that passes overhead. When a storm "
    "breaks a sailor's story in the middle, he catches the pieces and finishes it himself, so that no tale is ever "
    "lost at sea."
)
DROP_AFTER = 12  # words of the reply in the first stream, then the upstream closes the connection
ST_START_TIMEOUT = 180  # seconds; the first start builds the frontend bundle
REPLY_TIMEOUT = 60


async def start_sillytavern(workdir: Path) -> tuple[asyncio.subprocess.Process, str]:
    """SillyTavern 1.19.0 as tests/sillytavern.py starts it, but with its content check on (else the page's settings do
    not load) and its data in `workdir`; (process, URL) once it answers /csrf-token."""
    package = (await ensure_installed()) / "node_modules" / "sillytavern"
    node = shutil.which("node")
    if node is None:
        raise RuntimeError("node is not on PATH: install Node.js (20 or later)")
    port = free_port()
    data_root = workdir / "sillytavern-data"
    data_root.mkdir(parents=True)
    shared_bundle = package / "dist" / "_webpack"  # built once per machine, shared with the tests
    shared_bundle.mkdir(parents=True, exist_ok=True)
    (data_root / "_webpack").symlink_to(shared_bundle, target_is_directory=True)
    config = json.loads(_config(data_root, port))
    config["skipContentCheck"] = False
    config_path = workdir / "sillytavern-config.yaml"
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    log_path = workdir / "sillytavern.log"
    with open(log_path, "ab") as log:
        process = await asyncio.create_subprocess_exec(
            node, str(package / "server.js"), "--configPath", str(config_path),
            cwd=package, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    loop = asyncio.get_running_loop()
    deadline = loop.time() + ST_START_TIMEOUT
    async with aiohttp.ClientSession() as client:
        while loop.time() < deadline:
            if process.returncode is not None:
                raise RuntimeError(f"SillyTavern exited with {process.returncode}; see {log_path}")
            try:
                async with client.get(url + "/csrf-token", timeout=aiohttp.ClientTimeout(total=5)) as response:
                    if response.status == 200:
                        return process, url
            except (aiohttp.ClientError, TimeoutError):
                pass  # not listening yet
            await asyncio.sleep(0.5)
    await kill_group(process)
    raise RuntimeError(f"SillyTavern did not answer within {ST_START_TIMEOUT} s; see {log_path}")


async def welcome(page: Page) -> None:
    """A fresh SillyTavern greets its user with a persona-name dialog: keep "User"."""
    dialog = page.locator("dialog[open]:has(.onboarding)")
    try:
        await dialog.wait_for(state="visible", timeout=15_000)
    except PlaywrightTimeout:
        return
    await dialog.locator(".popup-button-ok").click()
    await dialog.wait_for(state="detached")


async def connect(page: Page, proxy_url: str) -> None:
    """API Connections: Chat Completion, Custom (OpenAI-compatible), the proxy's URL; Connect; model-a."""
    await page.click("#sys-settings-button .drawer-toggle")
    await page.select_option("#main_api", "openai")
    await page.select_option("#chat_completion_source", "custom")
    await page.fill("#custom_api_url_text", proxy_url + "/v1")
    await page.click("#api_button_openai")
    await page.wait_for_selector("#model_custom_select option[value='model-a']", state="attached", timeout=30_000)
    if await page.input_value("#model_custom_select") != "model-a":
        await page.select_option("#model_custom_select", "model-a")
    await page.wait_for_function(
        "document.querySelector('#send_textarea').getAttribute('placeholder')"
        " !== document.querySelector('#send_textarea').getAttribute('no_connection_text')",
        timeout=30_000,
    )
    await page.click("#sys-settings-button .drawer-toggle")  # close the drawer again


async def stream_on(page: Page) -> None:
    """AI Response Configuration: Streaming on (a fresh 1.19 may have it on already)."""
    await page.click("#ai-config-button .drawer-toggle")
    if not await page.is_checked("#stream_toggle"):
        await page.check("#stream_toggle")
    await page.click("#ai-config-button .drawer-toggle")


async def main(mitmdump: str, out: Path) -> int:
    words = split_words(REPLY)
    upstream = FaultyUpstream()
    await upstream.start()
    workdir = Path(tempfile.mkdtemp(prefix="seaking-st-screenshot-"))
    config = workdir / "seaking-config.yaml"
    config.write_text('{"target_proxy": {"prefill": "assistant"}, "health_check": {"interval": 0}}\n')
    proxy = Mitmdump("--mode", f"reverse:{upstream.url}", "--set", f"seaking_config={config}")
    proxy.args[0] = mitmdump  # the project's mitmproxy, not one beside this (playwright's) interpreter
    sillytavern = None
    try:
        proxy_url = await proxy.start()
        sillytavern, st_url = await start_sillytavern(workdir)
        print(f"upstream {upstream.url}, proxy {proxy_url}, SillyTavern {st_url} (data in {workdir})")
        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
            page = None
            try:
                page = await browser.new_page(viewport={"width": 1280, "height": 800})
                page.set_default_timeout(30_000)
                await page.goto(st_url)
                await page.wait_for_selector("#send_textarea", state="visible", timeout=120_000)
                await page.wait_for_selector("#preloader", state="detached", timeout=120_000)
                await welcome(page)
                await connect(page, proxy_url)
                await stream_on(page)
                upstream.script(
                    "chat/completions",
                    Stream(chunks=words, delay=0.08, drop_after=DROP_AFTER),
                    Stream(chunks=words, delay=0.08),
                )
                await page.fill("#send_textarea", MESSAGE)
                await page.click("#send_but")
                await page.wait_for_selector("#mes_stop", state="visible", timeout=30_000)  # generating
                await page.wait_for_selector("#mes_stop", state="hidden", timeout=REPLY_TIMEOUT * 1000)  # done
                await page.wait_for_timeout(1000)
                shown = (await page.inner_text("#chat .mes.last_mes .mes_text")).strip()
                toasts = await page.locator("#toast-container .toast-error:visible").all_inner_texts()
                await page.screenshot(path=str(out))
            except Exception:
                if page is not None:
                    await page.screenshot(path=str(workdir / "failed.png"))
                    print(f"failed; the page as it was: {workdir / 'failed.png'}")
                print(f"SillyTavern's log: {workdir / 'sillytavern.log'}")
                raise
            finally:
                await browser.close()
    finally:
        if sillytavern is not None:
            await kill_group(sillytavern)
        await proxy.stop()
        await upstream.stop()
    requests = upstream.received_at("chat/completions")
    streamed = bool(requests) and all(request.json().get("stream") is True for request in requests)
    continuation = requests[1].json()["messages"][-1] if len(requests) > 1 else {}
    whole = shown == REPLY.strip()
    ok = whole and not toasts and streamed and len(requests) == 2 and continuation.get("role") == "assistant"
    print(f"upstream chat requests: {len(requests)}, streamed: {streamed}")
    if continuation:
        print(f"  the second a continuation, its last message the {continuation.get('role')}'s: {continuation.get('content')!r}")
    print(f"last message is the whole reply: {whole}")
    if not whole:
        print(f"  shown:    {shown!r}\n  expected: {REPLY.strip()!r}")
    print(f"error toasts: {toasts or 'none'}")
    print(f"screenshot: {out}")
    print("OK" if ok else "FAILED")
    if ok:
        shutil.rmtree(workdir)
    else:
        print(f"SillyTavern's data and log kept in {workdir}")
    return 0 if ok else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mitmdump", default=str(ROOT / ".venv" / "bin" / "mitmdump"))
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "sillytavern-resume.png")
    args = parser.parse_args()
    sys.exit(asyncio.run(main(args.mitmdump, args.out)))
