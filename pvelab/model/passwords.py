"""The lab user's password: hashed before it reaches DIB, never written in plain text.

A lab file gives either ``password`` (plain) or ``password_hash`` (yescrypt ``$y$`` or
SHA-512 crypt ``$6$``). A plain password is hashed here with SHA-512 crypt
(``openssl passwd -6``) and a salt derived from the user name, so equal inputs give an
equal hash (the base image cache key stays stable and shared between labs) while the
cache key, the DIB environment the image records, and every log see only the hash.
The boot test and rehearsal log in with the plain password: from the lab file, or from
``PVELAB_PASSWORD`` when the file gives only a hash.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import subprocess
import tempfile
from pathlib import Path

from pvelab.core.errors import PvelabError

HASH_FORMAT = re.compile(
    r"\$(y\$[./0-9A-Za-z]+\$[./0-9A-Za-z]{1,86}|6\$(rounds=\d+\$)?[./0-9A-Za-z]{1,16})\$[./0-9A-Za-z]{43,86}"
)
DEFAULT_PASSWORD = "pve-cluster-ops"  # the specification's; the only one a release README prints


class SecretError(PvelabError):
    pass


def is_crypt_hash(text: str) -> bool:
    return bool(HASH_FORMAT.fullmatch(text))


def _salt(user: str) -> str:
    digest = hashlib.sha256(f"pvelab-salt:{user}".encode()).digest()
    return base64.b64encode(digest, altchars=b"./").decode()[:16]


def sha512_crypt(password: str, user: str) -> str:
    try:
        res = subprocess.run(
            ["openssl", "passwd", "-6", "-salt", _salt(user), "-stdin"],
            input=password,
            capture_output=True,
            text=True,
            timeout=30,
        )
    except FileNotFoundError:
        raise SecretError("openssl not found: it hashes the lab password (run scripts/setup)") from None
    out = res.stdout.strip()
    if res.returncode != 0 or not is_crypt_hash(out):
        raise SecretError(f"openssl passwd -6 failed: {res.stderr.strip()[-200:]}")
    return out


def login_password(password: str | None) -> str:
    """The plain password a runner logs in with."""
    if password:
        return password
    env = os.environ.get("PVELAB_PASSWORD")
    if not env:
        raise SecretError(
            "the lab file gives only lab.user.password_hash: set PVELAB_PASSWORD to the "
            "password it hashes, so the boot test can log in"
        )
    return env


def scan_tree(root: Path, password: str | None, *secrets: str) -> list[str]:
    """Files under ``root`` that hold ``password`` (or any of ``secrets``: API token
    secrets) in plain text (paths relative to root).

    The secrets go to grep through a private file, never its command line."""
    return _grep(root, [s for s in (password, *secrets) if s], "the plain password and token secrets")


# A PEM private key of any kind ("-----BEGIN PRIVATE KEY-----", "... EC PRIVATE KEY-----",
# "... OPENSSH PRIVATE KEY-----"): keys are made on the machine that uses them, never baked.
PRIVATE_KEY_MARK = "PRIVATE KEY-----"


def private_keys(root: Path) -> list[str]:
    """Files under ``root`` holding a PEM private key (paths relative to root)."""
    return _grep(root, [PRIVATE_KEY_MARK], "private keys")


def _grep(root: Path, needles: list[str], what: str) -> list[str]:
    if not needles:
        return []
    with tempfile.NamedTemporaryFile("w", prefix="pvelab-scan-", delete=True) as pattern:
        pattern.write("".join(n + "\n" for n in needles))
        pattern.flush()
        res = subprocess.run(
            ["grep", "-rlFZ", "--binary-files=text", "--no-messages", "-f", pattern.name, str(root)],
            capture_output=True,
        )
    if res.returncode not in (0, 1):
        raise SecretError(f"scanning {root} for {what}: grep exited {res.returncode}")
    return sorted(os.path.relpath(p, root) for p in res.stdout.decode(errors="replace").split("\0") if p)


def token_hash(secret: str, salt: str, iterations: int = 20000) -> str:
    """An API token secret as the node keeps it (pve_api.token_hash on the node checks it):
    ``pbkdf2-sha256$ITER$SALT$HEX``."""
    digest = hashlib.pbkdf2_hmac("sha256", secret.encode(), salt.encode(), iterations)
    return f"pbkdf2-sha256${iterations}${salt}${digest.hex()}"


def token_salt(lab_name: str, token_id: str) -> str:
    """Derived, not random: equal lab files give byte-equal images."""
    return hashlib.sha256(f"pvelab-token:{lab_name}:{token_id}".encode()).hexdigest()[:16]
