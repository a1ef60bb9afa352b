"""Waiting for the processes of a multi-process (gloo) test: imported as ``ranks`` by the tests that start them."""

from __future__ import annotations

import subprocess


def wait_for_ranks(processes: list[subprocess.Popen], timeout: int) -> None:
    """Wait for every rank's process (its output piped as text), kill any left over, and fail with the output of
    the first one that did not exit 0."""
    try:
        outputs = [p.communicate(timeout=timeout)[0] for p in processes]
    finally:
        for p in processes:
            p.kill()
    for p, output in zip(processes, outputs, strict=True):
        assert p.returncode == 0, output[-6000:]
