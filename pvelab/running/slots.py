"""How many VMs boot at once on this host: one per core this process may run on.

A booting VM under emulation keeps a host core busy. More booting VMs than cores do not
finish sooner together: they take turns on the cores, and every turn costs the others
the host's caches. Measured on 2 cores (QEMU 10, TCG), paired in one sitting on 2026-12-07:

- installers: four at once 204 s; two at once 74 s, as long as one alone;
- four nodes netbooting under Secure Boot: 158 s at once, 108 s two at a time;
- four live ISOs under Secure Boot: 103 s / 96 s; four qcow2 disks: 67 s / 64 s.

A VM holds its slot while it boots: until its SSH login works (a lab node, see
:meth:`pvelab.running.driver.Driver.wait_all_ssh`) or until it powers off (an installer,
:mod:`pvelab.checks.installtest`). A booted VM mostly idles, so the lab still runs all its
nodes at once. The slots are the process's: every boot of one run shares them.
``PVELAB_BOOT_SLOTS`` sets their number (``0``: no limit).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from pvelab.core.errors import PvelabError

ENV = "PVELAB_BOOT_SLOTS"

_lock = threading.Lock()
_slots: threading.BoundedSemaphore | None = None
_count: int | None = None


def count() -> int:
    """The number of slots: ``PVELAB_BOOT_SLOTS``, else the cores this process may use
    (0: no limit)."""
    raw = os.environ.get(ENV)
    if raw is None:
        return len(os.sched_getaffinity(0))
    if not raw.strip().isdigit():
        raise PvelabError(f"{ENV}: {raw!r}: not a whole number of VMs (0: no limit)")
    return int(raw)


def _semaphore() -> threading.BoundedSemaphore | None:
    global _slots, _count
    with _lock:
        if _count is None:
            _count = count()
            _slots = threading.BoundedSemaphore(_count) if _count else None
        return _slots


def limit() -> int:
    """How many VMs may boot at once (0: no limit)."""
    _semaphore()
    assert _count is not None
    return _count


def phrase(vms: int) -> str:
    """What a progress line says of the limit for ``vms`` VMs ('' when they all fit)."""
    n = limit()
    return f", up to {n} booting at once" if n and n < vms else ""


@contextmanager
def booting() -> Iterator[None]:
    """Hold one slot for the ``with`` block (waits until one is free)."""
    sem = _semaphore()
    if sem is None:
        yield
        return
    with sem:
        yield


def try_take() -> bool:
    """Take a slot if one is free now (a polling loop's way); give it back with :func:`give`."""
    sem = _semaphore()
    return True if sem is None else sem.acquire(blocking=False)


def give() -> None:
    sem = _semaphore()
    if sem is not None:
        sem.release()
