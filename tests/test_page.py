"""The release page and topology in a real browser: Chromium (Debian's) renders them
headless, and the screenshots are checked pixel by pixel: every link visible and in the
colour of its checks, the failing port red, the page laid out with its sections."""

import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from pvelab.model.artefacts import AssertionResult, ScenarioResult, TestResult
from pvelab.release.changes import compare
from pvelab.release.diagram import (
    BOX_H,
    BOX_W,
    COLOURS,
    _bezier,
    checks_from,
    listening_ports,
    route,
    topology_svg,
)
from pvelab.release.page import release_page

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed: run scripts/setup")


def dump_dom(page: Path) -> str:
    """The page's DOM as Chromium built it."""
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout


def shoot(url: str, out: Path, width: int, height: int) -> Image.Image:
    subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--window-size={width},{height}",
            f"--screenshot={out}",
            url,
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return Image.open(out).convert("RGB")


def rgb(hex_colour):
    return tuple(int(hex_colour[i : i + 2], 16) for i in (1, 3, 5))


def near(pixel, colour, tol=40):
    return all(abs(a - b) <= tol for a, b in zip(pixel, colour, strict=True))


def scenario(lab, failing_port=None):
    """The lab's scenario as the runner reports it; one port_listening check may fail."""
    tests = []
    for t in lab.scenario.custom_tests:
        results = []
        for a in t.assertions:
            ok = not (failing_port and a.type == "port_listening" and (a.on_vm, a.port) == failing_port)
            results.append(AssertionResult(a.kind.describe(a), a.on_vm, a.type, ok, 1, 0, "", 0.1))
        tests.append(TestResult(t.name, all(r.passed for r in results), 0.1, results))
    return ScenarioResult(lab.scenario.name, all(t.passed for t in tests), tests, 1.0)


def test_topology_in_chromium_every_link_visible_and_coloured(lab, tmp_path):
    checks = checks_from(lab, [scenario(lab, failing_port=("pve-3", 8006))], rehearsal_passed=True)
    svg = tmp_path / "topology.svg"
    svg.write_text(topology_svg(lab, checks))
    width, height = (
        int(float(x))
        for x in (
            svg.read_text().split('width="')[1].split('"')[0],
            svg.read_text().split('height="')[1].split('"')[0],
        )
    )
    shot = shoot(svg.as_uri(), tmp_path / "topology.png", width, height)
    for c in lab.connections:
        want = COLOURS[checks.link(c)]
        p0, ctrl, p2 = route(lab, c)
        points = [_bezier(p0, ctrl, p2, i / 40) for i in range(1, 40)]
        boxes = [n.diagram for n in lab.nodes]
        mx, my = _bezier(p0, ctrl, p2, 0.5)
        half = 3.5 * len("/".join(map(str, c.ports))) + 4  # the port label's half width (11 px font)
        # where the path is under no box (its own ends are, by design, with their port
        # badges) and not under its own port label (drawn over it, centred above the midpoint)
        free = [
            (x, y)
            for x, y in points
            if all(abs(x - nx) > BOX_W / 2 + 4 or abs(y - ny) > BOX_H / 2 + 22 for nx, ny in boxes)
            and not (abs(x - mx) < half and my - 17 < y < my - 1)
        ]
        assert len(free) >= 2, (c, free)
        # and somewhere it is its own line, not drawn over another link (a straight
        # pve-1-pve-3 would coincide with pve-1-pve-2 and pve-2-pve-3 everywhere it shows)
        others = [_bezier(*route(lab, o), i / 200) for o in lab.connections if o != c for i in range(201)]
        assert any(min(abs(x - ox) + abs(y - oy) for ox, oy in others) > 8 for x, y in free), c
        for x, y in free:
            # the line is 2.5 px wide: the best match in a 5x5 patch around the point
            patch = [
                shot.getpixel((round(x) + dx, round(y) + dy)) for dx in range(-2, 3) for dy in range(-2, 3)
            ]
            assert any(near(px, rgb(want)) for px in patch), (
                f"{c.source}-{c.target} not {want} at {x:.0f},{y:.0f}"
            )
    # pve-2-pve-3 and pve-1-pve-3 carry 8006, which pve-3 failed: red; the witness links green
    assert (
        checks.link(next(c for c in lab.connections if {c.source, c.target} == {"pve-2", "pve-3"})) == "fail"
    )
    assert (
        checks.link(next(c for c in lab.connections if {c.source, c.target} == {"pve-1", "pbs-witness"}))
        == "pass"
    )
    # the failing port's badge on pve-3 is red, its other ports green
    x, y = lab.node("pve-3").diagram
    ports = listening_ports(lab, "pve-3")
    for i, port in enumerate(ports):
        bx, by = x - BOX_W // 2 + 4 + i * 40 + 3, y + BOX_H // 2 + 3 + 3
        want = COLOURS["fail" if port == 8006 else "pass"]
        assert near(shot.getpixel((bx, by)), rgb(want)), (port, shot.getpixel((bx, by)))


def test_release_page_renders_in_chromium(lab, tmp_path):
    manifest = {
        "lab": lab.name,
        "release": "20261130T000000Z",
        "created": "2026-11-30T00:00:00Z",
        "git_commit": "abc123",
        "archive": {"trixie": {"date": "Sat, 21 Nov 2026 09:15:44 UTC"}},
        "nodes": [
            {
                "name": n.name,
                "role": n.role,
                "alias": str(n.alias),
                "packages": {"bash": "5.2"},
                "files": {
                    "qcow2": {
                        "name": f"{n.name}.qcow2",
                        "size": 170e6,
                        "sha256": "ab" * 32,
                        "boot_tests": ["qcow2-bios"],
                    }
                },
            }
            for n in lab.nodes
        ],
        "boot_tests": {
            "qcow2-bios": {
                "passed": True,
                "wall_seconds": 80.0,
                "ssh_ready_seconds": {"pve-1": 25.0},
                "secure_boot": {},
                "tests": {"Cluster ports listen": "pass"},
            }
        },
        "rehearsals": {},
    }
    rel = tmp_path / "rel"
    rel.mkdir()
    (rel / "manifest.json").write_text(__import__("json").dumps(manifest))
    checks = checks_from(lab, [scenario(lab, failing_port=("pbs-witness", 5403))])
    page = rel / "index.html"
    page.write_text(release_page(lab, manifest, compare(None, rel), checks))
    assert "<script" not in page.read_text() and "http" not in page.read_text().replace(
        "http://www.w3.org", ""
    )
    shot = shoot(page.as_uri(), tmp_path / "page.png", 1200, 1400)
    assert shot.size == (1200, 1400)
    pixels = list(shot.get_flattened_data())
    green = sum(near(p, rgb(COLOURS["pass"]), 20) for p in pixels)
    red = sum(near(p, rgb(COLOURS["fail"]), 20) for p in pixels)
    header = sum(near(p, (0x1F, 0x3B, 0x5C), 10) for p in pixels)
    assert green > 2000 and red > 500 and header > 50000, (green, red, header)
    dom = dump_dom(page)
    for n in lab.nodes:
        assert f'href="{n.name}.qcow2"' in dom and f"{n.name}.cdx.json" in dom
    assert "First release of this lab." in dom and 'class="link fail"' in dom


def test_release_page_shows_a_redundant_labs_links_and_their_states(tmp_path):
    """A lab with two links: the page lists each link (subnet, priority, each member's
    address and NIC) and, per walk step, the knet link states each member saw."""
    import json

    from pvelab.core.paths import LABS
    from pvelab.model.labfile import load_lab
    from pvelab.release.publish import links_entry

    lab = load_lab(LABS / "proxmox-3node-redundant.yaml")
    manifest = {
        "lab": lab.name,
        "release": "20261206T000000Z",
        "created": "2026-12-06T00:00:00Z",
        "git_commit": "abc123",
        "archive": {},
        "nodes": [],
        "boot_tests": {},
        "links": links_entry(lab),
        "rehearsals": {
            "qcow2": {
                "passed": True,
                "first_quorate_seconds": 5.0,
                "walk_seconds": 93.0,
                "steps": [
                    {
                        "number": 2,
                        "title": "pve-3's link0 cable pulled: knet fails over, nobody leaves",
                        "passed": True,
                        "settle_seconds": 2.9,
                        "links": {"pve-1": {"0": {"pve-2": "connected", "pve-3": "disconnected"}}},
                        "notes": ["membership held (ring id unchanged)"],
                    }
                ],
            }
        },
    }
    rel = tmp_path / "rel"
    rel.mkdir()
    (rel / "manifest.json").write_text(json.dumps(manifest))
    page = rel / "index.html"
    page.write_text(release_page(lab, manifest, compare(None, rel), checks_from(lab, [])))
    dom = dump_dom(page)
    assert "Corosync links (knet, redundant)" in dom and "10.81.1.0/24" in dom
    assert "10.81.1.13 on the NIC 52:54:00:81:01:03" in dom
    assert "10.81.0.13 on the NIC 52:54:00:81:00:03 (the default NIC)" in dom
    assert "link0 1/2" in dom and "membership held (ring id unchanged)" in dom
    assert "pve-3 disconnected" in dom  # each peer's state in the badge's title
