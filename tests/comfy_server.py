"""A real ComfyUI server for the end-to-end tests: start it on loopback with the pack installed, talk HTTP and
websocket to it (stdlib only: the test environment need not have a websocket package), stop it.

The server runs from COMFYUI_DIR with COMFYUI_PYTHON (default: a venv next to the checkout, `<dir>/../venv` or
`<dir>/venv`, else this interpreter), in an isolated --base-directory holding the tiny checkpoints under the
standard Comfy-Org names and the pack symlinked into custom_nodes/.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import struct
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACK_NAME = "comfyui-fluxcore"


def comfy_python(comfy_dir: Path) -> str:
    env = os.environ.get("COMFYUI_PYTHON")
    if env:
        return env
    for venv in (comfy_dir.parent / "venv", comfy_dir / "venv", comfy_dir / ".venv"):
        if (venv / "bin" / "python").exists():
            return str(venv / "bin" / "python")
    import sys

    return sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_base(base: Path) -> dict:
    """The server's --base-directory: tiny models under the standard names (and tiny LoRAs under the names the LoRA
    workflows pick), the pack linked into custom_nodes/."""
    from lora_fixtures import write_demo_loras

    from flux_core.demo import write_demo_checkpoints

    paths = write_demo_checkpoints(base / "models")
    write_demo_loras(paths)
    (base / "custom_nodes").mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / PACK_NAME
    if not link.exists():
        link.symlink_to(ROOT, target_is_directory=True)
    for sub in ("input", "output", "temp", "user"):
        (base / sub).mkdir(exist_ok=True)
    return paths


class ComfyServer:
    def __init__(self, comfy_dir: Path, base: Path, extra_args=()):
        self.comfy_dir, self.base = Path(comfy_dir), Path(base)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.base / "server.log"
        self.extra_args = list(extra_args)
        self.proc = None

    def start(self, timeout: float = 240.0) -> "ComfyServer":
        cmd = [comfy_python(self.comfy_dir), str(self.comfy_dir / "main.py"), "--cpu", "--listen", "127.0.0.1",
               "--port", str(self.port), "--disable-auto-launch", "--disable-api-nodes",
               "--base-directory", str(self.base), "--database-url", "sqlite:///:memory:", *self.extra_args]
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FLUXCORE_MODELS_DIR")}
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=self.comfy_dir, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                self.get("/system_stats")
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(1.0)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer within {timeout:.0f} s:\n{self.log()[-4000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if getattr(self, "_log", None):
            self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # ------------------------------------------------------------------------------------------------ HTTP
    def request(self, path: str, data=None, method=None, headers=None, timeout=60.0):
        body = json.dumps(data).encode() if isinstance(data, (dict, list)) else data
        hdrs = {"Content-Type": "application/json"} if isinstance(data, (dict, list)) else {}
        hdrs.update(headers or {})
        req = urllib.request.Request(self.url + path, data=body, headers=hdrs, method=method)
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()

    def get(self, path: str):
        status, raw = self.request(path)
        return json.loads(raw) if raw else None

    def post(self, path: str, data: dict):
        try:
            status, raw = self.request(path, data, method="POST")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")
        return status, (json.loads(raw) if raw.strip() else None)

    def history(self, prompt_id: str, timeout: float = 30.0) -> dict:
        """The prompt's history entry; ComfyUI writes it just after the execution_success message, so poll."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry:
                return entry
            time.sleep(0.2)
        raise TimeoutError(f"no history for {prompt_id}")

    def upload_image(self, name: str, png: bytes) -> dict:
        boundary = uuid.uuid4().hex
        parts = [f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{name}\"\r\n"
                 "Content-Type: image/png\r\n\r\n".encode() + png + b"\r\n",
                 f"--{boundary}\r\nContent-Disposition: form-data; name=\"overwrite\"\r\n\r\ntrue\r\n".encode(),
                 f"--{boundary}--\r\n".encode()]
        status, raw = self.request("/upload/image", b"".join(parts), "POST",
                                   {"Content-Type": f"multipart/form-data; boundary={boundary}"})
        return json.loads(raw)

    def view(self, image: dict) -> bytes:
        q = urllib.parse.urlencode({"filename": image["filename"], "subfolder": image.get("subfolder", ""),
                                    "type": image.get("type", "output")})
        return self.request(f"/view?{q}")[1]

    def queue(self, prompt: dict, client_id: str, workflow: dict | None = None):
        body = {"prompt": prompt, "client_id": client_id}
        if workflow is not None:
            body["extra_data"] = {"extra_pnginfo": {"workflow": workflow}}
        return self.post("/prompt", body)

    def websocket(self, client_id: str) -> "WebSocket":
        return WebSocket("127.0.0.1", self.port, f"/ws?clientId={client_id}")


class WebSocket:
    """The client half of RFC 6455, enough for ComfyUI's /ws: text (JSON) and binary frames, ping/pong, close."""

    def __init__(self, host: str, port: int, path: str, timeout: float = 120.0):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
                           ).encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(1)  # byte by byte: frames may follow the headers in the same packet
            if not chunk:
                raise ConnectionError("websocket handshake: connection closed")
            head += chunk
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise ConnectionError(f"websocket handshake failed: {head[:200]!r}")

    def _exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("websocket closed")
            buf += chunk
        return buf

    def _send(self, opcode: int, payload: bytes = b"") -> None:
        mask, n = os.urandom(4), len(payload)
        if n < 126:
            head = bytes([0x80 | opcode, 0x80 | n])
        elif n < 65536:
            head = bytes([0x80 | opcode, 0x80 | 126]) + struct.pack(">H", n)
        else:
            head = bytes([0x80 | opcode, 0x80 | 127]) + struct.pack(">Q", n)
        masked = (int.from_bytes(payload, "little") ^ int.from_bytes((mask * (n // 4 + 1))[:n], "little"))
        self.sock.sendall(head + mask + masked.to_bytes(n, "little"))

    def send_json(self, obj) -> None:
        self._send(1, json.dumps(obj).encode())

    def recv(self):
        """Next message: a dict for JSON text frames, ("binary", bytes) for binary ones."""
        data, first_op = b"", None
        while True:
            b0, b1 = self._exact(2)
            op, n = b0 & 0x0F, b1 & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._exact(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._exact(8))[0]
            if b1 & 0x80:  # servers never mask; handled for completeness
                mask = self._exact(4)
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(self._exact(n)))
            else:
                payload = self._exact(n)
            if op == 9:
                self._send(10, payload)
                continue
            if op == 8:
                raise ConnectionError("websocket closed by the server")
            if op in (1, 2):
                first_op = op
            data += payload
            if b0 & 0x80:
                return json.loads(data) if first_op == 1 else ("binary", data)

    def close(self) -> None:
        try:
            self._send(8)
        except OSError:
            pass
        self.sock.close()


def follow(ws: WebSocket, prompt_id: str, timeout: float = 300.0) -> list:
    """Collect this prompt's messages until it succeeds, fails or is interrupted (inclusive)."""
    msgs, deadline = [], time.time() + timeout
    ws.sock.settimeout(timeout)
    while time.time() < deadline:
        m = ws.recv()
        if isinstance(m, tuple):
            msgs.append(m)
            continue
        data = m.get("data", {})
        if data.get("prompt_id") not in (None, prompt_id):
            continue
        msgs.append(m)
        if m["type"] in ("execution_success", "execution_error", "execution_interrupted"):
            return msgs
        if m["type"] == "executing" and data.get("node") is None and data.get("prompt_id") == prompt_id:
            return msgs
    raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout} s")


def png_bytes(width: int, height: int, seed: int) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = (rng.random((height, width, 3)) * 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def cleanup(base: Path) -> None:
    link = base / "custom_nodes" / PACK_NAME
    if link.is_symlink():
        link.unlink()  # never follow the link into the repository
    shutil.rmtree(base, ignore_errors=True)


class Browser:
    """Headless Debian chromium driven over the Chrome DevTools Protocol (no browser download, no Node)."""

    FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-default-apps", "--remote-allow-origins=*", "--hide-scrollbars"]

    def __init__(self, exe: str, profile: Path, width: int = 1600, height: int = 1000):
        self.port = free_port()
        self.log_path = Path(profile).with_suffix(".log")
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([exe, *self.FLAGS, f"--user-data-dir={profile}",
                                      f"--remote-debugging-port={self.port}", f"--window-size={width},{height}",
                                      "about:blank"], stdout=subprocess.DEVNULL, stderr=self._log)
        target = self._page_target()
        path = urllib.parse.urlparse(target["webSocketDebuggerUrl"]).path
        self.ws = WebSocket("127.0.0.1", self.port, path)
        self.events, self._id = [], 0
        for domain in ("Runtime", "Log", "Page"):
            self.send(f"{domain}.enable")
        self.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1,
                                                         "mobile": False})

    def _page_target(self, timeout: float = 30.0) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json/list", timeout=5) as r:
                    pages = [t for t in json.loads(r.read()) if t.get("type") == "page"]
                if pages:
                    return pages[0]
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.3)
        raise RuntimeError(f"chromium did not start:\n{self.log_path.read_text()[-2000:]}")

    def send(self, method: str, params: dict | None = None, timeout: float = 60.0):
        self._id += 1
        my_id = self._id
        self.ws.sock.settimeout(timeout)
        self.ws.send_json({"id": my_id, "method": method, "params": params or {}})
        while True:
            m = self.ws.recv()
            if m.get("id") == my_id:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            if "method" in m:
                self.events.append(m)

    def evaluate(self, expression: str, timeout: float = 60.0):
        r = self.send("Runtime.evaluate", {"expression": expression, "awaitPromise": True, "returnByValue": True,
                                           "timeout": int(timeout * 1000)}, timeout=timeout + 5)
        if "exceptionDetails" in r:
            d = r["exceptionDetails"]
            raise RuntimeError(f"JS error: {d.get('exception', {}).get('description') or d.get('text')}")
        return r.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float = 60.0, interval: float = 0.25):
        deadline = time.time() + timeout
        while time.time() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(interval)
        raise TimeoutError(f"timed out waiting for: {expression}")

    def navigate(self, url: str) -> None:
        self.send("Page.navigate", {"url": url})
        self.wait_for("document.readyState === 'complete'")

    def screenshot(self, path: Path, clip: dict | None = None) -> None:
        params = {"format": "png", **({"clip": {**clip, "scale": 1}} if clip else {})}
        data = self.send("Page.captureScreenshot", params)["data"]
        Path(path).write_bytes(base64.b64decode(data))

    def console_errors(self) -> list[str]:
        out = []
        for e in self.events:
            p = e.get("params", {})
            if e["method"] == "Runtime.exceptionThrown":
                d = p["exceptionDetails"]
                out.append("exception: " + (d.get("exception", {}).get("description") or d.get("text", "")))
            elif e["method"] == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append("console.error: " + " ".join(str(a.get("value", a.get("description", "")))
                                                        for a in p.get("args", [])))
            elif e["method"] == "Log.entryAdded" and p["entry"].get("level") == "error":
                out.append(f"log ({p['entry'].get('source')}): {p['entry'].get('text')} {p['entry'].get('url', '')}")
        return out

    def close(self) -> None:
        try:
            self.ws.close()
        except OSError:
            pass
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()
