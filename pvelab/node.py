"""Stage 2: one node from the shared base: its own disk, its overlay, its role unit.

A node is the base image grown to the node's disk size with the node layer laid on
top.  The node layer is a small file tree (rendered overlay files with their modes and
owners, the role's ``/etc/pve`` directories, systemd enable links) made once and used
twice: copied into the node's root file system for the qcow2, and packed as its own
squashfs stacked over the shared base squashfs on the live ISO.
"""

from __future__ import annotations

import configparser
import os
import shutil
import stat
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .lab import Lab, Node
from .render import RenderedFile, enabled_units, node_dirs, render_files
from .run import Steps, StepError

UNIT_DIRS = ("etc/systemd/system", "usr/lib/systemd/system", "lib/systemd/system")


@dataclass(frozen=True)
class Entry:
    """One path of the node layer: a file (with content), a directory or a symlink."""
    path: str
    kind: str                 # "file" | "dir" | "link"
    mode: int = 0o644
    owner: str = "root"
    group: str = "root"
    content: bytes = b""
    target: str = ""          # symlink target


def _ids(root: Path, name: str, table: str) -> int:
    for line in (root / "etc" / table).read_text().splitlines():
        fields = line.split(":")
        if fields[0] == name:
            return int(fields[2])
    raise StepError(f"{name!r} is not in the image's /etc/{table}")


def _wanted_by(unit_file: Path) -> list[str]:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    parser.read_string(unit_file.read_text())
    if not parser.has_option("Install", "WantedBy"):
        return []
    return parser.get("Install", "WantedBy").split()


def layer_entries(lab: Lab, node: Node, image_root: Path,
                  files: list[RenderedFile] | None = None) -> list[Entry]:
    """The node layer for ``node``; ``image_root`` is the base file tree (for unit lookup)."""
    files = files if files is not None else render_files(lab, node)
    entries = [Entry(f.path, "file", f.mode, f.owner, f.group, f.content.encode()) for f in files]
    entries += [Entry(d, "dir", 0o750, lab.user.name, lab.user.name) for d in node_dirs(lab, node)]
    by_path = {e.path: e for e in entries}
    for unit in enabled_units(node):
        unit_path = None
        for d in UNIT_DIRS:
            candidate = f"/{d}/{unit}"
            if candidate in by_path:
                unit_path, text_file = candidate, None
                break
            if (image_root / d / unit).exists():
                unit_path, text_file = candidate, image_root / d / unit
                break
        if unit_path is None:
            raise StepError(f"{node.name}: unit {unit} is neither in the overlay nor in the image")
        if text_file is None:
            tmp = image_root.parent / f".unit-{node.name}-{unit}"
            tmp.write_bytes(by_path[unit_path].content)
            targets = _wanted_by(tmp)
            tmp.unlink()
        else:
            targets = _wanted_by(text_file)
        if not targets:
            raise StepError(f"{node.name}: unit {unit} has no [Install] WantedBy=")
        for target in targets:
            entries.append(Entry(f"/etc/systemd/system/{target}.wants/{unit}", "link",
                                 target=unit_path))
    return entries


def apply_entries(entries: list[Entry], dest: Path, reference: Path) -> None:
    """Write entries under ``dest``; missing parents copy mode/owner from ``reference``.

    Copying parent metadata matters for the squashfs layer: an overlay upper directory
    replaces the lower one's mode, so /root must stay 0700 there as in the base.
    """
    for e in sorted(entries, key=lambda e: e.path):
        rel = e.path.lstrip("/")
        target = dest / rel
        parts = Path(rel).parts
        for i in range(1, len(parts)):
            sub = Path(*parts[:i])
            d = dest / sub
            if not d.exists():
                d.mkdir()
                ref = reference / sub
                if ref.is_dir():
                    st = ref.stat()
                    os.chown(d, st.st_uid, st.st_gid)
                    os.chmod(d, stat.S_IMODE(st.st_mode))
        uid = _ids(reference, e.owner, "passwd")
        gid = _ids(reference, e.group, "group")
        if target.is_symlink() or (target.exists() and e.kind != "dir"):
            target.unlink()
        if e.kind == "file":
            target.write_bytes(e.content)
        elif e.kind == "dir":
            target.mkdir(exist_ok=True)
        else:
            target.symlink_to(e.target)
            os.lchown(target, uid, gid)
            continue
        os.chown(target, uid, gid)
        os.chmod(target, e.mode)


# ----------------------------------------------------------------------------- disks

@contextmanager
def loop_partition(image: Path, steps: Steps, read_only: bool = False):
    """Attach a disk image and yield its first partition's device (/dev/loopXp1).

    ``losetup --partscan`` is not honoured everywhere (not on this project's CI
    sandbox); ``partx --add`` asks the kernel for the partitions explicitly.
    """
    args = ["losetup", "--find", "--show"] + (["--read-only"] if read_only else [])
    dev = steps.capture(args + [str(image)]).strip()
    part = f"{dev}p1"
    try:
        if not os.path.exists(part):
            steps.capture(["partx", "--add", dev])
        deadline = time.monotonic() + 10
        while not os.path.exists(part):
            if time.monotonic() > deadline:
                raise StepError(f"{part} did not appear after partx --add {dev}")
            time.sleep(0.1)
        yield part
    finally:
        subprocess.run(["partx", "--delete", dev], check=False, capture_output=True)
        subprocess.run(["losetup", "--detach", dev], check=False)


@contextmanager
def mounted(device: str, mountpoint: Path, steps: Steps, read_only: bool = False):
    mountpoint.mkdir(parents=True, exist_ok=True)
    steps.capture(["mount"] + (["-o", "ro"] if read_only else []) + [device, str(mountpoint)])
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], check=False)


def grow_disk(raw: Path, size_gb: int, steps: Steps) -> None:
    """Grow the raw disk to size_gb and its first (root) partition to the end."""
    if raw.stat().st_size > size_gb * 1024 ** 3:
        raise StepError(f"{raw}: base image is larger than the node's disk ({size_gb} GB)")
    os.truncate(raw, size_gb * 1024 ** 3)
    steps.run(["sfdisk", "--no-reread", "--no-tell-kernel", "-N", "1", str(raw)], input=b", +\n")


def resize_fs(part: str, steps: Steps) -> None:
    res = subprocess.run(["e2fsck", "-f", "-y", part], capture_output=True, text=True)
    steps.log(res.stdout + res.stderr)
    if res.returncode not in (0, 1):
        raise StepError(f"e2fsck {part} exited {res.returncode}")
    steps.run(["resize2fs", part])


def copy_sparse(src: Path, dst: Path) -> None:
    subprocess.run(["cp", "--sparse=always", "--reflink=auto", str(src), str(dst)], check=True)


def squash(tree: Path, out: Path, steps: Steps, fast: bool = False) -> None:
    """mksquashfs with zstd; the base layer is compressed harder than the tiny node layers."""
    level = "3" if fast else "19"
    steps.run(["mksquashfs", str(tree), str(out), "-noappend", "-comp", "zstd",
               "-Xcompression-level", level, "-no-progress", "-quiet",
               "-wildcards", "-e", "boot/grub/*", "lost+found"])


def remove_quietly(*paths: Path) -> None:
    for p in paths:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        elif p.exists() or p.is_symlink():
            p.unlink()
