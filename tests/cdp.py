"""A small headless-Chromium driver over the Chrome DevTools Protocol (no Selenium/Playwright needed).

Uses the `websockets` package (installed with dagster-webserver via uvicorn[standard]).
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

from ops_helpers import free_port, wait_for
from process_group import stop_process_group

BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    for name in BROWSER_NAMES:
        p = shutil.which(name)
        if p:
            return p
    return None


class Browser:
    def __init__(self, exe: str, width: int = 1600, height: int = 1000):
        from websockets.sync.client import connect

        self.width, self.height = width, height
        self.profile = tempfile.mkdtemp(prefix="stepml-chromium-")
        port = free_port()
        args = [
            exe,
            "--headless=new",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--hide-scrollbars",
            "--mute-audio",
            f"--remote-debugging-port={port}",
            "--remote-debugging-address=127.0.0.1",
            f"--user-data-dir={self.profile}",
            f"--window-size={width},{height}",
            "about:blank",
        ]
        if os.geteuid() == 0:
            args.insert(1, "--no-sandbox")  # Chromium refuses to start its sandbox as root
        self.log = open(Path(self.profile) / "chromium.log", "w")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        base = f"http://127.0.0.1:{port}"

        def page_ws():
            try:
                with urllib.request.urlopen(f"{base}/json/list", timeout=2) as r:
                    pages = [t for t in json.load(r) if t.get("type") == "page"]
            except OSError:
                return None
            return pages[0]["webSocketDebuggerUrl"] if pages else None

        url = wait_for(page_ws, 60, 0.3, "Chromium's DevTools endpoint")
        self.ws = connect(url, max_size=None, open_timeout=30).__enter__()  # websockets >= 17.1 wants a context manager
        self._ids = itertools.count(1)
        self.call("Page.enable")
        self.call("Runtime.enable")
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    def call(self, method: str, timeout: float = 60, **params):
        i = next(self._ids)
        self.ws.send(json.dumps({"id": i, "method": method, "params": params}))
        end = time.monotonic() + timeout
        while True:
            msg = json.loads(self.ws.recv(timeout=max(0.1, end - time.monotonic())))
            if msg.get("id") == i:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def goto(self, url: str) -> None:
        self.call("Page.navigate", url=url)
        self.wait_js("document.readyState === 'complete'", 60, "page load")

    def js(self, expression: str):
        r = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return r.get("result", {}).get("value")

    def text(self) -> str:
        return self.js("document.body ? document.body.innerText : ''") or ""

    def wait_js(self, expression: str, timeout: float, what: str):
        return wait_for(lambda: self.js(expression), timeout, 0.5, what)

    def wait_text(self, needles: list[str], timeout: float = 60):
        cond = " && ".join(f"document.body.innerText.includes({json.dumps(n)})" for n in needles)
        return self.wait_js(f"!!document.body && {cond}", timeout, f"page text {needles}")

    def key(self, key: str, code: str, vk: int, modifiers: int = 0) -> None:
        for t in ("rawKeyDown", "keyUp"):
            self.call(
                "Input.dispatchKeyEvent", type=t, key=key, code=code, windowsVirtualKeyCode=vk, modifiers=modifiers
            )

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        try:
            self.ws.__exit__(None, None, None)
        except Exception:
            pass
        stop_process_group(self.proc, wait_s=15, kill_wait_s=5)  # the browser and its helper processes
        self.log.close()
        shutil.rmtree(self.profile, ignore_errors=True)
