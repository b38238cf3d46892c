"""Make docs/mitmweb.png: mitmweb with the addon — a retried request and its attempt flows, a stream continued after a
drop, a hedged request, a plain answer with its tokens — in headless Chromium.

    python3 -m venv /tmp/pw && /tmp/pw/bin/pip install playwright aiohttp
    /tmp/pw/bin/python docs/mitmweb_screenshot.py [--mitmweb .venv/bin/mitmweb]

Uses Debian's chromium (/usr/bin/chromium), never a downloaded browser, and Debian's fonts-noto-color-emoji for the
marks. Everything listens on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

import aiohttp
from playwright.async_api import async_playwright

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a file by another venv's python (playwright's)

from seaking.lab.fault_upstream import Delayed, FaultyUpstream, Hang, Status, Stream  # noqa: E402
from seaking.lab.harness import free_ports  # noqa: E402

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
PASSWORD = "screenshot"
COLUMNS = ["icon", "path", "method", "status", "size", "time", "comment"]


async def main(mitmweb: str, out: Path) -> None:
    upstream = FaultyUpstream()
    await upstream.start()
    proxy_port, web_port = free_ports(2)
    config = Path("/tmp/seaking-screenshot-config.yaml")
    config.write_text(
        "target_proxy: {prefill: assistant, timeout: 1}\nerror_handling: {base_delay: 0.2, max_delay: 0.4}\n"
        "health_check: {interval: 0}\n"
    )
    process = await asyncio.create_subprocess_exec(
        mitmweb, "-s", str(ROOT / "addon.py"), "--mode", f"reverse:{upstream.url}", "--listen-host", "127.0.0.1",
        "--listen-port", str(proxy_port), "--no-web-open-browser", "--web-host", "127.0.0.1", "--web-port", str(web_port),
        "--set", f"web_password={PASSWORD}", "--set", f"seaking_config={config}",
        *[arg for column in COLUMNS for arg in ("--set", f"web_columns={column}")],
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        for _ in range(300):  # until mitmweb listens
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", proxy_port)
                writer.close()
                break
            except OSError:
                await asyncio.sleep(0.1)
        proxy = f"http://127.0.0.1:{proxy_port}/v1/chat/completions"
        headers = {"Authorization": "Bearer sk-my-secret-key-123"}
        chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello!"}]}
        async with aiohttp.ClientSession() as client:
            await (await client.get(f"http://127.0.0.1:{proxy_port}/v1/models", headers=headers)).read()
            upstream.script("chat/completions", Status(503, headers={"Retry-After": "1"}), Status(502))
            await (await client.post(proxy, json=chat, headers=headers)).read()
            words = ["Once", " upon", " a", " time", " a", " fox", " lived", " by", " the", " river."]
            upstream.script("chat/completions", Stream(chunks=words, delay=0.1, drop_after=4), Stream(chunks=words, delay=0.1))
            await (await client.post(proxy, json={**chat, "stream": True}, headers=headers)).read()
            upstream.script("chat/completions", Delayed(1.6), Hang())  # a slow first attempt, hedged after 1 s: it wins
            await (await client.post(proxy, json=chat, headers=headers)).read()
            await (await client.post(proxy, json=chat, headers=headers)).read()
        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
            page = await browser.new_page(viewport={"width": 1920, "height": 720})
            await page.goto(f"http://127.0.0.1:{web_port}/?token={PASSWORD}")
            await page.wait_for_selector("text=answered first")
            await page.click("text=resumed after a drop")  # the continued stream: what its client was sent
            await page.click("text=Response")
            await page.add_style_tag(content=".col-comment { width: 620px !important; text-align: left !important; }")
            splitter = await page.query_selector(".splitter")  # give the list the room its comments need
            box = await splitter.bounding_box()
            await page.mouse.move(box["x"] + box["width"] / 2, box["y"] + 200)
            await page.mouse.down()
            await page.mouse.move(1300, box["y"] + 200, steps=10)
            await page.mouse.up()
            await page.wait_for_timeout(500)
            await page.screenshot(path=str(out))
            await browser.close()
    finally:
        process.send_signal(signal.SIGINT)
        await asyncio.wait_for(process.wait(), 10)
        await upstream.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mitmweb", default=str(ROOT / ".venv" / "bin" / "mitmweb"))
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "mitmweb.png")
    args = parser.parse_args()
    asyncio.run(main(args.mitmweb, args.out))
