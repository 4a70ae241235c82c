"""Guest kernel faults, read from the serial console: named, never mistaken for a boot or
an install.

Under a loaded TCG host a guest kernel can die before it has done anything (seen here:
``..MP-BIOS bug: 8254 timer not connected to IO-APIC`` then ``Kernel panic - not
syncing: IO-APIC + timer doesn't work!`` 0.02 s in; an oops in ``crng_reseed`` under
``-cpu max``). QEMU then exits, or hangs, as if the guest had powered off or were slow.
Every harness that boots asks :func:`scan` about the console of the attempt and says
what it found; a fault that is the emulator's (:attr:`GuestFault.emulator`) is retried
once, as a hung installer is, and counted in the report.

Which faults are the emulator's: the known signatures of emulated hardware (the timer
check, the early entropy code), and any panic before the guest's userspace started
(no ``systemd[1]`` line yet): nothing of pvelab's has run then, so the same artefact
booting again is the fair test. A panic after userspace started is the guest's own
and is not retried.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\r")


class FaultKind(enum.Enum):
    PANIC = "panic"  # the kernel stopped: the guest is dead
    OOPS = "oops"  # the kernel killed a task and may run on

    def is_fatal(self) -> bool:
        return self is FaultKind.PANIC


SIGNS: tuple[tuple[str, FaultKind], ...] = (
    ("Kernel panic - not syncing", FaultKind.PANIC),
    ("BUG: kernel NULL pointer dereference", FaultKind.OOPS),
    ("BUG: unable to handle page fault", FaultKind.OOPS),
    ("general protection fault", FaultKind.OOPS),
    ("Oops: ", FaultKind.OOPS),
)
# faults of emulated hardware, not of the image
EMULATOR_SIGNS = ("IO-APIC + timer doesn't work", "MP-BIOS bug", "crng_reseed", "timer not connected")
USERSPACE = re.compile(r"systemd\[1\]: |Welcome to .*Debian|live-boot")


@dataclass(frozen=True)
class GuestFault:
    kind: FaultKind
    line: str  # the console line that says it
    emulator: bool  # the emulator's, not the image's: retried once
    context: str  # the lines around it

    def describe(self) -> str:
        whose = "the emulator's" if self.emulator else "the guest's"
        return f"kernel {self.kind.value} ({whose}): {self.line}"

    def to_dict(self) -> dict[str, object]:
        return {"kind": self.kind.value, "line": self.line, "emulator": self.emulator}


def scan(console: str) -> GuestFault | None:
    """The first kernel panic or oops on ``console`` (one boot attempt's text), or None.
    A panic wins over an oops before it: it is what ended the guest."""
    lines = [line.strip() for line in ANSI.sub("", console).splitlines()]
    found: GuestFault | None = None
    for i, line in enumerate(lines):
        kind = next((k for sign, k in SIGNS if sign in line), None)
        if kind is None:
            continue
        before = lines[:i]
        near = "\n".join(lines[max(0, i - 6) : i + 4])
        started = any(USERSPACE.search(b) for b in before)
        emulator = any(sign in near for sign in EMULATOR_SIGNS) or (kind.is_fatal() and not started)
        fault = GuestFault(
            kind, line[line.find("]") + 1 :].strip() if line.startswith("[") else line, emulator, near
        )
        if kind.is_fatal():
            return fault
        found = found or fault
    return found
