"""`invoke boot-test`: boot the built nodes together and run the lab's scenario.

:func:`booted_lab` is the shared harness (the rehearsal uses it too): a network
namespace with a bridge and dnsmasq (labnet), one QEMU per node on a throwaway overlay
of its artefact (qemu, machine), SSH to every guest. VMs, taps, dnsmasq and the
namespace are removed on success, failure, Ctrl-C and SIGTERM. :func:`boot_test` runs
the lab's scenario on it and writes the reports under
``build/<lab>/boot-test/<media>-<firmware>/``: console logs, ``report.json``, ``junit.xml``.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pvelab.build.iso import read_from_iso
from pvelab.checks.installtest import blank_disk, run_installers
from pvelab.checks.scenario import run_scenario, summary, write_reports
from pvelab.core.errors import PvelabError
from pvelab.core.locks import locking
from pvelab.core.logger import Progress
from pvelab.model.artefacts import ArtefactKind, ArtefactRef, BootReport, built, sha256
from pvelab.model.lab import Lab, Node
from pvelab.model.media import (
    DEFAULT_FIRMWARE,
    DEFAULT_MEDIUM,
    FIRMWARES,
    INSTALLED_DISK,
    Firmware,
    Medium,
    boot_combination,
)
from pvelab.running import apicert
from pvelab.running.driver import Driver, sigterm_unwinds
from pvelab.running.machine import Machine
from pvelab.running.qemu import QEMU, VmSpec, prepare, qemu_command, resolve_accel

# the SecureBoot variable: 4 attribute bytes, then 1 when Secure Boot is enforced
SECURE_BOOT = "od -An -tu1 /sys/firmware/efi/efivars/SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c"
ANALYZE = "systemd-analyze time; echo '--- blame'; systemd-analyze blame | head -n 12"


class BootTestError(PvelabError):
    pass


def kernel_from_iso(iso: Path, dest: Path) -> Path:
    """The node's own kernel (for the KVM probe), read out of its ISO."""
    return read_from_iso(iso, "/live/vmlinuz", dest)


def choose_accel(lab: Lab, node: Node, requested: str) -> tuple[str, str]:
    with tempfile.TemporaryDirectory(prefix="pvelab-boot-") as tmp:
        return resolve_accel(
            requested, lambda: kernel_from_iso(built(lab, node, ArtefactKind.ISO), Path(tmp) / "vmlinuz")
        )


@contextmanager
def booted_lab(
    lab: Lab,
    nodes: tuple[Node, ...],
    medium: Medium,
    fw: Firmware,
    accel: str,
    outdir: Path,
    say: Progress,
    disks: dict[str, Path] | None = None,
    **driver_kw: Any,
) -> Iterator[Driver]:
    """Boot ``nodes`` together on an isolated lab network (a :class:`Driver`); yield when
    every one has SSH. ``disks`` boots each node from that disk (an installed one)
    instead of its artefact."""
    if disks is not None:
        medium = INSTALLED_DISK
    else:
        for n in nodes:
            built(lab, n, medium.artefact)
    for tool in (QEMU, "qemu-img", "dnsmasq", "ip"):
        if shutil.which(tool) is None:
            raise BootTestError(f"{tool} not found: it boots the lab (run scripts/setup)")
    chosen, why = choose_accel(lab, nodes[0], accel)
    say(f"accelerator: {chosen} ({why})")
    with Driver(lab, nodes, medium, fw, chosen, why, outdir, say, disks, **driver_kw) as driver:
        yield driver


After = Callable[[dict[str, Machine], BootReport], Any]


# Long on purpose: the report's fields are filled in one place, in the order they are produced.
@locking("boot-test")
def boot_test(
    lab: Lab,
    names: list[str] | None = None,
    media: str = DEFAULT_MEDIUM.name,
    firmware: str = DEFAULT_FIRMWARE.name,
    accel: str = "auto",
    outdir: Path | None = None,
    timeout: float = 180.0,
    after: After | None = None,
    analyze: bool = False,
) -> BootReport:
    """Boot the selected nodes together, run the scenario, write reports; return the report.

    ``analyze`` adds each guest's ``systemd-analyze time``/``blame`` (after the verdict;
    ~15 s of emulated CPU per guest). ``after(machines, report)`` runs while the VMs are
    still up (tests use it to break a node and show the gate failing).
    """
    medium, fw = boot_combination(media, firmware)
    nodes = lab.select(names)
    outdir = outdir or lab.layout.boot_test_dir(medium.name, fw.value)
    say = Progress("boot-test")
    refs = {n.name: built(lab, n, medium.artefact) for n in nodes}
    # the tested artefacts' digests (hundreds of MB) are taken while the VMs boot
    hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256")
    hashed = hasher.submit(lambda: {k: ArtefactRef(str(p), sha256(p)) for k, p in refs.items()})
    hasher.shutdown(wait=False)
    disks, installs = _install_first(lab, nodes, medium, fw, accel, outdir, say)
    with booted_lab(lab, nodes, medium, fw, accel, outdir, say, disks) as booted:
        report = BootReport(
            lab=lab.name,
            lab_file=str(lab.path),
            media=medium.name,
            firmware=fw.value,
            accel=booted.accel,
            accel_reason=booted.accel_reason,
            artefacts=hashed.result(),
            result=_scenario(booted, timeout),
            ssh_ready_seconds=booted.ssh_ready_seconds,
            dhcp_leases=booted.net.leases(),
            host_keys={name: m.host_key for name, m in booted.machines.items()},
            secure_boot_required=fw.secure_boot,
            install_seconds={n: r.seconds for n, r in installs.items()},
            install_attempts={n: r.attempts for n, r in installs.items()},
            guest_faults=[{"node": n, **f} for n, r in installs.items() for f in r.faults]
            + booted.guest_faults,
            lab_sha256=sha256(lab.path),
        )
        _diagnose(booted, report, analyze)
        if after:
            report.after = after(booted.machines, report)
    report.wall_seconds = round(say.elapsed(), 1)
    js, xml = write_reports(report, outdir)
    print(summary(report.result), flush=True)
    print(f"boot test wall time: {report.wall_seconds}s; reports: {js}, {xml}", flush=True)
    return report


def _install_first(
    lab: Lab, nodes: tuple[Node, ...], medium: Medium, fw: Firmware, accel: str, outdir: Path, say: Progress
) -> tuple[dict[str, Path] | None, dict]:
    """``--media install|netinstall``: the installers write blank disks first; their disks then boot."""
    if not medium.installs():
        return None, {}
    outdir.mkdir(parents=True, exist_ok=True)
    chosen, _ = choose_accel(lab, nodes[0], accel)
    disks = {n.name: blank_disk(outdir / f"{n.name}.disk.qcow2", n.disk_gb) for n in nodes}
    with sigterm_unwinds():
        runs = run_installers(lab, nodes, disks, fw, chosen, outdir, say, medium=medium)
    failed = {n: r for n, r in runs.items() if not r.installed}
    if failed:
        raise BootTestError(
            "installer did not install: "
            + "; ".join(f"{n} ({r.verdict}):\n    {r.tail()}" for n, r in failed.items())
        )
    return disks, runs


def _scenario(booted: Driver, timeout: float):
    booted.say("running scenario " + booted.lab.scenario.name)
    result = run_scenario(
        booted.lab.scenario, lambda vm, cmd: booted.machines[vm].execute(cmd, timeout=60), timeout=timeout
    )
    booted.say(f"scenario done: {'passed' if result.passed else 'FAILED'}")
    return result


def _diagnose(booted: Driver, report: BootReport, analyze: bool) -> None:
    """Failed units on every VM (always) and systemd-analyze (opt-in), after the verdict."""
    report.failed_units = booted.on_all("systemctl --failed --no-legend --plain")
    if FIRMWARES[report.firmware].is_uefi():
        seen = booted.on_all(SECURE_BOOT)
        report.secure_boot = {n: out.split()[-1:] == ["1"] for n, out in seen.items()}
        booted.say(
            "Secure Boot: "
            + ", ".join(f"{n} {'on' if on else 'off'}" for n, on in report.secure_boot.items())
        )
    report.api_fingerprints = {
        name: apicert.fingerprint(m, booted.lab.node(name).role_def.api_cert)
        for name, m in booted.machines.items()
        if booted.lab.node(name).role_def.api_cert
    }
    if report.api_fingerprints:
        booted.say(
            "API certificates (SHA-256): "
            + ", ".join(f"{n} {fp or 'none'}" for n, fp in report.api_fingerprints.items())
        )
    for name, units in report.failed_units.items():
        if units:
            booted.say(f"{name}: failed units: {' '.join(u.split()[0] for u in units.splitlines())}")
    if analyze:
        booted.say("reading systemd-analyze from the guests")
        report.boot_analysis = {
            name: dict(zip(("time", "blame"), (p.strip() for p in text.split("--- blame", 1)), strict=False))
            for name, text in booted.on_all(ANALYZE).items()
        }


def boot_one(lab: Lab, name: str, media: str, firmware: str, accel: str) -> int:
    """`invoke boot`: one node with its serial console on this terminal (Ctrl-a x quits)."""
    medium, fw = boot_combination(media, firmware)
    if medium.is_network_boot():
        raise BootTestError(
            f"--media {medium.name}: a network boot needs the lab network's DHCP, TFTP and HTTP; "
            f"run `invoke up --media {medium.name}` and `invoke console {name}`"
        )
    node = lab.select([name])[0]
    path = built(lab, node, medium.artefact)
    chosen, why = choose_accel(lab, node, accel)
    say = Progress("boot")
    say(f"accelerator: {chosen} ({why}); network: QEMU user mode, restricted (no outside access)")
    with tempfile.TemporaryDirectory(prefix="pvelab-boot-") as tmp:
        drive = prepare(medium, fw, path, Path(tmp), name)
        spec = VmSpec(name, node.ram_mb, medium, fw, chosen, drive, Path(tmp))
        say(f"login: {lab.user.name} (password from the lab file); quit with Ctrl-a x")
        return subprocess.call(qemu_command(spec, interactive=True))
