"""Topology picture of a lab (SVG): nodes at their diagram x/y, links labelled with ports.

Every connection stays visible: a link whose straight line would pass under another
node's box (pve-1 to pve-3 under pve-2 in the default lab) is drawn as a curve bowed
away from the other nodes far enough to clear every box.

With a :class:`Checks` (from the last boot test and rehearsal), each checked port on a
node is a badge and each link is coloured: green when every check of it passed, red
when one failed, grey when nothing checked it.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from xml.sax.saxutils import escape

from pvelab.model.lab import Connection, Lab

BOX_W, BOX_H = 150, 56
MARGIN = 14  # clearance a curved link keeps from other boxes
COLOURS = {"pass": "#2e7d32", "fail": "#c62828", None: "#555555"}
IP = re.compile(r"\b(?:\d{1,3}\.){3}\d{1,3}\b")


@dataclass
class Checks:
    """What the last boot test / rehearsal said, per port and per link."""

    ports: dict[tuple[str, int], bool] = field(default_factory=dict)  # (node, port) -> listening
    links: dict[frozenset[str], list[bool]] = field(default_factory=dict)  # {a, b} -> check results

    def port(self, node: str, port: int) -> str | None:
        got = self.ports.get((node, port))
        return None if got is None else "pass" if got else "fail"

    def link(self, c: Connection) -> str | None:
        found = list(self.links.get(frozenset((c.source, c.target)), []))
        found += [
            ok for p in c.ports for n in (c.source, c.target) if (ok := self.ports.get((n, p))) is not None
        ]
        return None if not found else "pass" if all(found) else "fail"


def checks_from(lab: Lab, scenario_results: list, rehearsal_passed: bool | None = None) -> Checks:
    """Checks from boot tests' scenario results (``port_listening`` assertions give the
    ports; a command run on one node that names another node's address checks their
    link) and, when given, the rehearsal: a passed one proved every pve link carried a
    real corosync membership and every witness link a QDevice vote. A port or link
    passes only if it passed in every result that checked it."""
    checks = Checks()
    by_ip = {str(n.alias.ip): n.name for n in lab.nodes}
    # a result names its assertion by node and description: the lab's own definition says what it checks
    defined = {(a.on_vm, a.kind.describe(a)): a for t in lab.scenario.custom_tests for a in t.assertions}
    for result in scenario_results:
        for test in result.tests:
            for a in test.assertions:
                definition = defined.get((a.on_vm, a.description))
                port = definition.kind.port_checked(definition) if definition else None
                if port is not None:
                    key = (a.on_vm, port)
                    checks.ports[key] = checks.ports.get(key, True) and a.passed
                    continue
                for ip in IP.findall(a.description):
                    other = by_ip.get(ip) if _is_ip(ip) else None
                    if other and other != a.on_vm:
                        checks.links.setdefault(frozenset((a.on_vm, other)), []).append(a.passed)
    if rehearsal_passed is not None:
        for c in lab.connections:
            checks.links.setdefault(frozenset((c.source, c.target)), []).append(rehearsal_passed)
    return checks


def _is_ip(text: str) -> bool:
    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        return False
    return True


def _bezier(p0, c, p2, t):
    return (
        (1 - t) ** 2 * p0[0] + 2 * (1 - t) * t * c[0] + t**2 * p2[0],
        (1 - t) ** 2 * p0[1] + 2 * (1 - t) * t * c[1] + t**2 * p2[1],
    )


def _hits(point, box_centre) -> bool:
    x, y = point
    cx, cy = box_centre
    return abs(x - cx) < BOX_W / 2 + MARGIN and abs(y - cy) < BOX_H / 2 + MARGIN


def route(lab: Lab, c: Connection) -> tuple[tuple[float, float], tuple[float, float], tuple[float, float]]:
    """(start, control, end) of the link's quadratic curve; control on the straight line's
    midpoint when nothing is in the way, else bowed away from the other nodes until the
    curve clears every other box."""
    pos = {n.name: n.diagram for n in lab.nodes}
    p0, p2 = pos[c.source], pos[c.target]
    others = [pos[n.name] for n in lab.nodes if n.name not in (c.source, c.target)]
    mid = ((p0[0] + p2[0]) / 2, (p0[1] + p2[1]) / 2)

    def clear(ctrl) -> bool:
        # the ends sit inside their own boxes; check the part of the curve between them
        return not any(_hits(_bezier(p0, ctrl, p2, i / 40), o) for i in range(4, 37) for o in others)

    if clear(mid):
        return p0, mid, p2
    dx, dy = p2[0] - p0[0], p2[1] - p0[1]
    length = (dx * dx + dy * dy) ** 0.5 or 1.0
    normal = (-dy / length, dx / length)
    centre = (sum(o[0] for o in others) / len(others), sum(o[1] for o in others) / len(others))
    away = 1 if (mid[0] - centre[0]) * normal[0] + (mid[1] - centre[1]) * normal[1] >= 0 else -1
    for side in (away, -away):
        for bow in range(20, 600, 10):
            ctrl = (mid[0] + side * normal[0] * bow, mid[1] + side * normal[1] * bow)
            if clear(ctrl):
                return p0, ctrl, p2
    return p0, mid, p2


# Long on purpose: one SVG document written element by element.
def topology_svg(lab: Lab, checks: Checks | None = None) -> str:
    routes = {(c.source, c.target): route(lab, c) for c in lab.connections}
    points = [n.diagram for n in lab.nodes] + [_bezier(*r, 0.5) for r in routes.values()]
    top = min(0, min(y for _, y in points) - 30)
    xs = [n.diagram[0] for n in lab.nodes]
    ys = [n.diagram[1] for n in lab.nodes]
    width = max(xs) + BOX_W // 2 + 60
    height = max(ys) + BOX_H // 2 + 70 - top
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height:.0f}" '
        f'viewBox="0 {top:.0f} {width} {height:.0f}" font-family="sans-serif" font-size="12">',
        f"<title>{escape(lab.name)}: {escape(str(lab.subnet))}</title>",
        f'<rect x="0" y="{top:.0f}" width="{width}" height="{height:.0f}" fill="white"/>',
        f'<text x="10" y="{top + 18:.0f}" font-size="14" font-weight="bold">{escape(lab.name)} '
        f"({escape(str(lab.subnet))}, expected_votes {lab.expected_votes})</text>",
        '<g id="links" stroke-width="2.5" fill="none">',
    ]
    for c in lab.connections:
        p0, ctrl, p2 = routes[(c.source, c.target)]
        state = checks.link(c) if checks else None
        mx, my = _bezier(p0, ctrl, p2, 0.5)
        label = "/".join(str(p) for p in c.ports)
        out.append(
            f'<path class="link {state or "unchecked"}" data-from="{escape(c.source)}" data-to="{escape(c.target)}" '
            f'd="M {p0[0]} {p0[1]} Q {ctrl[0]:.1f} {ctrl[1]:.1f} {p2[0]} {p2[1]}" stroke="{COLOURS[state]}"/>'
        )
        out.append(
            f'<text x="{mx:.0f}" y="{my - 5:.0f}" text-anchor="middle" stroke="white" stroke-width="3" '
            f'paint-order="stroke" fill="#333" font-size="11">{escape(label)}</text>'
        )
    out.append("</g>")
    out.append('<g id="nodes">')
    for n in lab.nodes:
        x, y = n.diagram
        out.append(
            f'<g class="node" id="node-{escape(n.name)}">'
            f'<rect x="{x - BOX_W // 2}" y="{y - BOX_H // 2}" width="{BOX_W}" height="{BOX_H}" '
            f'rx="8" fill="{n.role_def.colour}" stroke="#246"/>'
            f'<text x="{x}" y="{y - 8}" text-anchor="middle" font-weight="bold">{escape(n.name)}</text>'
            f'<text x="{x}" y="{y + 7}" text-anchor="middle">{escape(n.role)}</text>'
            f'<text x="{x}" y="{y + 21}" text-anchor="middle" fill="#444">{escape(str(n.alias))}</text>'
        )
        if checks:
            for i, port in enumerate(listening_ports(lab, n.name)):
                state = checks.port(n.name, port)
                bx = x - BOX_W // 2 + 4 + i * 40
                by = y + BOX_H // 2 + 3
                out.append(
                    f'<g class="port {state or "unchecked"}" data-port="{port}">'
                    f'<rect x="{bx}" y="{by}" width="36" height="14" rx="3" fill="{COLOURS[state]}"/>'
                    f'<text x="{bx + 18}" y="{by + 11}" text-anchor="middle" fill="white" font-size="10">'
                    f"{port}</text></g>"
                )
        out.append("</g>")
    out.append("</g></svg>")
    return "\n".join(out) + "\n"


def listening_ports(lab: Lab, node: str) -> list[int]:
    """Ports ``node`` serves on its links: as a link's target, or at either end of a link
    between two nodes of one role (the pve mesh)."""
    roles = {n.name: n.role for n in lab.nodes}
    return sorted(
        {
            p
            for c in lab.connections
            for p in c.ports
            if node == c.target or (node == c.source and roles[c.source] == roles[c.target])
        }
    )
