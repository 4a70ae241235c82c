"""The API certificate a node makes on its first boot (pve-ssl.service): its SHA-256
fingerprint, read from the guest, as Proxmox shows it (``AA:BB:...``). The boot test's
report and `invoke status` print it, so a client can pin exactly that certificate."""

from __future__ import annotations

import hashlib
import re
import shlex
import ssl
import subprocess
from pathlib import Path
from typing import Protocol

_PEM = re.compile(r"-----BEGIN CERTIFICATE-----[A-Za-z0-9+/=\s]+-----END CERTIFICATE-----")


class _Runs(Protocol):
    def execute(self, command: str, timeout: float = ...) -> tuple[int, str]: ...


def command(cert_path: str) -> str:
    """What reads the certificate on the node: the file itself. Hashed on the host (an
    `openssl x509` in the guest costs 0.4 s of emulated CPU, `cat` a tenth of it)."""
    return f"cat {shlex.quote(cert_path)}"


def parse(output: str) -> str:
    """The SHA-256 fingerprint of the first PEM certificate in ``output`` (``AA:BB:...``,
    what `openssl x509 -fingerprint -sha256` and Proxmox print), or "" if there is none."""
    m = _PEM.search(output)
    if m is None:
        return ""
    try:
        der = ssl.PEM_cert_to_DER_cert(m.group(0))
    except ValueError:
        return ""
    return ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())


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
