"""The walk's report: the console table's link column, what each step measured or
flagged, and one JUnit case per step and member that fails on a step's own failure."""

import xml.etree.ElementTree as ET

from pvelab.checks.rehearse import step_notes, table, to_junit
from pvelab.model.artefacts import NodeObservation, RehearsalReport, WalkStep

Q = {"quorate": True, "total_votes": 4, "expected_votes": 4, "qdevice_vote": True}


def node(name, links=None, passed=True):
    return NodeObservation(
        name, dict(Q), dict(Q), passed, "Votequorum information", 1, "LINK ID 0", links or {}
    )


def report(*steps):
    return RehearsalReport("lab", "labs/x.yaml", "qcow2", "bios", "tcg", {}, {}, steps=list(steps))


def test_links_column_and_membership_note():
    s = WalkStep(
        2,
        "pve-3's link0 cable pulled",
        ["unplug pve-3 link0"],
        True,
        2.9,
        [
            node(
                "pve-1",
                {
                    "0": {"pve-2": "connected", "pve-3": "disconnected"},
                    "1": {"pve-2": "connected", "pve-3": "connected"},
                },
            )
        ],
        membership_held=True,
    )
    text = table(report(s))
    assert "l0:1/2 l1:2/2" in text and "membership held (ring id unchanged)" in text


def test_two_writers_flagged_and_measured():
    danger = WalkStep(
        9,
        "expected 1",
        ["forget-qdevice pve-3", "expected pve-3 1"],
        True,
        3.0,
        [node("pve-3")],
        two_writers_seconds=2.0,
        two_writers_expected=True,
    )
    window = WalkStep(7, "cut", ["cut pve-2"], True, 21.0, [node("pve-1")], two_writers_seconds=18.4)
    assert any("DANGER: two partitions quorate at once" in n for n in step_notes(danger))
    assert step_notes(window)[0].startswith("two partitions quorate at once for up to 18.4s after the event")
    unseen = WalkStep(9, "expected 1", ["expected pve-3 1"], False, None, [], two_writers_expected=True)
    assert step_notes(unseen) == ["two writers expected, never seen"]


def test_ladder_and_window_figures_in_the_notes():
    rung = {"delay_ms": 1000.0, "jitter_ms": 100.0, "membership_changed": True, "lost_quorum": ["pve-3"]}
    ladder = {
        "node": "pve-3",
        "link": 0,
        "token_ms": 3650,
        "consensus_ms": 4380,
        "rungs": [dict(rung, delay_ms=5.0, jitter_ms=0.5, membership_changed=False, lost_quorum=[]), rung],
        "membership_changed_at_ms": 1000.0,
        "quorum_lost_at_ms": 1000.0,
    }
    notes = step_notes(WalkStep(10, "ladder", ["clear"], True, 9.0, [node("pve-1")], measurement=ladder))
    assert notes[0] == "delay 5 ms +/- 0.5: membership held, lost quorum: none"
    assert "membership first changed at 1000.0 ms" in notes[-1] and "token 3650 ms" in notes[-1]
    window = {
        "seconds": 30.0,
        "membership_changed": True,
        "lost_quorum": ["pve-1"],
        "retransmits": 12,
        "memberships_formed": 2,
        "knet_link_downs": 4,
        "knet_latency_ms": {"0": 812.5},
        "port_mbit": {"tap0": 4.9},
    }
    line = step_notes(WalkStep(11, "saturated", ["saturate link0"], True, 9.0, [], measurement=window))[0]
    assert "membership CHANGED" in line and "12 retransmits" in line and "link0 812.5 ms" in line
    assert "tap0 4.9 Mbit/s" in line


def test_a_step_failure_fails_its_junit_cases():
    failed = WalkStep(
        7,
        "link1 saturated",
        ["saturate link1"],
        False,
        None,
        [node("pve-1"), node("pve-2")],
        membership_held=False,
        failure="membership changed (ring id {...})",
    )
    root = ET.fromstring(to_junit(report(failed)))
    cases = [c for c in root.iter("testcase") if c.get("classname", "").startswith("step 7")]
    assert len(cases) == 2 and all(c.find("failure") is not None for c in cases)
    assert "membership changed" in cases[0].find("failure").get("message")
    assert "FAILED: membership changed" in table(report(failed))


def test_two_halves_quorate_at_once_are_counted_by_the_models_partitions():
    from pvelab.checks.rehearse import quorate_halves
    from pvelab.core.paths import LABS
    from pvelab.model.faults import Fault
    from pvelab.model.labfile import load_lab
    from pvelab.model.quorum import walk

    lab = load_lab(LABS / "proxmox-2node-qdevice.yaml")
    cut = next(s for s in walk(lab) if s.events[0].fault is Fault.CUT)

    def polled(**quorate):
        return {n: {"quorum": {"quorate": q}} for n, q in quorate.items()}

    # right after the cut both still say quorate (stale membership, the QDevice vote held)
    assert quorate_halves(cut, polled(**{"pve-1": True, "pve-2": True})) == 2
    assert quorate_halves(cut, polled(**{"pve-1": True, "pve-2": False})) == 1
    healed = walk(lab)[-1]  # one partition: never two halves
    assert quorate_halves(healed, polled(**{"pve-1": True, "pve-2": True})) == 1


def test_a_failed_unit_start_quotes_the_units_journal():
    """A deployment command that starts a unit and fails carries the journal of that unit
    and of the services it requires (what systemctl's "see journalctl -xeu" points at);
    other commands carry nothing more."""
    from types import SimpleNamespace

    from pvelab.checks.rehearse import unit_journal

    asked = []

    def sudo(command):
        asked.append(command)
        if command.startswith("systemctl show"):
            return 0, "corosync.service sysinit.target system.slice\n"
        return 0, f"{command.split()[3]}: a line\n"

    m = SimpleNamespace(name="pve-1", sudo=sudo)
    text = unit_journal(m, "systemctl --no-reload enable --now corosync-qdevice.service")
    assert asked == [
        "systemctl show -p Requires --value corosync-qdevice.service",
        "journalctl -b -u corosync-qdevice.service -n 25 --no-pager -o short-monotonic",
        "journalctl -b -u corosync.service -n 25 --no-pager -o short-monotonic",
    ]
    assert text == (
        "\n-- journal of corosync-qdevice.service on pve-1:\ncorosync-qdevice.service: a line"
        "\n-- journal of corosync.service on pve-1:\ncorosync.service: a line"
    )
    assert unit_journal(m, "install -m 0644 /etc/pve/corosync.conf /etc/corosync/corosync.conf") == ""
    assert len(asked) == 3
