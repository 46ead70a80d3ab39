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
    """One node of the demo alliance: its API, its admin token, users made
    on it."""

    def __init__(self, dir: Path, name: str = "submitter"):
        self.dir = dir
        node = dir / name
        self.data_dir = str(node)
        self.url = (node / "api.url").read_text().strip()
        self.admin_token = (node / "api.token").read_text().strip()
        self.admin = alliance.Client(self.url, self.admin_token)
        self._tokens = {}

    def node(self, name: str) -> "Net":
        """Another node of the same alliance, e.g. "worker-north"."""
        return Net(self.dir, name)

    def token(self, name: str) -> str:
        """User `name`'s token on this node, made on first use."""
        if name not in self._tokens:
            self._tokens[name] = self.admin._post("/v1/users", {"name": name})["token"]
        return self._tokens[name]

    def user(self, name: str) -> alliance.Client:
        """A client as user `name`, made on first use."""
        return alliance.Client(self.url, self.token(name), timeout=120)


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
    try:
        yield Net(dir / "demo")
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
