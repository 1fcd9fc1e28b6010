"""Boots the real Debian kernel (with IPVS) under qemu with virtme-ng once and
runs tests/vm inside it; passes only if the inner run passed. If the VM cannot
start, this fails with the reason (it is never silently skipped)."""

from __future__ import annotations

import os
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).parents[2]
CACHE = ROOT / ".cache"


def test_vm_tier(tmp_path: Path) -> None:
    prep = subprocess.run([str(ROOT / "scripts" / "vm-prepare.sh")], capture_output=True,
                          text=True, timeout=900)
    assert prep.returncode == 0, f"cannot prepare the VM: {prep.stderr}"
    kernel = prep.stdout.strip().splitlines()[-1]
    results = tmp_path / "results"
    results.mkdir()
    env = {**os.environ, "PATH": f"{CACHE / 'vng-venv' / 'bin'}:{os.environ['PATH']}"}
    cmd = ["vng", "--disable-kvm", "--force-9p", "-r", kernel, "--memory", "2G", "--cpus", "2",
           "--cwd", str(ROOT), "--rwdir", str(results),
           "--exec", f"bash scripts/vm-guest-wrap.sh bash scripts/vm-run-tests.sh {results}"]
    # qemu sets O_NONBLOCK on inherited descriptors: give it private pipes
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=1500, env=env)
    junit = results / "vm-junit.xml"
    summary = ""
    if junit.exists():
        suite = ET.parse(junit).getroot()
        suite = suite if suite.tag == "testsuite" else suite[0]
        summary = (f"{suite.get('tests')} tests, {suite.get('failures')} failures, "
                   f"{suite.get('errors')} errors, {suite.get('skipped')} skipped")
    print(f"VM tier: {summary}\n{proc.stdout[-4000:]}")
    assert junit.exists(), f"the VM tier did not run (vng exit {proc.returncode}):\n" \
                           f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, f"VM tests failed ({summary}):\n{proc.stdout[-6000:]}"
