"""`invoke boot-test`: boot the built nodes together and run the lab's scenario.

Network namespace + bridge + dnsmasq (labnet), one QEMU per node on a throwaway
overlay of its artefact (machine), the scenario from the lab file (scenario), then
reports under ``build/boot-test/``: console logs, ``report.json``, ``junit.xml``.
VMs, taps, dnsmasq and the namespace are removed on success, failure and Ctrl-C.
"""

from __future__ import annotations

import signal
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import pycdlib

from .build import sha256
from .lab import Lab, Node
from .labnet import LabNet
from .machine import Machine, MachineError, resolve_accel
from .paths import build_root, node_dir
from .scenario import Report, run_scenario, summary, write_reports

SSH_TIMEOUT_TCG = 900.0
SSH_TIMEOUT_KVM = 240.0


class BootTestError(RuntimeError):
    pass


def artefact(node: Node, media: str) -> Path:
    path = node_dir(node.name) / f"{node.name}.{media}"
    if not path.exists():
        raise BootTestError(f"{path} is missing: run `invoke build --node {node.name}` first")
    return path


def report_dir(media: str, firmware: str) -> Path:
    """build/boot-test/ for the default qcow2+BIOS run, build/boot-test/<media>-<firmware>/ else."""
    root = build_root() / "boot-test"
    return root if (media, firmware) == ("qcow2", "bios") else root / f"{media}-{firmware}"


def kernel_from_iso(iso: Path, dest: Path) -> Path:
    """The node's own kernel (for the KVM probe), read out of its ISO."""
    cd = pycdlib.PyCdlib()
    cd.open(str(iso))
    try:
        cd.get_file_from_iso(str(dest), rr_path="/live/vmlinuz")
    finally:
        cd.close()
    return dest


_T0 = [time.monotonic()]


def _say(msg: str) -> None:
    print(f"[boot-test {time.monotonic() - _T0[0]:6.1f}s] {msg}", file=sys.stderr, flush=True)


def boot_test(lab: Lab, names: list[str] | None = None, media: str = "qcow2",
              firmware: str = "bios", accel: str = "auto", outdir: Path | None = None,
              timeout: float = 180.0, after=None, analyze: bool = False) -> Report:
    """Boot the selected nodes together, run the scenario, write reports; return the report.

    ``analyze`` adds each guest's ``systemd-analyze time``/``blame`` to the report (after
    the verdict; it costs ~15 s of emulated CPU per guest, so it is opt-in).

    ``after(machines, report)``, if given, runs while the VMs are still up (tests use it
    to break a node and show the gate failing); what it returns lands in
    ``report.context["after"]``.
    """
    if media not in ("qcow2", "iso"):
        raise BootTestError(f"--media: {media!r}: must be qcow2 or iso")
    if firmware not in ("bios", "uefi"):
        raise BootTestError(f"--firmware: {firmware!r}: must be bios or uefi")
    if media == "qcow2" and firmware == "uefi":
        raise BootTestError("--firmware uefi boots the ISO (--media iso); the qcow2 is a BIOS/MBR disk")
    nodes = lab.select(names)
    files = {n.name: artefact(n, media) for n in nodes}
    outdir = outdir or report_dir(media, firmware)
    outdir.mkdir(parents=True, exist_ok=True)
    t0 = _T0[0] = time.monotonic()

    with tempfile.TemporaryDirectory(prefix="pvelab-boot-") as tmp:
        probe_kernel = kernel_from_iso(artefact(nodes[0], "iso"), Path(tmp) / "vmlinuz")
        chosen, why = resolve_accel(accel, probe_kernel)
    _say(f"accelerator: {chosen} ({why})")
    context = {
        "lab": lab.name, "media": media, "firmware": firmware, "accel": chosen, "accel_reason": why,
        "artefacts": {name: {"path": str(p), "sha256": sha256(p)} for name, p in files.items()},
    }

    # SIGTERM (CI timeouts, kill) unwinds like Ctrl-C so everything is cleaned up.
    previous = signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        with ExitStack() as stack:
            net = stack.enter_context(LabNet([n.name for n in nodes], outdir))
            machines = {}
            for n in nodes:
                m = Machine(n.name, n.ram_mb, files[n.name], media, firmware, chosen, outdir, net,
                            user=lab.user.name, password=lab.user.password)
                stack.callback(m.stop)
                machines[n.name] = m
            for m in machines.values():
                m.start()
            _say(f"started {len(machines)} VM(s) ({media}, {firmware}); consoles in {outdir}")
            boot_seconds = _wait_all_ssh(machines, SSH_TIMEOUT_KVM if chosen == "kvm" else SSH_TIMEOUT_TCG)
            context["ssh_ready_seconds"] = boot_seconds
            context["dhcp_leases"] = net.leases()
            context["host_keys"] = {name: m.host_key for name, m in machines.items()}

            def execute(vm: str, command: str) -> tuple[int, str]:
                return machines[vm].execute(command, timeout=60)

            _say("running scenario " + lab.scenario.name)
            report = run_scenario(lab.scenario, execute, timeout=timeout, context=context)
            _say(f"scenario done: {'passed' if report.passed else 'FAILED'}")
            failed = _on_all(machines, "systemctl --failed --no-legend --plain")
            report.context["failed_units"] = failed
            for name, units in failed.items():
                if units:
                    _say(f"{name}: failed units: {' '.join(l.split()[0] for l in units.splitlines())}")
            if analyze:  # diagnostics after the verdict, all VMs at once
                _say("reading systemd-analyze from the guests")
                report.context["boot_analysis"] = {
                    name: dict(zip(("time", "blame"), (p.strip() for p in text.split("--- blame", 1))))
                    for name, text in _on_all(machines, ANALYZE).items()}
            if after:
                report.context["after"] = after(machines, report)
            _say("stopping the VMs and the lab network")
    finally:
        signal.signal(signal.SIGTERM, previous)
    report.context["wall_seconds"] = round(time.monotonic() - t0, 1)
    write_reports(report, outdir)
    print(summary(report), flush=True)
    print(f"boot test wall time: {report.context['wall_seconds']}s; reports: "
          f"{outdir / 'report.json'}, {outdir / 'junit.xml'}", flush=True)
    return report


def _wait_all_ssh(machines: dict[str, Machine], timeout: float) -> dict[str, float]:
    def wait(m: Machine) -> float:
        seconds = round(m.wait_for_ssh(timeout), 1)
        _say(f"{m.name}: SSH up after {seconds}s at {m.address}")
        return seconds

    results, errors = _parallel(machines, wait)
    if errors:
        raise BootTestError("; ".join(errors.values()))
    return results


def _parallel(machines: dict[str, Machine], fn) -> tuple[dict, dict[str, str]]:
    """fn(machine) on every VM at once: (name -> result, name -> MachineError text)."""
    results: dict = {}
    errors: dict[str, str] = {}

    def run(m: Machine):
        try:
            results[m.name] = fn(m)
        except MachineError as exc:
            errors[m.name] = str(exc)

    threads = [threading.Thread(target=run, args=(m,), daemon=True) for m in machines.values()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, errors


ANALYZE = "systemd-analyze time; echo '--- blame'; systemd-analyze blame | head -n 12"


def _on_all(machines: dict[str, Machine], command: str) -> dict[str, str]:
    """Run one command on every VM at once; name -> output (or the error)."""
    results, errors = _parallel(machines, lambda m: m.execute(command, timeout=60)[1].strip())
    return {name: results[name] if name in results else f"error: {errors.get(name, '')}"
            for name in machines}


def boot_one(lab: Lab, name: str, media: str, firmware: str, accel: str) -> int:
    """`invoke boot`: one node with its serial console on this terminal (Ctrl-a x quits)."""
    import subprocess
    node = lab.node(name)
    path = artefact(node, media)
    with tempfile.TemporaryDirectory(prefix="pvelab-boot-") as tmp:
        chosen, why = resolve_accel(accel, kernel_from_iso(artefact(node, "iso"), Path(tmp) / "vmlinuz"))
        _say(f"accelerator: {chosen} ({why}); network: QEMU user mode, restricted (no outside access)")
        m = Machine(name, node.ram_mb, path, media, firmware, chosen, Path(tmp))
        args = m.qemu_args(interactive=True)
        _say(f"login: {lab.user.name} / {lab.user.password}; quit with Ctrl-a x")
        return subprocess.call(args)
