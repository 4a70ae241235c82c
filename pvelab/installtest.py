"""The installer ISOs, run for real: each installs its node onto a blank disk of the
node's size, unattended, and powers off; the boot test then boots the installed disks
alone (:func:`pvelab.boottest.boot_test` with ``--media install``). Also used to show
a refusal: an installer facing a disk that is not blank writes nothing.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from .artefacts import Layout
from .errors import PvelabError
from .lab import Lab, Node
from .machine import Machine
from .media import MEDIA, Firmware
from .qemu import VmSpec, prepare

INSTALL_TIMEOUT = {"tcg": 1800.0, "kvm": 600.0}


class InstallError(PvelabError):
    pass


@dataclass
class InstallRun:
    node: str
    disk: Path
    seconds: float  # power-on to power-off
    exit_code: int | None
    console: str

    @property
    def installed(self) -> bool:
        return self.exit_code == 0 and f"pvelab-install: installed {self.node} on" in self.console

    @property
    def refused(self) -> bool:
        return "pvelab-install: REFUSED:" in self.console


def blank_disk(path: Path, size_gb: int) -> Path:
    path.unlink(missing_ok=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), f"{size_gb}G"], check=True)
    return path


# Long on purpose: start every installer, then one polling loop with its deadline and cleanup.
def run_installers(
    lab: Lab, nodes: tuple[Node, ...], disks: dict[str, Path], fw: Firmware, accel: str, workdir: Path, say
) -> dict[str, InstallRun]:
    """Boot each node's installer ISO with its target disk attached; wait until each powers off."""
    medium = MEDIA["install"]
    machines = {}
    for n in nodes:
        iso = Layout(lab.name).artefact(n.name, "installer")
        if not iso.exists():
            raise InstallError(f"{iso} is missing: run `invoke build --lab {lab.path}` first")
        drive = prepare(medium, fw, iso, workdir, f"{n.name}-installer")
        spec = VmSpec(
            f"{n.name}-installer", n.ram_mb, medium, fw, accel, drive, workdir, target_disk=disks[n.name]
        )
        machines[n.name] = Machine(spec)
    t0 = time.monotonic()
    for m in machines.values():
        m.start()
    say(f"installing {len(machines)} node(s) ({fw.name}); consoles {workdir}/<node>-installer.console.log")
    deadline = t0 + INSTALL_TIMEOUT.get(accel, INSTALL_TIMEOUT["tcg"])
    runs: dict[str, InstallRun] = {}
    try:
        while len(runs) < len(machines):
            for name, m in machines.items():
                if name not in runs and not m.is_running():
                    assert m.proc is not None
                    runs[name] = InstallRun(
                        name,
                        disks[name],
                        round(time.monotonic() - t0, 1),
                        m.proc.returncode,
                        m.console_text(),
                    )
                    say(
                        f"{name}: installer powered off after {runs[name].seconds}s "
                        f"({'installed' if runs[name].installed else 'REFUSED' if runs[name].refused else 'FAILED'})"
                    )
            if time.monotonic() > deadline:
                late = [n for n in machines if n not in runs]
                raise InstallError(
                    f"installer still running after {deadline - t0:.0f}s on {', '.join(late)}; "
                    f"consoles in {workdir}"
                )
            time.sleep(2)
    finally:
        for m in machines.values():
            m.stop()
    return runs
