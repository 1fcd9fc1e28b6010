"""The tool runner: every kernel tool svcproxy runs (iptables-save/-restore,
ipset, conntrack, modprobe) goes through `run_tool`, in the host or inside a
network namespace, with its failures as KernelError naming the tool.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence


class KernelError(Exception):
    """An iptables tool failed; the message carries its output."""


def run_tool(args: Sequence[str], netns: str | None = None, *,
             stdin: str | Sequence[str] | None = None, check: bool = True,
             timeout: float = 900.0) -> subprocess.CompletedProcess[str]:
    """Run a kernel tool (iptables, ipset, conntrack, ip), inside `netns` when
    given. A missing tool or a timeout is a KernelError naming the tool; so is a
    non-zero exit with `check`.

    `stdin` is the tool's input: a string, or its parts in order (a large
    input built piece by piece: the parts go to an unlinked temporary file the
    tool reads, so the whole text is never one string in svcproxy's memory)."""
    cmd = [*(["ip", "netns", "exec", netns] if netns else []), *args]
    if stdin is None or isinstance(stdin, str):
        return _run(cmd, args, stdin, None, check, timeout)
    with tempfile.TemporaryFile("w+", encoding="utf-8") as f:
        for part in stdin:
            f.write(part)
        f.flush()
        f.seek(0)
        return _run(cmd, args, None, f.fileno(), check, timeout)


def _run(cmd: list[str], args: Sequence[str], text: str | None, fd: int | None, check: bool,
         timeout: float) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(cmd, input=text, stdin=fd, capture_output=True, text=True,
                              timeout=timeout, env={**os.environ, "LC_ALL": "C"})
    except FileNotFoundError:
        raise KernelError(f"{cmd[0]} not found (install the {_PACKAGES.get(cmd[0], cmd[0])} "
                          "package)") from None
    except subprocess.TimeoutExpired:
        raise KernelError(f"{args[0]} did not finish in {timeout:.0f}s") from None
    if check and proc.returncode != 0:
        raise KernelError(f"{' '.join(args[:3])} failed (exit {proc.returncode}): "
                          f"{proc.stderr.strip() or proc.stdout.strip()}")
    return proc


_PACKAGES = {"ip": "iproute2", "conntrack": "conntrack", "ipset": "ipset"}


def load_module(name: str) -> str | None:
    """modprobe `name`; None on success, else why it failed."""
    if shutil.which("modprobe") is None:
        return "modprobe not found (install the kmod package)"
    try:
        proc = subprocess.run(["modprobe", name], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    return None if proc.returncode == 0 else (proc.stderr.strip() or f"exit {proc.returncode}")
