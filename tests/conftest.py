import copy
import os
import shutil
import sys

import pytest
import yaml

from pvelab.core.paths import DEFAULT_LAB, ELEMENTS, OVERLAYS
from pvelab.model.labfile import load_lab

COMPAT_DIR = ELEMENTS / "pvelab-compat" / "static" / "usr" / "lib" / "pvelab"  # shared library
ROLE_MODULE_DIRS = [OVERLAYS / role / "usr" / "lib" / "pvelab" for role in ("pve-host", "qdevice-witness")]


def pytest_addoption(parser):
    parser.addoption(
        "--full",
        action="store_true",
        help="also run the image and boot tests (root, builds the lab: many minutes)",
    )


def pytest_configure(config):
    # the full suite's time is a figure CI's limit judges: it says where the time went
    if config.getoption("--full") and not config.option.durations:
        config.option.durations = 25


def pytest_collection_modifyitems(config, items):
    # tests marked `last` use what the others built and tested (the end-to-end nightly)
    items.sort(key=lambda item: "last" in item.keywords)
    if config.getoption("--full"):
        return
    skip = pytest.mark.skip(reason="image/boot test: run with --full")
    for item in items:
        if "image" in item.keywords or "boot" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def lab():
    return load_lab(DEFAULT_LAB)


@pytest.fixture
def raw_lab():
    """The default lab file as a plain dict (YAML merge keys resolved), to mutate."""
    return copy.deepcopy(yaml.safe_load(DEFAULT_LAB.read_text()))


@pytest.fixture
def write_lab(tmp_path):
    """Write a lab dict to a temp file and return its path."""

    def write(data, name="lab.yaml"):
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    return write


@pytest.fixture(scope="session")
def compat_modules():
    for d in [COMPAT_DIR, *ROLE_MODULE_DIRS]:
        sys.path.insert(0, str(d))
    import compat
    import pve_compat
    import qdevice_compat

    # This host has corosync installed (for `corosync -t`); the images do not: serve as they do.
    pve_compat.QUORUMTOOL = "/nonexistent/corosync-quorumtool"

    return compat, pve_compat, qdevice_compat


@pytest.fixture(autouse=True)
def _build_dir(tmp_path, monkeypatch, request):
    """Unit tests write into a temp build tree, never the real build/."""
    if "image" in request.keywords or "boot" in request.keywords:
        return
    monkeypatch.setenv("PVELAB_BUILD_DIR", str(tmp_path / "build"))


def assert_refused(raw, case, write_lab):
    """Apply ``case`` (mutate, field, value) to a lab dict: loading it must fail with one
    line naming the file, the field and the value."""
    from pvelab.model.lab import LabError

    mutate, field, value = case
    mutate(raw)
    path = write_lab(raw)
    with pytest.raises(LabError) as err:
        load_lab(path)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and "\n" not in message, message
    assert field in message and value in message, message


def needs_root():
    return pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


def need_tool(name):
    if shutil.which(name) is None:
        pytest.fail(f"{name} not installed: run scripts/setup")


@pytest.fixture
def fixture_role(monkeypatch, tmp_path):
    """A role that exists only here: its registry entry and its overlay folder (a small
    file server on port 8007, started at boot). Nothing else of pvelab names it."""
    from pvelab.core.paths import ROOT
    from pvelab.model import roles

    role = roles.Role(
        name="backup-target",
        unit="backup-compat.service",
        service="backup-compat",
        cluster_member=False,
        qdevice_host=False,
        dirs=("/srv/backup",),
        compat_config=lambda lab, node: {"node": node.name, "listen": "0.0.0.0", "port": 8007},
        colour="#e3f4e1",
    )
    monkeypatch.setitem(roles.ROLES, role.name, role)
    overlays = tmp_path / "overlays"
    overlays.mkdir()
    for entry in (ROOT / "overlays").iterdir():
        os.symlink(entry, overlays / entry.name)
    layer = overlays / role.name
    (layer / "etc/pvelab").mkdir(parents=True)
    (layer / "etc/pvelab/backup-compat.json.j2").write_text("{{ compat_config }}\n")
    (layer / "usr/lib/systemd/system").mkdir(parents=True)
    (layer / "usr/lib/systemd/system/backup-compat.service").write_text(
        "[Unit]\nDescription=backup stand-in\nAfter=network-online.target\n"
        "[Service]\nExecStart=/usr/bin/python3 -m http.server 8007 --directory /srv/backup\n"
        "[Install]\nWantedBy=multi-user.target\n"
    )
    monkeypatch.setattr("pvelab.build.render.OVERLAYS", overlays)
    return role
