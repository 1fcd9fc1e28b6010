"""The VM tier as a background job: boot the real Debian kernel (with IPVS)
under qemu with virtme-ng and run tests/vm inside it.

It is the suite's long pole (about ten minutes of software emulation, about
one core), so tests/host/conftest.py starts it as soon as collection is done
and the other tiers run meanwhile on the other core; test_vm_tier.py, sorted
last, waits for it and reports. The VM runs at a lower CPU priority, so the
tests beside it keep their timing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).parents[2]
CACHE = ROOT / ".cache"
TIMEOUT = 1500.0


@dataclass
class VmRun:
    results: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="svp-vm-")))
    proc: subprocess.Popen[str] | None = None
    error: str = ""

    def start(self) -> None:
        prep = subprocess.run([str(ROOT / "scripts" / "vm-prepare.sh")], capture_output=True,
                              text=True, timeout=900)
        if prep.returncode != 0:
            self.error = f"cannot prepare the VM: {prep.stderr}"
            return
        kernel = prep.stdout.strip().splitlines()[-1]
        env = {**os.environ, "PATH": f"{CACHE / 'vng-venv' / 'bin'}:{os.environ['PATH']}"}
        cmd = ["nice", "-n", "10", "vng", "--disable-kvm", "--force-9p", "-r", kernel,
               "--memory", "2G", "--cpus", "2", "--cwd", str(ROOT),
               "--rwdir", str(self.results), "--exec",
               f"bash scripts/vm-guest-wrap.sh bash scripts/vm-run-tests.sh {self.results}"]
        # qemu sets O_NONBLOCK on inherited descriptors: give it private files
        # (not pipes nobody reads while the other tiers run)
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, env=env, text=True,
            stdout=open(self.results / "stdout.txt", "w"),  # noqa: SIM115
            stderr=open(self.results / "stderr.txt", "w"))  # noqa: SIM115

    def wait(self) -> tuple[int | None, str, str]:
        """(vng's exit code, the inner run's summary, its output tail)."""
        if self.proc is None:
            return None, "", self.error
        try:
            code: int | None = self.proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            self.stop()
            code = None
        out = (self.results / "stdout.txt").read_text(errors="replace")
        err = (self.results / "stderr.txt").read_text(errors="replace")
        return code, self.summary(), out[-6000:] + err[-2000:]

    def summary(self) -> str:
        """Both inner runs (the IPVS-path host tests, then tests/vm), summed."""
        if not (self.results / "vm-junit.xml").exists():
            return ""
        totals = dict.fromkeys(("tests", "failures", "errors", "skipped"), 0)
        for name in ("host-junit.xml", "vm-junit.xml"):
            junit = self.results / name
            if not junit.exists():
                continue
            suite = ET.parse(junit).getroot()
            suite = suite if suite.tag == "testsuite" else suite[0]
            for key in totals:
                totals[key] += int(suite.get(key) or 0)
        return (f"{totals['tests']} tests, {totals['failures']} failures, "
                f"{totals['errors']} errors, {totals['skipped']} skipped")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.results, ignore_errors=True)


#: the run conftest.py started for this session, if any
current: VmRun | None = None
