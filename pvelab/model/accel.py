"""QEMU accelerators, each defined once: how long its guests take and how QEMU runs them.

Under TCG every guest instruction is emulated, so a boot or an install takes several
times what it takes under KVM; the waits below are each accelerator's own. Which
accelerator really works on a host is :func:`pvelab.running.qemu.resolve_accel`'s question.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Accel:
    name: str  # QEMU -accel
    cpu: str  # QEMU -cpu
    ssh_timeout: float  # a booting VM to its first SSH login
    install_timeout: float  # one installer's power-on to power-off (a retry included)
    stall_timeout: float  # an installer whose console is unchanged this long is hung
    counts_instructions: bool = False  # supports -icount (guest time = instructions)


# Under TCG: QEMU's default CPU without SVM. The lab never runs nested guests, and an
# SVM flag makes the guest load kvm_amd (and ccp, irqbypass) on every boot.
TCG = Accel("tcg", "qemu64,-svm", 900.0, 900.0, 300.0, counts_instructions=True)
KVM = Accel("kvm", "host", 240.0, 300.0, 120.0)
ACCELS: dict[str, Accel] = {a.name: a for a in (TCG, KVM)}
AUTO = "auto"  # --accel auto: KVM when it really runs a guest here, else TCG
SLOWEST = TCG  # the waits of an accelerator not (yet) known


def of(name: str) -> Accel:
    """The accelerator called ``name`` (a report's, a resolved one); the slowest's waits
    for a name this pvelab does not know."""
    return ACCELS.get(name, SLOWEST)


def choices() -> str:
    return ", ".join((AUTO, *ACCELS))
