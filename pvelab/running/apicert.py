"""The API certificate a node makes on its first boot (pve-ssl.service): its SHA-256
fingerprint, read from the guest, as Proxmox shows it (``AA:BB:...``). The boot test's
report and `invoke status` print it, so a client can pin exactly that certificate."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path
from typing import Protocol

_FINGERPRINT = re.compile(r"(?:sha256 )?Fingerprint=((?:[0-9A-F]{2}:){31}[0-9A-F]{2})", re.I)


class _Runs(Protocol):
    def execute(self, command: str, timeout: float = ...) -> tuple[int, str]: ...


def command(cert_path: str) -> str:
    return f"openssl x509 -noout -fingerprint -sha256 -in {shlex.quote(cert_path)}"


def parse(output: str) -> str:
    """The fingerprint in ``openssl x509 -fingerprint -sha256`` output, or "" if none."""
    m = _FINGERPRINT.search(output)
    return m.group(1).upper() if m else ""


def fingerprint(machine: _Runs, cert_path: str, timeout: float = 30) -> str:
    """The fingerprint of the certificate at ``cert_path`` on a booted machine ("" if none yet)."""
    status, out = machine.execute(command(cert_path), timeout=timeout)
    return parse(out) if status == 0 else ""


def make_self_signed(dest: Path, cn: str, san: str = "IP:127.0.0.1", days: int = 30) -> tuple[Path, Path]:
    """A certificate and key like the one pve-ssl.service makes at a node's first boot
    (EC P-256, self-signed), for the service on loopback: tests and `invoke bench`."""
    cert, key = dest / "pve-ssl.pem", dest / "pve-ssl.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            str(days),
            "-subj",
            f"/CN={cn}",
            "-addext",
            f"subjectAltName={san}",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key
