#!/usr/bin/python3
"""pvelab-install: put this node onto a local disk, unattended, or refuse and touch nothing.

Runs on the installer ISO's live system (``pvelab-install.service``, started when the
kernel command line has ``pvelab.install=1``). Rules come from /etc/pvelab/install.json
(rendered from the lab file's ``install:`` section):

* the target is the one disk matching every rule (path, size range, model, serial);
  by default the only non-removable disk of at least the node's ``disk_gb``; never the
  medium the installer booted from; none or several candidates: refuse;
* a disk that already holds partitions or file-system signatures is refused unless the
  lab says ``existing_data: wipe``;
* refusing writes nothing to any disk, says why on the consoles, and powers off.

Installing: GPT (BIOS boot, EFI system, root; the layout pvelab's disks use), the ESP
from the ISO (Debian's signed shim and GRUB), the root file system copied from the
live system's read-only layers (base, then the node's; never the live session's own
changes, so no live machine-id or SSH host key), /boot from the ISO, GRUB for BIOS
installed by the system itself. The log is kept on the installed disk,
/var/log/pvelab-install.log. Then it powers off (or reboots).
"""

import json
import os
import shlex
import subprocess
import sys
import threading
import time

CONFIG = "/etc/pvelab/install.json"
MEDIUM = "/run/live/medium"
TARGET = "/mnt/pvelab-target"
LOG = "/run/pvelab-install.log"
INSTALLER_LAYER = "installer.squashfs"
CONSOLES = ("/dev/ttyS0", "/dev/tty0")
HEARTBEAT = 20  # seconds between "still working" lines during a long step


def say(msg):
    line = f"pvelab-install: {msg}"
    with open(LOG, "a") as fh:
        fh.write(time.strftime("%H:%M:%S ") + line + "\n")
    for console in CONSOLES:
        try:
            with open(console, "w") as fh:
                fh.write(line + "\r\n")
        except OSError:
            pass


def run(cmd, **kw):
    """Run one step, its output to the log; a step that takes long says so every HEARTBEAT
    seconds on the consoles (an operator, and the test harness, can tell slow from hung)."""
    text = cmd if isinstance(cmd, str) else shlex.join(cmd)
    done = threading.Event()

    def heartbeat():
        t0 = time.monotonic()
        while not done.wait(HEARTBEAT):
            say(f"  ... {text.split()[0]} still running ({time.monotonic() - t0:.0f} s)")

    threading.Thread(target=heartbeat, daemon=True).start()
    try:
        with open(LOG, "a") as fh:
            fh.write("$ " + text + "\n")
            fh.flush()
            res = subprocess.run(cmd, shell=isinstance(cmd, str), stdout=fh, stderr=subprocess.STDOUT, **kw)
    finally:
        done.set()
    if res.returncode != 0:
        raise RuntimeError(f"{text} exited {res.returncode}")


def capture(cmd):
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


# --------------------------------------------------------------------------- the disk


def disks():
    data = json.loads(capture(["lsblk", "-J", "-b", "-d", "-o", "NAME,PATH,SIZE,MODEL,SERIAL,RM,RO,TYPE"]))
    return [d for d in data["blockdevices"] if d.get("type") == "disk"]


def boot_medium_disk():
    """The disk the installer booted from (never a target)."""
    try:
        src = capture(["findmnt", "-no", "SOURCE", MEDIUM]).strip()
        parent = capture(["lsblk", "-no", "PKNAME", src]).strip()
        return "/dev/" + (parent or os.path.basename(src))
    except (subprocess.CalledProcessError, FileNotFoundError):
        return None


def describe(d):
    gib = int(d["size"]) / 1024**3
    return f"{d['path']} ({gib:.0f} GiB, model {d.get('model') or '-'}, serial {d.get('serial') or '-'})"


def matches(d, rule):
    gib = int(d["size"]) / 1024**3
    checks = [
        ("path", lambda v: d["path"] == v or os.path.realpath(v) == d["path"]),
        ("min_gb", lambda v: gib >= v - 0.01),
        ("max_gb", lambda v: gib <= v + 0.01),
        ("model", lambda v: (d.get("model") or "").strip() == v),
        ("serial", lambda v: (d.get("serial") or "").strip() == v),
    ]
    return all(check(rule[key]) for key, check in checks if rule.get(key) is not None)


def choose(cfg):
    """(target disk, None) or (None, why not)."""
    medium = boot_medium_disk()
    rule = cfg["disk"]
    pool = [d for d in disks() if d["path"] != medium and not d.get("ro") and int(d["size"]) != 0]
    if rule.get("path") is None:
        pool = [d for d in pool if not d.get("rm")]
    found = [d for d in pool if matches(d, rule)]
    if len(found) != 1:
        seen = "; ".join(describe(d) for d in pool) or "no disk at all"
        what = "no disk matches" if not found else f"{len(found)} disks match"
        return None, f"{what} the rule {cfg['rule_text']} (disks seen: {seen})"
    return found[0], None


def signatures(path):
    """What is already on the disk: partition tables and file-system signatures."""
    out = capture(["wipefs", "--no-act", "--noheadings", "--output", "TYPE,OFFSET", path]).split("\n")
    return [line.strip() for line in out if line.strip()]


# --------------------------------------------------------------------------- installing


def layers():
    """The live system's read-only layers, lowest first (base, then the node; live-boot
    mounts each squashfs of live/filesystem.module at /run/live/rootfs/<file>)."""
    order = [n.strip() for n in open(f"{MEDIUM}/live/filesystem.module") if n.strip()]
    paths = [f"/run/live/rootfs/{n}" for n in order if n != INSTALLER_LAYER]
    missing = [p for p in paths if not os.path.isdir(f"{p}/etc")]
    if missing:
        raise RuntimeError(f"live layers not mounted: {', '.join(missing)}")
    return paths


def install(cfg, disk):
    dev = disk["path"]
    part = (lambda n: f"{dev}p{n}") if dev[-1].isdigit() else (lambda n: f"{dev}{n}")
    say(f"writing GPT (BIOS boot, EFI system, root) to {describe(disk)}")
    run(["wipefs", "--all", "--quiet", dev])
    run(["sfdisk", "--quiet", "--wipe", "always", dev], input=cfg["layout"].encode())
    run(["partx", "--update", dev])
    # the partitions' device nodes, not the whole udev queue: under emulation the live
    # system's own coldplug can keep that busy for 20 s and more
    run(["udevadm", "settle", "--timeout=60", f"--exit-if-exists={part(3)}"])
    say("EFI system partition: Debian's signed shim and GRUB")
    run(f"zstd -dc {MEDIUM}/install/esp.img.zst | dd of={part(2)} bs=4M conv=fsync status=none")
    say("root file system")
    uuid = open(f"{MEDIUM}/install/root.uuid").read().strip()  # the one grub.cfg and the ESP look for
    run(["mkfs.ext4", "-q", "-F", "-L", cfg["root_label"], "-U", uuid, part(3)])
    os.makedirs(TARGET, exist_ok=True)
    run(["mount", part(3), TARGET])
    try:
        for layer in layers():
            say(f"copying {layer}")
            run(["cp", "-a", "--no-preserve=links", f"{layer}/.", TARGET])
        run(["tar", "--zstd", "-xpf", f"{MEDIUM}/install/boot.tar.zst", "-C", TARGET])
        run(["install", "-m", "0644", "/usr/lib/pvelab/install/fstab", f"{TARGET}/etc/fstab"])
        for d in ("dev", "proc", "sys"):
            run(["mount", "--bind", f"/{d}", f"{TARGET}/{d}"])
        say("GRUB for BIOS (the installed system's own)")
        run(
            [
                "chroot",
                TARGET,
                "grub-install",
                "--target=i386-pc",
                "--boot-directory=/boot",
                "--modules=part_gpt ext2 biosdisk",
                dev,
            ]
        )
        os.makedirs(f"{TARGET}/var/log", exist_ok=True)
        say(f"installed {cfg['node']} on {dev}; log: /var/log/pvelab-install.log on the disk")
        run(["cp", LOG, f"{TARGET}/var/log/pvelab-install.log"])
    finally:
        for d in ("sys", "proc", "dev"):
            subprocess.run(["umount", "-l", f"{TARGET}/{d}"], capture_output=True)
        subprocess.run(["umount", TARGET], capture_output=True)
        subprocess.run(["sync"])


def finish(cfg, code):
    """Say the outcome, then power off (or reboot) at once, the live system's units
    stopped in order. (``systemctl --force`` skips that, but systemd-shutdown then waited
    80 s for a python3 process that SIGTERM did not end: tried, slower.)"""
    action = cfg.get("after", "poweroff") if code == 0 else "poweroff"
    outcome = {0: "done", 2: "nothing was written"}.get(code, "the disk is incomplete: do not boot it")
    say(f"{outcome}; {action} now")
    subprocess.run(["systemctl", "--no-block", action])
    return code


def main():
    cfg = json.load(open(CONFIG))
    say(f"installing node {cfg['node']}: disk rule {cfg['rule_text']}, existing data: {cfg['existing_data']}")
    disk, why = choose(cfg)
    if disk is None:
        say(f"REFUSED: {why}")
        return finish(cfg, 2)
    found = signatures(disk["path"])
    if found and cfg["existing_data"] != "wipe":
        say(
            f"REFUSED: {describe(disk)} is not blank ({', '.join(found)}); the lab says existing_data: "
            f"{cfg['existing_data']}; nothing was written"
        )
        return finish(cfg, 2)
    try:
        install(cfg, disk)
    except Exception as exc:
        say(f"FAILED: {exc}")
        return finish(cfg, 1)
    return finish(cfg, 0)


if __name__ == "__main__":
    sys.exit(main())
