"""A headless Chromium driven over the DevTools protocol through ``--remote-debugging-pipe`` (JSON messages on file
descriptors 3 and 4): no websocket package or network port needed. Shared by the report and dashboard tests."""

from __future__ import annotations

import base64
import fcntl
import io
import json
import os
import queue
import shlex
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
BASH = shutil.which("bash") or "/bin/bash"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", "--disable-extensions", "--mute-audio", "--hide-scrollbars",
         "--remote-debugging-pipe"]


class Browser:
    """A headless Chromium and a minimal DevTools-protocol client over its debugging pipe."""

    def __init__(self, user_data_dir: Path) -> None:
        to_chrome_r, self._to_chrome_w = os.pipe()
        self._from_chrome_r, from_chrome_w = os.pipe()
        # Chromium reads commands on fd 3 and writes replies and events on fd 4. The child ends are moved above 9
        # first, so redirecting onto 3 and 4 cannot clobber one of them; bash (not dash) takes multi-digit fds.
        child_r, child_w = (fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (to_chrome_r, from_chrome_w))
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        cmd = " ".join(shlex.quote(a) for a in [CHROMIUM, *FLAGS, f"--user-data-dir={user_data_dir}", "about:blank"])
        # its log goes to a file: an undrained stderr pipe fills up and stalls the browser
        self.log_path = user_data_dir / "chromium.log"
        with open(self.log_path, "wb") as log:
            script = f"exec {cmd} 3<&{child_r} 4>&{child_w} {child_r}<&- {child_w}>&-"
            self.proc = subprocess.Popen([BASH, "-c", script], pass_fds=(child_r, child_w), stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=log)
        os.close(child_r)
        os.close(child_w)
        self._next_id = 0
        self._messages: queue.Queue[dict[str, Any]] = queue.Queue()
        self.events: list[dict[str, Any]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        buf = b""
        with os.fdopen(self._from_chrome_r, "rb", buffering=0) as f:
            while True:
                chunk = f.read(1 << 16)
                if not chunk:
                    return
                buf += chunk
                while b"\0" in buf:
                    msg, buf = buf.split(b"\0", 1)
                    self._messages.put(json.loads(msg))

    def _pump(self, timeout: float) -> dict[str, Any] | None:
        try:
            msg = self._messages.get(timeout=timeout)
        except queue.Empty:
            return None
        if "id" not in msg:
            self.events.append(msg)
        return msg

    def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None,
             timeout: float = 30.0) -> dict[str, Any]:
        self._next_id += 1
        msg: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to_chrome_w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            reply = self._pump(deadline - time.monotonic())
            if reply is not None and reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
        raise TimeoutError(f"{method}: no reply in {timeout} s")

    def wait_for(self, method: str, timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        seen = len(self.events)
        while time.monotonic() < deadline:
            for e in self.events[seen:]:
                if e.get("method") == method:
                    return e
            seen = len(self.events)
            self._pump(0.1)
        raise TimeoutError(f"no {method} in {timeout} s")

    def drain(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self._pump(0.05)

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=5)
        except Exception:  # noqa: BLE001 - the process is killed below anyway
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_chrome_w)


def open_page(html_path: Path, user_data_dir: Path, width: int = 1280, height: int = 2400) -> dict[str, Any]:
    """Load ``html_path``; return its requests, console/log errors, image states and a viewport screenshot."""
    browser = Browser(user_data_dir)
    try:
        target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Network", "Runtime", "Log"):
            browser.send(f"{domain}.enable", session=session)
        browser.send("Emulation.setDeviceMetricsOverride",
                     {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, session=session)
        url = html_path.resolve().as_uri()
        browser.send("Page.navigate", {"url": url}, session=session)
        browser.wait_for("Page.loadEventFired")
        browser.drain(0.5)  # late console messages and requests
        images = browser.send("Runtime.evaluate", {
            "expression": "JSON.stringify(Array.from(document.images).map(i => [i.complete, i.naturalWidth, "
                          "i.getBoundingClientRect().width]))", "returnByValue": True}, session=session)
        shot = browser.send("Page.captureScreenshot", {"format": "png"}, session=session)
        events = [e for e in browser.events if e.get("sessionId") == session]
    finally:
        browser.close()
    requests = [e["params"]["request"]["url"] for e in events if e["method"] == "Network.requestWillBeSent"]
    errors = [e["params"] for e in events
              if (e["method"] == "Runtime.consoleAPICalled" and e["params"].get("type") in ("error", "assert"))
              or e["method"] == "Runtime.exceptionThrown"
              or (e["method"] == "Log.entryAdded" and e["params"]["entry"].get("level") == "error")]
    return {"url": url, "requests": requests, "errors": errors,
            "images": json.loads(images["result"]["value"]), "png": base64.b64decode(shot["data"])}


def save_screenshot(html_path: Path, out: Path, width: int = 1280, height: int = 2400) -> int:
    """Screenshot ``html_path`` into ``out`` for the README, reduced to 256 dithered colours (about 3x smaller than
    the browser's PNG, still sharp for text and plots). Returns the file size."""
    import tempfile

    from PIL import Image

    with tempfile.TemporaryDirectory(prefix="hwprune-chromium-") as profile:
        png = open_page(html_path, Path(profile), width, height)["png"]
    img = Image.open(io.BytesIO(png)).convert("RGB")
    img.quantize(colors=256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.FLOYDSTEINBERG).save(
        out, optimize=True)
    return out.stat().st_size


if __name__ == "__main__":  # python tests/browser.py RUN_DIR docs/report-screenshot.png
    import sys

    from hwprune.report import build_report

    build_report(sys.argv[1])
    print(save_screenshot(Path(sys.argv[1]) / "report.html", Path(sys.argv[2])))
