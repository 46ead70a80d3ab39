"""A real local alliance for the client's tests: `alliance demo --stay
--no-jobs` starts a bootstrap node, three workers of three institutions
and a submitting node as processes, and keeps them up until the session
ends."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

import alliance

ROOT = Path(__file__).resolve().parents[2]


def alliance_bin() -> str:
    """The `alliance` binary: $ALLIANCE_BIN, else the one cargo built."""
    if os.environ.get("ALLIANCE_BIN"):
        return os.environ["ALLIANCE_BIN"]
    for profile in ("debug", "release"):
        p = ROOT / "target" / profile / "alliance"
        if p.exists():
            return str(p)
    pytest.fail("no alliance binary: run `cargo build -p alliance-node` or set ALLIANCE_BIN")


class Net:
    def __init__(self, dir: Path, env: dict):
        self.dir = dir
        self.url = env["ALLIANCE_URL"]
        self.admin_token = Path(env["ALLIANCE_TOKEN_FILE"]).read_text().strip()
        self.data_dir = env["ALLIANCE_DATA_DIR"]
        self.admin = alliance.Client(self.url, self.admin_token)
        self._tokens = {}

    def user(self, name: str) -> alliance.Client:
        """A client as user `name`, made on first use."""
        if name not in self._tokens:
            self._tokens[name] = self.admin._post("/v1/users", {"name": name})["token"]
        return alliance.Client(self.url, self._tokens[name], timeout=120)


@pytest.fixture(scope="session")
def net(tmp_path_factory):
    dir = tmp_path_factory.mktemp("alliance")
    log = open(dir / "demo.log", "w")
    proc = subprocess.Popen(
        [alliance_bin(), "demo", "--stay", "--no-jobs", "--dir", str(dir / "demo")],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        cwd=ROOT,
    )
    env_file = dir / "demo" / "demo.env"
    deadline = time.monotonic() + 240
    while not env_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("the demo alliance did not start:\n" + (dir / "demo.log").read_text())
        time.sleep(0.5)
    env = dict(line.split("=", 1) for line in env_file.read_text().splitlines() if "=" in line)
    try:
        yield Net(dir / "demo", env)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


@pytest.fixture
def raw(net):
    """httpx against the node with no token at all."""
    with httpx.Client(base_url=net.url) as c:
        yield c
