"""What votequorum should report, derived from the lab: the arithmetic and the walk.

:func:`expect` answers, for one state of the cluster (which members are powered on,
which are cut off from the others, whether qnetd runs), what every running member's
``corosync-quorumtool -s`` must say: expected votes, total votes, quorate, and whether
the QDevice votes for it.  The QDevice vote follows corosync-qnetd's algorithms:

* ``ffsplit`` votes for the partition holding more than half of the configured nodes;
  in an even cluster's 50:50 split, for the partition with more nodes connected to
  qnetd, then the tie-breaker (lowest node id).  A partition of a minority never gets
  it: one survivor of three stays at one vote.
* ``lms`` (last man standing) votes for the best partition connected to qnetd, however
  small: more connected nodes, then larger, then the tie-breaker.

:func:`walk` is the rehearsal's sequence of events, built for any lab.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pvelab.model.faults import Fault
from pvelab.model.lab import Lab


@dataclass(frozen=True)
class State:
    powered: frozenset[str]  # cluster members that are running
    qnetd: bool = True  # corosync-qnetd runs on the witness
    cut: frozenset[str] = frozenset()  # members cut off from everyone else
    links_down: frozenset[tuple[str, int]] = frozenset()  # (member, link): that link carries nothing
    lan_down: frozenset[str] = frozenset()  # members whose default NIC reaches no one (nor qnetd)
    # members whose default NIC has no carrier: out of the runner's reach
    unplugged: frozenset[str] = frozenset()

    def reach(self, a: str, b: str, links: tuple[int, ...]) -> bool:
        """Two running members talk when neither is cut and one link is up at both ends."""
        if a in self.cut or b in self.cut:
            return False
        return any((a, n) not in self.links_down and (b, n) not in self.links_down for n in links)

    def partitions(self, links: tuple[int, ...] = (0,)) -> list[frozenset[str]]:
        """Groups of running members that reach each other, largest first."""
        left = set(self.powered)
        parts: list[frozenset[str]] = []
        while left:
            group = {min(left)}
            for b in sorted(left - group):  # each joins if it reaches everyone already in
                if all(self.reach(a, b, links) for a in group):
                    group.add(b)
            parts.append(frozenset(group))
            left -= group
        return sorted(parts, key=lambda p: (-len(p), sorted(p)))

    def reaches_qnetd(self, member: str) -> bool:
        return member not in self.cut and member not in self.lan_down


@dataclass(frozen=True)
class Expect:
    expected_votes: int
    total_votes: int
    quorum: int
    quorate: bool
    qdevice_vote: bool
    members: frozenset[str]


def _tie_break(lab: Lab, part: frozenset[str]) -> bool:
    lowest = min(lab.members, key=lambda n: n.nodeid or 0)
    return lowest.name in part


def qdevice_partition(lab: Lab, state: State) -> frozenset[str] | None:
    """The partition qnetd gives the QDevice vote to, or None."""
    if lab.qdevice is None or lab.witness is None or not state.qnetd:
        return None
    n = len(lab.members)
    connected = [p for p in partitions(lab, state) if any(state.reaches_qnetd(m) for m in p)]
    if lab.qdevice.algorithm == "ffsplit":
        majority = [p for p in connected if len(p) > n // 2]
        if majority:
            return majority[0]
        halves = [p for p in connected if n % 2 == 0 and len(p) == n // 2]
        return max(halves, key=lambda p: (len(p), _tie_break(lab, p)), default=None)
    return max(connected, key=lambda p: (len(p), _tie_break(lab, p)), default=None)


def partitions(lab: Lab, state: State) -> list[frozenset[str]]:
    return state.partitions(tuple(link.number for link in lab.links))


def expect(lab: Lab, state: State) -> dict[str, Expect]:
    """Per running member the runner reaches: what its corosync-quorumtool must report in
    ``state`` (a member with no carrier on its default NIC is judged by its peers)."""
    voted = qdevice_partition(lab, state)
    qvotes = lab.qdevice.votes if lab.qdevice and lab.witness else 0
    out = {}
    for part in partitions(lab, state):
        vote = part == voted
        total = len(part) + (qvotes if vote else 0)
        for name in sorted(part - state.unplugged):
            out[name] = Expect(lab.expected_votes, total, lab.quorum, total >= lab.quorum, vote, part)
    return out


@dataclass(frozen=True)
class Event:
    """One thing the rehearsal does to the lab: a fault of the running lab's vocabulary
    on ``nodes``, or nothing (``fault=None``: the first step looks at the lab as it is)."""

    fault: Fault | None = None
    nodes: tuple[str, ...] = ()
    link: int | None = None  # a corosync link's NIC (link faults; None: every NIC)
    values: tuple[float, ...] = ()  # delay ms and jitter ms, or loss percent

    @property
    def kind(self) -> str:
        """Its name in reports: the fault's, or ``none``."""
        return self.fault.value if self.fault else "none"

    def __str__(self) -> str:
        words = [self.kind, " ".join(self.nodes)]
        words += [] if self.link is None else [f"link{self.link}"]
        words += [f"{v:g}" for v in self.values]
        return " ".join(w for w in words if w)


@dataclass(frozen=True)
class Step:
    number: int
    title: str
    events: tuple[Event, ...]
    state: State
    expect: dict[str, Expect] = field(hash=False, compare=False, default_factory=dict)


def walk(lab: Lab) -> list[Step]:
    """The failure walk for this lab: node loss (clean and hard), qnetd loss, a partition."""
    members = [n.name for n in sorted(lab.members, key=lambda n: n.nodeid or 0)]
    everyone = frozenset(members)
    last, first = members[-1], members[0]
    plan: list[tuple[str, tuple[Event, ...], State]] = [
        ("all up", (Event(),), State(everyone)),
        (
            f"{last} powered off (clean shutdown)",
            (Event(Fault.POWER_OFF, (last,)),),
            State(everyone - {last}),
        ),
    ]
    if len(members) >= 3:
        second = members[-2]
        plan.append(
            (
                f"{second} killed too (QEMU killed, no shutdown)",
                (Event(Fault.KILL, (second,)),),
                State(everyone - {last, second}),
            )
        )
        plan.append((f"{last} and {second} back", (Event(Fault.POWER_ON, (last, second)),), State(everyone)))
    else:  # two members: the other one fails hard while the first is back
        plan.append(
            (
                f"{last} back, {first} killed (QEMU killed, no shutdown)",
                (Event(Fault.POWER_ON, (last,)), Event(Fault.KILL, (first,))),
                State(everyone - {first}),
            )
        )
        plan.append((f"{first} back", (Event(Fault.POWER_ON, (first,)),), State(everyone)))
    if lab.witness is not None:
        plan.append(
            ("qnetd stopped on the witness", (Event(Fault.QNETD_STOP),), State(everyone, qnetd=False))
        )
        plan.append(("qnetd back", (Event(Fault.QNETD_START),), State(everyone)))
    plan.append(
        (
            f"{last} cut off from the others and the witness",
            (Event(Fault.CUT, (last,)),),
            State(everyone, cut=frozenset({last})),
        )
    )
    plan.append(("network healed", (Event(Fault.HEAL, (last,)),), State(everyone)))
    return [
        Step(i, title, events, state, expect(lab, state)) for i, (title, events, state) in enumerate(plan, 1)
    ]


def table(lab: Lab) -> list[dict]:
    """Votes and quorate state in the cases operators ask about, as votequorum counts them.

    ``naive_votes`` is the simple arithmetic (every QDevice vote always counted); it
    differs where qnetd withholds the vote (ffsplit and a minority partition)."""
    names = [n.name for n in sorted(lab.members, key=lambda n: n.nodeid or 0)]
    q = lab.qdevice.votes if lab.qdevice and lab.witness else 0
    cases = [
        ("all up", State(frozenset(names)), len(names) + q),
        ("one node down", State(frozenset(names[:-1])), len(names) - 1 + q),
    ]
    if q:
        cases += [
            ("two nodes down, QDevice up", State(frozenset(names[:-2])), len(names) - 2 + q),
            ("QDevice down, nodes up", State(frozenset(names), qnetd=False), len(names)),
        ]
    rows = []
    for situation, state, naive in cases:
        seen = expect(lab, state)
        votes = max((e.total_votes for e in seen.values()), default=0)
        rows.append(
            {"situation": situation, "votes": votes, "naive_votes": naive, "quorate": votes >= lab.quorum}
        )
    return rows
