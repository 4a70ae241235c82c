"""Stage 1: the shared base image, built once by diskimage-builder and cached.

All nodes share the same trixie base, packages and compat service code; they differ
only in the role unit they enable and their rendered overlay.  The base is one DIB
build (raw disk: MBR, ext4 root, GRUB) keyed by a hash of everything that goes into
it: element files, package list, DIB version, release, user and DNS settings, and the
state of the Debian suites it installs from (:mod:`pvelab.build.archive_state`). Changing any of
those, or Debian publishing a package update, rebuilds it; changing a template does not.
When the archive cannot be reached, the newest cached base of the same inputs is reused
(said on the console), so an offline rebuild of the nodes still works.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from pvelab.build import archive_state as archive
from pvelab.build import cache, dib_blockdev
from pvelab.build.disk import loop_partition, mounted, squash
from pvelab.build.hostapt import dib_mirror_env
from pvelab.build.signedboot import SignedBoot, signed_boot
from pvelab.core.paths import ELEMENTS, cache_dir
from pvelab.core.run import StepError, Steps
from pvelab.model.lab import Lab
from pvelab.model.passwords import scan_tree

BASE_ELEMENTS = ("debian-minimal", "vm", "pvelab-base", "pvelab-compat")
BASE_IMAGE_GB = 2  # raw base size; each node grows it to its own disk size
PRIMARY = ("base.raw", "vmlinuz", "initrd.img", "base.json")  # what DIB's build leaves; sealed
BASE_FORMAT = 5  # bump when the way the base or its live squashfs is made changes


@dataclass(frozen=True)
class Base:
    key: str
    dir: Path

    @property
    def raw(self) -> Path:
        return self.dir / "base.raw"

    @property
    def info(self) -> dict:
        return json.loads((self.dir / "base.json").read_text())


def dib_version() -> str:
    return metadata.version("diskimage-builder")


def _element_files() -> dict[str, str]:
    out = {}
    for name in sorted(os.listdir(ELEMENTS)):
        for path in sorted((ELEMENTS / name).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                mode = "x" if os.access(path, os.X_OK) else "-"
                out[path.relative_to(ELEMENTS).as_posix()] = f"{mode}{digest}"
    return out


def base_packages(lab: Lab) -> list[str]:
    return sorted({p for n in lab.nodes for p in n.packages})


def base_inputs(lab: Lab) -> dict:
    """Everything that shapes the base image; its hash is the cache key."""
    return {
        "format": BASE_FORMAT,
        "elements": list(BASE_ELEMENTS),
        "element_files": _element_files(),
        "packages": base_packages(lab),
        "release": lab.release,
        "arch": "amd64",
        "size_gb": BASE_IMAGE_GB,
        "dib": dib_version(),
        "user": [
            lab.user.name,
            lab.user.crypt_hash(),
            list(lab.user.groups),
        ],
        "dns": list(lab.dns_servers),
    }


def base_key(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def dib_env(lab: Lab) -> dict[str, str]:
    venv_bin = str(Path(sys.executable).parent)
    env = {
        "PATH": venv_bin + os.pathsep + os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "ELEMENTS_PATH": str(ELEMENTS),
        "DIB_RELEASE": lab.release,
        "DIB_IMAGE_CACHE": str(cache_dir() / "dib"),
        "DIB_PVELAB_USER": lab.user.name,
        "DIB_PVELAB_PASSWORD_HASH": lab.user.crypt_hash(),
        "DIB_PVELAB_GROUPS": " ".join(lab.user.groups),
        "DIB_PVELAB_DNS": " ".join(lab.dns_servers),
        "DIB_DEBIAN_COMPONENTS": "main",
    }
    env.update(dib_mirror_env())
    if dib_blockdev.needs_loop_partitions():
        env["DIB_BLOCK_DEVICE_CONFIG"] = dib_blockdev.block_device_config("pvelab_partitioning")
    return env


def _newest_of_family(root: Path, family: str) -> Path | None:
    """The newest complete cached base built from the same inputs (any archive state)."""
    found = []
    for d in root.iterdir():
        if d.name.endswith((".tmp", ".damaged")):
            continue
        try:
            info = json.loads((d / "base.json").read_text())
        except (OSError, ValueError):
            continue
        if info.get("family") == family:
            found.append(d)
    return max(found, key=lambda d: d.stat().st_mtime, default=None)


def _kept(root: Path, key: str, family: str, steps: Steps) -> Base | None:
    """The cached base ``key`` if it is complete, undamaged and of these inputs' family."""
    d = root / key
    try:
        info = json.loads((d / "base.json").read_text())
    except (OSError, ValueError):
        why = "no longer cached"
    else:
        damaged = cache.damage(d, PRIMARY)
        why = (
            "built from other inputs (an element, a package list or a setting changed)"
            if info.get("family") != family
            else f"damaged ({cache.describe(d, damaged)})"
            if damaged
            else ""
        )
    if why:
        steps.say(
            f"base {key} of the lab's other nodes is {why}: this build uses the archive's current"
            " state; `invoke build` of every node puts the lab back on one base"
        )
        return None
    steps.say(
        f"base {key}: the base the lab's other nodes were built from"
        f" (archive: {_describe(archive.from_json(info.get('archive_state', {})))}); kept so the lab"
        " stays on one base: `invoke build` of every node moves it to the archive's current state"
    )
    return Base(key, d)


# Long on purpose: key (with the archive state), cache hit or offline reuse, DIB, export, move.
def build_base(lab: Lab, steps: Steps, force: bool = False, keep: str | None = None) -> Base:
    """Return the cached base for this lab's inputs and the archive's state, building it
    with DIB if needed (``force``: always). ``keep``: the base the nodes not being built
    stand on; a build of some nodes reuses it while it is cached and of the same inputs
    (the archive may have moved since), so a lab never ends up on two bases."""
    inputs = base_inputs(lab)
    family = base_key(inputs)
    root = cache_dir() / "base"
    root.mkdir(parents=True, exist_ok=True)
    if keep and not force:
        with open(root / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            kept = _kept(root, keep, family, steps)
        if kept:
            return kept
    try:
        state = archive.fetch_state(lab.release)
    except archive.ArchiveUnreachable as exc:
        cached = _newest_of_family(root, family)
        if cached is None or force:
            raise StepError(f"cannot read the Debian archive's state to build the base: {exc}") from None
        damaged = cache.damage(cached, PRIMARY)
        if damaged:
            raise StepError(
                f"cannot read the Debian archive's state ({exc}) and the newest cached base is damaged: "
                f"{cache.describe(cached, damaged)}"
            ) from None
        steps.say(f"archive unreachable ({exc}); reusing the newest cached base {cached.name}")
        return Base(cached.name, cached)
    inputs = dict(inputs, archive=archive.key_part(state))
    key = base_key(inputs)
    final = root / key
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one base build at a time; others wait and reuse
        if final.is_dir() and (final / "base.json").exists() and not force:
            damaged = cache.damage(final, PRIMARY)
            if not damaged:
                steps.say(f"base {key}: cached (archive unchanged: {_describe(state)})")
                return Base(key, final)
            aside = cache.move_aside(final)
            steps.say(
                f"cache: base {key} is damaged ({cache.describe(final, damaged)}): moved aside to {aside}"
            )
        steps.say(f"base {key}: building (archive: {_describe(state)})")
        work = root / f"{key}.tmp"
        # what killed base builds left (of any key): none can be running, they hold the lock
        for stale in root.glob("*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        work.mkdir()
        with steps.stage(f"base image (DIB, key {key})"):
            cmd = [
                "disk-image-create",
                "-a",
                "amd64",
                "-t",
                "raw",
                "--image-size",
                str(BASE_IMAGE_GB),
                "-o",
                str(work / "base"),
                "-p",
                ",".join(inputs["packages"]),
                *BASE_ELEMENTS,
            ]
            steps.run(cmd, env=dib_env(lab))
        with steps.stage("base: kernel + live initramfs out of the disk image"):
            version, found = _export_live_boot(work, steps, lab.user.password)
        info = dict(
            inputs,
            key=key,
            family=family,
            archive_state=archive.to_json(state),
            kernel_version=version,
            dib_log=str(steps.log_path),
            password_found=found,
        )
        (work / "base.json").write_text(json.dumps(info, indent=2) + "\n")
        cache.seal(work, [work / name for name in PRIMARY])
        if final.exists():
            shutil.rmtree(final)
        os.replace(work, final)
        _prune(root, keep=final)
        return Base(key, final)


def _describe(state: dict[str, archive.SuiteState]) -> str:
    return ", ".join(f"{s.suite} {s.date or '?'}" for s in state.values())


def _export_live_boot(work: Path, steps: Steps, password: str | None) -> tuple[str, list[str]]:
    """Copy the kernel and move the live ISO's initramfs out of the fresh base image.

    install.d/70-pvelab-initramfs leaves the live initramfs (with live-boot) in
    /boot/pvelab-live; disks boot their own lean one, so it leaves the image, and
    fstrim hands its blocks back so no qcow2 carries the freed bytes.
    """
    raw, mnt = work / "base.raw", work / "mnt"
    with loop_partition(raw, steps) as part, mounted(part, mnt, steps):
        live = sorted((mnt / "boot" / "pvelab-live").glob("initrd.img-*"))
        if not live:
            raise StepError(
                f"{raw}: no /boot/pvelab-live/initrd.img-* "
                "(made by elements/pvelab-base/install.d/70-pvelab-initramfs)"
            )
        version = live[-1].name[len("initrd.img-") :]
        kernel = mnt / "boot" / f"vmlinuz-{version}"
        if not kernel.is_file():
            raise StepError(f"{raw}: live initramfs for {version} but no /boot/{kernel.name}")
        shutil.copyfile(kernel, work / "vmlinuz")
        shutil.copyfile(live[-1], work / "initrd.img")
        shutil.rmtree(mnt / "boot" / "pvelab-live")
        os.sync()  # freed blocks can be discarded only once the deletion is committed
        res = subprocess.run(["fstrim", "--verbose", str(mnt)], capture_output=True, text=True)
        steps.log(f"fstrim {mnt}: exit {res.returncode} {res.stdout.strip()} {res.stderr.strip()}")
        found = scan_tree(mnt, password)  # the base root as every node and ISO carries it
        steps.log(f"plain password in the base: {found or 'nowhere'}")
    mnt.rmdir()
    return version, found


def _prune(root: Path, keep: Path, generations: int = 2) -> None:
    """Keep the newest few bases (a rollback is then instant); drop the rest."""
    bases = sorted(
        (p for p in root.iterdir() if p.is_dir() and not p.name.endswith((".tmp", ".damaged"))),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    for old in bases[generations:]:
        if old != keep:
            shutil.rmtree(old, ignore_errors=True)


@dataclass(frozen=True)
class LiveParts:
    """What every node's ISO shares: kernel, initrd, the base squashfs, the signed boot chain."""

    kernel: Path
    initrd: Path
    squashfs: Path
    kernel_version: str
    signed: SignedBoot
    disk: Path | None = None  # the GPT boot disk every node's qcow2 starts from (bootdisk)


def live_parts(base: Base, steps: Steps) -> LiveParts:
    """Squash the base root once per base (cached beside it); kernel + live initrd are there."""
    d = base.dir
    squashfs = d / "filesystem.squashfs"  # renamed into place only when complete
    with open(base.dir.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not cache.usable(d, [squashfs.name], f"base {base.key}", steps.say):
            with steps.stage("base squashfs for the live ISO"):
                mnt = d / "mnt"
                with (
                    loop_partition(base.raw, steps, read_only=True) as part,
                    mounted(part, mnt, steps, read_only=True),
                ):
                    squash(mnt, d / "filesystem.squashfs.tmp", steps)
                mnt.rmdir()
                os.replace(d / "filesystem.squashfs.tmp", squashfs)
                cache.seal(d, [squashfs])
    signed = signed_boot(squashfs, base.key, base.info["release"], steps)
    return LiveParts(d / "vmlinuz", d / "initrd.img", squashfs, base.info["kernel_version"], signed)
