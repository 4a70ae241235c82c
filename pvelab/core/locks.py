"""One writer per lab: ``build/<lab>/lab.lock``, and what a killed run left behind.

Every task that writes under ``build/<lab>/`` (build, boot test, install test, rehearsal,
``up``/``fault``/``down``, publish, nightly) runs inside :func:`lab_lock`. A second
run of the same lab waits, saying once which command holds the lock (pid, command,
start time), or with ``--no-wait`` (:func:`no_wait`) stops at once with that line,
exit 2. The lock is ``flock``: the kernel releases it when its holder dies, however
it dies. The base cache keeps its own lock (:mod:`pvelab.build.base`), so two labs still
build side by side.

The lock file also records, while it is held, what the run starts that could outlive
it: network namespaces (:func:`leave`, called by :class:`pvelab.running.labnet.LabNet`) and
QEMU processes (called by :class:`pvelab.running.machine.Machine`). A clean end empties the
file. A run killed with SIGKILL cannot clean up; the next run of any task on that
lab finds the record of a holder that is gone, says so in one line, kills the QEMUs
it names (checked to be those guests' QEMU, not a reused pid) and removes the
namespaces (and dnsmasq in them) before it starts.

Re-entrant within one process: ``nightly`` holds the lab's lock and calls build, boot
test, rehearsal and publish, which take it again.
"""

from __future__ import annotations

import contextvars
import fcntl
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pvelab.core.errors import PvelabError, space_guard
from pvelab.core.paths import build_root, cache_dir

LOCK_NAME = "lab.lock"

_WAIT = contextvars.ContextVar("pvelab_lock_wait", default=True)


class LabBusy(PvelabError):
    pass


@dataclass
class Holder:
    """Who holds a lab's lock, and what it started that could outlive it."""

    pid: int
    command: str
    started_at: str
    netns: list[str] = field(default_factory=list)
    qemu: dict[str, int] = field(default_factory=dict)  # guest name -> QEMU pid

    def describe(self) -> str:
        return f"`{self.command}` (pid {self.pid}, started {self.started_at})"

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=1) + "\n"

    @classmethod
    def parse(cls, text: str) -> Holder | None:
        try:
            data = json.loads(text)
            return cls(
                int(data["pid"]),
                str(data["command"]),
                str(data["started_at"]),
                [str(n) for n in data.get("netns", [])],
                {str(k): int(v) for k, v in data.get("qemu", {}).items()},
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            return None


@dataclass
class _Held:
    fh: Any
    holder: Holder
    depth: int = 1


_HELD: dict[str, _Held] = {}  # lock path -> what this process holds


def lock_path(lab_name: str) -> Path:
    return build_root() / lab_name / LOCK_NAME


def _command(task: str) -> str:
    prog = Path(sys.argv[0]).name if sys.argv else ""
    if prog in ("invoke", "inv"):
        return " ".join(["invoke", *sys.argv[1:]])
    return f"pvelab {task}"


@contextmanager
def no_wait(enabled: bool = True) -> Iterator[None]:
    """Inside this block a busy lab is refused (exit 2) instead of waited for."""
    token = _WAIT.set(not enabled)
    try:
        yield
    finally:
        _WAIT.reset(token)


def pid_alive(pid: int) -> bool:
    """Is ``pid`` a live process (not a zombie)?"""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@contextmanager
def lab_lock(lab_name: str, task: str) -> Iterator[Holder]:
    """Hold ``build/<lab>/lab.lock`` for the block (see the module's docstring)."""
    path = lock_path(lab_name)
    key = str(path.resolve())
    if key in _HELD:
        _HELD[key].depth += 1
        try:
            yield _HELD[key].holder
        finally:
            _HELD[key].depth -= 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(path, "a+")
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            other = Holder.parse(fh.read())
            who = other.describe() if other else "another pvelab command"
            if not _WAIT.get():
                raise LabBusy(
                    f"lab {lab_name} is busy: {who} holds {path}; not waiting (--no-wait)"
                ) from None
            print(f"lab {lab_name} is busy: {who} holds {path}; waiting for it to finish", flush=True)
            fcntl.flock(fh, fcntl.LOCK_EX)
        fh.seek(0)
        left = Holder.parse(fh.read())
        if left is not None and left.pid != os.getpid():
            print(f"lab {lab_name}: {sweep(left)}", flush=True)
        holder = Holder(os.getpid(), _command(task), datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"))
        _HELD[key] = _Held(fh, holder)
        _write(_HELD[key])
        try:
            yield holder
        finally:
            del _HELD[key]
            fh.seek(0)
            fh.truncate()  # a clean end: nothing left to sweep
            fh.flush()
    finally:
        fh.close()  # releases the flock


def _write(held: _Held) -> None:
    held.fh.seek(0)
    held.fh.truncate()
    held.fh.write(held.holder.to_json())
    held.fh.flush()


def leave(netns: str | None = None, qemu: tuple[str, int] | None = None) -> None:
    """Record in every lab lock this process holds something that could outlive it."""
    for held in _HELD.values():
        if netns and netns not in held.holder.netns:
            held.holder.netns.append(netns)
        if qemu:
            held.holder.qemu[qemu[0]] = qemu[1]
        _write(held)


def qemu_alive(pid: int, name: str) -> bool:
    """Is ``pid`` still the QEMU of guest ``name``? (not a zombie, not a reused pid)"""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z" and b"-name" in cmdline and name.encode() in cmdline


def remove_netns(name: str) -> bool:
    """Delete network namespace ``name``, killing what still runs in it (a QEMU that
    ignored SIGTERM, a dnsmasq); its bridge and taps go with it. False: there was none."""
    if name not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split():
        return False
    pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    subprocess.run(["ip", "netns", "del", name], capture_output=True, text=True)
    return True


def sweep(left: Holder) -> str:
    """Remove what a killed holder left; one line saying what it was and what was done."""
    done = []
    for name, pid in left.qemu.items():
        if qemu_alive(pid, name):
            try:
                os.kill(pid, signal.SIGKILL)
                done.append(f"QEMU of {name} (pid {pid}) killed")
            except ProcessLookupError:
                pass
    for ns in left.netns:
        if remove_netns(ns):  # what is left in it (dnsmasq, a QEMU) dies with it
            done.append(f"namespace {ns} (bridge, taps, dnsmasq) removed")
    what = "; ".join(done) if done else "nothing of it was still running"
    return f"the run {left.describe()} ended without cleaning up (killed?); lock taken over: {what}"


def locking(task: str) -> Any:
    """Decorator: run a ``fn(lab, ...)`` under that lab's lock (``task`` names it); a full
    file system inside is one :class:`pvelab.core.errors.DiskFull` line naming it and the task."""
    import functools

    def deco(fn: Any) -> Any:
        @functools.wraps(fn)
        def wrapper(lab: Any, *args: Any, **kwargs: Any) -> Any:
            with lab_lock(lab.name, task), space_guard(task, build_root() / lab.name, cache_dir()):
                return fn(lab, *args, **kwargs)

        return wrapper

    return deco
