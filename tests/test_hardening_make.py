"""Issue 16 item 19: `make serve` / `make test` install only when the requirements change; `make stop`
stops the server `make serve` started (by the pid it wrote)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAKE = shutil.which("make")
pytestmark = pytest.mark.skipif(MAKE is None, reason="make is not installed")


def dry_run(target: str, venv: Path) -> str:
    return subprocess.run([MAKE, "-n", "-f", str(ROOT / "Makefile"), target, f"VENV={venv}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=30, check=True).stdout


def test_setup_installs_only_when_the_requirements_change(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").touch()
    assert "pip install" in dry_run("setup", venv)  # never installed
    (venv / ".installed").touch()
    for target in ("setup", "serve", "test"):
        assert "pip install" not in dry_run(target, venv), target
    past = min((ROOT / name).stat().st_mtime for name in ("requirements.txt", "pyproject.toml")) - 3600
    os.utime(venv / ".installed", (past, past))  # the requirements are now newer than the install
    assert "pip install" in dry_run("setup", venv)


def test_make_stop_stops_the_server_make_serve_started(tmp_path):
    server = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # stands in for serve
    try:
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "serve.pid").write_text(f"{server.pid}\n")
        done = subprocess.run([MAKE, "-f", str(ROOT / "Makefile"), "stop"], cwd=tmp_path, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0 and f"pid {server.pid}" in done.stdout
        assert server.wait(10) == -15  # SIGTERM: the server's own graceful stop
        assert not (tmp_path / "run" / "serve.pid").exists()
        again = subprocess.run([MAKE, "-f", str(ROOT / "Makefile"), "stop"], cwd=tmp_path, capture_output=True,
                               text=True, timeout=60)
        assert again.returncode == 0 and "no server" in again.stdout
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(10)
