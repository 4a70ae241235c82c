"""Invoke tasks: a thin layer that parses arguments and calls pvelab.

invoke render [--node pve-1]     rendered overlays in build/<lab>/<node>/overlay/
invoke recipes                   JSON recipes + scenario in build/<lab>/recipes/
invoke build [--node pve-1]      qcow2 + ISO + manifest per node in build/<lab>/<node>/
invoke boot-test [--media iso --firmware uefi]   boot all four, run the scenario
invoke boot --node pve-1         one node on this terminal
invoke up [--cluster]            boot the lab and leave it running; status, ssh, console, fault, down
invoke publish [--dest DIR] [--keep N]   gated, atomic release of tested artefacts
invoke nightly [--dest DIR]      build; if changed: boot-test every medium, rehearse, publish
invoke verify RELEASE [--key F]  check a received release offline (checksums, signatures, provenance)
invoke bench                     stock DIB vs pvelab: times, sizes, ratios
"""

import functools
import sys

from invoke import Exit, task

from pvelab.core.paths import DEFAULT_LAB
from pvelab.model.accel import AUTO
from pvelab.model.media import DEFAULT_FIRMWARE, DEFAULT_MEDIUM, MEDIA

MEDIA_HELP = ", ".join(MEDIA)


def _lab(path):
    from pvelab.model.labfile import load_lab

    return load_lab(path)


def _keep(keep):
    from pvelab.core.errors import PvelabError

    if keep is None:
        return None
    try:
        return int(keep)
    except ValueError:
        raise PvelabError(f"--keep: {keep!r}: must be a whole number") from None


NO_WAIT = "when another run holds this lab, stop at once (exit 2) instead of waiting for it"


def friendly(fn):
    """Every expected failure is a PvelabError: one line, exit 2, no traceback.

    `invoke --debug ...` or PVELAB_DEBUG=1 shows the traceback instead."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import os

        from pvelab.core.errors import PvelabError
        from pvelab.core.locks import no_wait

        debug = os.environ.get("PVELAB_DEBUG") == "1" or "--debug" in sys.argv or "-d" in sys.argv[:2]
        try:
            with no_wait(kwargs.pop("no_wait", False)):
                return fn(*args, **kwargs)
        except PvelabError as exc:
            if debug:
                raise
            raise Exit(f"error: {exc}", code=exc.exit_code) from None
        except KeyboardInterrupt:
            raise Exit("interrupted: stopped and cleaned up (no artefact was replaced)", code=130) from None

    return wrapper


@task(
    iterable=["node"], help={"node": "node to render (repeatable; default all)", "lab": "lab definition file"}
)
@friendly
def render(c, node=None, lab=str(DEFAULT_LAB)):
    """Render the overlays of each node into build/<lab>/<node>/overlay/."""
    from pvelab.build.render import render_lab

    for tree in render_lab(_lab(lab), node):
        print(tree)


@task(help={"lab": "lab definition file"})
@friendly
def recipes(c, lab=str(DEFAULT_LAB)):
    """Write one JSON recipe per node and the scenario JSON into build/<lab>/recipes/."""
    from pvelab.build.recipes import export_recipes

    for path in export_recipes(_lab(lab)):
        print(path)


@task(
    iterable=["node"],
    help={
        "no_wait": NO_WAIT,
        "node": "node to build (repeatable; default all)",
        "lab": "lab definition file",
        "refresh": "rebuild the shared base even if cached (the archive is re-read either way)",
        "rebuild_base": "same as --refresh",
        "verify": "hash every cached file the build uses (a damaged one is moved aside and remade)",
    },
)
@friendly
def build(c, node=None, lab=str(DEFAULT_LAB), refresh=False, rebuild_base=False, verify=False, no_wait=False):
    """Build qcow2 + bootable ISO + installer ISO + manifest for each node into build/<lab>/<node>/."""
    from pvelab.build.pipeline import build as run_build

    for result in run_build(_lab(lab), node, force_base=refresh or rebuild_base, verify=verify):
        print(f"{result.node}: {' '.join(map(str, result.artefacts.values()))} ({result.seconds:.0f}s)")


@task(
    name="boot-test",
    iterable=["node"],
    help={
        "no_wait": NO_WAIT,
        "node": "node to boot (repeatable; default all)",
        "media": MEDIA_HELP,
        "firmware": "bios, uefi or uefi-sb",
        "accel": "auto, kvm or tcg",
        "lab": "lab definition file",
        "timeout": "seconds each assertion may take to pass",
        "analyze": "also record systemd-analyze time/blame of every guest in report.json",
    },
)
@friendly
def boot_test(
    c,
    node=None,
    media=DEFAULT_MEDIUM.name,
    firmware=DEFAULT_FIRMWARE.name,
    accel=AUTO,
    lab=str(DEFAULT_LAB),
    timeout=180,
    analyze=False,
    no_wait=False,
):
    """Boot the built nodes together under QEMU and run the lab's validation scenario."""
    from pvelab.checks.boottest import boot_test as run

    report = run(
        _lab(lab), node, media=media, firmware=firmware, accel=accel, timeout=float(timeout), analyze=analyze
    )
    if not report.passed:
        raise Exit("boot test FAILED", code=1)


@task(
    help={
        "no_wait": NO_WAIT,
        "lab": "lab definition file",
        "media": "qcow2 or iso",
        "firmware": "bios or uefi",
        "accel": "auto, kvm or tcg",
        "keep_going": "walk every step even after a mismatch",
        "keep": "leave the lab running at the end (invoke status / ssh / down), as invoke up does",
        "running": "walk the lab that `invoke up --cluster` left running (it stays up)",
    }
)
@friendly
def rehearse(
    c,
    lab=str(DEFAULT_LAB),
    media=DEFAULT_MEDIUM.name,
    firmware=DEFAULT_FIRMWARE.name,
    accel=AUTO,
    keep_going=False,
    keep=False,
    running=False,
    no_wait=False,
):
    """Form the real corosync cluster from the baked wiring on the booted lab; walk the quorum cases."""
    from pvelab.checks.rehearse import rehearse as run

    report = run(
        _lab(lab),
        media=media,
        firmware=firmware,
        accel=accel,
        keep_going=keep_going,
        keep=keep,
        running=running,
    )
    if not report.passed:
        raise Exit("rehearsal FAILED", code=1)


# ------------------------------------------------------------------ the running lab


@task(
    help={
        "no_wait": NO_WAIT,
        "lab": "lab definition file",
        "media": MEDIA_HELP,
        "firmware": "bios, uefi or uefi-sb",
        "accel": "auto, kvm or tcg",
        "cluster": "also deploy real corosync + the QDevice (as the rehearsal does) and wait until quorate",
        "replace": "take a running lab of the same name down first",
    }
)
@friendly
def up(
    c,
    lab=str(DEFAULT_LAB),
    media=DEFAULT_MEDIUM.name,
    firmware=DEFAULT_FIRMWARE.name,
    accel=AUTO,
    cluster=False,
    replace=False,
    no_wait=False,
):
    """Boot the lab and leave it running (build/<lab>/run/); prints how to reach each node."""
    from pvelab.labctl import up as run
    from pvelab.running.lifecycle import describe

    the_lab = _lab(lab)
    print(describe(the_lab, run(the_lab, media, firmware, accel, cluster=cluster, replace=replace)))


@task(help={"lab": "lab definition file", "json": "machine-readable output"})
@friendly
def status(c, lab=str(DEFAULT_LAB), json=False):
    """Per node: power, addresses, SSH, corosync's quorum and links; the witness's clients; faults."""
    from pvelab.labctl import status as run
    from pvelab.labctl import status_json, status_table

    s = run(_lab(lab))
    print(status_json(s) if json else status_table(s))
    if not s["up"]:
        raise Exit(code=3)


@task(
    positional=["node"],
    help={"node": "the node", "lab": "lab definition file", "root": "as root (sudo) instead of the lab user"},
)
@friendly
def ssh(c, node, lab=str(DEFAULT_LAB), root=False):
    """A shell on NODE, or one command after `--` (its exit status is passed through)."""
    from pvelab.labctl import ssh as run

    raise Exit(code=run(_lab(lab), node, c.remainder, root=root))


@task(positional=["node"], help={"node": "the node", "lab": "lab definition file"})
@friendly
def console(c, node, lab=str(DEFAULT_LAB)):
    """NODE's serial console on this terminal (Ctrl-] leaves)."""
    from pvelab.labctl import console as run

    raise Exit(code=run(_lab(lab), node))


@task(
    positional=["action", "target"],
    help={
        "no_wait": NO_WAIT,
        "action": "power-off, kill, power-on, cut, partition, heal, qnetd, unplug, replug, drop, delay, loss,"
        " saturate, clear, expected, forget-qdevice, restore-qdevice",
        "target": "NODE[,NODE] | 'A,B C' (partition: groups) | all (heal) | stop|start (qnetd)"
        " | 'NODE [LINK]' (unplug, replug, drop) | 'NODE LINK MS [JITTER_MS]' (delay)"
        " | 'NODE LINK PERCENT' (loss) | 'LINK [MBIT [QUEUE_MS]]' (saturate) | all (clear)"
        " | 'NODE VOTES' (expected) | NODE (forget-qdevice, restore-qdevice)",
        "lab": "lab definition file",
    },
)
@friendly
def fault(c, action, target, lab=str(DEFAULT_LAB), no_wait=False):
    """Break the running lab on purpose, or mend it: one line of output, recorded in its state."""
    from pvelab.labctl import fault as run

    print(run(_lab(lab), action, target))


@task(help={"no_wait": NO_WAIT, "lab": "lab definition file"})
@friendly
def down(c, lab=str(DEFAULT_LAB), no_wait=False):
    """Stop every VM; remove taps, dnsmasq, the namespace and the overlays (stale state too)."""
    from pvelab.labctl import down as run

    for line in run(_lab(lab)):
        print(line)


@task(
    help={
        "node": "node to boot",
        "media": "qcow2, iso, usb or install (network boot needs the lab network: invoke up --media netboot)",
        "firmware": "bios, uefi or uefi-sb",
        "accel": "auto, kvm or tcg",
        "lab": "lab definition file",
    }
)
@friendly
def boot(
    c, node, media=DEFAULT_MEDIUM.name, firmware=DEFAULT_FIRMWARE.name, accel=AUTO, lab=str(DEFAULT_LAB)
):
    """Boot one node with its serial console on this terminal (quit: Ctrl-a x)."""
    from pvelab.checks.boottest import boot_one

    raise Exit(code=boot_one(_lab(lab), node, media, firmware, accel))


@task(
    help={
        "no_wait": NO_WAIT,
        "dest": "release root (local folder, NFS or object-store mount)",
        "keep": "keep only the newest N releases",
        "lab": "lab definition file",
        "gpg_key": "sign SHA256SUMS with this GPG key (or set PVELAB_GPG_KEY)",
        "artefacts": "comma-separated artefact kinds to publish (default: qcow2,iso,installer; netboot adds the network boot bundles and the ISOs they fetch)",
        "force": "publish even when the artefacts are identical to the latest release's",
    }
)
@friendly
def publish(
    c,
    dest=None,
    keep=None,
    lab=str(DEFAULT_LAB),
    gpg_key=None,
    artefacts="qcow2,iso,installer",
    force=False,
    no_wait=False,
):
    """Publish what is built and boot-tested as DEST/<lab>/<timestamp>/ (gated, atomic)."""
    import os

    from pvelab.release.publish import publish as run

    rel = run(
        _lab(lab),
        dest,
        keep=_keep(keep),
        kinds=tuple(k for k in artefacts.split(",") if k),
        gpg_key=gpg_key or os.environ.get("PVELAB_GPG_KEY"),
        force=force,
    )
    _say_release(rel)


def _say_release(rel):
    if rel.new:
        print(f"published {rel.path} ({len(rel.files)} artefacts)")
    else:
        print(
            f"nothing new: the artefacts are identical to release {rel.path}; not published (--force to publish)"
        )


@task(
    help={
        "no_wait": NO_WAIT,
        "dest": "release root",
        "keep": "keep only the newest N releases",
        "lab": "lab definition file",
        "accel": "auto, kvm or tcg",
        "gpg_key": "sign SHA256SUMS with this GPG key (or set PVELAB_GPG_KEY)",
        "force": "test and publish even when the artefacts are identical to the latest release's",
        "on_failure": "shell command run when the nightly fails ($PVELAB_STATUS: its status.json)",
    }
)
@friendly
def nightly(
    c,
    dest=None,
    keep=None,
    lab=str(DEFAULT_LAB),
    accel=AUTO,
    gpg_key=None,
    force=False,
    on_failure=None,
    no_wait=False,
):
    """Build; unless identical to the latest release, boot-test every medium, rehearse, publish."""
    import os

    from pvelab.release.nightly import nightly as run

    rel = run(
        _lab(lab),
        dest,
        _keep(keep),
        accel,
        gpg_key or os.environ.get("PVELAB_GPG_KEY"),
        force=force,
        on_failure=on_failure,
    )
    if rel is not None:
        _say_release(rel)


@task(
    positional=["release"],
    help={
        "release": "the release folder (e.g. DEST/<lab>/latest)",
        "key": "the release's public key file (armored or binary), got out of band: check every signature",
    },
)
@friendly
def verify(c, release, key=None):
    """Check a release you received, offline: checksums, signatures, provenance, SBOMs, test reports."""
    from pvelab.release.verify import verify as run

    v = run(release, key)
    for problem in v.problems:
        print(problem)
    if not v.ok:
        raise Exit(v.summary(), code=1)
    print(v.summary())


@task(
    help={
        "boots": "boots of each image for the boot-to-SSH figure (median; default 3)",
        "icount": "also boot each image under TCG -icount (instruction-counted guest time) and report "
        "systemd-analyze per boot: repeatable figures for changes worth a few percent",
    }
)
@friendly
def bench(c, boots=3, icount=False):
    """Stock DIB vs pvelab side by side: build times, boot to SSH, sizes; ratios + JSON."""
    import subprocess

    from pvelab.core.paths import ROOT

    raise Exit(
        code=subprocess.call(
            [sys.executable, str(ROOT / "bench" / "bench.py"), "--boots", str(int(boots))]
            + (["--icount"] if icount else [])
        )
    )
