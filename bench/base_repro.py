#!/usr/bin/env python3
"""How reproducible is the base? Build it twice from the same archive state and compare.

    .venv/bin/python bench/base_repro.py            (as root; two DIB builds, ~3 min each)

Each build goes to its own cache (``build/bench/base-repro/{a,b}``), so nothing of the
real cache is touched. Reported: the SHA-256 of each base output (raw disk, squashfs,
kernel, live initramfs), then, inside the two root file systems, every path that
differs and how (only in one, content, mode/owner, symlink target, mtime), grouped by
top directories, and the file-system-level differences (dumpe2fs header fields).
Written to ``build/bench/base-repro/report.json`` and printed.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pvelab.build import base as image  # noqa: E402
from pvelab.build.disk import loop_partition, mounted  # noqa: E402
from pvelab.core.paths import DEFAULT_LAB, build_root  # noqa: E402
from pvelab.core.run import Steps  # noqa: E402
from pvelab.model.artefacts import sha256 as sha  # noqa: E402
from pvelab.model.labfile import load_lab  # noqa: E402

OUT = build_root() / "bench" / "base-repro"
OUTPUTS = ("base.raw", "filesystem.squashfs", "vmlinuz", "initrd.img")


def tree(root: Path) -> dict[str, dict]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            st = p.lstat()
            rel = "/" + p.relative_to(root).as_posix()
            entry: dict[str, int | str] = {
                "mode": stat.S_IMODE(st.st_mode),
                "uid": st.st_uid,
                "gid": st.st_gid,
                "mtime": int(st.st_mtime),
            }
            if stat.S_ISLNK(st.st_mode):
                entry["link"] = os.readlink(p)
            elif stat.S_ISREG(st.st_mode):
                entry["sha"] = sha(p)
            out[rel] = entry
    return out


def fs_header(part: str) -> dict[str, str]:
    res = subprocess.run(["dumpe2fs", "-h", part], capture_output=True, text=True)
    fields = {}
    for line in res.stdout.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def build(lab, label: str) -> Path:
    os.environ["PVELAB_CACHE_DIR"] = str(OUT / label)
    steps = Steps(f"base-{label}", OUT / f"{label}.log")
    base = image.build_base(lab, steps, force=True)
    image.live_parts(base, steps)
    return base.dir


def main() -> int:
    lab = load_lab(DEFAULT_LAB)
    OUT.mkdir(parents=True, exist_ok=True)
    dirs = {label: build(lab, label) for label in ("a", "b")}
    report: dict = {"outputs": {}, "paths": {}, "filesystem": {}}
    for name in OUTPUTS:
        a, b = sha(dirs["a"] / name), sha(dirs["b"] / name)
        report["outputs"][name] = {"a": a, "b": b, "identical": a == b}
    steps = Steps("base-repro", OUT / "compare.log")
    with (
        loop_partition(dirs["a"] / "base.raw", steps, read_only=True) as pa,
        mounted(pa, OUT / "mnt-a", steps, read_only=True) as ra,
        loop_partition(dirs["b"] / "base.raw", steps, read_only=True) as pb,
        mounted(pb, OUT / "mnt-b", steps, read_only=True) as rb,
    ):
        ta, tb = tree(ra), tree(rb)
        ha, hb = fs_header(pa), fs_header(pb)
    kinds: dict[str, list[str]] = {}
    for path in sorted(set(ta) | set(tb)):
        ea, eb = ta.get(path), tb.get(path)
        if ea == eb:
            continue
        if ea is None or eb is None:
            why = "only in " + ("b" if ea is None else "a")
        else:
            why = ",".join(
                k for k in ("sha", "link", "mode", "uid", "gid", "mtime") if ea.get(k) != eb.get(k)
            )
        kinds.setdefault(why, []).append(path)
    report["paths"] = {why: paths for why, paths in sorted(kinds.items())}
    report["filesystem"] = {
        k: [ha.get(k), hb.get(k)] for k in sorted(set(ha) | set(hb)) if ha.get(k) != hb.get(k)
    }
    report["files_compared"] = len(set(ta) | set(tb))
    (OUT / "report.json").write_text(json.dumps(report, indent=2) + "\n")

    print("outputs:")
    for name, r in report["outputs"].items():
        print(f"  {'same' if r['identical'] else 'DIFF'} {name}")
    print(f"paths compared: {report['files_compared']}; differing:")
    for why, paths in report["paths"].items():
        tops = Counter("/".join(p.split("/")[:3]) for p in paths)
        print(f"  {why}: {len(paths)} ({', '.join(f'{t} {n}' for t, n in tops.most_common(6))})")
        for p in paths[:8]:
            print(f"      {p}")
    print("file-system header fields that differ:")
    for k, (a, b) in report["filesystem"].items():
        print(f"  {k}: {a} | {b}")
    print(f"report: {OUT / 'report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
