"""The batched IPVS netlink module against the real kernel, checked with
ipvsadm."""

from __future__ import annotations

import errno
import subprocess

import pytest

from svcproxy.plugins.ipvs.servers import render_ipvsadm
from svcproxy.plugins.kernel.ipvs import (
    F_PERSISTENT,
    F_SCHED1,
    F_SCHED2,
    Batch,
    IPVSNetlink,
    RealServer,
    VirtualServer,
    probe_ipvs,
)


def ipvsadm_rules() -> list[str]:
    out = subprocess.run(["ipvsadm", "-S", "-n"], capture_output=True, text=True,
                         check=True).stdout
    return sorted(line.strip() for line in out.splitlines() if line.strip())


def as_ipvsadm(table: dict[VirtualServer, list[RealServer]]) -> list[str]:
    """What `ipvsadm -S -n` prints for a table, as the datapath renders it."""
    return sorted(render_ipvsadm(table).splitlines())


def table(n: int) -> dict[VirtualServer, list[RealServer]]:
    out = {}
    for i in range(n):
        proto = "UDP" if i % 7 == 0 else "TCP"
        vs = VirtualServer(f"10.96.{i // 250}.{i % 250 + 1}", 80 + i % 3, proto)
        out[vs] = [RealServer(f"10.244.{i // 250}.{j * 50 + i % 50}", 8080) for j in range(5)]
    v6 = VirtualServer("fd00:96::1", 443, "TCP", scheduler="wrr")
    out[v6] = [RealServer("fd00:244::1", 8443, weight=3), RealServer("fd00:244::2", 8443)]
    return out


def test_batch_load_matches_ipvsadm() -> None:
    want = table(300)
    with IPVSNetlink() as nl:
        b = nl.batch()
        for vs, dests in want.items():
            b.add_service(vs)
            for rs in dests:
                b.add_dest(vs, rs)
        assert len(b) == 300 + 1500 + 1 + 2
        assert b.commit() == []
        got = nl.dump()
    assert {vs: sorted(d) for vs, d in got.items()} == {vs: sorted(d) for vs, d in want.items()}
    assert ipvsadm_rules() == as_ipvsadm(want)


def test_flags_persistence_and_updates() -> None:
    sticky = VirtualServer("10.96.0.1", 80, "TCP", "rr", F_PERSISTENT, 600)
    mh = VirtualServer("10.96.0.2", 53, "UDP", "mh", F_SCHED1 | F_SCHED2)
    rs = RealServer("10.244.0.1", 8080)
    with IPVSNetlink() as nl:
        b = nl.batch()
        for vs in (sticky, mh):
            b.add_service(vs)
            b.add_dest(vs, rs)
        assert b.commit() == []
        rules = ipvsadm_rules()
        assert "-A -t 10.96.0.1:80 -s rr -p 600" in rules
        assert "-A -u 10.96.0.2:53 -s mh -b mh-fallback,mh-port" in rules
        assert rules == as_ipvsadm({sticky: [rs], mh: [rs]})
        assert set(nl.services()) == {sticky, mh}
        b = nl.batch()
        b.update_dest(sticky, RealServer("10.244.0.1", 8080, weight=0))
        b.update_service(VirtualServer("10.96.0.1", 80, "TCP", "wlc"))
        assert b.commit() == []
        assert "-a -t 10.96.0.1:80 -r 10.244.0.1:8080 -m -w 0" in ipvsadm_rules()
        assert "-A -t 10.96.0.1:80 -s wlc" in ipvsadm_rules()
        b = nl.batch()
        b.delete_dest(mh, rs)
        b.delete_service(sticky)
        assert b.commit() == []
        assert nl.dump() == {mh: []}


def test_failures_are_per_operation() -> None:
    vs = VirtualServer("10.96.0.1", 80, "TCP")
    with IPVSNetlink() as nl:
        b = nl.batch()
        b.add_service(vs)
        b.add_service(vs)  # EEXIST
        b.add_dest(vs, RealServer("10.244.0.1", 80))
        b.delete_dest(vs, RealServer("10.244.0.9", 80))  # not there
        b.add_service(VirtualServer("10.96.0.2", 80, "TCP", scheduler="bogus"))
        b.add_service(VirtualServer("10.96.0.3", 80, "TCP"))
        failures = b.commit()
        assert [(f.op, f.errno) for f in failures] == [
            ("add service", errno.EEXIST), ("delete real server", errno.ENOENT),
            ("add service", errno.ENOENT)]
        assert "File exists" in str(failures[0])
        assert set(nl.services()) == {vs, VirtualServer("10.96.0.3", 80, "TCP")}
        assert nl.dests(vs) == [RealServer("10.244.0.1", 80)]


def test_timeouts_and_flush() -> None:
    with IPVSNetlink() as nl:
        before = nl.timeouts()
        nl.set_timeouts(7200, 30, 120)
        assert nl.timeouts() == (7200, 30, 120)
        nl.set_timeouts(0, 0, 0)  # 0 keeps what is there
        assert nl.timeouts() == (7200, 30, 120)
        nl.set_timeouts(*before)
        b = nl.batch()
        b.add_service(VirtualServer("10.96.0.1", 80, "TCP"))
        assert b.commit() == []
        nl.flush()
        assert nl.services() == []


@pytest.mark.parametrize("scheduler", ["rr", "wrr", "lc", "wlc", "lblc", "lblcr", "dh", "sh",
                                       "sed", "nq", "mh", "fo", "ovf"])
def test_probe_accepts_every_kernel_scheduler(scheduler: str) -> None:
    assert probe_ipvs(scheduler) is None
    assert subprocess.run(["ipvsadm", "-S", "-n"], capture_output=True, text=True,
                          check=True).stdout.strip() == ""  # the test server is gone again


def test_probe_names_an_unknown_scheduler() -> None:
    assert probe_ipvs("bogus") == "scheduler bogus not available (modprobe ip_vs_bogus)"


def test_listing_is_complete_while_another_namespace_deletes_its_virtual_servers() -> None:
    """The kernel's virtual-server table is shared by every namespace and a
    dump of several messages resumes by position in it, so a dump skips this
    namespace's entries when another namespace's go meanwhile (a namespace
    torn down). services(expect) asks for the expected ones a long dump
    lacks by key: complete every time; get_services finds exactly what
    exists."""
    want = table(300)
    with IPVSNetlink() as nl:
        b = nl.batch()
        for vs in want:
            b.add_service(vs)
        assert b.commit() == []
        keys = [vs.key for vs in want]
        ns = "svpother"
        subprocess.run(["ip", "netns", "add", ns], check=True)
        try:
            other = [f"10.97.{i // 250}.{i % 250 + 1}:80" for i in range(2000)]
            subprocess.run(["ip", "netns", "exec", ns, "ipvsadm", "-R"], check=True, text=True,
                           input="".join(f"-A -t {a} -s rr\n" for a in other))
            deleting = subprocess.Popen(["ip", "netns", "exec", ns, "ipvsadm", "-R"],
                                        stdin=subprocess.PIPE, text=True)
            assert deleting.stdin is not None
            deleting.stdin.write("".join(f"-D -t {a}\n" for a in other))
            deleting.stdin.close()
            listings = short = 0
            while deleting.poll() is None or listings < 3:
                plain = nl.services()
                short += len(plain) < len(want)
                got = nl.services(keys)
                listings += 1
                assert sorted(got, key=lambda v: v.key) == sorted(want, key=lambda v: v.key)
            assert deleting.wait() == 0
            print(f"{listings} listings; {short} plain dumps were short")
        finally:
            subprocess.run(["ip", "netns", "del", ns], check=False)
        missing = ("10.96.9.9", 80, "TCP")
        assert nl.get_services([keys[5], missing, keys[-1]]) == [
            next(vs for vs in want if vs.key == keys[5]), next(iter(reversed(want)))]


def test_a_batch_sends_as_it_grows_and_keeps_every_refusal(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Every SEND_AT operations go to the kernel while the batch is built;
    commit sends the rest and returns the refusals of all of them, in order."""
    monkeypatch.setattr(Batch, "SEND_AT", 2)
    vs = VirtualServer("10.96.0.1", 80, "TCP")
    with IPVSNetlink() as nl:
        b = nl.batch()
        b.add_service(vs)
        b.add_service(vs)  # EEXIST, in the first send
        assert set(nl.services()) == {vs}  # sent already
        b.add_dest(vs, RealServer("10.244.0.1", 80))
        b.delete_dest(vs, RealServer("10.244.0.9", 80))  # ENOENT, in the second
        b.add_service(VirtualServer("10.96.0.2", 80, "TCP", scheduler="bogus"))  # ENOENT
        assert len(b) == 5
        failures = b.commit()
        assert [(f.op, f.errno) for f in failures] == [
            ("add service", errno.EEXIST), ("delete real server", errno.ENOENT),
            ("add service", errno.ENOENT)]
        assert b.commit() == [] and len(b) == 0
        assert nl.dests(vs) == [RealServer("10.244.0.1", 80)]
