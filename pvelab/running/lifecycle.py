"""A running lab's state on disk: claiming it for a new ``up``, cleaning what a run
left, and the lines ``up`` prints (also after ``invoke rehearse --keep``)."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

from pvelab.core.locks import pid_alive, qemu_alive
from pvelab.model.faults import DriverError
from pvelab.model.lab import Lab
from pvelab.running import serving
from pvelab.running.driver import (
    KEY_NAME,
    RunState,
    netns_name,
    read_state,
)
from pvelab.running.labnet import LabNet


def claim(lab: Lab) -> Path:
    """The run state's path for a new running lab; DriverError if the lab is up already.
    Stale state (or a namespace left without state) is said and cleaned first."""
    state = read_state(lab)
    if state is not None:
        why = state.liveness()
        if not why:
            raise DriverError(
                f"lab {lab.name} is already up (since {state.started_at}): invoke status --lab {lab.path};"
                f" take it down with invoke down, or up --replace"
            )
        print(f"lab {lab.name}: stale state ({why}); cleaning it up first", flush=True)
        cleanup(lab, state)
    elif Path(f"/run/netns/{netns_name(lab)}").exists():
        print(f"lab {lab.name}: a network namespace {netns_name(lab)} without state; removing it", flush=True)
        cleanup(lab, None)
    return lab.layout.run_dir / "state.json"


def cleanup(lab: Lab, state: RunState | None) -> list[str]:
    """Kill whatever of the lab still runs, remove its namespace and throwaway files; what was done."""
    done = []
    ns = state.netns if state else netns_name(lab)
    if state is not None:
        for name, rec in state.nodes.items():
            if qemu_alive(rec.pid, name):
                os.kill(rec.pid, signal.SIGKILL)
                done.append(f"QEMU of {name} killed")
        if state.forwarder_pid and pid_alive(state.forwarder_pid):
            os.kill(state.forwarder_pid, signal.SIGTERM)
    workdir = Path(state.workdir) if state else lab.layout.run_dir
    if Path(f"/run/netns/{ns}").exists():
        net = LabNet([], workdir)
        net.name = ns
        net.down()  # what is left in the namespace dies with it
        done.append(f"network namespace {ns} (bridge, taps, dnsmasq) removed")
    removed = 0
    patterns = (
        "*.overlay.qcow2",
        "*.disk.qcow2",
        "*.OVMF_VARS.fd",
        "*.console.sock",
        "*.qmp.sock",
        "*.pid",
        "dnsmasq.pid",
    )
    for pattern in patterns:
        for f in workdir.glob(pattern):
            f.unlink(missing_ok=True)
            removed += 1
    for name in (KEY_NAME, f"{KEY_NAME}.pub", "state.json"):
        (workdir / name).unlink(missing_ok=True)
    if (workdir / serving.SERVE_DIR).is_dir():
        shutil.rmtree(workdir / serving.SERVE_DIR)
        removed += 1
    (lab.layout.run_dir / "state.json").unlink(missing_ok=True)
    if removed:
        done.append(f"{removed} throwaway file(s) (overlays, UEFI variables, sockets) removed")
    return done


# --------------------------------------------------------------------------- up / down


def describe(lab: Lab, state: RunState) -> str:
    """What ``up`` prints: per node its addresses, how to log in, its console log."""
    lines = [
        f"lab {lab.name} is up ({state.media}, {state.firmware}, {state.accel})"
        + (f"; corosync cluster {lab.cluster_name} with its QDevice, quorate" if state.cluster else ""),
        f"{'node':<12} {'lab address':<13} {'DHCP address':<14} {'SSH on the host':<17} {'API on the host':<17} console log",
    ]
    for name, rec in state.nodes.items():
        fw = rec.forwards
        lines.append(
            f"{name:<12} {rec.alias:<13} {rec.address:<14} "
            f"{'127.0.0.1:' + str(fw['ssh']) if 'ssh' in fw else '-':<17} "
            f"{'127.0.0.1:' + str(fw['api']) if 'api' in fw else '-':<17} {rec.console_log}"
        )
    flag = f" --lab {lab.path}" if lab.path.resolve() != _default_lab() else ""
    first, last = (
        next(iter(state.nodes)),
        lab.members[-1].name if lab.members else next(iter(state.nodes)),
    )
    lines += [
        f"log in:   invoke ssh {first}{flag}          (as {lab.user.name}; sudo needs no password here)",
        f"run:      invoke ssh {first}{flag} --root -- corosync-quorumtool -s",
        f"console:  invoke console {first}{flag}      (Ctrl-] leaves)",
        f"faults:   invoke fault cut {last}{flag}, invoke fault heal all{flag}, ... ; invoke status{flag}",
        f"stop:     invoke down{flag}",
    ]
    return "\n".join(lines)


def _default_lab() -> Path:
    from pvelab.core.paths import DEFAULT_LAB

    return DEFAULT_LAB.resolve()
