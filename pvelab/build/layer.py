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
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

from pvelab.build.render import INSTALLER_UNIT, RenderedFile, enabled_units, node_dirs, render_files
from pvelab.core.run import StepError, Steps
from pvelab.model.lab import Lab, Node

UNIT_DIRS = ("etc/systemd/system", "usr/lib/systemd/system", "lib/systemd/system")


@dataclass(frozen=True)
class Entry:
    """One path of the node layer: a file (with content), a directory or a symlink."""

    path: str
    kind: str  # "file" | "dir" | "link"
    mode: int = 0o644
    owner: str = "root"
    group: str = "root"
    content: bytes = b""
    target: str = ""  # symlink target


def _ids(root: Path, name: str, table: str) -> int:
    for line in (root / "etc" / table).read_text().splitlines():
        fields = line.split(":")
        if fields[0] == name:
            return int(fields[2])
    raise StepError(f"{name!r} is not in the image's /etc/{table}")


def _wanted_by(unit_text: str) -> list[str]:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keep key case
    parser.read_string(unit_text)
    if not parser.has_option("Install", "WantedBy"):
        return []
    return parser.get("Install", "WantedBy").split()


def layer_entries(
    lab: Lab, node: Node, image_root: Path, files: list[RenderedFile] | None = None
) -> list[Entry]:
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
        targets = _wanted_by(
            by_path[unit_path].content.decode() if text_file is None else text_file.read_text()
        )
        if not targets:
            raise StepError(f"{node.name}: unit {unit} has no [Install] WantedBy=")
        for target in targets:
            entries.append(Entry(f"/etc/systemd/system/{target}.wants/{unit}", "link", target=unit_path))
    return entries


def apply_entries(entries: list[Entry], dest: Path, reference: Path) -> None:
    """Write entries under ``dest``; missing parents copy mode/owner from ``reference``.

    Copying parent metadata matters for the squashfs layer: an overlay upper directory
    replaces the lower one's mode, so /root must stay 0700 there as in the base.
    """
    dest.mkdir(parents=True, exist_ok=True)
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


def installer_entries(files: list[RenderedFile]) -> list[Entry]:
    """The installer ISO's own layer (its rendered ``files``: the installer and
    install.json), its unit enabled."""
    entries = [Entry(f.path, "file", f.mode, f.owner, f.group, f.content.encode()) for f in files]
    unit = f"/usr/lib/systemd/system/{INSTALLER_UNIT}"
    entries.append(
        Entry(f"/etc/systemd/system/multi-user.target.wants/{INSTALLER_UNIT}", "link", target=unit)
    )
    return entries


_DEBUGFS_NOISE = ("debugfs ",)  # its version banner on stderr


def debugfs_script(entries: list[Entry], image_root: Path, workdir: Path) -> Path:
    """Write to ``workdir`` the debugfs commands (and the files they copy) that lay
    ``entries`` into the ext4 file system whose current tree is mounted read-only at
    ``image_root``. Missing parents are made 0755 root:root (as ``apply_entries`` does for
    parents the image lacks). Returns the command file for :func:`run_debugfs`."""
    workdir.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []
    made: set[str] = set()

    def exists(path: str) -> bool:
        return path in made or os.path.lexists(image_root / path.lstrip("/"))

    def meta(path: str, mode: int | None, uid: int, gid: int) -> None:
        if mode is not None:
            lines.append(f"sif {path} mode 0{mode:o}")
        lines.extend([f"sif {path} uid {uid}", f"sif {path} gid {gid}"])

    for i, e in enumerate(sorted(entries, key=lambda e: e.path)):
        if any(c.isspace() for c in e.path + e.target):
            raise StepError(f"{e.path!r}: paths with white space cannot be written by debugfs")
        parts = e.path.strip("/").split("/")
        for j in range(1, len(parts)):
            parent = "/" + "/".join(parts[:j])
            if not exists(parent):
                lines.append(f"mkdir {parent}")
                made.add(parent)
        uid, gid = _ids(image_root, e.owner, "passwd"), _ids(image_root, e.group, "group")
        if e.kind == "dir":
            if not exists(e.path):
                lines.append(f"mkdir {e.path}")
                made.add(e.path)
            meta(e.path, stat.S_IFDIR | e.mode, uid, gid)
            continue
        if exists(e.path):
            lines.append(f"rm {e.path}")
        if e.kind == "file":
            source = workdir / f"f{i}"
            source.write_bytes(e.content)
            lines.append(f"write {source} {e.path}")
            meta(e.path, stat.S_IFREG | e.mode, uid, gid)
        else:
            lines.append(f"symlink {e.path} {e.target}")
            meta(e.path, None, uid, gid)
        made.add(e.path)
    script = workdir / "commands"
    script.write_text("\n".join(lines) + "\n")
    return script


def run_debugfs(script: Path, device: str, steps: Steps) -> None:
    """Run a :func:`debugfs_script` on the unmounted ext4 ``device``: no kernel mount, so
    no journal traffic and no clock in the result (times come from E2FSPROGS_FAKE_TIME in
    ``steps.env``); the same layer gives the same bytes. e2fsck checks the result."""
    steps.log(f"debugfs commands ({script}):\n{script.read_text()}")
    res = subprocess.run(
        ["debugfs", "-w", "-f", str(script), device],
        capture_output=True,
        text=True,
        env=dict(os.environ, **steps.env),
    )
    errors = [line for line in res.stderr.splitlines() if line.strip() and not line.startswith("debugfs ")]
    if res.returncode != 0 or errors:
        raise StepError(f"debugfs on {device}: {'; '.join(errors) or f'exit {res.returncode}'}")
    check = subprocess.run(["e2fsck", "-f", "-n", device], capture_output=True, text=True)
    steps.log(check.stdout + check.stderr)
    if check.returncode != 0:
        raise StepError(f"e2fsck -n {device} after laying the node layer: exit {check.returncode}")
