"""Fast tests of what makes builds fresh and reproducible: the archive-state key, the
fixed clock for pycdlib, derived identifiers and the debugfs script of a node layer."""

import os
import subprocess
import time

import pycdlib.dates
import pytest

from pvelab.build import archive_state as archive
from pvelab.build.layer import Entry, debugfs_script
from pvelab.core import repro

INRELEASE = """\
-----BEGIN PGP SIGNED MESSAGE-----
Hash: SHA256

Origin: Debian
Suite: stable
Version: 13.8
Codename: trixie
Date: Sat, 21 Nov 2026 09:15:44 UTC
MD5Sum:
 203e1451a4c2e0edf3646a5da3cec2d8  9679304 main/binary-amd64/Packages.xz
SHA256:
 2efd6103f013081f8118f4c9f228739bc97bff2e4e1de496f80458c7e72a24ac 56634892 main/binary-amd64/Packages
 be3d7d96a040eda0505c1808cccc67f183bbc05dff0842c50f88e6c396557412  9679304 main/binary-amd64/Packages.xz
 1111111111111111111111111111111111111111111111111111111111111111  1234 main/binary-arm64/Packages.xz
-----BEGIN PGP SIGNATURE-----
iQIzBAEBCAAdFiEE
-----END PGP SIGNATURE-----
"""


def test_inrelease_state_is_the_amd64_index_hash():
    s = archive.parse_inrelease(INRELEASE, "trixie", "http://mirror.invalid/debian")
    assert s.index_sha256 == "be3d7d96a040eda0505c1808cccc67f183bbc05dff0842c50f88e6c396557412"
    assert (s.version, s.date) == ("13.8", "Sat, 21 Nov 2026 09:15:44 UTC")
    # re-signing (new Date, same index) keeps the key; a changed index changes it
    resigned = archive.parse_inrelease(INRELEASE.replace("09:15:44", "10:00:00"), "trixie", "m")
    assert archive.key_part({"trixie": resigned}) == archive.key_part({"trixie": s})
    moved = archive.parse_inrelease(INRELEASE.replace("be3d7d96", "00000000"), "trixie", "m")
    assert archive.key_part({"trixie": moved}) != archive.key_part({"trixie": s})


def test_inrelease_without_the_index_is_an_error():
    with pytest.raises(archive.ArchiveUnreachable, match="lists no main/binary-amd64/Packages"):
        archive.parse_inrelease(INRELEASE.replace("main/binary-amd64", "contrib/binary-amd64"), "trixie", "m")


def test_source_date_epoch_is_the_newest_suite_date(monkeypatch):
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    state = {
        "trixie": {"date": "Sat, 21 Nov 2026 09:15:44 UTC"},
        "trixie-security": {"date": "Sun, 29 Nov 2026 00:53:14 UTC"},
    }
    assert repro.source_date_epoch(state) == 1795913594
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    assert repro.source_date_epoch(state) == 1700000000


def test_fixed_clock_reaches_pycdlib_and_is_undone():
    with repro.fixed_clock(1700000000, pycdlib.dates):
        d = pycdlib.dates.DirectoryRecordDate()
        d.new(pycdlib.dates.time.time())
        assert (d.years_since_1900, d.month, d.day_of_month, d.gmtoffset) == (123, 11, 14, 0)
    assert pycdlib.dates.time is time


def test_derived_identifiers_differ_by_node_and_repeat():
    assert repro.derived_uuid("lab/pve-1/iso", "disk") == repro.derived_uuid("lab/pve-1/iso", "disk")
    assert repro.derived_uuid("lab/pve-1/iso", "disk") != repro.derived_uuid("lab/pve-2/iso", "disk")
    assert 0 <= repro.derived_u32("x") < 2**32


def test_debugfs_script_lays_a_layer_and_the_result_is_reproducible(tmp_path):
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\nlab:x:1000:1000::/home/lab:/bin/sh\n")
    (root / "etc/group").write_text("root:x:0:\nlab:x:1000:\n")
    (root / "etc/hostname").write_text("old\n")
    entries = [
        Entry("/etc/hostname", "file", 0o644, content=b"pve-1\n"),
        Entry("/etc/pve/priv", "dir", 0o750, "lab", "lab"),
        Entry("/etc/systemd/system/multi-user.target.wants/x.service", "link", target="/usr/lib/x.service"),
    ]
    script = debugfs_script(entries, root, tmp_path / "dbg").read_text().splitlines()
    assert "rm /etc/hostname" in script and "mkdir /etc/pve" in script and "mkdir /etc/pve/priv" in script
    assert "sif /etc/pve/priv mode 040750" in script and "sif /etc/pve/priv uid 1000" in script
    assert script.index("mkdir /etc/systemd") < script.index("mkdir /etc/systemd/system")
    # the script on a real ext4 image: same bytes twice, e2fsck clean
    digests = []
    for i in range(2):
        img = tmp_path / f"fs{i}.img"
        env = dict(os.environ, **repro.tool_env(1700000000))
        uid = "11111111-2222-3333-4444-555555555555"
        subprocess.run(
            ["mkfs.ext4", "-q", "-F", "-U", uid, "-E", f"hash_seed={uid}", str(img), "16M"],
            check=True,
            env=env,
        )
        subprocess.run(
            ["debugfs", "-w", "-f", str(tmp_path / "dbg/commands"), str(img)],
            check=True,
            env=env,
            capture_output=True,
        )
        subprocess.run(["e2fsck", "-fn", str(img)], check=True, capture_output=True)
        digests.append(
            subprocess.run(["sha256sum", str(img)], capture_output=True, text=True).stdout.split()[0]
        )
    assert digests[0] == digests[1]


def test_sbom_licences_from_dep5_copyright(tmp_path):
    from pvelab.build import sbom

    doc = tmp_path / "usr/share/doc"
    (doc / "a").mkdir(parents=True)
    (doc / "a/copyright").write_text(
        "Format: https://example.invalid/copyright-format/1.0/\n\n"
        "Files: *\nLicense: GPL-2+ or Expat\n\nFiles: x\nLicense: BSD-3-clause\n Some text\n"
    )
    (doc / "b").mkdir()
    (doc / "b/copyright").write_text("This package was debianized by someone.\n")
    got = sbom.licenses(tmp_path, {"a": "1", "b": "1", "c": "1"})
    assert got == {"a": ["GPL-2+", "Expat", "BSD-3-clause"], "b": [], "c": []}
    assert [sbom._license(n).id for n in got["a"]] == ["GPL-2.0-or-later", "MIT", "BSD-3-Clause"]
