"""Guest kernel faults read from the console: named, the emulator's told from the guest's,
retried once by the driver and never taken for a boot."""

import threading

import pytest

from pvelab.model.faults import DriverError
from pvelab.running.driver import Driver
from pvelab.running.guestfault import FaultKind, scan
from pvelab.running.machine import GuestFaultError

IOAPIC = """\
[    0.000000] Linux version 6.12.57+deb13-amd64
[    0.019874] ..MP-BIOS bug: 8254 timer not connected to IO-APIC
[    0.020112] Kernel panic - not syncing: IO-APIC + timer doesn't work!  Boot with apic=debug
[    0.020400] CPU: 0 UID: 0 PID: 1 Comm: swapper/0 Not tainted
"""
CRNG = """\
[    5.900000] systemd[1]: Started systemd-journald.service
[    6.104000] BUG: kernel NULL pointer dereference, address: 0000000000000008
[    6.104100] RIP: 0010:crng_reseed+0x4a/0x110
[    6.104200] Oops: 0000 [#1] PREEMPT SMP NOPTI
"""
LATE = """\
[    3.000000] systemd[1]: Starting pvelab-install.service
[   40.000000] Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100
"""
CLEAN = "[    1.0] systemd[1]: Reached target multi-user.target\nDebian GNU/Linux 13 pve-1 ttyS0\n"


def test_scan_names_the_fault_and_whose_it_is():
    f = scan(IOAPIC)
    assert f is not None and f.kind is FaultKind.PANIC and f.emulator
    assert f.line.startswith("Kernel panic - not syncing: IO-APIC + timer doesn't work!")
    o = scan(CRNG)
    assert o is not None and o.kind is FaultKind.OOPS and o.emulator and not o.kind.is_fatal()
    late = scan(LATE)
    assert late is not None and late.kind.is_fatal() and not late.emulator  # the guest's own: not retried
    assert scan(CLEAN) is None
    assert "the emulator's" in f.describe() and "the guest's" in late.describe()
    assert scan(CRNG + LATE).kind is FaultKind.PANIC  # the panic, not the oops before it, ended it


class FakeMachine:
    def __init__(self, name, faults):
        self.name, self.faults, self.events = name, list(faults), []
        self.address = "10.81.0.110"

    def wait_for_ssh(self, timeout):
        self.events.append("wait")
        if self.faults:
            raise GuestFaultError(self.name, scan(self.faults.pop(0)), "console.log")
        return 21.04

    def crash(self):
        self.events.append("crash")

    def restart(self, timeout):
        self.events.append("restart")
        return self.wait_for_ssh(timeout)


def fake_driver(machines):
    d = Driver.__new__(Driver)
    d.machines = {m.name: m for m in machines}
    d.accel, d.detached, d.state_file, d.guest_faults = "tcg", False, None, []
    d.state, d._unstarted, d._saving = None, [], threading.Lock()  # every machine already started
    d.said = []
    d.say = d.said.append
    return d


def test_driver_retries_an_emulator_panic_once_and_counts_it():
    m = FakeMachine("pve-1", [IOAPIC])
    d = fake_driver([m])
    assert d.wait_all_ssh() == {"pve-1": 21.0}
    assert m.events == ["wait", "crash", "restart", "wait"]
    assert d.guest_faults == [
        {"node": "pve-1", "kind": "panic", "line": scan(IOAPIC).line, "emulator": True, "retried": True}
    ]
    assert any("booting it again" in s for s in d.said)


@pytest.mark.parametrize("faults", [[IOAPIC, IOAPIC], [LATE]], ids=["twice", "the guest's own"])
def test_driver_stops_on_a_second_or_a_guest_panic(faults):
    m = FakeMachine("pve-2", faults)
    d = fake_driver([m])
    with pytest.raises(
        DriverError, match=r"pve-2: kernel panic \(the (emulator|guest)'s\): Kernel panic - not syncing"
    ):
        d.wait_all_ssh()
    assert d.guest_faults[-1]["retried"] is False


def test_an_installer_stuck_before_userspace_is_hung_though_its_console_changes():
    """GRUB redrawing its menu keeps the console changing: the stall watch alone never
    fires, so no userspace STALL seconds after power-on is a hang too; a console that
    went silent is one whatever it shows; a booted installer printing is not."""
    from pvelab.checks.installtest import hang

    assert hang(console_changed=299, powered_on=0, now=300, stall=300, userspace=False) == (
        "still in firmware or the boot loader 300s after power-on"
    )
    assert hang(console_changed=299, powered_on=0, now=299, stall=300, userspace=False) is None
    assert hang(console_changed=899, powered_on=0, now=900, stall=300, userspace=True) is None
    assert (
        hang(console_changed=100, powered_on=0, now=400, stall=300, userspace=True)
        == "console silent for 300s"
    )
    assert (
        hang(console_changed=100, powered_on=0, now=400, stall=300, userspace=False)
        == "console silent for 300s"
    )
    # a retry powers on again: the clock starts over
    assert hang(console_changed=500, powered_on=450, now=700, stall=300, userspace=False) is None
