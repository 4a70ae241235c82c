"""A throwaway disk layer per node artefact, with the rehearsal's packages installed.

A rehearsal (and ``invoke up --cluster``) installs Debian's corosync packages on the booted
nodes. Under TCG, dpkg in the guest is a minute of emulated CPU on every member, paid on
every run. For a node booted from its qcow2 the same ``.deb`` files (:mod:`guestpkgs`) are
installed once, on the host, into a qcow2 layer made over the artefact (``qemu-img create
-b``): qemu-storage-daemon exports the layer as a raw disk over FUSE, its root partition is
mounted through a loop device (no device-mapper needed), and the image's own dpkg runs in a
chroot there, no service started (``policy-rc.d``) and none enabled (the deployment enables
each one, as on a fresh node). Each VM's throwaway overlay is then made over the layer.

The artefact is only read, and the layer is never published: it lives in the cache,
``<cache>/guest-layers/<artefact path key>/<artefact sha256>-<package set key>/<node>.qcow2``,
sealed, made again when the artefact's bytes or the packages change. Making a new layer
removes that artefact path's older ones: they back onto bytes that are gone. The
deployment still checks, in the guest, that every package is installed at its version.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from pvelab.build import cache
from pvelab.build.bootdisk import ROOT_PARTITION
from pvelab.build.disk import loop_disk, mounted, overlay_command, unmount
from pvelab.build.guestpkgs import PackageSet, identities
from pvelab.core.paths import cache_dir
from pvelab.core.run import StepError, Steps
from pvelab.model.artefacts import ArtefactKind, built, sha256
from pvelab.model.deploy import installs
from pvelab.model.lab import Lab, Node
from pvelab.model.media import Medium

LAYER_FORMAT = "2"  # bump when the way a layer is made changes: older layers are then not used
DAEMON = "qemu-storage-daemon"
UNIT = re.compile(r"^/(usr/)?lib/systemd/system/([^/]+\.(service|socket|timer))$")
CHROOT_ENV = {"DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C"}


def layers(lab: Lab, medium: Medium, packages: dict[str, PackageSet], steps: Steps) -> dict[str, Path]:
    """``{node: the file its overlay backs onto}``: the node's layer when ``medium`` boots
    the qcow2 through an overlay and the node gets packages; nodes without a layer are left out."""
    if not (medium.copy_on_write and medium.artefact == ArtefactKind.QCOW2) or not packages:
        return {}
    wanted = installs(lab)
    out = {}
    for node in lab.nodes:
        debs = tuple(d for key in wanted.get(node.name, ()) for d in packages[" ".join(key)].debs)
        if not debs:
            continue
        try:
            out[node.name] = layer(lab, node, debs, steps)
        except (StepError, OSError) as exc:  # a speed-up only: without it the guest installs the packages
            steps.say(
                f"{node.name}: no package layer ({str(exc).splitlines()[0]}); the guest will install them"
            )
    return out


def layer(lab: Lab, node: Node, debs: tuple[Path, ...], steps: Steps) -> Path:
    """The node's layer with ``debs`` installed (cached; made now when missing)."""
    if shutil.which(DAEMON) is None:
        raise StepError(f"{DAEMON} not found (scripts/setup installs it)")
    artefact = built(lab, node, ArtefactKind.QCOW2.value).resolve()
    where = cache_dir() / "guest-layers" / hashlib.sha256(str(artefact).encode()).hexdigest()[:16]
    packages = hashlib.sha256("\n".join([LAYER_FORMAT, *sorted(d.name for d in debs)]).encode())
    entry = where / f"{sha256(artefact)[:16]}-{packages.hexdigest()[:16]}"
    name = f"{node.name}.qcow2"
    if cache.usable(entry, [name], f"package layer of {node.name}", steps.say):
        steps.say(f"{node.name}: package layer cached ({entry / name})")
        return entry / name
    with steps.stage(f"{node.name}: package layer ({len(debs)} .deb files, installed on the host)"):
        staging = where / f".{entry.name}.{os.getpid()}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            disk = staging / name
            steps.capture(overlay_command(artefact, disk))
            with ExitStack() as opened:
                raw = opened.enter_context(raw_view(disk, steps))
                dev = opened.enter_context(loop_disk(raw, steps, partitions=ROOT_PARTITION))
                root = opened.enter_context(mounted(f"{dev}p{ROOT_PARTITION}", staging / "root", steps))
                install_offline(root, debs, steps)
            (staging / "root").rmdir()
            cache.seal(staging, [disk])
            for old in where.iterdir():  # older layers of this path: their artefact bytes are gone
                if not old.name.startswith(".") and not old.name.endswith(".damaged"):  # kept for a look
                    shutil.rmtree(old, ignore_errors=True)
            try:
                os.replace(staging, entry)
            except OSError:  # another run made it meanwhile: theirs is as good
                if not cache.usable(entry, [name], f"package layer of {node.name}", steps.say):
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return entry / name


@contextmanager
def raw_view(qcow2: Path, steps: Steps) -> Iterator[Path]:
    """The qcow2 as a raw, writable file (qemu-storage-daemon's FUSE export) while inside."""
    view = qcow2.with_name(qcow2.name + ".raw")
    view.touch()

    def opt(p: Path) -> str:
        return str(p).replace(",", ",,")

    cmd = [
        DAEMON,
        "--blockdev",
        f"driver=file,node-name=file,filename={opt(qcow2)}",
        "--blockdev",
        "driver=qcow2,node-name=disk,file=file",
        "--export",
        f"type=fuse,id=view,node-name=disk,mountpoint={opt(view)},writable=on",
    ]
    steps.log("$ " + " ".join(cmd))
    with open(steps.log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not os.path.ismount(view):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise StepError(f"{DAEMON} did not export {qcow2} (exit {proc.poll()}); see {steps.log_path}")
            time.sleep(0.05)
        yield view
    finally:
        if os.path.ismount(view):
            subprocess.run(["sync", str(view)], check=False, timeout=120)
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if os.path.ismount(view):
            subprocess.run(["umount", "--lazy", str(view)], check=False)
        view.unlink(missing_ok=True)


def install_offline(root: Path, debs: tuple[Path, ...], steps: Steps) -> list[str]:
    """dpkg -i ``debs`` in a chroot at ``root``: no service started, none enabled; the units
    the packages brought (disabled) are returned."""
    carried = root / "tmp" / "pvelab-debs"
    carried.mkdir(parents=True, exist_ok=True)
    policy = root / "usr" / "sbin" / "policy-rc.d"
    with ExitStack() as undo:
        undo.callback(shutil.rmtree, carried, True)
        for d in debs:
            shutil.copyfile(d, carried / d.name)
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
        undo.callback(policy.unlink, True)
        for fs, where in (("proc", "proc"), ("sysfs", "sys"), ("bind", "dev")):
            src = "/dev" if fs == "bind" else fs
            args = ["--bind"] if fs == "bind" else ["-t", fs]
            steps.capture(["mount", *args, src, str(root / where)])
            undo.callback(unmount, root / where)
        chroot = ["chroot", str(root)]
        steps.run(
            [*chroot, "dpkg", "--force-unsafe-io", "-i", *(f"/tmp/pvelab-debs/{d.name}" for d in debs)],
            env=CHROOT_ENV,
        )
        files = steps.capture(
            [*chroot, "dpkg-query", "-L", *sorted(identities(debs))], env=CHROOT_ENV
        ).splitlines()
        units = sorted({m.group(2) for f in files if (m := UNIT.match(f.strip()))})
        if units:
            steps.run([*chroot, "systemctl", "disable", *units], env=CHROOT_ENV)
            states = subprocess.run(  # exits 1 when any is disabled: its output is the answer
                [*chroot, "systemctl", "is-enabled", *units],
                capture_output=True,
                text=True,
                env=dict(os.environ, **steps.env, **CHROOT_ENV),
            ).stdout.split()
            enabled = [u for u, st in zip(units, states, strict=False) if st.startswith("enabled")]
            if enabled or len(states) != len(units):
                raise StepError(f"units still enabled after systemctl disable: {enabled or states}")
        # on the layer's disk before it is unmounted, detached and closed: a cached layer
        # that lost these writes boots corosync on Debian's sample config
        steps.run(["sync", "-f", str(root)])
        steps.say(f"installed {len(debs)} packages offline; units left disabled: {', '.join(units) or '-'}")
        return units
