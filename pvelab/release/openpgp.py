"""OpenPGP through the gpg tools: signing on the publishing side, checking on the receiving side.

A release is signed with one GPG key (``invoke publish --gpg-key KEY``): ``SHA256SUMS.asc``
and each provenance envelope's DSSE signature (:mod:`pvelab.release.provenance`). The receiving
side checks them against a public key file it got out of band (``invoke verify --key
FILE``), in a throwaway GnuPG home: offline, nothing imported into the user's keyring.
"""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pvelab.core.errors import PvelabError

TIMEOUT = 120.0


class GpgError(PvelabError):
    pass


def _run(args: list[str], data: bytes | None = None, home: Path | None = None) -> subprocess.CompletedProcess:
    cmd = ["gpg", "--batch", "--no-tty", *(["--homedir", str(home)] if home else []), *args]
    try:
        return subprocess.run(cmd, input=data, capture_output=True, timeout=TIMEOUT)
    except FileNotFoundError:
        raise GpgError("gpg is not installed (apt install gnupg)") from None
    except subprocess.TimeoutExpired:
        raise GpgError(f"gpg {args[0]} did not finish within {TIMEOUT:.0f} s") from None


def _last_line(res: subprocess.CompletedProcess) -> str:
    return (res.stderr.decode(errors="replace").strip().splitlines() or ["no output"])[-1]


def _fingerprints(res: subprocess.CompletedProcess) -> list[str]:
    """The ``fpr`` records of a ``--with-colons`` listing."""
    return [l.split(":")[9] for l in res.stdout.decode().splitlines() if l.startswith("fpr:")]


def fingerprint(key: str) -> str:
    """The fingerprint of the secret key ``key`` names (the DSSE signature's keyid)."""
    res = _run(["--with-colons", "--list-secret-keys", key])
    fprs = _fingerprints(res)
    if res.returncode != 0 or not fprs:
        raise GpgError(f"--gpg-key {key}: no such secret key: {_last_line(res)}")
    return fprs[0]


def sign(key: str, data: bytes, armor: bool, what: str) -> bytes:
    """A detached signature of ``data`` (``what``, for the error message) by ``key``."""
    res = _run(["--local-user", key, *(["--armor"] if armor else []), "--detach-sign", "--output", "-"], data)
    if res.returncode != 0 or not res.stdout:
        raise GpgError(f"--gpg-key {key}: gpg could not sign {what}: {_last_line(res)}")
    return res.stdout


class Keyring:
    """A throwaway GnuPG home holding only the public keys of one file."""

    def __init__(self, home: Path):
        self.home = home

    def verify(self, signature: bytes, data: bytes) -> str | None:
        """The signer's fingerprint when ``signature`` is a good signature of ``data`` by a
        key of this keyring, else None."""
        with tempfile.TemporaryDirectory(dir=self.home) as tmp:
            sig, payload = Path(tmp, "sig"), Path(tmp, "data")
            sig.write_bytes(signature)
            payload.write_bytes(data)
            res = _run(["--status-fd", "1", "--verify", str(sig), str(payload)], home=self.home)
        for line in res.stdout.decode(errors="replace").splitlines():
            parts = line.split()
            if res.returncode == 0 and parts[:2] == ["[GNUPG:]", "VALIDSIG"] and len(parts) > 2:
                return parts[-1] if len(parts) > 11 else parts[2]  # the primary key's fingerprint
        return None


@contextmanager
def keyring(keyfile: Path) -> Iterator[Keyring]:
    """The public keys of ``keyfile`` (armored or binary) in a throwaway home."""
    with tempfile.TemporaryDirectory(prefix="pvelab-verify-") as tmp:
        home = Path(tmp)
        home.chmod(0o700)
        res = _run(["--import", str(keyfile)], home=home)
        if res.returncode != 0 or not _fingerprints(_run(["--with-colons", "--list-keys"], home=home)):
            raise GpgError(f"--key {keyfile}: no OpenPGP public key in it: {_last_line(res)}")
        try:
            yield Keyring(home)
        finally:
            subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], capture_output=True)
