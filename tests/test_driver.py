"""The running lab without booting: fault words and targets, run state, the corosync
tools' output, the console socket on QEMU's command line, the CLI's refusals."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pvelab.core.paths import ROOT
from pvelab.model.faults import DriverError, Fault, Target
from pvelab.model.media import BIOS, MEDIA
from pvelab.running.corotools import parse_cfgtool, parse_qnetd_clients
from pvelab.running.driver import NodeRecord, RunState, parse_groups, parse_nodes
from pvelab.running.qemu import VmSpec, qemu_command

CFGTOOL = """Local node ID 1, transport knet
LINK ID 0 udp
\taddr\t= 10.81.0.11
\tstatus:
\t\tnodeid:          1:\tlocalhost
\t\tnodeid:          2:\tconnected
\t\tnodeid:          3:\tdisconnected
LINK ID 1 udp
\taddr\t= 10.82.0.11
\tstatus:
\t\tnodeid:          1:\tlocalhost
\t\tnodeid:          2:\tconnected
\t\tnodeid:          3:\tconnected
"""

QNETD = """Cluster "pve-cluster":
    Algorithm:          Fifty-Fifty split
    Tie-breaker:        Node with lowest node ID
    Node ID 2:
        Client address:         ::ffff:10.81.0.12:45454
        Configured node list:   1, 2, 3
        Membership node list:   1, 2
        Vote:                   ACK (ACK)
    Node ID 1:
        Client address:         ::ffff:10.81.0.11:45446
        Vote:                   ACK (ACK)
"""


def test_cfgtool_links_per_peer():
    links = parse_cfgtool(CFGTOOL)
    assert links == {
        "0": {"1": "localhost", "2": "connected", "3": "disconnected"},
        "1": {"1": "localhost", "2": "connected", "3": "connected"},
    }
    assert parse_cfgtool("") == {}


def test_qnetd_clients():
    assert parse_qnetd_clients(QNETD) == {"clusters": ["pve-cluster"], "node_ids": [1, 2]}


def test_fault_words_are_the_walks_words(lab):
    from pvelab.model.quorum import walk

    kinds = {e.kind for s in walk(lab) for e in s.events} - {"none"}
    assert kinds <= {f.value for f in Fault}
    assert Fault.parse("cut") is Fault.CUT and Fault.CUT.target is Target.NODES
    assert Fault.PARTITION.target is Target.GROUPS and Fault.HEAL.target is Target.NODES_OR_ALL
    assert Fault.KILL.is_power and Fault.CUT.is_network and not Fault.QNETD_STOP.is_network
    with pytest.raises(DriverError, match=r"unknown fault.*power-off"):
        Fault.parse("yank")


def test_groups_name_every_node_once(lab):
    assert parse_groups(lab, "pve-1,pve-2 pve-3,pbs-witness") == [
        ["pve-1", "pve-2"],
        ["pve-3", "pbs-witness"],
    ]
    assert parse_groups(lab, "pve-1,pve-2,pbs-witness/pve-3") == [
        ["pve-1", "pve-2", "pbs-witness"],
        ["pve-3"],
    ]
    for bad, why in [
        ("pve-1,pve-2 pve-2,pve-3,pbs-witness", "pve-2 named twice"),
        ("pve-1,pve-2 pve-3", "pbs-witness in no group"),
        ("pve-1,pve-2 pve-3,pve-9,pbs-witness", "unknown pve-9"),
        ("pve-1,pve-2,pve-3,pbs-witness", "two groups"),
    ]:
        with pytest.raises(DriverError, match=why) as exc:
            parse_groups(lab, bad)
        assert "pve-1, pve-2, pve-3, pbs-witness" in str(exc.value)
    assert parse_nodes(lab, "pve-3", "cut") == ["pve-3"]
    with pytest.raises(DriverError, match=r"unknown node pve-9 \(nodes: pve-1, pve-2, pve-3, pbs-witness\)"):
        parse_nodes(lab, "pve-9", "cut")


def _state(tmp_path, **kw):
    rec = NodeRecord("pve-1", 999999, "172.31.81.11", "10.81.0.11", "m", "tap0", "c", "d")
    fields = dict(
        lab="x",
        lab_file="x.yaml",
        netns="pvelab-test-none",
        media="qcow2",
        firmware="bios",
        accel="tcg",
        accel_reason="",
        workdir=str(tmp_path),
        nodes={"pve-1": rec},
    )
    return RunState(**{**fields, **kw})


def test_run_state_round_trip_and_staleness(tmp_path):
    state = _state(tmp_path, phase="up")
    path = tmp_path / "state.json"
    path.write_text(state.to_json())
    again = RunState.from_json(path)
    assert again == state and isinstance(again.nodes["pve-1"], NodeRecord)
    # no namespace of that name: stale, and it says why
    assert "network namespace pvelab-test-none is gone" in again.liveness()


def test_console_socket_is_relative_and_logged(tmp_path):
    spec = VmSpec(
        "pve-1", 512, MEDIA["qcow2"], BIOS, "tcg", tmp_path / "d.qcow2", tmp_path, console_socket=True
    )
    args = qemu_command(spec)
    chardev = args[args.index("-chardev") + 1]
    assert chardev.startswith("socket,id=ser0,path=pve-1.console.sock,server=on,wait=off,")
    assert f"logfile={tmp_path / 'pve-1.console.log'},logappend=on" in chardev


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_cli_refuses_before_any_work(tmp_path):
    """Not up: one line, exit 2 (status: 3); a bad fault target is refused before the lab is looked at."""
    invoke = str(Path(sys.executable).parent / "invoke")
    env = {**os.environ, "PVELAB_BUILD_DIR": str(tmp_path)}

    def run(*args):
        return subprocess.run([invoke, *args], cwd=ROOT, env=env, capture_output=True, text=True)

    res = run("ssh", "pve-1", "--", "true")
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0 and "is not up" in res.stderr
    res = run("fault", "cut", "pve-9")
    assert res.returncode == 2 and "unknown node pve-9" in res.stderr
    for args, words in {
        ("saturate", "7"): "not a corosync link",
        ("expected", "pve-3"): "NODE VOTES",
        ("forget-qdevice", "pve-9"): "unknown node pve-9",
    }.items():
        res = run("fault", *args)
        assert res.returncode == 2 and words in res.stderr and res.stderr.strip().count("\n") == 0, res.stderr
    res = run("status")
    assert res.returncode == 3 and "not up" in res.stdout
    res = run("down")
    assert res.returncode == 0 and "nothing to do" in res.stdout


def _fake_qemu(tmp_path, monkeypatch, script):
    """A `qemu-system-x86_64` on PATH that runs ``script`` (sh) instead of a guest."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "qemu-system-x86_64"
    fake.write_text("#!/bin/sh\n" + script)
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    monkeypatch.setattr("pvelab.running.qemu.os.access", lambda *a: True)  # as if /dev/kvm were usable


def test_a_kvm_that_stops_the_guest_is_found_in_seconds_not_at_the_timeout(tmp_path, monkeypatch):
    """QEMU pauses (does not exit) on "KVM internal error": the probe stops at those words."""
    import time

    from pvelab.running.qemu import probe_kvm

    _fake_qemu(tmp_path, monkeypatch, 'echo "KVM internal error. Suberror: 1"\nexec sleep 600\n')
    t0 = time.monotonic()
    ok, why = probe_kvm(tmp_path / "vmlinuz", timeout=30)
    assert (ok, why) == (False, "KVM internal error. Suberror: 1")
    assert time.monotonic() - t0 < 10


def test_a_working_kvm_is_the_panic_on_the_console(tmp_path, monkeypatch):
    from pvelab.running.qemu import probe_kvm

    # the serial console is the argument after -serial ("file:PATH")
    _fake_qemu(
        tmp_path,
        monkeypatch,
        'while [ "$1" != -serial ]; do shift; done\n'
        'echo "Kernel panic - not syncing: VFS: Unable to mount root fs" > "${2#file:}"\n',
    )
    assert probe_kvm(tmp_path / "vmlinuz", timeout=30) == (True, "kernel booted under KVM")


def test_auto_probes_kvm_once_per_process(monkeypatch):
    from pvelab.running import qemu

    probes = []
    monkeypatch.setattr(qemu, "_accel_cache", {})
    monkeypatch.setattr(qemu, "probe_kvm", lambda k: probes.append(k) or (False, "KVM internal error"))
    kernels = []

    def kernel():
        kernels.append(1)
        return Path("/nonexistent/vmlinuz")

    for _ in range(3):
        assert qemu.resolve_accel("auto", kernel) == ("tcg", "KVM unusable: KVM internal error")
    assert len(probes) == len(kernels) == 1  # and the kernel is extracted only for that probe
    assert qemu.resolve_accel("tcg", kernel) == ("tcg", "requested") and len(kernels) == 1


def test_link_fault_targets_are_parsed_before_anything_runs():
    from pvelab.core.paths import DEFAULT_LAB
    from pvelab.model.labfile import load_lab
    from pvelab.running.driver import parse_link_target

    red = load_lab(DEFAULT_LAB.parent / "proxmox-3node-redundant.yaml")
    assert parse_link_target(red, Fault.UNPLUG, "pve-3 0") == (["pve-3"], 0, ())
    assert parse_link_target(red, Fault.UNPLUG, "pve-3") == (["pve-3"], None, ())
    assert parse_link_target(red, Fault.DROP, "pve-1,pve-2 1") == (["pve-1", "pve-2"], 1, ())
    assert parse_link_target(red, Fault.DELAY, "pve-2 0 40 10") == (["pve-2"], 0, (40.0, 10.0))
    assert parse_link_target(red, Fault.LOSS, "pve-2 1 20") == (["pve-2"], 1, (20.0,))
    assert parse_link_target(red, Fault.CLEAR, "all") == ([], None, ())
    assert parse_link_target(red, Fault.SATURATE, "1") == ([], 1, ())
    assert parse_link_target(red, Fault.SATURATE, "0 20 500") == ([], 0, (20.0, 500.0))
    bad = {
        (Fault.UNPLUG, "pve-9"): "unknown node pve-9",
        (Fault.UNPLUG, "pve-1 2"): "not a corosync link",
        (Fault.DELAY, "pve-1 0"): "MS",
        (Fault.DELAY, "pve-1"): "MS",
        (Fault.LOSS, "pve-1 0 120"): "at most 100",
        (Fault.CLEAR, "pve-1"): "clear all",
        (Fault.SATURATE, "pve-1"): "not a corosync link",
        (Fault.SATURATE, "2"): "not a corosync link",
        (Fault.SATURATE, "1 0"): "more than 0",
        (Fault.SATURATE, "1 5 100 7"): "MBIT",
    }
    for (fault, text), words in bad.items():
        with pytest.raises(DriverError, match=words):
            parse_link_target(red, fault, text)


def test_expected_votes_target_is_one_member_and_a_count(lab):
    from pvelab.running.driver import parse_votes

    assert parse_votes(lab, "pve-3 1") == (["pve-3"], (1.0,))
    for text, words in {
        "pve-3": "NODE VOTES",
        "pve-3 0": "NODE VOTES",
        "pve-3 x": "NODE VOTES",
        "pve-9 1": "unknown node pve-9",
        "pbs-witness 1": "not a cluster member",
    }.items():
        with pytest.raises(DriverError, match=words):
            parse_votes(lab, text)


def test_link_faults_in_force_until_undone():
    from pvelab.running.driver import link_faults_in_force

    history = [
        {"fault": "unplug", "nodes": ["pve-3"], "link": 0},
        {"fault": "drop", "nodes": ["pve-2"], "link": 1},
        {"fault": "delay", "nodes": ["pve-1"], "link": 0, "values": [200.0, 20.0]},
        {"fault": "saturate", "link": 1, "values": [5.0]},
    ]
    assert link_faults_in_force(history) == [
        "pve-3 link0 unplugged",
        "pve-2 link1 dropped",
        "pve-1 link0 delay 200/20 ms",
        "link1 saturated (5)",
    ]
    replugged = [*history, {"fault": "replug", "nodes": ["pve-3"]}]
    assert "pve-3 link0 unplugged" not in link_faults_in_force(replugged)
    forced = [*history, {"fault": "expected", "nodes": ["pve-3"], "values": [1.0]}, {"fault": "clear"}]
    assert link_faults_in_force(forced) == ["pve-3: expected votes set to 1 by hand"]
    assert link_faults_in_force([*forced, {"fault": "heal"}]) == []


def test_cmapctl_stats_and_values():
    from pvelab.running.corotools import parse_cmap_value, parse_stats

    text = (
        "stats.knet.node2.link0.down_count (u32) = 3\n"
        "stats.knet.node2.link0.latency_ave (u32) = 812\n"
        "stats.srp.mcast_retx (u64) = 17\n"
        "stats.srp.operational_entered (u64) = 4\n"
        "stats.ipcs.global.active (u64) = 1\n"
        "stats.srp.rx_msg_dropped (u64) = 0\n"
    )
    stats = parse_stats(text)
    assert stats["stats.srp.mcast_retx"] == 17 and stats["stats.knet.node2.link0.down_count"] == 3
    assert len(stats) == 6
    assert parse_cmap_value("runtime.config.totem.token (u32) = 3650\n") == 3650
    assert parse_cmap_value("Can't get key runtime.config.totem.x. Error CS_ERR_NOT_EXIST") is None


def test_parallel_reports_every_machines_error_by_name():
    """fn on every VM at once: a MachineError is its message, any other error (an SFTP
    put's OSError) is named by its type; neither is lost with its thread."""
    from types import SimpleNamespace

    from pvelab.running.driver import parallel
    from pvelab.running.qemu import MachineError

    def fn(m):
        if m.name == "a":
            return "fine"
        if m.name == "b":
            raise MachineError("b: exited 1")
        raise OSError("Socket is closed")

    vms = {n: SimpleNamespace(name=n) for n in ("a", "b", "c")}
    results, errors = parallel(vms, fn)
    assert results == {"a": "fine"}
    assert errors == {"b": "b: exited 1", "c": "c: OSError: Socket is closed"}


def test_the_api_fingerprint_hashed_on_the_host_is_openssls(tmp_path):
    """`invoke status` and the boot test read the node's certificate and hash it on the
    host: the same AA:BB:... as `openssl x509 -fingerprint -sha256` prints; no certificate
    (not made yet) is ""."""
    from pvelab.running import apicert

    cert, _ = apicert.make_self_signed(tmp_path, "pve-1")
    out = subprocess.run(
        ["openssl", "x509", "-noout", "-fingerprint", "-sha256", "-in", str(cert)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    want = out.strip().split("=", 1)[1]
    assert len(want) == 95 and apicert.parse("noise\n" + cert.read_text()) == want
    assert apicert.command("/etc/pve/local/pve-ssl.pem") == "cat /etc/pve/local/pve-ssl.pem"
    assert apicert.parse("cat: /etc/pve/local/pve-ssl.pem: No such file or directory") == ""


def test_a_probe_is_one_script_each_commands_output_and_status_framed():
    """Machine.probe's script, run by a real shell: each command's output (with or without
    a last newline) and exit status, one failing not stopping the next; an `exit` in one
    ends only its own subshell."""
    from pvelab.running.machine import Probe, parse_probe, probe_script

    script = probe_script(
        {
            "two lines": "echo hi; echo there",
            "no newline": "printf x; exit 3",
            "quiet": "false",
            "last": "echo end",
        }
    )
    out = subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=True).stdout
    assert parse_probe(out) == {
        "two lines": Probe(0, "hi\nthere"),
        "no newline": Probe(3, "x"),
        "quiet": Probe(1, ""),
        "last": Probe(0, "end"),
    }
    assert parse_probe(out.split("@@pvelab-probe last")[0]).keys() == {"two lines", "no newline", "quiet"}


@pytest.fixture
def two_slots(monkeypatch):
    """The process's boot slots made afresh, two of them (as on this 2-core host)."""
    from pvelab.running import slots

    monkeypatch.setenv(slots.ENV, "2")
    monkeypatch.setattr(slots, "_count", None)
    monkeypatch.setattr(slots, "_slots", None)
    yield slots
    monkeypatch.setattr(slots, "_count", None)
    monkeypatch.setattr(slots, "_slots", None)


class Booting:
    """Counts the VMs booting at once (power-on until SSH or power-off)."""

    def __init__(self):
        import threading

        self.lock, self.now, self.most, self.order = threading.Lock(), 0, 0, []

    def on(self, name):
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
            self.order.append(name)

    def off(self):
        with self.lock:
            self.now -= 1


def test_no_more_vms_boot_at_once_than_there_are_slots(two_slots):
    """Four nodes, two slots: the driver powers on two, and the next only when one has
    SSH; every node boots, in the lab's order."""
    import threading
    import time

    from pvelab.running.driver import Driver

    count = Booting()

    class VM:
        def __init__(self, name):
            self.name, self.address = name, "192.0.2.1"

        def start(self):
            count.on(self.name)

        def wait_for_ssh(self, timeout):
            time.sleep(0.2)
            count.off()
            return 1.0

    d = Driver.__new__(Driver)
    names = ["pve-1", "pve-2", "pve-3", "pbs-witness"]
    d.machines = {n: VM(n) for n in names}
    d.accel, d.detached, d.state_file, d.state, d.guest_faults = "tcg", False, None, None, []
    d._unstarted, d._saving, d.say = list(names), threading.Lock(), lambda line: None
    assert d.wait_all_ssh() == dict.fromkeys(names, 1.0)
    assert count.most == 2 and sorted(count.order) == sorted(names) and d._unstarted == []


def test_installers_run_as_many_at_once_as_there_are_slots(two_slots, tmp_path, monkeypatch, lab):
    """Four installers, two slots: two power on; the next when one has powered off; each
    one's seconds count from its own power-on."""
    from pvelab.checks import installtest
    from pvelab.model.media import BIOS

    count = Booting()
    clock = [0.0]
    monkeypatch.setattr(installtest.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(installtest.time, "sleep", lambda s: clock.__setitem__(0, clock[0] + s))

    class Installer:
        def __init__(self, name):
            self.name, self.proc, self.polls = name, None, 0
            self.console_log = tmp_path / f"{name}.console.log"

        def start(self):
            count.on(self.name)
            self.proc = type("Proc", (), {"returncode": 0})()

        def guest_fault(self):
            return None

        def is_running(self):
            self.polls += 1
            if self.polls <= 5:  # five polls (10 s) of installing, then powered off
                return True
            count.off()
            return False

        def console_text(self):
            return f"pvelab-install: installed {self.name} on /dev/vda"

        def stop(self):
            pass

    monkeypatch.setattr(installtest, "hang", lambda *a: None)
    nodes = tuple(lab.nodes)
    disks = {n.name: tmp_path / n.name for n in nodes}
    job = installtest._Watch(nodes, disks, BIOS, "tcg", tmp_path, print, True)
    runs = installtest._watch(job, Installer)
    assert count.most == 2 and all(r.installed for r in runs.values()) and len(runs) == 4
    assert {r.seconds for r in runs.values()} == {10.0}  # its own 10 s, not the wait for a slot
    assert two_slots.try_take() and two_slots.try_take()  # every slot given back
    two_slots.give(), two_slots.give()


def test_a_bad_slot_count_is_one_line(monkeypatch):
    from pvelab.core.errors import PvelabError
    from pvelab.running import slots

    monkeypatch.setenv(slots.ENV, "two")
    with pytest.raises(PvelabError, match=r"^PVELAB_BOOT_SLOTS: 'two': not a whole number"):
        slots.count()
    monkeypatch.setenv(slots.ENV, "0")
    assert slots.count() == 0
    monkeypatch.delenv(slots.ENV)
    assert slots.count() == len(os.sched_getaffinity(0))
