"""What the benchmarks share: waiting for a server process, its peak memory."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import httpx


def rss_kib(pid: int) -> int:
    """Peak resident set size of a process, KiB (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def children(pid: int) -> list[int]:
    """The process's children (the sender's composer, say)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def wait_ready(url: str, proc: subprocess.Popen[bytes]) -> None:
    """Until GET {url}/readyz answers 200; exits when the server dies or takes 60 s."""
    end = time.monotonic() + 60
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise SystemExit("server not ready in 60 s")
