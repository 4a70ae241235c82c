"""One QEMU guest: start, console log, wait_for_* verbs over one SSH connection, stop.

Modelled on the NixOS test driver: a machine is an object whose verbs read like the
test (``wait_for_ssh``, ``wait_for_unit``, ``wait_for_open_port``, ``succeed``), each
polling with a deadline. The serial console goes to ``<workdir>/<node>.console.log``
and is kept after the run. The command line itself comes from :mod:`pvelab.running.qemu`.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paramiko

from pvelab.core import locks
from pvelab.core.locks import qemu_alive
from pvelab.running.guestfault import GuestFault, scan
from pvelab.running.labnet import LabNet
from pvelab.running.qemu import MachineError, VmSpec, qemu_command

__all__ = ["GuestFaultError", "Machine", "MachineError", "Probe"]


class GuestFaultError(MachineError):
    """The guest's kernel panicked: which node, what the console said."""

    def __init__(self, node: str, fault: GuestFault, console: Path):
        super().__init__(f"{node}: {fault.describe()}; console: {console}")
        self.node, self.fault = node, fault


PROBE = "@@pvelab-probe"  # a line no probed tool prints


@dataclass(frozen=True)
class Probe:
    """One command of :meth:`Machine.probe`: its exit status (None: it never ran) and output."""

    status: int | None
    output: str

    @property
    def ok(self) -> bool:
        return self.status == 0


def probe_script(commands: dict[str, str]) -> str:
    """A shell script running each command in turn, its output and status framed."""
    return "\n".join(
        f"echo '{PROBE} {name}'; ( {command} ) 2>&1; printf '\\n{PROBE}-status %s\\n' \"$?\""
        for name, command in commands.items()
    )


def parse_probe(output: str) -> dict[str, Probe]:
    """:func:`probe_script`'s output, section by section."""
    found: dict[str, Probe] = {}
    name: str | None = None
    lines: list[str] = []
    for line in output.splitlines():
        if line.startswith(f"{PROBE}-status "):
            if name is not None:
                status = line.rsplit(" ", 1)[1]
                found[name] = Probe(int(status) if status.isdigit() else None, "\n".join(lines).strip("\n"))
            name, lines = None, []
        elif line.startswith(f"{PROBE} "):
            name, lines = line[len(PROBE) + 1 :], []
        elif name is not None:
            lines.append(line)
    return found


@dataclass
class Machine:
    spec: VmSpec
    net: LabNet | None = None
    user: str = "ops"
    password: str = ""
    proc: subprocess.Popen | None = None
    pid: int | None = None  # QEMU's pid: set by start(), or given to adopt a running guest
    client: paramiko.SSHClient | None = None
    started_at: float = 0.0
    ssh_ready_after: float | None = None
    console_offset: int = 0  # where this attempt's console starts in the log
    host_key: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def console_log(self) -> Path:
        return self.spec.console_log

    @property
    def address(self) -> str:
        assert self.net is not None
        return self.net.addresses[self.name]

    def start(self) -> None:
        if self.proc is None and self.pid is None:  # a first start: a fresh console log (a restart appends)
            self.console_log.unlink(missing_ok=True)
        self.console_offset = self.console_log.stat().st_size if self.console_log.exists() else 0
        prefix = self.net.exec_args() if self.net else []
        # its own session (a running lab outlives the process that started it); the
        # working directory holds the console socket, named relative to it
        with open(self.spec.workdir / f"{self.name}.qemu.log", "wb") as qemu_log:
            self.proc = subprocess.Popen(
                prefix + qemu_command(self.spec),
                stdout=qemu_log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=self.spec.workdir,
            )
        self.pid = self.proc.pid
        self.started_at = time.monotonic()
        locks.leave(qemu=(self.name, self.pid))  # a killed run's QEMU is found by the next run

    def is_running(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        return self.pid is not None and qemu_alive(self.pid, self.name)

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode if self.proc is not None else None

    def wait(self, timeout: float) -> None:
        """Until QEMU has exited; MachineError after ``timeout`` seconds."""
        if self.proc is not None:
            try:
                self.proc.wait(timeout=timeout)
                return
            except subprocess.TimeoutExpired:
                raise MachineError(f"{self.name}: still running after {timeout:.0f}s") from None
        deadline = time.monotonic() + timeout
        while self.is_running():
            if time.monotonic() > deadline:
                raise MachineError(f"{self.name}: still running after {timeout:.0f}s")
            time.sleep(0.2)

    def console_text(self) -> str:
        try:
            return self.console_log.read_text(errors="replace")
        except OSError:
            return ""

    def console_of_attempt(self) -> str:
        """The console since the last start (a restart appends to the same log)."""
        try:
            with open(self.console_log, "rb") as fh:
                fh.seek(self.console_offset)
                return fh.read().decode(errors="replace")
        except OSError:
            return ""

    def guest_fault(self) -> GuestFault | None:
        """A kernel panic or oops on this attempt's console (:mod:`pvelab.running.guestfault`)."""
        return scan(self.console_of_attempt())

    def _check_alive(self) -> None:
        fault = self.guest_fault()
        if fault is not None and fault.kind.is_fatal():
            raise GuestFaultError(self.name, fault, self.console_log)
        if not self.is_running():
            qemu = (self.spec.workdir / f"{self.name}.qemu.log").read_text(errors="replace").strip()
            raise MachineError(
                f"{self.name}: QEMU exited ({'-' if self.returncode is None else self.returncode})"
                f"{': ' + qemu.splitlines()[-1] if qemu else ''}; console: {self.console_log}"
            )

    # -------------------------------------------------------------- SSH
    def wait_for_ssh(self, timeout: float) -> float:
        """Poll until an SSH login as the lab user works; keep that one connection.

        Short connect timeouts and pauses: until the guest has its address a connect
        waits out ARP, and the time SSH came up is measured to about a second."""
        deadline = time.monotonic() + timeout
        last = "no attempt"
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                assert self.net is not None, "SSH needs the lab network"
                sock = self.net.connect(self.address, 22, timeout=1)
            except OSError as exc:
                last = f"tcp: {exc}"
                time.sleep(0.25)
                continue
            try:
                client = paramiko.SSHClient()
                client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
                client.connect(
                    self.address,
                    username=self.user,
                    password=self.password,
                    sock=sock,
                    timeout=30,
                    banner_timeout=60,
                    auth_timeout=60,
                    look_for_keys=False,
                    allow_agent=False,
                )
                transport = client.get_transport()
                assert transport is not None  # connect() succeeded
                transport.set_keepalive(15)
                self.client = client
                key = transport.get_remote_server_key()
                self.host_key = f"{key.get_name()} {key.get_fingerprint().hex()}"
                self.ssh_ready_after = time.monotonic() - self.started_at
                return self.ssh_ready_after
            except (paramiko.SSHException, OSError, EOFError) as exc:
                last = f"ssh: {type(exc).__name__}: {exc}"
                sock.close()
                time.sleep(1)
        raise MachineError(
            f"{self.name}: no SSH login within {timeout:.0f}s (last: {last}); console: {self.console_log}"
        )

    def execute(self, command: str, timeout: float = 60.0) -> tuple[int, str]:
        """Run a shell command as the lab user; (exit status, stdout+stderr)."""
        if self.client is None:
            raise MachineError(f"{self.name}: not connected (call wait_for_ssh first)")
        with self._lock:  # one SSH connection per VM, one channel at a time
            transport = self.client.get_transport()
            if transport is None or not transport.is_active():
                raise MachineError(f"{self.name}: SSH connection lost")
            chan = transport.open_session(timeout=30)
            chan.set_combine_stderr(True)
            chan.settimeout(timeout)
            chan.exec_command(command)
            out = b""
            try:
                while True:
                    data = chan.recv(65536)
                    if not data:
                        break
                    out += data
                status = chan.recv_exit_status()
            except TimeoutError:
                chan.close()
                return 124, out.decode(errors="replace") + f"\n[timed out after {timeout:.0f}s]"
            chan.close()
            return status, out.decode(errors="replace")

    def succeed(self, command: str, timeout: float = 60.0) -> str:
        status, out = self.execute(command, timeout)
        if status != 0:
            raise MachineError(f"{self.name}: `{command}` exited {status}: {out.strip()[-500:]}")
        return out

    def sudo(self, command: str, timeout: float = 60.0) -> tuple[int, str]:
        return self.execute(
            f"echo {shlex.quote(self.password)} | sudo -S -p '' sh -c {shlex.quote(command)}", timeout
        )

    def probe(self, commands: dict[str, str], root: bool = False, timeout: float = 60.0) -> dict[str, Probe]:
        """Several read-only commands in one round trip (one SSH channel, at most one sudo):
        under TCG a channel costs 0.13 s and a sudo 0.4 s more, as much as most commands
        they run. ``{name: command}`` -> ``{name: Probe}``; each command
        runs whatever the others did (a section the script never reached is a Probe with
        status None)."""
        script = probe_script(commands)
        status, out = self.sudo(script, timeout) if root else self.execute(script, timeout)
        got = parse_probe(out)
        if status == 124 and "[timed out after" in out:
            return {n: got.get(n, Probe(None, out[-300:])) for n in commands}
        return {n: got.get(n, Probe(None, "")) for n in commands}

    def wait_until(
        self, what: str, check: Callable[[], tuple[bool, Any]], timeout: float, interval: float = 2.0
    ) -> Any:
        deadline = time.monotonic() + timeout
        last = None
        while True:
            self._check_alive()
            ok, last = check()
            if ok:
                return last
            if time.monotonic() > deadline:
                raise MachineError(f"{self.name}: {what} not reached within {timeout:.0f}s (last: {last})")
            time.sleep(interval)

    def wait_for_unit(self, unit: str, timeout: float = 120.0) -> None:
        def check():
            _status, out = self.execute(f"systemctl is-active {shlex.quote(unit)}")
            return out.strip() == "active", out.strip()

        self.wait_until(f"unit {unit} active", check, timeout)

    def wait_for_open_port(self, port: int, timeout: float = 120.0) -> None:
        def check():
            status, out = self.execute(f"ss -Hltn 'sport = :{int(port)}'")
            return status == 0 and bool(out.strip()), out.strip()

        self.wait_until(f"port {port} listening", check, timeout)

    def put(self, local: Path, remote: str) -> None:
        """Copy a file onto the guest (SFTP over the machine's SSH connection)."""
        if self.client is None:
            raise MachineError(f"{self.name}: not connected (call wait_for_ssh first)")
        with self._lock:
            sftp = self.client.open_sftp()
            try:
                sftp.put(str(local), remote)
            finally:
                sftp.close()

    def read(self, remote: str) -> bytes:
        if self.client is None:
            raise MachineError(f"{self.name}: not connected (call wait_for_ssh first)")
        with self._lock:
            sftp = self.client.open_sftp()
            try:
                with sftp.open(remote, "rb") as fh:
                    return fh.read()
            finally:
                sftp.close()

    # -------------------------------------------------------------- power
    def power_off(self, timeout: float = 180.0) -> None:
        """A clean shutdown from inside the guest; returns when QEMU has exited."""
        self.sudo("systemctl --no-block poweroff", timeout=30)
        self._disconnect()
        try:
            self.wait(timeout)
        except MachineError:
            raise MachineError(
                f"{self.name}: still running {timeout:.0f}s after poweroff; console: {self.console_log}"
            ) from None

    def crash(self) -> None:
        """Pull the plug: QEMU killed, no shutdown inside the guest."""
        self._disconnect()
        self._kill_process(signal.SIGKILL)

    def restart(self, ssh_timeout: float) -> float:
        """Power on again from the same disk overlay; returns seconds to SSH."""
        if self.is_running():
            raise MachineError(f"{self.name}: still running")
        self.start()
        return self.wait_for_ssh(ssh_timeout)

    # -------------------------------------------------------------- NICs
    def qmp(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """One QMP command on the guest's QEMU; its ``return`` value."""
        workdir = os.open(self.spec.workdir, os.O_PATH)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        try:
            # named relative to the run folder; /proc/self/fd keeps the path short
            sock.connect(f"/proc/self/fd/{workdir}/{self.spec.qmp_sock}")
            reader = sock.makefile("rb")
            reader.readline()  # the greeting
            for cmd in ({"execute": "qmp_capabilities"}, {"execute": command, "arguments": arguments or {}}):
                sock.sendall(json.dumps(cmd).encode() + b"\n")
                while True:
                    reply = json.loads(reader.readline() or b"{}")
                    if "event" not in reply:
                        break
                if "error" in reply or not reply:
                    raise MachineError(
                        f"{self.name}: QMP {cmd['execute']}: {reply.get('error', 'no answer')}"
                    )
            return reply.get("return")
        except OSError as exc:
            raise MachineError(f"{self.name}: QMP socket {self.spec.qmp_sock}: {exc}") from None
        finally:
            sock.close()
            os.close(workdir)

    def set_link(self, nic: str, up: bool) -> None:
        """The carrier of one NIC (QEMU's device id): down is a pulled cable, as the guest sees it."""
        self.qmp("set_link", {"name": nic, "up": up})

    # -------------------------------------------------------------- stop
    def _disconnect(self) -> None:
        if self.client:
            try:
                self.client.close()
            except Exception:
                pass
            self.client = None

    def _kill_process(self, sig: int = signal.SIGTERM) -> None:
        if self.pid is not None and self.is_running():
            try:
                os.killpg(self.pid, sig)
                self.wait(10)
            except (ProcessLookupError, MachineError):
                try:
                    os.killpg(self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.wait(10)

    def stop(self) -> None:
        """End the guest and remove its throwaway files (overlay, UEFI variables)."""
        self._disconnect()
        self._kill_process()
        self.spec.overlay.unlink(missing_ok=True)
        self.spec.vars_file.unlink(missing_ok=True)
        (self.spec.workdir / self.spec.qmp_sock).unlink(missing_ok=True)
