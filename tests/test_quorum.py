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
        "ring_id": "1.d",
        "members": [1, 2, 3],
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


def test_walk_of_the_redundant_lab_is_its_links():
    """Each deterministic link step, as the model expects it: who stays, who is judged,
    which knet links must show connected, and where the membership must hold."""
    from pvelab.model.faults import Fault
    from pvelab.model.quorum import Window

    lab = load_lab(LABS / "proxmox-3node-redundant.yaml")
    steps = walk(lab)
    assert all(s.check_links for s in steps)
    by = {s.number: s for s in steps}
    assert [str(e) for s in steps for e in s.events] == [
        "none",
        "unplug pve-3 link0",
        "unplug pve-3",
        "replug pve-3",
        "drop pve-1 pve-2 pve-3 link0",
        "clear",
        "saturate link1",
        "clear",
    ]
    full = {n: (4, True) for n in ("pve-1", "pve-2", "pve-3")}

    def seen(step):
        return {n: (e.total_votes, e.quorate) for n, e in step.expect.items()}

    # all up: every peer connected on both links
    assert all(up for links in by[1].links.values() for peers in links.values() for up in peers.values())
    # link0 of pve-3 pulled: nobody leaves; link0 to pve-3 down on its peers, link1 up
    assert seen(by[2]) == full and by[2].holds_membership
    assert by[2].links["pve-1"] == {0: {"pve-2": True, "pve-3": False}, 1: {"pve-2": True, "pve-3": True}}
    assert by[2].links["pve-3"][0] == {"pve-1": False, "pve-2": False}
    # every cable of pve-3 pulled: it leaves and cannot be observed; its peers keep 3 of 4
    assert seen(by[3]) == {"pve-1": (3, True), "pve-2": (3, True)} and not by[3].holds_membership
    assert by[3].links["pve-1"] == {0: {"pve-2": True, "pve-3": False}, 1: {"pve-2": True, "pve-3": False}}
    assert seen(by[4]) == full
    # link0 dropped everywhere: knet on link1 alone, the membership held
    assert seen(by[5]) == full and by[5].holds_membership
    assert all(not up for links in by[5].links.values() for up in links[0].values())
    assert all(up for links in by[5].links.values() for up in links[1].values())
    # link1 saturated: its state is not judged (a timing), link0 must stay up, membership held
    assert by[7].events[0].fault is Fault.SATURATE and isinstance(by[7].measure, Window)
    assert by[7].holds_membership and all(set(links) == {0} for links in by[7].links.values())
    assert not any(s.two_writers for s in steps)


def test_walk_of_the_one_link_lab_ends_with_the_last_resort_latency_and_saturation(lab):
    from pvelab.model.faults import Fault
    from pvelab.model.quorum import Ladder, Window, quorate_partitions

    steps = walk(lab)
    titles = [s.title for s in steps]
    cut = next(s for s in steps if s.events and s.events[0].fault is Fault.CUT)
    blocked, forced, healed = steps[cut.number], steps[cut.number + 1], steps[cut.number + 2]

    def figures(e):  # expected votes, quorum, total votes, quorate, QDevice in its config
        return (e.expected_votes, e.quorum, e.total_votes, e.quorate, e.device)

    # `expected 1` on the lone node: votequorum keeps expected at its vote plus the QDevice's
    # configured vote (2), so quorum is 2 and one vote stays blocked; its peers keep 3 of 4
    assert [str(e) for e in blocked.events] == ["expected pve-3 1"]
    assert figures(blocked.expect["pve-3"]) == (2, 2, 1, False, True)
    assert (blocked.expect["pve-1"].total_votes, blocked.expect["pve-1"].quorate) == (3, True)
    assert not blocked.two_writers
    # the QDevice out of its running config, expected 1 again: quorate alone, two writers
    assert [str(e) for e in forced.events] == ["forget-qdevice pve-3", "expected pve-3 1"]
    assert figures(forced.expect["pve-3"]) == (1, 1, 1, True, False)
    assert forced.two_writers and quorate_partitions(forced.expect) == 2
    assert not any(s.two_writers for s in steps if s is not forced)
    # corosync.conf read again and the network healed: every member 4 of 4
    assert [str(e) for e in healed.events] == ["restore-qdevice pve-3", "heal pve-3"]
    assert {n: (x.total_votes, x.expected_votes, x.device) for n, x in healed.expect.items()} == {
        n: (4, 4, True) for n in ("pve-1", "pve-2", "pve-3")
    }
    ladder, window = steps[-2], steps[-1]
    assert isinstance(ladder.measure, Ladder) and ladder.measure.node == "pve-3" and ladder.measure.link == 0
    assert (
        list(ladder.measure.rungs_ms) == sorted(ladder.measure.rungs_ms) and ladder.measure.rungs_ms[0] <= 5
    )
    assert [str(e) for e in ladder.undo] == ["clear"]
    assert isinstance(window.measure, Window) and [str(e) for e in window.events] == ["saturate link0"]
    assert all(x.quorate and x.total_votes == 4 for x in ladder.expect.values())
    assert not any(s.check_links for s in steps) and len(titles) == len(set(titles))


def test_two_node_walk_cuts_and_heals_without_the_last_resort():
    lab = load_lab(LABS / "proxmox-2node-qdevice.yaml")
    kinds = [e.kind for s in walk(lab) for e in s.events]
    assert "cut" in kinds and "heal" in kinds and "expected" not in kinds and "saturate" not in kinds


def test_quorumtool_ring_id_and_members_after_a_cut():
    text = (DATA / "quorumtool-3-of-4.txt").read_text()
    q = parse_quorumtool(text)
    assert (q["ring_id"], q["members"]) == ("1.11", [1, 2])


def test_the_lone_node_forced_quorate_matches_what_corosync_printed(lab):
    """Captured on the cut-off pve-3 after `forget-qdevice` and `expected 1`: quorate
    alone with 1 of 1, the QDevice still registered (flag shown) with no votes."""
    from pvelab.model.faults import Fault

    steps = walk(lab)
    forced = next(s for s in steps if any(e.fault is Fault.FORGET_QDEVICE for e in s.events))
    seen = parse_quorumtool((DATA / "quorumtool-forced-alone.txt").read_text())
    assert (seen["expected_votes"], seen["total_votes"], seen["quorum"], seen["quorate"]) == (1, 1, 1, True)
    assert matches(forced.expect["pve-3"], seen, with_qdevice=True)
    blocked = steps[forced.number - 2]
    assert not matches(blocked.expect["pve-3"], seen, with_qdevice=True)
