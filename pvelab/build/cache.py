"""Verified cache entries: every file a cache entry holds is sealed when it is made.

A seal (``.seal.json`` in the entry's folder) records each file's size, SHA-256 and
modification time. Every use checks each sealed file:

- missing, or another size: damaged (a truncated copy, a disk that filled up);
- small files (under :data:`ALWAYS_HASH`: kernel, initrd, ``.deb`` files, EFI
  binaries, records) are hashed on every use;
- a large file (the 2 GB raw disks, the squashfs) whose modification time is the
  sealed one is taken as sealed: any write through the file system (a bit flipped by
  a program, a partial copy over it) moves the time. If the time moved, the file is
  hashed: the same bytes (a cache copied with ``cp`` without ``-p``) re-seal it, other
  bytes are damage.

:func:`full_checks` (``invoke build --verify``, and the nightly) hashes every file: that
also finds damage below the file system (a bad disk block) which no time shows.
Measured on the base entry here: hashing all of it reads 4.3 GB of (sparse) files in
about 22 s; the per-use check costs well under a second (its small files hashed).

A damaged or unsealed entry is never used: the caller moves it aside (one copy kept,
``<name>.damaged``) with :func:`move_aside`, says so in one line, and rebuilds it.
"""

from __future__ import annotations

import contextvars
import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from pvelab.model.artefacts import sha256, write_atomic

SEAL = ".seal.json"
ALWAYS_HASH = 64 << 20  # bytes: files below this are hashed on every use

_FULL = contextvars.ContextVar("pvelab_cache_full", default=False)


@contextmanager
def full_checks(enabled: bool = True) -> Iterator[None]:
    """Inside this block every sealed file is hashed on every use."""
    token = _FULL.set(enabled)
    try:
        yield
    finally:
        _FULL.reset(token)


def _read(entry: Path) -> dict[str, dict]:
    try:
        data = json.loads((entry / SEAL).read_text())
        return dict(data["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _write(entry: Path, records: dict[str, dict]) -> None:
    write_atomic(entry / SEAL, json.dumps({"files": records}, indent=1, sort_keys=True) + "\n")


def seal(entry: Path, files: Iterable[Path]) -> None:
    """Record ``files`` (inside ``entry``) as they are now; other records are kept."""
    records = _read(entry)
    for f in files:
        st = f.stat()
        records[f.relative_to(entry).as_posix()] = {
            "size": st.st_size,
            "sha256": sha256(f),
            "mtime_ns": st.st_mtime_ns,
        }
    _write(entry, records)


def sealed(entry: Path) -> set[str]:
    return set(_read(entry))


def damage(entry: Path, names: Iterable[str]) -> dict[str, str]:
    """``{name: why}`` for each of ``names`` (paths relative to ``entry``) that is not as sealed."""
    records = _read(entry)
    full = _FULL.get()
    out: dict[str, str] = {}
    resealed = {}
    for name in names:
        rec = records.get(name)
        path = entry / name
        if rec is None:
            out[name] = "not sealed (made by an older pvelab, or its making was cut short)"
            continue
        try:
            st = path.stat()
        except OSError:
            out[name] = "missing"
            continue
        if st.st_size != rec["size"]:
            out[name] = f"{st.st_size} bytes, sealed with {rec['size']}"
            continue
        moved = st.st_mtime_ns != rec["mtime_ns"]
        if full or moved or st.st_size < ALWAYS_HASH:
            got = sha256(path)
            if got != rec["sha256"]:
                out[name] = f"sha256 {got[:12]}..., sealed {rec['sha256'][:12]}..."
            elif moved:
                resealed[name] = st.st_mtime_ns
    if resealed and not out:
        for name, mtime in resealed.items():
            records[name]["mtime_ns"] = mtime
        _write(entry, records)
    return out


def describe(entry: Path, found: dict[str, str]) -> str:
    """One phrase: the damaged files, grouped by what is wrong with them."""
    by_why: dict[str, list[str]] = {}
    for name, why in sorted(found.items()):
        by_why.setdefault(why, []).append(name)
    return "; ".join(f"{', '.join(names)}: {why}" for why, names in by_why.items())


def move_aside(path: Path) -> Path:
    """Rename a damaged file or folder to ``<name>.damaged`` (replacing an older such copy):
    kept for a look, never used again."""
    aside = path.with_name(path.name + ".damaged")
    if aside.is_dir() and not aside.is_symlink():
        shutil.rmtree(aside)
    elif aside.exists():
        aside.unlink()
    os.replace(path, aside)
    return aside


def forget(entry: Path, names: Iterable[str]) -> None:
    """Drop the records of ``names`` (files moved aside, to be made again)."""
    records = _read(entry)
    for name in names:
        records.pop(name, None)
    _write(entry, records)


def usable(entry: Path, names: list[str], label: str, say: Callable[[str], None]) -> bool:
    """True when every one of ``names`` is in ``entry`` and as sealed. Those that are
    damaged are moved aside (said in one line) and False is returned: make them again.
    False, silently, when none of them was ever made."""
    if not any((entry / n).exists() for n in names):
        return False
    found = damage(entry, names)
    if not found:
        return True
    for name in found:
        if (entry / name).exists():
            move_aside(entry / name)
    forget(entry, found)
    say(f"cache: {label}: {describe(entry, found)}: moved aside, making it again")
    return False
