"""Base-image cache keys: what must rebuild the base, and what must not."""

import shutil

from pvelab.build import base as image
from pvelab.model.labfile import load_lab


def key(lab):
    return image.base_key(image.base_inputs(lab))


def test_key_is_stable(lab):
    assert key(lab) == key(lab)


def test_package_list_changes_the_key(lab, raw_lab, write_lab):
    for n in raw_lab["nodes"]:
        n["packages"] = n["packages"] + ["htop"]
    assert key(load_lab(write_lab(raw_lab))) != key(lab)


def test_user_changes_the_key(lab, raw_lab, write_lab):
    raw_lab["lab"]["user"]["password"] = "another-password"
    assert key(load_lab(write_lab(raw_lab, "a.yaml"))) != key(lab)


def test_dns_changes_the_key(lab, raw_lab, write_lab):
    raw_lab["lab"]["dns_servers"] = ["9.9.9.9"]
    assert key(load_lab(write_lab(raw_lab))) != key(lab)


def test_element_edit_changes_the_key(lab, tmp_path, monkeypatch):
    copy = tmp_path / "elements"
    shutil.copytree(image.ELEMENTS, copy)
    monkeypatch.setattr(image, "ELEMENTS", copy)
    before = key(lab)
    script = copy / "pvelab-base" / "install.d" / "60-pvelab-system"
    script.write_text(script.read_text() + "\n# edited\n")
    assert key(lab) != before
    script.chmod(0o644)  # the executable bit matters to DIB, so to the key
    edited = key(lab)
    script.chmod(0o755)
    assert key(lab) != edited


def test_template_and_node_identity_do_not_change_the_key(lab, raw_lab, write_lab):
    # overlays, aliases, names, RAM and disk are per-node: the shared base stays cached
    raw_lab["nodes"][0]["alias"] = "10.81.0.31/24"
    raw_lab["nodes"][1]["ram_mb"] = 8192
    raw_lab["nodes"][3]["disk_gb"] = 20
    raw_lab["lab"]["storage"][0]["properties"]["sparse"] = 0
    assert key(load_lab(write_lab(raw_lab))) == key(lab)
    inputs = image.base_inputs(lab)
    assert not any(k.startswith("overlays") for k in inputs["element_files"])


def test_a_base_build_clears_what_killed_builds_left(lab, tmp_path, monkeypatch):
    """Half-written base folders (``<key>.tmp``) of builds that were killed are removed
    by the next base build, under the lock that keeps two from running at once; a
    failing build leaves its own behind for reading, and no finished base is touched."""
    import pytest

    from pvelab.build import archive_state as archive
    from pvelab.core.run import StepError, Steps

    state = {"trixie": archive.SuiteState("trixie", "http://mirror.invalid/debian", "ab" * 32, "d", "13")}
    root = dib_failing_on(state, tmp_path, monkeypatch)
    (root / "0123456789abcdef.tmp" / "base").mkdir(parents=True)  # killed, another key
    (root / "fedcba9876543210").mkdir()  # a finished base
    (root / "fedcba9876543210" / "base.json").write_text("{}")
    with pytest.raises(StepError):
        image.build_base(lab, Steps("base", tmp_path / "base.log"))
    assert not (root / "0123456789abcdef.tmp").exists()
    assert (root / "fedcba9876543210" / "base.json").exists()
    assert [p.name for p in root.glob("*.tmp")] == [f"{key_with(lab, state)}.tmp"]


def test_a_partial_build_keeps_the_base_the_other_nodes_stand_on(lab, tmp_path, monkeypatch):
    """``keep`` (what a build of some nodes passes: the base the others were built from) is
    reused while it is cached, whole and of the same inputs, even after the archive moved;
    a base of other inputs, a damaged one or ``force`` fall back to building, here failing
    on purpose at DIB with the key of the archive's current state."""
    import json

    import pytest

    from pvelab.build import archive_state as archive
    from pvelab.build import cache
    from pvelab.core.run import StepError, Steps

    old = {"trixie": archive.SuiteState("trixie", "http://mirror.invalid/debian", "ab" * 32, "d0", "13")}
    now = {"trixie": archive.SuiteState("trixie", "http://mirror.invalid/debian", "cd" * 32, "d1", "13.1")}
    root = dib_failing_on(now, tmp_path, monkeypatch)

    def cached(family):
        kept = root / key_with(lab, old)
        shutil.rmtree(kept, ignore_errors=True)
        kept.mkdir(parents=True)
        for name in image.PRIMARY[:-1]:
            (kept / name).write_bytes(name.encode() * 100)
        info = {"family": family, "archive_state": archive.to_json(old)}
        (kept / "base.json").write_text(json.dumps(info))
        cache.seal(kept, [kept / n for n in image.PRIMARY])
        return kept.name

    steps = Steps("base", tmp_path / "base.log")
    said = []
    monkeypatch.setattr(steps, "say", said.append)
    kept = cached(key(lab))
    assert image.build_base(lab, steps, keep=kept).key == kept
    assert "archive: trixie d0" in said[-1] and "other nodes" in said[-1]
    building = f"{key_with(lab, now)}.tmp"
    with pytest.raises(StepError):  # forced: the archive's current state, whatever is kept
        image.build_base(lab, steps, force=True, keep=kept)
    assert [p.name for p in root.glob("*.tmp")] == [building]
    with pytest.raises(StepError):  # an unknown key
        image.build_base(lab, steps, keep="0000000000000000")
    assert any("0000000000000000 of the lab's other nodes is no longer cached" in line for line in said), said
    said.clear()
    with pytest.raises(StepError):  # built from other inputs (an element or package changed)
        image.build_base(lab, steps, keep=cached("another-family"))
    assert any("is built from other inputs" in line for line in said), said
    said.clear()
    kept = cached(key(lab))
    (root / kept / "vmlinuz").write_bytes(b"damaged")
    with pytest.raises(StepError):
        image.build_base(lab, steps, keep=kept)
    assert any("is damaged (vmlinuz: " in line for line in said), said
    said.clear()
    assert [p.name for p in root.glob("*.tmp")] == [building]


def dib_failing_on(state, tmp_path, monkeypatch):
    """A base cache under ``tmp_path`` whose archive is in ``state`` and whose DIB run
    fails on purpose (what a base build left is then there to read); its root."""
    from pvelab.build import archive_state as archive
    from pvelab.core.run import StepError, Steps

    monkeypatch.setattr(archive, "fetch_state", lambda release: state)
    monkeypatch.setenv("PVELAB_CACHE_DIR", str(tmp_path / "cache"))
    real_run = Steps.run

    def failing_dib(self, cmd, *args, **kwargs):
        if cmd[0] == "disk-image-create":
            raise StepError("fake DIB: failing on purpose")
        return real_run(self, cmd, *args, **kwargs)

    monkeypatch.setattr(Steps, "run", failing_dib)
    return tmp_path / "cache" / "base"


def key_with(lab, state):
    from pvelab.build import archive_state as archive

    return image.base_key(dict(image.base_inputs(lab), archive=archive.key_part(state)))


def test_seal_finds_truncation_flips_and_reseals_a_plain_copy(tmp_path):
    import os
    import shutil

    from pvelab.build import cache

    entry = tmp_path / "e"
    entry.mkdir()
    small, big = entry / "small", entry / "big"
    small.write_bytes(b"a" * 1000)
    big.write_bytes(b"b" * 100)
    cache.seal(entry, [small, big])
    names = ["small", "big"]
    assert cache.damage(entry, names) == {}
    # a small file is hashed on every use, even with its time put back
    st = small.stat()
    small.write_bytes(b"A" + b"a" * 999)
    os.utime(small, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert "sha256" in cache.damage(entry, names)["small"]
    small.write_bytes(b"a" * 1000)
    # a large one only when its time moved, or under full_checks
    old, cache.ALWAYS_HASH = cache.ALWAYS_HASH, 10
    try:
        st = big.stat()
        big.write_bytes(b"c" * 100)
        os.utime(big, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert "big" not in cache.damage(entry, names)
        with cache.full_checks():
            assert "sha256" in cache.damage(entry, names)["big"]
        big.write_bytes(b"b" * 100)  # the same bytes, a new time (cp without -p): re-sealed
        assert cache.damage(entry, names) == {}
        assert cache.damage(entry, names) == {}
    finally:
        cache.ALWAYS_HASH = old
    os.truncate(big, 10)
    assert cache.damage(entry, names) == {"big": "10 bytes, sealed with 100"}
    assert cache.damage(entry, ["other"]) == {
        "other": "not sealed (made by an older pvelab, or its making was cut short)"
    }
    said = []
    assert not cache.usable(entry, names, "test entry", said.append)
    assert (entry / "big.damaged").exists() and not big.exists() and len(said) == 1
    assert "big: 10 bytes" in said[0] and "moved aside" in said[0]
    assert cache.sealed(entry) == {"small"}
    shutil.rmtree(entry)
    assert not cache.usable(entry, names, "test entry", said.append) and len(said) == 1  # never made: silent
