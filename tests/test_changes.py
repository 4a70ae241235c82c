"""CHANGES.md / changes.json between two releases (release folders as publish writes them)."""

import json
import subprocess

from pvelab.core.paths import ROOT
from pvelab.release import changes


def release(d, name, packages, corosync, lab_text, commit, sha="aa"):
    d.mkdir(parents=True)
    nodes = []
    for node, pkgs in packages.items():
        nodes.append(
            {"name": node, "packages": pkgs, "files": {"qcow2": {"name": f"{node}.qcow2", "sha256": sha}}}
        )
        conf = d / "rendered" / node / "etc/pve/corosync.conf"
        conf.parent.mkdir(parents=True)
        conf.write_text(corosync)
    archive = {
        "trixie-security": {
            "suite": "trixie-security",
            "mirror": "http://mirror.invalid/debian-security",
            "index_sha256": sha,
            "date": f"date {sha}",
        }
    }
    manifest = {"release": name, "nodes": nodes, "git_commit": commit, "archive": archive}
    (d / "manifest.json").write_text(json.dumps(manifest))
    (d / "lab.yaml").write_text(lab_text)
    return d


def git(*args):
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True).stdout.strip()


def test_changes_name_packages_security_files_lab_and_commits(tmp_path, monkeypatch):
    old_pkgs = {"openssl": "3.5.1-1", "vim-tiny": "2:9.1-1", "gone": "1.0"}
    new_pkgs = {"openssl": "3.5.4-1~deb13u1", "vim-tiny": "2:9.1-1", "htop": "3.4.1-5"}
    nodes = ("pve-1", "pbs-witness")
    old = release(
        tmp_path / "r1",
        "20261129T000000Z",
        dict.fromkeys(nodes, old_pkgs),
        "votes: 1\n",
        "a: 1\n",
        git("rev-parse", "HEAD~2"),
    )
    new = release(
        tmp_path / "r2",
        "20261130T000000Z",
        {"pve-1": new_pkgs, "pbs-witness": {**new_pkgs, "extra": "1"}},
        "votes: 2\n",
        "a: 2\n",
        git("rev-parse", "HEAD") + "-dirty",
        sha="bb",
    )
    monkeypatch.setattr(changes, "security_index", lambda archive: {"openssl": {"3.5.4-1~deb13u1"}})
    c = changes.compare(old, new)
    by = {p["package"]: p for p in c["packages"]}
    assert by["openssl"]["change"] == "upgraded" and by["openssl"]["security"] is True
    assert by["htop"]["change"] == "added" and by["htop"]["security"] is False
    assert by["gone"]["change"] == "removed" and by["extra"]["nodes"] == ["pbs-witness"]
    assert "vim-tiny" not in by
    assert [f["path"] for f in c["rendered_files"]] == ["/etc/pve/corosync.conf"] * 2
    assert "-a: 1" in c["lab_file"] and "+a: 2" in c["lab_file"]
    assert (
        c["commits"] == git("log", "--format=%h %s", "HEAD~2..HEAD").splitlines() and len(c["commits"]) == 2
    )
    assert c["archive"] == {"trixie-security": {"old": "date aa", "new": "date bb"}}
    md = changes.markdown(c)
    assert "upgraded: `openssl` 3.5.1-1 -> 3.5.4-1~deb13u1 **(security)** (all nodes)" in md
    assert "added: `extra` - -> 1 (pbs-witness)" in md
    assert "+votes: 2" in md and "## Commits" in md


def test_first_release_and_unknown_commits(tmp_path, monkeypatch):
    monkeypatch.setattr(changes, "security_index", lambda archive: None)
    one = release(tmp_path / "r1", "20261129T000000Z", {"pve-1": {}}, "x\n", "a\n", "0" * 40)
    assert "First release" in changes.markdown(changes.compare(None, one))
    two = release(tmp_path / "r2", "20261130T000000Z", {"pve-1": {"p": "1"}}, "x\n", "a\n", "1" * 40)
    c = changes.compare(one, two)
    assert c["commits"] is None and c["security_index"] == "unavailable"
    assert "is not in this checkout" in changes.markdown(c) and "not marked" in changes.markdown(c)
