"""`invoke build`: lab -> overlays -> shared base (DIB) -> per-node qcow2 + ISO + manifest.

Artefacts are written under ``build/<lab>/<node>/.work`` and moved into place with
``os.replace`` only when both the qcow2 and the ISO are complete, so a failed or
interrupted build never leaves a truncated artefact at ``build/<lab>/<node>/<node>.qcow2``
/ ``.iso`` and never removes the previous good ones.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from pvelab.build import base as image
from pvelab.build import bootdisk, cache, iso, netboot, sbom
from pvelab.build.disk import QCOW2_FORMAT, copy_sparse, grow_disk, loop_partition, mounted, resize_fs, squash
from pvelab.build.layer import (
    Entry,
    apply_entries,
    debugfs_script,
    installer_entries,
    layer_entries,
    run_debugfs,
)
from pvelab.build.render import RenderedFile, render_node
from pvelab.core import repro
from pvelab.core.errors import PvelabError
from pvelab.core.locks import locking
from pvelab.core.paths import ROOT, build_root
from pvelab.core.run import StepError, Steps
from pvelab.model.artefacts import ArtefactInfo, ArtefactKind, BuildManifest, Layout, RecordError, sha256
from pvelab.model.lab import Lab, Node
from pvelab.model.passwords import private_keys, scan_tree

HOST_TOOLS = (
    "disk-image-create",
    "debootstrap",
    "qemu-img",
    "mksquashfs",
    "sfdisk",
    "partx",
    "losetup",
    "e2fsck",
    "resize2fs",
    "dpkg-deb",
    "mkfs.vfat",
    "mcopy",
    "mmd",
    "sgdisk",
)
HOST_FILES = (iso.ISOLINUX_BIN, iso.LDLINUX_C32, *iso.MENU_C32)
LIVE_FSTAB = "# pvelab live system: / is live-boot's overlay; nothing to mount.\n"


class PreflightError(PvelabError):
    pass


@dataclass(frozen=True)
class NodeBuild:
    node: str
    artefacts: dict[ArtefactKind, Path]
    manifest: Path
    seconds: float


def preflight(lab: Lab, nodes: tuple[Node, ...]) -> None:
    """Everything a build needs, checked before any long work starts."""
    problems = []
    if os.geteuid() != 0:
        problems.append("building images needs root (loop devices, mounts, chroot)")
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    for tool in HOST_TOOLS:
        if shutil.which(tool, path=path) is None:
            problems.append(f"host tool {tool!r} not found (run scripts/setup)")
    for f in HOST_FILES:
        if not f.exists():
            problems.append(f"{f} not found (run scripts/setup)")
    for i, n in enumerate(lab.nodes):
        if n in nodes and n.disk_gb < image.BASE_IMAGE_GB:
            problems.append(
                f"{lab.path}: nodes[{i}].disk_gb: {n.disk_gb}: smaller than the "
                f"{image.BASE_IMAGE_GB} GB base image"
            )
    free = shutil.disk_usage(build_root() if build_root().exists() else ROOT).free
    if free < 6 * 1024**3:
        problems.append(f"only {free // 1024**2} MiB free under {build_root()}; need ~6 GiB")
    if problems:
        raise PreflightError("cannot build:\n  - " + "\n  - ".join(problems))


def _dpkg_packages(root: Path) -> tuple[dict[str, str], dict[str, str]]:
    """Installed packages: (name -> version, name -> source package)."""
    versions, sources = {}, {}
    status = (root / "var/lib/dpkg/status").read_text(errors="replace")
    for stanza in status.split("\n\n"):
        fields = dict(
            line.split(": ", 1) for line in stanza.splitlines() if ": " in line and not line.startswith(" ")
        )
        name = fields.get("Package")
        if name and fields.get("Status", "").endswith(" installed"):
            versions[name] = fields.get("Version", "")
            sources[name] = fields.get("Source", name).split(" ", 1)[0]
    return dict(sorted(versions.items())), dict(sorted(sources.items()))


def tool_versions() -> dict[str, str]:
    def first_line(cmd: list[str]) -> str:
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
            return (res.stdout or res.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "unknown"

    return {
        "pvelab": metadata.version("pvelab"),
        "diskimage-builder": metadata.version("diskimage-builder"),
        "pycdlib": metadata.version("pycdlib"),
        "qemu-img": first_line(["qemu-img", "--version"]),
        "mksquashfs": first_line(["mksquashfs", "-version"]),
    }


def git_commit() -> str:
    res = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    return (res.stdout.strip() or "unknown") + ("-dirty" if dirty else "")


def release_leftovers(work: Path) -> None:
    """Unmount and detach what a killed build (SIGKILL, power loss) left under ``work``."""
    work = work.resolve()
    try:
        mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        mounts = []
    for mnt in sorted((m for m in mounts if m.startswith(str(work) + "/")), reverse=True):
        subprocess.run(["umount", "-l", mnt], capture_output=True)
    res = subprocess.run(
        ["losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE"], capture_output=True, text=True
    )
    for line in res.stdout.splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2 and parts[1].strip().startswith(str(work) + "/"):
            subprocess.run(["partx", "--delete", parts[0]], capture_output=True)
            subprocess.run(["losetup", "--detach", parts[0]], capture_output=True)


@dataclass
class NodeContext:
    """One node's build: what each of its stages reads and what they have made so far
    (mkosi's ``Context``). The node is rendered once, by :func:`_build`, into ``files``
    (its overlay) and ``installer_files`` (the installer layer)."""

    lab: Lab
    node: Node
    base: image.Base
    live: image.LiveParts
    steps: Steps
    files: list[RenderedFile]
    installer_files: list[RenderedFile]
    made: dict[ArtefactKind, Path] = field(default_factory=dict)
    units: list[str] = field(default_factory=list)
    packages: tuple[dict[str, str], dict[str, str], dict[str, list[str]]] = ({}, {}, {})

    @property
    def layout(self) -> Layout:
        return self.lab.layout

    @property
    def work(self) -> Path:
        """Where the stages write, beside the node's folder; moved into place when all is made."""
        return self.layout.node_dir(self.node.name) / ".work"

    @property
    def epoch(self) -> int:
        return int(self.steps.env.get("SOURCE_DATE_EPOCH", "0"))

    def out(self, kind: ArtefactKind) -> Path:
        """Where the stage that makes ``kind`` writes it."""
        return self.work / kind.file_name(self.node.name)


# Long on purpose: the node's stages and the atomic move into place form one try/finally.
def build_node(ctx: NodeContext) -> NodeBuild:
    t0 = time.monotonic()
    lab, node, layout, work = ctx.lab, ctx.node, ctx.layout, ctx.work
    release_leftovers(work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        for kind, stage in STAGES.items():
            ctx.made[kind] = stage(ctx)
        found = ctx.base.info.get("password_found", ["(base not scanned: rebuild it)"]) + [
            f"node layer: {p}"
            for p in scan_tree(work / "layer", lab.user.password, *(t.secret for t in lab.api.tokens))
        ]
        keys = private_keys(work / "layer")
        if keys:
            raise StepError(
                f"{node.name}: a private key is in the node layer ({', '.join(keys[:3])}): keys are made "
                "on the node at first boot, never baked into an image"
            )
        with ctx.steps.stage("manifest + checksums"):
            manifest = dataclasses.replace(_manifest(ctx), password_found=found)
            (work / layout.manifest(node.name).name).write_text(manifest.to_json())
        with ctx.steps.stage("SBOM (CycloneDX 1.6)"):
            bom = sbom.node_sbom(manifest, ctx.packages[2], ctx.epoch, lab.release)
            invalid = sbom.validate(bom)
            if invalid:
                raise StepError(f"{node.name}: the SBOM does not validate: {invalid}")
            (work / "sbom.json").write_text(bom)
        # Everything is complete: move into place (same file system, atomic per file).
        for kind, src in ctx.made.items():
            os.replace(src, layout.artefact(node.name, kind))
        os.replace(work / "sbom.json", layout.sbom(node.name))
        os.replace(work / layout.manifest(node.name).name, layout.manifest(node.name))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    took = time.monotonic() - t0
    made = ", ".join(layout.artefact(node.name, k).name for k in ctx.made)
    ctx.steps.say(f"built {made} in {took:.1f}s")
    return NodeBuild(
        node.name, {k: layout.artefact(node.name, k) for k in ctx.made}, layout.manifest(node.name), took
    )


def _disk_stage(ctx: NodeContext) -> Path:
    """The node's disk: base grown to its size, its layer baked in; also stages the ISO layers.

    The root file system is read through a read-only mount and written with debugfs
    (:func:`pvelab.build.layer.run_debugfs`), so the disk is the same bytes every time."""
    lab, node, work, steps = ctx.lab, ctx.node, ctx.work, ctx.steps
    disk = ctx.live.disk
    assert disk is not None, "build() makes the boot disk before the nodes"
    raw = work / "disk.raw"
    with steps.stage(f"disk: copy base, grow to {node.disk_gb} GB"):
        copy_sparse(disk, raw)
        grow_disk(raw, node.disk_gb, steps, partition=bootdisk.ROOT_PARTITION)
    with loop_partition(raw, steps, number=bootdisk.ROOT_PARTITION) as part:
        with steps.stage("root file system: resize"):
            resize_fs(part, steps)
        with (
            steps.stage("node layer: render, stage the ISO layers"),
            mounted(part, work / "root", steps, read_only=True) as root,
        ):
            entries = layer_entries(lab, node, root, ctx.files)
            iso_layer = [*entries, Entry("/etc/fstab", "file", content=LIVE_FSTAB.encode())]
            apply_entries(iso_layer, work / "layer", root)
            apply_entries(installer_entries(ctx.installer_files), work / "installer-layer", root)
            packages = _dpkg_packages(root)
            licences = sbom.licenses(root, packages[0])
            script = debugfs_script(entries, root, work / "debugfs")
        with steps.stage("bake overlay + enable units (debugfs)"):
            run_debugfs(script, part, steps)
    with steps.stage("qcow2 (zstd-compressed)"):
        qcow2 = ctx.out(ArtefactKind.QCOW2)
        steps.run(
            [
                "qemu-img",
                "convert",
                "-p",
                "-f",
                "raw",
                "-O",
                QCOW2_FORMAT,
                "-c",
                "-o",
                "compression_type=zstd",
                str(raw),
                str(qcow2),
            ]
        )
        raw.unlink()
    ctx.units = [e.path.rsplit("/", 1)[1] for e in entries if e.kind == "link"]
    ctx.packages = (*packages, licences)
    return qcow2


def _iso_stage(ctx: NodeContext) -> Path:
    lab, node, live, work, steps = ctx.lab, ctx.node, ctx.live, ctx.work, ctx.steps
    with steps.stage("ISO (pycdlib, BIOS+UEFI hybrid)"):
        layer_sq = work / f"{node.name}.squashfs"
        squash(work / "layer", layer_sq, steps, fast=True, all_time=ctx.epoch)
        iso_path = ctx.out(ArtefactKind.ISO)
        iso.build_iso(
            iso_path,
            node.name,
            live.kernel,
            live.initrd,
            live.squashfs,
            layer_sq,
            live.signed,
            steps,
            epoch=ctx.epoch,
            seed=f"{lab.name}/{node.name}/iso",
        )
        steps.log(iso.verify_gpt(iso_path))
    return iso_path


def _installer_stage(ctx: NodeContext) -> Path:
    """The installer ISO: the live ISO's system plus the installer layer and its payload."""
    lab, node, live, work, steps = ctx.lab, ctx.node, ctx.live, ctx.work, ctx.steps
    assert live.disk is not None
    with steps.stage("installer ISO (the live ISO + installer layer + payload)"):
        layer = work / "installer.squashfs"
        squash(work / "installer-layer", layer, steps, fast=True, all_time=ctx.epoch)
        payload = iso.InstallerPayload(
            layer, bootdisk.install_payload(live.disk, steps), lab.install.disk.describe(node)
        )
        out = ctx.out(ArtefactKind.INSTALLER)
        iso.build_iso(
            out,
            node.name,
            live.kernel,
            live.initrd,
            live.squashfs,
            work / f"{node.name}.squashfs",
            live.signed,
            steps,
            installer=payload,
            epoch=ctx.epoch,
            seed=f"{lab.name}/{node.name}/installer",
        )
        steps.log(iso.verify_gpt(out))
    return out


def _netboot_stage(ctx: NodeContext) -> Path:
    with ctx.steps.stage("network boot bundle (iPXE, shim + GRUB, kernel, initrd)"):
        bundle = ctx.out(ArtefactKind.NETBOOT)
        live = ctx.live
        netboot.make_bundle(bundle, ctx.lab, ctx.node, live.kernel, live.initrd, live.signed, ctx.epoch)
    return bundle


# The stage that makes each artefact kind, in the order they run (the disk's stage also
# stages the layers the ISOs are made of).
STAGES: dict[ArtefactKind, Callable[[NodeContext], Path]] = {
    ArtefactKind.QCOW2: _disk_stage,
    ArtefactKind.ISO: _iso_stage,
    ArtefactKind.INSTALLER: _installer_stage,
    ArtefactKind.NETBOOT: _netboot_stage,
}


def _artefact_info(ctx: NodeContext, kind: ArtefactKind, path: Path) -> ArtefactInfo:
    """What the manifest records of one artefact: size, digest, and what its kind adds."""
    info = ArtefactInfo(path.stat().st_size, sha256(path))
    if kind is ArtefactKind.QCOW2:
        info = dataclasses.replace(info, virtual_size=ctx.node.disk_gb * 1024**3)
    elif path.suffix == ".iso":
        info = dataclasses.replace(info, volume_label=iso.volume_label(ctx.node.name))
    return info


def _manifest(ctx: NodeContext) -> BuildManifest:
    lab, node, base, live, steps = ctx.lab, ctx.node, ctx.base, ctx.live, ctx.steps
    return BuildManifest(
        lab=lab.name,
        node=node.name,
        role=node.role,
        alias=str(node.alias),
        ram_mb=node.ram_mb,
        disk_gb=node.disk_gb,
        artefacts={p.name: _artefact_info(ctx, k, p) for k, p in ctx.made.items()},
        base_key=base.key,
        elements=list(image.BASE_ELEMENTS),
        overlay_files=[f.path for f in ctx.files],
        enabled_units=ctx.units,
        packages=ctx.packages[0],
        sources=ctx.packages[1],
        kernel=live.kernel_version,
        tools=dict(tool_versions(), **live.signed.versions),
        git_commit=git_commit(),
        built_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        build_seconds=dict(steps.timings),
        archive=base.info.get("archive_state", {}),
    )


@locking("build")
def build(
    lab: Lab, names: list[str] | None = None, force_base: bool = False, verify: bool = False
) -> list[NodeBuild]:
    """Build ``names`` (default: every node). ``verify``: hash every cached file used
    (:func:`pvelab.build.cache.full_checks`), not only the small ones and those whose time moved."""
    with cache.full_checks(verify):
        return _build(lab, names, force_base)


def _build(lab: Lab, names: list[str] | None, force_base: bool) -> list[NodeBuild]:
    nodes = lab.select(names)
    preflight(lab, nodes)
    layout = lab.layout
    rendered = {n.name: render_node(lab, n) for n in nodes}  # each node rendered once, here
    base_steps = Steps("base", layout.base_log)
    base = image.build_base(lab, base_steps, force=force_base, keep=_others_base(lab, nodes))
    epoch = repro.source_date_epoch(base.info.get("archive_state", {}))
    base_steps.env.update(repro.tool_env(epoch))  # the base's squashfs: the same bytes when remade
    live = image.live_parts(base, base_steps)
    disk = bootdisk.base_disk(base.raw, live.signed, base_steps)
    live = dataclasses.replace(live, disk=disk)
    # what every node's installer ISO shares is made once, before the nodes run side by side
    bootdisk.install_payload(disk, base_steps)
    jobs = []
    for n in nodes:
        log = layout.build_log(n.name)
        log.write_text(
            f"pvelab build of {n.name}; base {base.key} (its DIB output: {base_steps.log_path}); "
            f"SOURCE_DATE_EPOCH={epoch}\n"
        )
        steps = Steps(n.name, log, env=repro.tool_env(epoch))
        r = rendered[n.name]
        jobs.append(NodeContext(lab, n, base, live, steps, r.files, r.installer_files))
    return _run_nodes(jobs)


def _others_base(lab: Lab, nodes: tuple[Node, ...]) -> str | None:
    """The one base key the lab's nodes outside ``nodes`` were built from, if they all were
    built and from one base (else None: nothing to stay consistent with)."""
    layout = lab.layout
    building = {n.name for n in nodes}
    keys = set()
    for n in lab.nodes:
        if n.name in building:
            continue
        try:
            keys.add(BuildManifest.from_json(layout.manifest(n.name)).base_key)
        except RecordError:  # not built, or its record unreadable: the base is free to move
            return None
    return keys.pop() if len(keys) == 1 else None


def _die_with_parent() -> None:
    """A node build in a worker process ends when the build it belongs to is killed
    (PR_SET_PDEATHSIG), as it would have as part of that one process."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


_STOP: Any = None  # multiprocessing.Event of a parallel build: set when it is interrupted


def _node_job(job: NodeContext) -> NodeBuild:
    if _STOP is not None and _STOP.is_set():
        raise KeyboardInterrupt("the build was interrupted before this node started")
    return build_node(job)


def _run_nodes(jobs: list[NodeContext]) -> list[NodeBuild]:
    """Build the nodes, two or more at a time when the host has the cores: a node's build
    is mostly single-threaded (qemu-img, pycdlib, debugfs) and writes only its own
    folder. Worker processes, not threads: pycdlib's clock is replaced per process
    (repro.fixed_clock). The first failure is raised once every started node has ended."""
    workers = min(len(jobs), os.cpu_count() or 1, 4)
    if workers < 2:
        return [build_node(job) for job in jobs]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    global _STOP
    ctx = multiprocessing.get_context("fork")
    _STOP = ctx.Event()  # inherited by the forked workers
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_die_with_parent) as pool:
            futures = [pool.submit(_node_job, job) for job in jobs]
            try:
                errors = [f.exception() for f in futures]
            except BaseException:
                # interrupted: no queued node starts, the running ones stop through their
                # own cleanup (as Ctrl-C in a terminal would)
                _STOP.set()
                for f in futures:
                    f.cancel()
                for proc in list(getattr(pool, "_processes", {}).values()):
                    if proc.pid and proc.is_alive():
                        os.kill(proc.pid, signal.SIGINT)
                raise
    except BaseException:
        # a worker interrupted between a mount or losetup and its cleanup leaves them: the
        # workers have ended here, so what is left under a node's .work is released
        for job in jobs:
            release_leftovers(job.work)
            shutil.rmtree(job.work, ignore_errors=True)
        raise
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise first
    return [f.result() for f in futures]
