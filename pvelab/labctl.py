"""The lab an operator's hands know: ``up``, ``status``, ``ssh``, ``console``, ``fault``, ``down``.

``up`` boots the lab through :class:`pvelab.running.driver.Driver` in ``build/<lab>/run/`` and
detaches it: the VMs, dnsmasq and the loopback port forwarder run on after the command
returns. Every later command finds the lab again from its run state. One running lab per
lab name (a lock file and the run state guard it); different labs run side by side, each
in its own network namespace ``pvelab-<lab>``.

A lab whose processes were killed, or whose host rebooted, leaves stale state: it is
detected (:meth:`RunState.liveness`), said in one line, and cleaned by ``down`` (and by
``up`` before it starts).
"""

from __future__ import annotations

import json
import os
import select
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pvelab.core.locks import lab_lock, qemu_alive
from pvelab.core.logger import Progress
from pvelab.model.artefacts import RehearsalReport, write_atomic
from pvelab.model.faults import DriverError, Fault, Target
from pvelab.model.lab import Lab
from pvelab.model.media import DEFAULT_FIRMWARE, DEFAULT_MEDIUM
from pvelab.running import apicert
from pvelab.running.corotools import parse_cfgtool, parse_qnetd_clients, parse_quorumtool
from pvelab.running.driver import (
    KEY_NAME,
    Driver,
    RunState,
    link_faults_in_force,
    netns_name,
    parallel,
    parse_groups,
    parse_link_target,
    parse_nodes,
    parse_votes,
    read_state,
)
from pvelab.running.lifecycle import claim, cleanup
from pvelab.running.machine import Machine

CONSOLE_ESCAPE = b"\x1d"  # Ctrl-]


# --------------------------------------------------------------------------- lock and state


def up(
    lab: Lab,
    media: str = DEFAULT_MEDIUM.name,
    firmware: str = DEFAULT_FIRMWARE.name,
    accel: str = "auto",
    cluster: bool = False,
    replace: bool = False,
) -> RunState:
    """Boot the lab, leave it running; with ``cluster``, real corosync + QDevice, quorate."""
    from pvelab.build.guestlayer import layers
    from pvelab.checks.boottest import _install_first, choose_accel
    from pvelab.core.run import Steps
    from pvelab.model.artefacts import built
    from pvelab.model.media import INSTALLED_DISK, boot_combination

    medium, fw = boot_combination(media, firmware)
    say = Progress("up")
    with lab_lock(lab.name, "up"):
        if replace and read_state(lab) is not None:
            for line in cleanup(lab, read_state(lab)):
                say(line)
        state_file = claim(lab)
        for n in lab.nodes:
            built(lab, n, medium.artefact)
        packages = _cluster_packages(lab) if cluster else {}
        run_dir = lab.layout.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        chosen, why = choose_accel(lab, lab.nodes[0], accel)
        say(f"accelerator: {chosen} ({why})")
        disks, _ = _install_first(lab, lab.nodes, medium, fw, accel, run_dir, say)
        boot_medium = boot_combination(INSTALLED_DISK.name, fw.name)[0] if disks else medium
        bases = layers(lab, medium, packages, Steps("up", run_dir / "layers.log")) if not disks else {}
        driver = Driver(
            lab,
            lab.nodes,
            boot_medium,
            fw,
            chosen,
            why,
            run_dir,
            say,
            disks,
            netns=netns_name(lab),
            state_file=state_file,
            bases=bases,
        )
        with driver:
            if cluster:
                _form_cluster(lab, driver, packages, say)
            state = driver.detach(state_file)
            state.cluster = cluster
            state.up_seconds = round(say.elapsed(), 1)
            driver.save()
        say(f"lab {lab.name} is up after {state.up_seconds}s")
    return state


def _cluster_packages(lab: Lab) -> dict:
    from pvelab.checks.rehearse import guest_packages
    from pvelab.core.run import Steps

    return guest_packages(lab, Steps("up", lab.layout.run_dir / "packages.log"))


def _form_cluster(lab: Lab, driver: Driver, packages: dict, say: Progress) -> None:
    """The rehearsal's deployment, then wait until every member is quorate as the lab's
    arithmetic says (the walk's first step)."""
    from pvelab.checks.rehearse import SETTLE_TIMEOUT, Rehearsal
    from pvelab.model.quorum import walk

    report = _empty_report(lab, driver)
    run = Rehearsal(lab, driver, packages, report, say)
    try:
        run.deploy()
        step = walk(lab)[0]
        settled = run.settle(step, time.monotonic(), SETTLE_TIMEOUT)
    finally:
        write_atomic(lab.layout.run_dir / "deploy.json", report.to_json())
    if not settled.passed:
        raise DriverError(
            f"the cluster did not become quorate within {SETTLE_TIMEOUT:.0f}s: "
            + "; ".join(f"{n.node} {n.observed}" for n in settled.nodes if not n.passed)
        )
    say(f"cluster {lab.cluster_name} quorate on every member after {settled.settle_seconds}s")


def _empty_report(lab: Lab, driver: Driver) -> RehearsalReport:
    return RehearsalReport(
        lab=lab.name,
        lab_file=str(lab.path),
        media=driver.medium.name,
        firmware=driver.fw.value,
        accel=driver.accel,
        artefacts={},
        packages={},
    )


def down(lab: Lab) -> list[str]:
    """Stop every VM, remove taps, dnsmasq, namespace and overlays; idempotent."""
    with lab_lock(lab.name, "down"):
        state = read_state(lab)
        leftover_ns = Path(f"/run/netns/{netns_name(lab)}").exists()
        if state is None and not leftover_ns:
            return [f"lab {lab.name} is not up; nothing to do"]
        lines = []
        if state is not None and (why := state.liveness()):
            lines.append(f"lab {lab.name}: stale state ({why}); cleaning up")
        done = cleanup(lab, state)
        lines += done
        lines.append(f"lab {lab.name} is down")
        return lines


# --------------------------------------------------------------------------- describe / status


def status(lab: Lab) -> dict[str, Any]:
    """Per node: power, addresses, SSH, corosync's own figures; the witness's qnetd clients; faults."""
    state = read_state(lab)
    if state is None:
        return {"lab": lab.name, "up": False, "stale": ""}
    why = state.liveness()
    if why:
        return {"lab": lab.name, "up": False, "stale": why}
    driver = Driver.attach(lab, Progress("status"))
    connect_errors = driver.connect(timeout=15)
    nodes: dict[str, Any] = {}
    for name, rec in state.nodes.items():
        m = driver.machines[name]
        nodes[name] = {
            "power": "running" if m.is_running() else "off",
            "address": rec.address,
            "alias": rec.alias,
            "ssh": m.client is not None,
            "ssh_error": connect_errors.get(name, ""),
            "forwards": {k: f"127.0.0.1:{v}" for k, v in rec.forwards.items()},
            "console_log": rec.console_log,
        }
    reachable = {n: m for n, m in driver.machines.items() if m.client is not None}
    results, _ = parallel(reachable, lambda m: _node_status(lab, m))
    for name, extra in results.items():
        nodes[name].update(extra)
    separated = driver.net.separated()
    in_force = [f"{n} powered off" for n, v in nodes.items() if v["power"] == "off"]
    in_force += [f"{','.join(g)} cut off from the rest" for g in separated]
    in_force += link_faults_in_force(state.faults)
    witness = lab.witness.name if lab.witness else None
    if state.cluster and witness and nodes.get(witness, {}).get("qnetd") == "inactive":
        in_force.append(f"corosync-qnetd stopped on {witness}")
    return {
        "lab": lab.name,
        "up": True,
        "media": state.media,
        "firmware": state.firmware,
        "accel": state.accel,
        "started_at": state.started_at,
        "up_seconds": state.up_seconds,
        "cluster": state.cluster,
        "netns": state.netns,
        "nodes": nodes,
        "faults_in_force": in_force,
        "fault_history": state.faults,
    }


def _node_status(lab: Lab, m: Machine) -> dict[str, Any]:
    """What one node says about itself, read in one round trip (:meth:`Machine.probe`)."""
    node = lab.node(m.name)
    role = node.role_def
    probes = {"addresses": "ip -4 -o addr show scope global"}
    if role.api_cert:
        probes["api_cert"] = apicert.command(role.api_cert)
    if role.is_member():
        probes["corosync"] = "systemctl is-active corosync.service"
        # corosync's own tools only where it runs (a lab up without --cluster has none)
        probes["quorum"] = "! pidof corosync >/dev/null || corosync-quorumtool -s"
        probes["links"] = "! pidof corosync >/dev/null || corosync-cfgtool -s"
    if role.is_witness():
        probes["qnetd"] = "systemctl is-active corosync-qnetd.service"
        probes["qnetd_clients"] = "! pidof corosync-qnetd >/dev/null || corosync-qnetd-tool -l"
    got = m.probe(probes, root=True, timeout=60)
    out: dict[str, Any] = {"alias_up": str(node.alias.ip) in got["addresses"].output}
    if role.api_cert:
        out["api_fingerprint"] = apicert.parse(got["api_cert"].output) if got["api_cert"].ok else ""
    if role.is_member():
        out["corosync"] = got["corosync"].output.strip()
        if out["corosync"] == "active":
            q = parse_quorumtool(got["quorum"].output)
            out["quorum"] = {
                k: q[k] for k in ("quorate", "total_votes", "expected_votes", "quorum", "qdevice_vote")
            }
            ids = {str(n.nodeid): n.name for n in lab.members}
            out["links"] = {
                link: {ids.get(nid, nid): st for nid, st in peers.items()}
                for link, peers in parse_cfgtool(got["links"].output).items()
            }
    if role.is_witness():
        out["qnetd"] = got["qnetd"].output.strip()
        if out["qnetd"] == "active":
            clients = parse_qnetd_clients(got["qnetd_clients"].output)
            by_id = {n.nodeid: n.name for n in lab.members}
            out["qnetd_clients"] = [by_id.get(i, str(i)) for i in clients["node_ids"]]
    return out


def status_table(s: dict[str, Any]) -> str:
    if not s["up"]:
        return f"lab {s['lab']}: not up" + (
            f" (stale state: {s['stale']}; clean it with invoke down)" if s["stale"] else ""
        )
    lines = [
        f"lab {s['lab']}: up since {s['started_at']} ({s['media']}, {s['firmware']}, {s['accel']})"
        + ("; corosync + QDevice deployed" if s["cluster"] else ""),
        f"{'node':<12} {'power':<8} {'ssh':<4} {'address':<14} {'lab address':<13} {'ssh/api on 127.0.0.1':<22} corosync",
    ]
    for name, n in s["nodes"].items():
        ports = "/".join(v.split(":")[1] for v in n["forwards"].values())
        lines.append(
            f"{name:<12} {n['power']:<8} {'yes' if n['ssh'] else 'no':<4} {n['address']:<14} "
            f"{n['alias'] + ('' if n.get('alias_up', True) else '?'):<13} {ports:<22} {_corosync_cell(n)}"
        )
    lines.append("faults in force: " + ("; ".join(s["faults_in_force"]) or "none"))
    lines += [
        f"{name} API certificate SHA-256: {n['api_fingerprint'] or 'not made yet'}"
        for name, n in s["nodes"].items()
        if "api_fingerprint" in n
    ]
    return "\n".join(lines)


def _corosync_cell(n: dict[str, Any]) -> str:
    if "quorum" in n:
        q = n["quorum"]
        links = " ".join(
            f"link{lid}: " + ",".join(f"{peer} {st}" for peer, st in peers.items() if st != "localhost")
            for lid, peers in n.get("links", {}).items()
        )
        return (
            f"{'quorate' if q['quorate'] else 'NOT quorate'} {q['total_votes']}/{q['expected_votes']}"
            f"{' +qd' if q['qdevice_vote'] else ''}; {links}"
        )
    if "qnetd_clients" in n:
        return f"qnetd: {len(n['qnetd_clients'])} client(s) {', '.join(n['qnetd_clients'])}"
    if "qnetd" in n:
        return f"qnetd {n['qnetd']}"
    return n.get("corosync", "-") if n["ssh"] else "-"


# --------------------------------------------------------------------------- ssh / console


def _running(lab: Lab, node: str) -> RunState:
    state = read_state(lab)
    if state is None:
        raise DriverError(f"lab {lab.name} is not up (start it: invoke up --lab {lab.path})")
    if why := state.liveness():
        raise DriverError(
            f"lab {lab.name} is not up: stale state, {why} (clean it: invoke down --lab {lab.path})"
        )
    if node not in state.nodes:
        raise DriverError(f"{node!r}: no such node in lab {lab.name} (nodes: {', '.join(state.nodes)})")
    if not qemu_alive(state.nodes[node].pid, node):
        raise DriverError(f"{node} is powered off (invoke fault power-on {node} --lab {lab.path})")
    return state


def ssh_command(
    lab: Lab, node: str, command: str = "", root: bool = False, tty: bool | None = None
) -> list[str]:
    state = _running(lab, node)
    rec = state.nodes[node]
    tty = sys.stdin.isatty() if tty is None else tty
    remote = command
    if root:
        remote = f"sudo -i sh -c {shlex.quote(command)}" if command else "sudo -i"
    return [
        "ip",
        "netns",
        "exec",
        state.netns,
        "ssh",
        "-i",
        str(Path(state.workdir) / KEY_NAME),
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "BatchMode=yes",
        "-o",
        "ConnectTimeout=15",
        # a throwaway lab: host keys change with every up (and with every live boot)
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "LogLevel=ERROR",
        *(["-t"] if tty and not command else []),
        f"{lab.user.name}@{rec.address}",
        *([remote] if remote else []),
    ]


def ssh(lab: Lab, node: str, command: str = "", root: bool = False) -> int:
    """An interactive shell on ``node``, or one command: its exit status passed through."""
    return subprocess.call(ssh_command(lab, node, command, root))


def console(lab: Lab, node: str) -> int:
    """The node's serial console on this terminal (Ctrl-] leaves); the log keeps it all."""
    state = _running(lab, node)
    workdir = os.open(state.workdir, os.O_PATH)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # the socket is named relative to the run folder; /proc/self/fd keeps the path short
        sock.connect(f"/proc/self/fd/{workdir}/{node}.console.sock")
    except OSError as exc:
        raise DriverError(f"{node}: its console socket does not answer ({exc})") from None
    finally:
        os.close(workdir)
    tty = sys.stdin.isatty()
    if tty:
        import termios
        import tty as ttymod

        saved = termios.tcgetattr(sys.stdin.fileno())
        ttymod.setraw(sys.stdin.fileno())
        print(f"[{node} console; Ctrl-] leaves]\r", file=sys.stderr, flush=True)
    try:
        _pump_console(sock, tty)
    finally:
        if tty:
            termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, saved)
        sock.close()
    return 0


def _pump_console(sock: socket.socket, tty: bool) -> None:
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
    eof_at: float | None = None
    while True:
        wait = [sock] + ([] if eof_at else [stdin])
        ready, _, _ = select.select(wait, [], [], 0.5)
        if sock in ready:
            data = sock.recv(4096)
            if not data:
                return
            os.write(stdout, data)
        if stdin in ready:
            data = os.read(stdin, 1024)
            if tty and CONSOLE_ESCAPE in data:
                return
            if not data:
                eof_at = time.monotonic()  # piped input ended: show what the guest answers, then leave
            else:
                sock.sendall(data)
        if eof_at and time.monotonic() - eof_at > 3:
            return


# --------------------------------------------------------------------------- fault


def fault(lab: Lab, action: str, target: str = "") -> str:
    """``invoke fault ACTION TARGET``: parse first (exit 2 on a bad name), then apply."""
    word = action if action != "qnetd" else f"qnetd-{target}"
    f = Fault.parse(word)
    nodes: list[str] = []
    groups: list[list[str]] | None = None
    link: int | None = None
    values: tuple[float, ...] = ()
    if f.is_link:
        nodes, link, values = parse_link_target(lab, f, target)
    elif f.target is Target.VOTES:
        nodes, values = parse_votes(lab, target)
    elif f.target is Target.GROUPS:
        groups = parse_groups(lab, target)
    elif f.target is Target.NODES_OR_ALL:
        nodes = [] if target in ("", "all") else parse_nodes(lab, target, f.value)
    elif f.target is Target.NODES:
        nodes = parse_nodes(lab, target, f.value)
    with lab_lock(lab.name, "fault"):
        driver = Driver.attach(lab, Progress("fault"))
        if f is Fault.POWER_OFF:  # a clean shutdown is asked for over SSH
            driver.connect(nodes)
        if f.is_link or f.is_by_hand:
            driver.connect()  # netem, bulk traffic, clear and expected work in the guests
        line = driver.fault(f, nodes, groups, link=link, values=values)
        assert driver.state is not None
        if f is Fault.POWER_ON and driver.state.cluster and not driver.medium.copy_on_write:
            _redeploy(lab, driver, set(nodes))
            line += "; corosync deployed on it again (live medium)"
        return line


def _redeploy(lab: Lab, driver: Driver, names: set[str]) -> None:
    from pvelab.checks.rehearse import Rehearsal

    driver.connect()
    run = Rehearsal(lab, driver, _cluster_packages(lab), _empty_report(lab, driver), Progress("fault"))
    run.redeploy(names)


def status_json(s: dict[str, Any]) -> str:
    return json.dumps(s, indent=2)


__all__ = ["console", "down", "fault", "ssh", "status", "up"]
