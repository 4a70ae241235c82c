"""What the real corosync tools print, read into figures.

``corosync-quorumtool -s`` (votes, quorum, the QDevice's vote), ``corosync-cfgtool -s``
(each knet link's state per peer) and ``corosync-qnetd-tool -l`` (the clients qnetd
serves). The rehearsal compares these figures with the lab's arithmetic; ``invoke
status`` shows them.
"""

from __future__ import annotations

import re
from typing import Any


def parse_quorumtool(text: str) -> dict[str, Any]:
    """The figures of ``corosync-quorumtool -s`` that the walk compares."""

    def num(label: str) -> int | None:
        m = re.search(rf"^{label}:\s+(\d+)", text, re.M)
        return int(m.group(1)) if m else None

    flags = re.search(r"^Flags:\s+(.*)$", text, re.M)
    local = re.search(r"^\s*\d+\s+\d+\s+(\S*)\s+.*\(local\)\s*$", text, re.M)
    qdevice = re.search(r"^\s*0\s+(\d+)\s+Qdevice\b", text, re.M)
    local_flags = local.group(1).split(",") if local else []
    ring = re.search(r"^Ring ID:\s+(\S+)", text, re.M)
    listing = text.split("Membership information", 1)[-1] if "Membership information" in text else ""
    members = sorted(
        int(m.group(1)) for m in re.finditer(r"^\s+(\d+)\s+\d+\s", listing, re.M) if m.group(1) != "0"
    )
    return {
        "ring_id": ring.group(1) if ring else None,
        "members": members,
        "quorate": bool(re.search(r"^Quorate:\s+Yes\s*$", text, re.M)),
        "expected_votes": num("Expected votes"),
        "total_votes": num("Total votes"),
        "quorum": num("Quorum"),
        "flags": flags.group(1).split() if flags else [],
        "qdevice_vote": "V" in local_flags,
        "qdevice_votes_line": int(qdevice.group(1)) if qdevice else None,
    }


def parse_cfgtool(text: str) -> dict[str, dict[str, str]]:
    """``corosync-cfgtool -s``: link id -> {peer node id -> state} (localhost, connected,
    disconnected, ...), e.g. ``{"0": {"1": "localhost", "2": "connected"}}``."""
    links: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for line in text.splitlines():
        link = re.match(r"^LINK ID (\d+)", line)
        if link:
            current = links.setdefault(link.group(1), {})
            continue
        peer = re.match(r"^\s+nodeid:\s+(\d+):\s+(.+?)\s*$", line)
        if peer and current is not None:
            current[peer.group(1)] = peer.group(2)
    return links


def parse_qnetd_clients(text: str) -> dict[str, Any]:
    """``corosync-qnetd-tool -l``: the cluster names and the node ids qnetd serves."""
    clusters = re.findall(r'^Cluster "([^"]+)":', text, re.M)
    nodes = [int(n) for n in re.findall(r"^\s+Node ID (\d+):", text, re.M)]
    return {"clusters": clusters, "node_ids": sorted(nodes)}


def parse_stats(text: str) -> dict[str, int]:
    """``corosync-cmapctl -m stats``: every numeric key (``stats.srp.mcast_retx (u64) = 3``)."""
    out = {}
    for m in re.finditer(r"^(stats\.\S+) \((?:u|i)\d+\) = (-?\d+)\s*$", text, re.M):
        out[m.group(1)] = int(m.group(2))
    return out


def parse_cmap_value(text: str) -> int | None:
    """``corosync-cmapctl -g KEY``: its number (``runtime.config.totem.token (u32) = 3650``)."""
    m = re.search(r"= (\d+)\s*$", text.strip())
    return int(m.group(1)) if m else None
