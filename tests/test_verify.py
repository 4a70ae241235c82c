"""Provenance in each release and `invoke verify` on the receiving side (fast: stand-in artefacts, real gpg)."""

import base64
import json
import shutil
import subprocess
import sys

import pytest
from test_publish import make_built

from pvelab.core.paths import ROOT
from pvelab.release import provenance
from pvelab.release.publish import publish
from pvelab.release.verify import VerifyInputError, verify

KEY = "pvelab-release@example.invalid"


@pytest.fixture
def built(lab):
    return make_built(lab)


@pytest.fixture
def gpg_home(tmp_path, monkeypatch):
    if shutil.which("gpg") is None:
        pytest.skip("gpg not installed")
    home = tmp_path / "gnupg"
    home.mkdir(mode=0o700)
    monkeypatch.setenv("GNUPGHOME", str(home))
    subprocess.run(
        ["gpg", "--batch", "--passphrase", "", "--quick-gen-key", KEY, "ed25519", "sign", "1d"],
        check=True,
        capture_output=True,
    )
    yield home
    subprocess.run(["gpgconf", "--kill", "gpg-agent"], capture_output=True)


@pytest.fixture
def signed(lab, built, tmp_path, gpg_home):
    """A signed release and the public key file a provisioning team would be sent."""
    rel = publish(lab, tmp_path / "rel", gpg_key=KEY)
    key = tmp_path / "release-key.asc"
    key.write_bytes(
        subprocess.run(["gpg", "--armor", "--export", KEY], check=True, capture_output=True).stdout
    )
    return rel.path, key


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "invoke", "verify", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _flip(path, offset=100):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _resum(release):
    """What someone without the key can do: recompute SHA256SUMS after a change."""
    lines = []
    for line in (release / "SHA256SUMS").read_text().splitlines():
        _, rel = line.split("  ", 1)
        lines.append(f"{provenance.sha256(release / rel)}  {rel}\n")
    (release / "SHA256SUMS").write_text("".join(lines))


def test_statement_per_node_names_bytes_inputs_and_tests(lab, built, signed):
    release, _ = signed
    m = json.loads((release / "manifest.json").read_text())
    assert m["signed"] is True
    for node in lab.nodes:
        env, stmt = provenance.read(provenance.path(release, node.name))
        assert stmt["_type"] == "https://in-toto.io/Statement/v1"
        assert stmt["predicateType"] == "https://slsa.dev/provenance/v1"
        subjects = {s["name"]: s["digest"]["sha256"] for s in stmt["subject"]}
        for kind in ("qcow2", "iso", "installer"):
            name = f"{node.name}-installer.iso" if kind == "installer" else f"{node.name}.{kind}"
            assert subjects[name] == built[(node.name, kind)]
        assert subjects[f"{node.name}.cdx.json"] == provenance.sha256(release / f"{node.name}.cdx.json")
        bd = stmt["predicate"]["buildDefinition"]
        assert bd["externalParameters"]["node"] == node.name
        assert bd["internalParameters"]["baseKey"] == "k"
        deps = {d["name"]: d for d in bd["resolvedDependencies"]}
        assert deps["pvelab"]["digest"] == {"gitCommit": "abc123"}
        assert deps["lab.yaml"]["digest"]["sha256"] == provenance.sha256(lab.path)
        by = {b["name"]: b for b in stmt["predicate"]["runDetails"]["byproducts"]}
        assert set(by) == {
            "boot-test/qcow2-bios.report.json",
            "boot-test/iso-bios.report.json",
            "boot-test/iso-uefi.report.json",
            "boot-test/install-bios.report.json",
        }
        assert all(b["annotations"]["pvelab.passed"] is True for b in by.values())
        assert len(env.signatures) == 1  # the release key's, over DSSE's PAE
        raw = json.loads(provenance.path(release, node.name).read_text())
        assert raw["payloadType"] == "application/vnd.in-toto+json"
        assert json.loads(base64.b64decode(raw["payload"])) == stmt


def test_a_published_release_verifies(lab, signed):
    release, key = signed
    v = verify(release, key)
    assert v.ok, v.problems
    n = len(lab.nodes)
    assert (v.signatures, v.statements, v.sboms, v.reports) == (1 + n, n, n, 4)
    res = _cli(release, "--key", key)
    assert res.returncode == 0, res.stdout + res.stderr
    assert (
        res.stdout.count("\n") == 1 and "verified" in res.stdout and f"{1 + n} good signatures" in res.stdout
    )
    res = _cli(release)  # no key: the hashes are checked, the signatures said not to be
    assert res.returncode == 0 and "NOT checked (no --key)" in res.stdout


@pytest.mark.parametrize("target", ["pve-2.iso", "provenance/pve-1.intoto.json", "pve-3.cdx.json"])
def test_one_changed_byte_fails_and_names_the_file(signed, tmp_path, target):
    release, key = signed
    copy = tmp_path / "copy"
    shutil.copytree(release, copy)
    _flip(copy / target)
    res = _cli(copy, "--key", key)
    assert res.returncode == 1, res.stdout + res.stderr
    assert f"{target}: SHA256SUMS: sha256" in res.stdout
    assert "FAILED" in res.stderr


def test_recomputed_checksums_do_not_hide_a_changed_artefact(signed, tmp_path):
    release, key = signed
    _flip(release / "pve-2.iso")
    _resum(release)
    v = verify(release)  # without the key only the hashes can speak
    assert not v.ok
    text = "\n".join(v.problems)
    for check in ("provenance subject", "SBOM", "gate"):
        assert f"pve-2.iso: {check}:" in text, text
    v = verify(release, key)
    assert "SHA256SUMS.asc: signature: not a good signature of SHA256SUMS by a key of --key" in v.problems


def test_a_rewritten_statement_fails_its_signature(signed, tmp_path):
    release, key = signed
    p = provenance.path(release, "pve-1")
    env = json.loads(p.read_text())
    stmt = json.loads(base64.b64decode(env["payload"]))
    stmt["predicate"]["buildDefinition"]["externalParameters"]["role"] = "something-else"
    env["payload"] = base64.b64encode(json.dumps(stmt).encode()).decode()
    p.write_text(json.dumps(env))
    _resum(release)
    v = verify(release, key)
    assert "provenance/pve-1.intoto.json: signature: no good DSSE signature by a key of --key" in v.problems
    other = subprocess.run(
        [
            "gpg",
            "--batch",
            "--passphrase",
            "",
            "--quick-gen-key",
            "other@example.invalid",
            "ed25519",
            "sign",
            "1d",
        ],
        capture_output=True,
    )
    assert other.returncode == 0
    wrong = tmp_path / "other.asc"
    wrong.write_bytes(
        subprocess.run(["gpg", "--armor", "--export", "other@example.invalid"], capture_output=True).stdout
    )
    v = verify(release, wrong)  # a key that did not sign: every signature fails
    assert sum("signature" in p for p in v.problems) == 1 + 4


def test_unsigned_release_and_added_files(lab, built, tmp_path, gpg_home):
    rel = publish(lab, tmp_path / "rel")
    v = verify(rel.path)
    assert v.ok and "unsigned" in v.summary()
    key = tmp_path / "k.asc"
    key.write_bytes(subprocess.run(["gpg", "--armor", "--export", KEY], capture_output=True).stdout)
    v = verify(rel.path, key)
    assert "SHA256SUMS.asc: signature: missing (the release is unsigned, and --key was given)" in v.problems
    assert (
        "provenance/pve-1.intoto.json: signature: the envelope is unsigned, and --key was given" in v.problems
    )
    (rel.path / "extra.sh").write_text("echo hi\n")
    (rel.path / "provenance" / "pve-2.intoto.json").unlink()
    v = verify(rel.path)
    assert "extra.sh: SHA256SUMS: not listed (added after the release was made)" in v.problems
    assert "provenance/pve-2.intoto.json: SHA256SUMS: listed but missing" in v.problems
    assert "provenance/pve-2.intoto.json: provenance: missing for node pve-2" in v.problems


def test_bad_input_is_one_line_and_exit_2(signed, tmp_path):
    release, _ = signed
    with pytest.raises(VerifyInputError, match="not a folder"):
        verify(tmp_path / "nowhere")
    (tmp_path / "notakey").write_text("hello\n")
    with pytest.raises(VerifyInputError, match="no OpenPGP public key in it"):
        verify(release, tmp_path / "notakey")
    for args in ((tmp_path / "nowhere",), (release, "--key", tmp_path / "missing.asc"), (tmp_path,)):
        res = _cli(*args)
        assert res.returncode == 2, res.stdout + res.stderr
        assert (
            res.stderr.count("\n") == 1 and res.stderr.startswith("error: ") and "Traceback" not in res.stderr
        )
