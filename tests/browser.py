"""Headless Chromium driven over the DevTools protocol (a websocket on 127.0.0.1), for UI tests.

``--dump-dom`` gives the DOM but not the layout: whether an element is drawn, and where, needs
the page's own ``getBoundingClientRect``. This opens a page, waits until a script run in it
says it is ready, and gives back that script's answer, the page's text and a screenshot.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Rendered:
    answer: dict
    """What the ``ready`` script returned last (``{"ok": true, ...}`` when it was ready)."""
    text: str
    """The page's visible text, then its HTML."""


def render(url: str, profile: Path, screenshot: Path, ready: str, timeout_s: float = 90.0) -> Rendered:
    """Open ``url`` in a fresh headless Chromium (profile folder ``profile``), evaluate ``ready``
    (a JavaScript expression giving a JSON string with an ``ok`` field) once a second until it
    says ok or ``timeout_s`` passes, then save a screenshot of the page."""
    profile.mkdir(parents=True, exist_ok=True)
    (profile / "DevToolsActivePort").unlink(missing_ok=True)
    cmd = ["chromium", "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
           f"--user-data-dir={profile}", "--window-size=1600,1800", "--remote-debugging-address=127.0.0.1",
           "--remote-debugging-port=0", "about:blank"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        port = _port(profile / "DevToolsActivePort", proc)
        return asyncio.run(_drive(port, url, screenshot, ready, timeout_s))
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # its own process group: Chromium and its helpers
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def _port(path: Path, proc: subprocess.Popen, timeout_s: float = 60.0) -> int:
    """The debugging port Chromium chose (the first line of ``DevToolsActivePort``)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"chromium exited with {proc.returncode} before it listened")
        if path.is_file() and path.read_text().strip():
            return int(path.read_text().split()[0])
        time.sleep(0.1)
    raise TimeoutError(f"chromium wrote no {path.name} in {timeout_s:.0f} s")


async def _drive(port: int, url: str, screenshot: Path, ready: str, timeout_s: float) -> Rendered:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/json/list") as r:
            targets = await r.json()
        ws_url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
        async with session.ws_connect(ws_url, max_msg_size=0) as ws:
            ids = iter(range(1, 1 << 30))

            async def call(method: str, **params) -> dict:
                n = next(ids)
                await ws.send_json({"id": n, "method": method, "params": params})
                while True:  # events arrive between the answers; ours carries our id
                    msg = await ws.receive_json()
                    if msg.get("id") == n:
                        if "error" in msg:
                            raise RuntimeError(f"{method}: {msg['error']}")
                        return msg["result"]

            async def evaluate(expression: str):
                result = await call("Runtime.evaluate", expression=expression, returnByValue=True)
                return result["result"].get("value")

            await call("Page.navigate", url=url)
            answer: dict = {"ok": False}
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                await asyncio.sleep(1.0)
                answer = json.loads(await evaluate(ready) or '{"ok": false}')
                if answer.get("ok"):
                    break
            text = await evaluate("document.body.innerText + '\\n' + document.documentElement.outerHTML")
            shot = await call("Page.captureScreenshot", format="png")
            screenshot.write_bytes(base64.b64decode(shot["data"]))
            return Rendered(answer, text or "")


def text_has(expect: tuple[str, ...]) -> str:
    """A ``ready`` script: ok once the page's text or HTML holds every string of ``expect``."""
    wanted = json.dumps(list(expect))
    return (
        "(() => { const t = document.body ? document.body.innerText + document.documentElement.outerHTML : '';"
        f" const missing = {wanted}.filter(e => !t.includes(e));"
        " return JSON.stringify({ok: missing.length === 0, missing}); })()"
    )
