"""The expected-vote model of the rehearsal: votequorum arithmetic and qnetd's algorithms."""

from pathlib import Path

import pytest

from pvelab.checks.rehearse import matches, parse_quorumtool
from pvelab.core.paths import LABS
from pvelab.model.labfile import load_lab
from pvelab.model.quorum import State, expect, qdevice_partition, walk


def lab_with(raw_lab, write_lab, members, algorithm="ffsplit", votes=1, witness=True):
    pve = next(n for n in raw_lab["nodes"] if n["role"] == "pve-host")
    nodes = [dict(pve, name=f"pve-{i}", alias=f"10.81.0.{10 + i}/24") for i in range(1, members + 1)]
    if witness:
        nodes.append(next(n for n in raw_lab["nodes"] if n["role"] == "qdevice-witness"))
    raw_lab["nodes"] = nodes
    raw_lab["lab"]["qdevice"].update(algorithm=algorithm, votes=votes)
    raw_lab["connections"] = []
    for t in raw_lab["scenarios"][0]["custom_tests"]:
        t["assertions"] = [a for a in t["assertions"] if a["on_vm"] in {n["name"] for n in nodes}]
    raw_lab["scenarios"][0]["custom_tests"] = [
        t for t in raw_lab["scenarios"][0]["custom_tests"] if t["assertions"]
    ]
    return load_lab(write_lab(raw_lab))


def votes(lab, state):
    return {n: (e.total_votes, e.quorate, e.qdevice_vote) for n, e in sorted(expect(lab, state).items())}


def test_three_nodes_ffsplit(lab):
    everyone = frozenset({"pve-1", "pve-2", "pve-3"})
    assert lab.expected_votes == 4 and lab.quorum == 3
    assert votes(lab, State(everyone)) == {n: (4, True, True) for n in everyone}
    assert votes(lab, State(everyone - {"pve-3"})) == {"pve-1": (3, True, True), "pve-2": (3, True, True)}
    # a minority never gets ffsplit's vote: one survivor of three stays at one vote
    assert votes(lab, State(frozenset({"pve-1"}))) == {"pve-1": (1, False, False)}
    assert votes(lab, State(everyone, qnetd=False)) == {n: (3, True, False) for n in everyone}
    cut = votes(lab, State(everyone, cut=frozenset({"pve-3"})))
    assert cut == {"pve-1": (3, True, True), "pve-2": (3, True, True), "pve-3": (1, False, False)}


def test_two_nodes_ffsplit_keeps_either_survivor_quorate():
    lab = load_lab(LABS / "proxmox-2node-qdevice.yaml")
    assert lab.expected_votes == 3 and lab.quorum == 2
    assert votes(lab, State(frozenset({"pve-1"}))) == {"pve-1": (2, True, True)}
    assert votes(lab, State(frozenset({"pve-2"}))) == {"pve-2": (2, True, True)}
    assert votes(lab, State(frozenset({"pve-1", "pve-2"}), qnetd=False)) == {
        "pve-1": (2, True, False),
        "pve-2": (2, True, False),
    }


def test_even_cluster_half_keeps_quorum_with_the_qdevice(raw_lab, write_lab):
    lab = lab_with(raw_lab, write_lab, 4)
    assert lab.expected_votes == 5 and lab.quorum == 3
    # exactly half of an even cluster, connected to qnetd: ffsplit's 50:50 rule gives the vote
    two = State(frozenset({"pve-3", "pve-4"}))
    assert qdevice_partition(lab, two) == two.powered
    assert votes(lab, two) == {"pve-3": (3, True, True), "pve-4": (3, True, True)}
    # less than half: no vote
    assert votes(lab, State(frozenset({"pve-4"}))) == {"pve-4": (1, False, False)}


def test_lms_votes_for_the_last_man_standing(raw_lab, write_lab):
    lab = lab_with(raw_lab, write_lab, 3, algorithm="lms", votes=2)
    assert lab.expected_votes == 5 and lab.quorum == 3
    assert votes(lab, State(frozenset({"pve-2"}))) == {"pve-2": (3, True, True)}
    # qnetd gone: lms's large vote is gone too, and two of three nodes are not enough
    assert votes(lab, State(frozenset({"pve-1", "pve-2"}), qnetd=False)) == {
        "pve-1": (2, False, False),
        "pve-2": (2, False, False),
    }


@pytest.mark.parametrize("members", [2, 3, 5])
def test_walk_shape(raw_lab, write_lab, members):
    lab = lab_with(raw_lab, write_lab, members)
    steps = walk(lab)
    kinds = [e.kind for s in steps for e in s.events]
    assert "power-off" in kinds and "kill" in kinds and "cut" in kinds and "heal" in kinds
    assert "qnetd-stop" in kinds and "qnetd-start" in kinds
    assert steps[0].expect and all(e.quorate for e in steps[0].expect.values())
    assert all(e.quorate for e in steps[-1].expect.values()) and len(steps[-1].expect) == members
    assert [s.number for s in steps] == list(range(1, len(steps) + 1))


def test_no_witness_walk_has_no_qnetd_steps(raw_lab, write_lab):
    lab = lab_with(raw_lab, write_lab, 3, witness=False)
    kinds = [e.kind for s in walk(lab) for e in s.events]
    assert "qnetd-stop" not in kinds and lab.expected_votes == 3


# captured from `invoke rehearse` (Debian trixie corosync 3.1.9, corosync-qdevice 3.0.3)
DATA = Path(__file__).parent / "data"
QUORATE = (DATA / "quorumtool-all-up.txt").read_text()

BLOCKED = (DATA / "quorumtool-blocked.txt").read_text()


def test_parse_and_match_quorumtool(lab):
    everyone = frozenset({"pve-1", "pve-2", "pve-3"})
    ok = parse_quorumtool(QUORATE)
    assert ok == {
        "quorate": True,
        "expected_votes": 4,
        "total_votes": 4,
        "quorum": 3,
        "flags": ["Quorate", "Qdevice"],
        "qdevice_vote": True,
        "qdevice_votes_line": 1,
    }
    assert matches(expect(lab, State(everyone))["pve-1"], ok, with_qdevice=True)
    blocked = parse_quorumtool(BLOCKED)
    assert blocked["quorum"] == 3 and not blocked["quorate"] and not blocked["qdevice_vote"]
    assert matches(expect(lab, State(frozenset({"pve-1"})))["pve-1"], blocked, with_qdevice=True)
    assert not matches(expect(lab, State(everyone))["pve-1"], blocked, with_qdevice=True)


def test_link_faults_in_the_model_of_the_redundant_lab():
    from pvelab.core.paths import DEFAULT_LAB
    from pvelab.model.labfile import load_lab

    lab = load_lab(DEFAULT_LAB.parent / "proxmox-3node-redundant.yaml")
    everyone = frozenset({"pve-1", "pve-2", "pve-3"})

    def seen(state):
        return {
            n: (e.total_votes, e.quorate, e.qdevice_vote, len(e.members))
            for n, e in expect(lab, state).items()
        }

    # one link of one node down: knet carries on over the other, nobody leaves
    one = State(everyone, links_down=frozenset({("pve-3", 0)}))
    assert seen(one) == {n: (4, True, True, 3) for n in everyone}
    # link0 silently dropped everywhere: every pair still shares link1
    dropped = State(everyone, links_down=frozenset((n, 0) for n in everyone))
    assert seen(dropped) == {n: (4, True, True, 3) for n in everyone}
    # every NIC of pve-3 unplugged: it leaves; the runner cannot reach it, its peers judge
    gone = State(
        everyone,
        links_down=frozenset({("pve-3", 0), ("pve-3", 1)}),
        lan_down=frozenset({"pve-3"}),
        unplugged=frozenset({"pve-3"}),
    )
    assert seen(gone) == {"pve-1": (3, True, True, 2), "pve-2": (3, True, True, 2)}
    # pve-1 without link0, pve-2 without link1: they share no link, so they split
    crossed = State(everyone, links_down=frozenset({("pve-1", 0), ("pve-2", 1)}))
    parts = sorted(sorted(p) for p in crossed.partitions((0, 1)))
    assert parts == [["pve-1", "pve-3"], ["pve-2"]]


def test_one_link_lab_unchanged_by_the_link_model(lab):
    everyone = frozenset({"pve-1", "pve-2", "pve-3"})
    # the single-link lab: link0 down on a node is that node cut off
    assert expect(lab, State(everyone, links_down=frozenset({("pve-3", 0)})))["pve-3"].total_votes == 1
    assert State(everyone, cut=frozenset({"pve-3"})).partitions() == [
        frozenset({"pve-1", "pve-2"}),
        frozenset({"pve-3"}),
    ]
