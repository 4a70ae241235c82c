"""Topology picture of a lab (SVG): nodes at their diagram x/y, links labelled with ports."""

from __future__ import annotations

from xml.sax.saxutils import escape

from .lab import Lab

BOX_W, BOX_H = 150, 56
ROLE_FILL = {"pve-host": "#e8f1fb", "qdevice-witness": "#fdf3e1"}


def topology_svg(lab: Lab) -> str:
    xs = [n.diagram[0] for n in lab.nodes]
    ys = [n.diagram[1] for n in lab.nodes]
    width = max(xs) + BOX_W // 2 + 60
    height = max(ys) + BOX_H // 2 + 70
    pos = {n.name: n.diagram for n in lab.nodes}
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
        f"<title>{escape(lab.name)}: {escape(str(lab.subnet))}</title>",
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="white"/>',
        f'<text x="10" y="18" font-size="14" font-weight="bold">{escape(lab.name)} '
        f"({escape(str(lab.subnet))}, expected_votes {lab.expected_votes})</text>",
        '<g id="links" stroke="#555" stroke-width="1.5">',
    ]
    for c in lab.connections:
        (x1, y1), (x2, y2) = pos[c.source], pos[c.target]
        mx, my = (x1 + x2) / 2, (y1 + y2) / 2
        label = "/".join(str(p) for p in c.ports)
        out.append(f'<line x1="{x1}" y1="{y1}" x2="{x2}" y2="{y2}"/>')
        out.append(
            f'<text x="{mx:.0f}" y="{my - 4:.0f}" text-anchor="middle" stroke="none" '
            f'fill="#333" font-size="11">{escape(label)}</text>'
        )
    out.append("</g>")
    out.append('<g id="nodes">')
    for n in lab.nodes:
        x, y = n.diagram
        out.append(
            f'<g class="node" id="node-{escape(n.name)}">'
            f'<rect x="{x - BOX_W // 2}" y="{y - BOX_H // 2}" width="{BOX_W}" height="{BOX_H}" '
            f'rx="8" fill="{ROLE_FILL.get(n.role, "#eee")}" stroke="#246"/>'
            f'<text x="{x}" y="{y - 8}" text-anchor="middle" font-weight="bold">{escape(n.name)}</text>'
            f'<text x="{x}" y="{y + 7}" text-anchor="middle">{escape(n.role)}</text>'
            f'<text x="{x}" y="{y + 21}" text-anchor="middle" fill="#444">{escape(str(n.alias))}</text>'
            f"</g>"
        )
    out.append("</g></svg>")
    return "\n".join(out) + "\n"
