"""Start a real ComfyUI (from COMFYUI_PATH) with this pack, for integration tests."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def comfyui_path() -> Path | None:
    value = os.environ.get("COMFYUI_PATH")
    if not value:
        return None
    path = Path(value)
    return path if (path / "main.py").exists() else None


def comfyui_python(path: Path) -> str:
    if os.environ.get("COMFYUI_PYTHON"):
        return os.environ["COMFYUI_PYTHON"]
    venv = path / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    def __init__(self, base: Path):
        self.base = base
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = base / "server.log"
        self.proc = None
        self.client_id = uuid.uuid4().hex

    def start(self, timeout: float = 240) -> ComfyServer:
        path = comfyui_path()
        (self.base / "custom_nodes").mkdir(parents=True, exist_ok=True)
        link = self.base / "custom_nodes" / "dreamloom"
        if not link.exists():
            link.symlink_to(ROOT, target_is_directory=True)
        for sub in ("models/checkpoints", "models/loras", "models/embeddings", "input", "output", "temp", "user"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        cmd = [
            comfyui_python(path),
            "main.py",
            "--cpu",
            "--listen",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--base-directory",
            str(self.base),
            "--disable-auto-launch",
            # ComfyUI's default database sits in its own install folder; an in-memory one is finalized from the
            # wrong thread (a logged sqlite3.ProgrammingError traceback): a file in the base directory is neither.
            "--database-url",
            f"sqlite:///{self.base / 'user' / 'comfyui.db'}",
        ]
        # A user's Python keeps compiled bytecode (pip writes it for the libraries; the first start writes the
        # pack's), so only the first start after an install compiles the pack. This machine may say
        # PYTHONDONTWRITEBYTECODE, which makes every start compile it (about 30 ms of the import time ComfyUI
        # prints) and ComfyUI itself; the pack is compiled here, into its git-ignored __pycache__ folders.
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX")}
        python = comfyui_python(path)
        sources = [str(ROOT / "__init__.py"), str(ROOT / "nodes"), str(ROOT / "trainer")]
        subprocess.run([python, "-m", "compileall", "-q", *sources], env=env, check=True, timeout=600)
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=str(path), stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited early; log:\n{self.log_text()[-3000:]}")
            try:
                self.get("/system_stats")
                return self
            except (urllib.error.URLError, ConnectionError):
                time.sleep(1)
        raise TimeoutError(f"ComfyUI did not start; log:\n{self.log_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if getattr(self, "log", None):
            self.log.close()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def get(self, route: str):
        with urllib.request.urlopen(self.url + route, timeout=30) as r:
            return json.loads(r.read() or b"null")

    def post(self, route: str, body: dict | None = None):
        req = urllib.request.Request(
            self.url + route, data=json.dumps(body or {}).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                raw = r.read()
                return json.loads(raw) if raw else None
        except urllib.error.HTTPError as err:
            raise AssertionError(f"POST {route} -> {err.code}: {err.read().decode(errors='replace')}") from None

    def queue_prompt(self, prompt: dict) -> str:
        return self.post("/prompt", {"prompt": prompt, "client_id": self.client_id})["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 900) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            hist = self.get(f"/history/{prompt_id}")
            if hist and prompt_id in hist and hist[prompt_id].get("status", {}).get("completed") is not None:
                entry = hist[prompt_id]
                if entry["status"].get("status_str") in ("success", "error") or entry["status"].get("completed"):
                    return entry
            time.sleep(1)
        raise TimeoutError(f"prompt {prompt_id} did not finish; log tail:\n{self.log_text()[-3000:]}")

    def messages(self, entry: dict) -> list[str]:
        return [m[0] for m in entry.get("status", {}).get("messages", [])]
