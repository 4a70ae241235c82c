"""One QEMU guest: start, console log, wait_for_* verbs over one SSH connection, stop.

Modelled on the NixOS test driver: a machine is an object whose verbs read like the
test (``wait_for_ssh``, ``wait_for_unit``, ``wait_for_open_port``, ``succeed``,
``fail``), each polling with a deadline. The serial console goes to
``<logdir>/<node>.console.log`` and is kept after the run.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import paramiko

from .labnet import LabNet

OVMF_CODE = (Path("/usr/share/OVMF/OVMF_CODE_4M.fd"), Path("/usr/share/OVMF/OVMF_CODE.fd"))
OVMF_VARS = (Path("/usr/share/OVMF/OVMF_VARS_4M.fd"), Path("/usr/share/OVMF/OVMF_VARS.fd"))
QEMU = "qemu-system-x86_64"


class MachineError(RuntimeError):
    pass


# --------------------------------------------------------------------------- acceleration

_accel_cache: dict[str, tuple[str, str]] = {}


def probe_kvm(kernel: Path, timeout: float = 30.0) -> tuple[bool, str]:
    """Does KVM really run a guest here? Boot ``kernel`` (no root fs) until it panics.

    A working KVM gets the kernel to "Kernel panic ... Unable to mount root fs" in
    seconds and QEMU exits (-no-reboot). Broken KVM layers abort at start ("failed to
    set MSR") or stop with "KVM internal error"; both are reported as the reason.
    """
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "/dev/kvm is missing or not accessible"
    with tempfile.TemporaryDirectory(prefix="pvelab-kvm-") as tmp:
        console = Path(tmp) / "console"
        proc = subprocess.Popen([QEMU, "-accel", "kvm", "-cpu", "host", "-m", "256", "-display", "none",
                                 "-no-reboot", "-nic", "none", "-monitor", "none",
                                 "-serial", f"file:{console}", "-kernel", str(kernel),
                                 "-append", "console=ttyS0 panic=-1 loglevel=4"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
            text = console.read_bytes() if console.exists() else b""
            if b"Kernel panic" in text:
                break
        if proc.poll() is None:
            proc.kill()
        output = proc.communicate()[0] or b""
        text = console.read_bytes() if console.exists() else b""
        if b"Kernel panic" in text:
            return True, "kernel booted under KVM"
        reason = output.decode(errors="replace").strip().splitlines()
        return False, (reason[0] if reason else f"no kernel output within {timeout:.0f}s")


def resolve_accel(requested: str, kernel: Path | None) -> tuple[str, str]:
    """(accelerator, why) for --accel auto|kvm|tcg."""
    if requested == "tcg":
        return "tcg", "requested"
    if requested == "kvm":
        return "kvm", "requested"
    if requested != "auto":
        raise MachineError(f"--accel: {requested!r}: must be auto, kvm or tcg")
    key = str(kernel)
    if key not in _accel_cache:
        if kernel is None:
            _accel_cache[key] = ("tcg", "no kernel to probe KVM with")
        else:
            ok, why = probe_kvm(kernel)
            _accel_cache[key] = ("kvm", why) if ok else ("tcg", f"KVM unusable: {why}")
    return _accel_cache[key]


def first_existing(paths) -> Path:
    for p in paths:
        if p.exists():
            return p
    raise MachineError(f"none of {', '.join(map(str, paths))} exists (install ovmf: scripts/setup)")


# --------------------------------------------------------------------------- the machine

@dataclass
class Machine:
    name: str
    ram_mb: int
    media: Path                    # qcow2 (copy-on-write overlay is made) or ISO
    media_kind: str                # "qcow2" | "iso" (as a CD) | "usb" (the ISO as a USB stick)
    firmware: str                  # "bios" | "uefi"
    accel: str                     # "kvm" | "tcg"
    workdir: Path
    net: LabNet | None = None
    user: str = "ops"
    password: str = ""
    proc: subprocess.Popen | None = None
    client: paramiko.SSHClient | None = None
    started_at: float = 0.0
    ssh_ready_after: float | None = None
    host_key: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def console_log(self) -> Path:
        return self.workdir / f"{self.name}.console.log"

    @property
    def address(self) -> str:
        return self.net.addresses[self.name]

    def qemu_args(self, interactive: bool = False) -> list[str]:
        w = self.workdir
        # -nodefaults: no VGA, floppy, parallel port or default NIC; fewer devices for the
        # guest to probe (udev coldplug is a large part of an emulated boot)
        args = [QEMU, "-name", self.name, "-machine", "pc,usb=off", "-nodefaults",
                "-m", str(self.ram_mb), "-smp", "1", "-accel", self.accel, "-no-reboot",
                "-display", "none", "-device", "virtio-rng-pci",
                "-pidfile", str(w / f"{self.name}.pid")]
        # Under TCG: QEMU's default CPU without SVM. The lab never runs nested guests, and
        # an SVM flag makes the guest load kvm_amd (and ccp, irqbypass) on every boot.
        args += ["-cpu", "host"] if self.accel == "kvm" else ["-cpu", "qemu64,-svm"]
        if self.media_kind == "qcow2":
            overlay = w / f"{self.name}.overlay.qcow2"
            overlay.unlink(missing_ok=True)
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
                            str(self.media.resolve()), str(overlay)], check=True)
            args += ["-drive", f"file={overlay},if=virtio,format=qcow2,cache=unsafe"]
        elif self.media_kind == "usb":  # the hybrid ISO written to a USB stick
            args += ["-device", "qemu-xhci,id=xhci",
                     "-drive", f"if=none,id=stick,format=raw,readonly=on,file={self.media.resolve()}",
                     "-device", "usb-storage,bus=xhci.0,drive=stick,bootindex=0"]
        else:
            args += ["-drive", f"file={self.media.resolve()},media=cdrom,readonly=on,if=ide,index=0",
                     "-boot", "d"]
        if self.firmware == "uefi":
            vars_copy = w / f"{self.name}.OVMF_VARS.fd"
            shutil.copyfile(first_existing(OVMF_VARS), vars_copy)
            args += ["-drive", f"if=pflash,format=raw,readonly=on,file={first_existing(OVMF_CODE)}",
                     "-drive", f"if=pflash,format=raw,file={vars_copy}"]
        if self.net:
            args += ["-netdev", f"tap,id=n0,ifname={self.net.taps[self.name]},script=no,downscript=no",
                     "-device", f"virtio-net-pci,netdev=n0,mac={self.net.macs[self.name]}"]
        else:
            args += ["-nic", "user,restrict=on,model=virtio-net-pci"]
        if interactive:
            args += ["-serial", "mon:stdio"]
        else:
            args += ["-chardev", f"file,id=ser0,path={self.console_log}", "-serial", "chardev:ser0",
                     "-monitor", "none"]
        return args

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.console_log.unlink(missing_ok=True)
        prefix = self.net.exec_args() if self.net else []
        qemu_log = open(self.workdir / f"{self.name}.qemu.log", "wb")
        self.proc = subprocess.Popen(prefix + self.qemu_args(), stdout=qemu_log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        self.started_at = time.monotonic()

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def console_text(self) -> str:
        try:
            return self.console_log.read_text(errors="replace")
        except OSError:
            return ""

    def _check_alive(self) -> None:
        if not self.is_running():
            qemu = (self.workdir / f"{self.name}.qemu.log").read_text(errors="replace").strip()
            raise MachineError(f"{self.name}: QEMU exited ({self.proc.returncode if self.proc else '-'})"
                               f"{': ' + qemu.splitlines()[-1] if qemu else ''}; console: {self.console_log}")

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
                sock = self.net.connect(self.address, 22, timeout=1)
            except OSError as exc:
                last = f"tcp: {exc}"
                time.sleep(0.25)
                continue
            try:
                client = paramiko.SSHClient()
                client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
                client.connect(self.address, username=self.user, password=self.password, sock=sock,
                               timeout=30, banner_timeout=60, auth_timeout=60,
                               look_for_keys=False, allow_agent=False)
                client.get_transport().set_keepalive(15)
                self.client = client
                key = client.get_transport().get_remote_server_key()
                self.host_key = f"{key.get_name()} {key.get_fingerprint().hex()}"
                self.ssh_ready_after = time.monotonic() - self.started_at
                return self.ssh_ready_after
            except (paramiko.SSHException, OSError, EOFError) as exc:
                last = f"ssh: {type(exc).__name__}: {exc}"
                sock.close()
                time.sleep(1)
        raise MachineError(f"{self.name}: no SSH login within {timeout:.0f}s (last: {last}); "
                           f"console: {self.console_log}")

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
            except socket.timeout:
                chan.close()
                return 124, out.decode(errors="replace") + f"\n[timed out after {timeout:.0f}s]"
            chan.close()
            return status, out.decode(errors="replace")

    def succeed(self, command: str, timeout: float = 60.0) -> str:
        status, out = self.execute(command, timeout)
        if status != 0:
            raise MachineError(f"{self.name}: `{command}` exited {status}: {out.strip()[-500:]}")
        return out

    def fail(self, command: str, timeout: float = 60.0) -> str:
        status, out = self.execute(command, timeout)
        if status == 0:
            raise MachineError(f"{self.name}: `{command}` unexpectedly succeeded")
        return out

    def sudo(self, command: str, timeout: float = 60.0) -> tuple[int, str]:
        return self.execute(f"echo {shlex.quote(self.password)} | sudo -S -p '' sh -c {shlex.quote(command)}",
                            timeout)

    def wait_until(self, what: str, check, timeout: float, interval: float = 2.0):
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
            status, out = self.execute(f"systemctl is-active {shlex.quote(unit)}")
            return out.strip() == "active", out.strip()
        self.wait_until(f"unit {unit} active", check, timeout)

    def wait_for_open_port(self, port: int, timeout: float = 120.0) -> None:
        def check():
            status, out = self.execute(f"ss -Hltn 'sport = :{int(port)}'")
            return status == 0 and bool(out.strip()), out.strip()
        self.wait_until(f"port {port} listening", check, timeout)

    # -------------------------------------------------------------- stop
    def stop(self) -> None:
        if self.client:
            try:
                self.client.close()
            except Exception:  # noqa: BLE001 - best effort on teardown
                pass
            self.client = None
        if self.proc and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=10)
        (self.workdir / f"{self.name}.overlay.qcow2").unlink(missing_ok=True)
        (self.workdir / f"{self.name}.OVMF_VARS.fd").unlink(missing_ok=True)
