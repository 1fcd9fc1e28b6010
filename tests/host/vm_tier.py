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
import sys
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).parents[2]
CACHE = ROOT / ".cache"
TIMEOUT = 2700.0


#: the VMs of the tier and the test files each runs. One VM: two VMs at once
#: (one per core) were measured slower than one, the datapath half timing out
#: after 20 minutes. test_zfallback_without_ipvs.py, which unloads IPVS, last.
SPLIT: tuple[tuple[str, ...], ...] = (
    ("tests/vm/test_ipvs_datapath.py", "tests/vm/test_ipvs_faults.py",
     "tests/vm/test_ipvs_netlink.py", "tests/vm/test_ipvs_takeover.py",
     "tests/vm/test_node_integration.py", "tests/vm/test_ipvs_load.py",
     "tests/vm/test_ipvs_cold_start.py",
     "tests/vm/test_zfallback_without_ipvs.py"),
)
#: run only with SVCPROXY_VM_LOAD=1 (in the first VM, before the last file):
#: none at the moment (the IPVS load test, once opt-in, passes and is in SPLIT)
OPT_IN: tuple[str, ...] = ()


def precompile() -> None:
    """Byte-compile svcproxy's and the tests' modules on the host: the guest's
    root is read-only, so without .pyc files every Python process in it (each
    CLI call) compiled them again, seconds of emulated CPU each time."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", "-j", "0",
                    *(str(ROOT / d) for d in ("core", "plugins", "demo", "tests"))],
                   capture_output=True, timeout=300, check=False)


@dataclass
class VmRun:
    results: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="svp-vm-")))
    proc: subprocess.Popen[str] | None = None
    error: str = ""
    #: the test files this VM runs (empty: all of tests/vm)
    files: tuple[str, ...] = ()
    #: the IPVS-path host tests too (scripts/vm-run-tests.sh --with-host-tests)
    host_tests: bool = False

    def start(self) -> None:
        prep = subprocess.run([str(ROOT / "scripts" / "vm-prepare.sh")], capture_output=True,
                              text=True, timeout=900)
        if prep.returncode != 0:
            self.error = f"cannot prepare the VM: {prep.stderr}"
            return
        kernel = prep.stdout.strip().splitlines()[-1]
        precompile()
        env = {**os.environ, "PATH": f"{CACHE / 'vng-venv' / 'bin'}:{os.environ['PATH']}"}
        cmd = ["nice", "-n", "10", "vng", "--disable-kvm", "--force-9p", "-r", kernel,
               "--memory", "2G", "--cpus", "2", "--cwd", str(ROOT),
               "--rwdir", str(self.results), "--exec",
               f"bash scripts/vm-guest-wrap.sh bash scripts/vm-run-tests.sh {self.results}"
               + (" --with-host-tests" if self.host_tests else "")
               + (f" --tests '{' '.join(self.files)}'" if self.files else "")]
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


class VmTier:
    """The VM tier as the VMs of SPLIT, started together; wait() reports them
    as one run."""

    def __init__(self) -> None:
        host_tests = bool(os.environ.get("SVCPROXY_VM_HOST_TESTS"))
        split = [list(files) for files in SPLIT]
        if os.environ.get("SVCPROXY_VM_LOAD"):
            split[0][-1:-1] = OPT_IN
        self.runs = [VmRun(files=tuple(files), host_tests=host_tests and i == 0)
                     for i, files in enumerate(split)]

    @property
    def error(self) -> str:
        return "; ".join(r.error for r in self.runs if r.error)

    def start(self) -> None:
        for run in self.runs:
            run.start()

    def wait(self) -> tuple[int | None, str, str]:
        """(the worst vng exit code, the summed summary, each VM's output tail)."""
        results = [run.wait() for run in self.runs]
        codes = [code for code, _, _ in results]
        code = None if None in codes else max(c for c in codes if c is not None)
        totals = [0, 0, 0, 0]
        for _, summary, _ in results:
            if not summary:
                return code, "", "\n".join(tail for _, _, tail in results)
            for i, word in enumerate(summary.split(",")):
                totals[i] += int(word.split()[0])
        summary = (f"{totals[0]} tests, {totals[1]} failures, {totals[2]} errors, "
                   f"{totals[3]} skipped (in {len(self.runs)} VMs)")
        tails = "\n".join(f"--- VM {i + 1} ({' '.join(run.files) or 'tests/vm'}):\n{tail}"
                          for i, (run, (_, _, tail)) in enumerate(zip(self.runs, results,
                                                                      strict=True)))
        return code, summary, tails

    def close(self) -> None:
        for run in self.runs:
            run.close()


#: the tier conftest.py started for this session, if any
current: VmTier | None = None
