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

import dataclasses
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
    saturated: frozenset[int] = frozenset()  # links under bulk traffic: their state is not judged
    # (member, votes): `corosync-quorumtool -e votes` run on it (what `pvecm expected` does)
    expected_set: frozenset[tuple[str, int]] = frozenset()
    no_qdevice: frozenset[str] = frozenset()  # members whose running config has no QDevice

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

    def link_up(self, a: str, b: str, link: int) -> bool:
        """knet's state of ``link`` between two running members: connected or not."""
        if a in self.cut or b in self.cut or a not in self.powered or b not in self.powered:
            return False
        return (a, link) not in self.links_down and (b, link) not in self.links_down


@dataclass(frozen=True)
class Expect:
    expected_votes: int
    total_votes: int
    quorum: int
    quorate: bool
    qdevice_vote: bool
    members: frozenset[str]
    device: bool = True  # a QDevice with votes is in its running configuration (the Qdevice flag)


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
    configured = lab.qdevice.votes if lab.qdevice and lab.witness else 0
    forced = dict(state.expected_set)
    out = {}
    for part in partitions(lab, state):
        qvotes = 0 if part & state.no_qdevice else configured
        vote = part == voted and qvotes > 0
        total = len(part) + (qvotes if vote else 0)
        expected, quorum = lab.expected_votes, lab.quorum
        if any(m in forced for m in part):
            # `-e N` holds in the partition it was run in, but votequorum keeps expected votes
            # at least at its members' votes plus the QDevice's *configured* votes (voting or
            # not): with a QDevice, a lone node's expected never drops below 2
            expected = max(min(forced[m] for m in part if m in forced), len(part) + qvotes)
            quorum = expected // 2 + 1
        for name in sorted(part - state.unplugged):
            out[name] = Expect(expected, total, quorum, total >= quorum, vote, part, qvotes > 0)
    return out


def quorate_partitions(expected: dict[str, Expect]) -> int:
    """How many partitions are quorate at once: more than one is two writers (split brain)."""
    return len({e.members for e in expected.values() if e.quorate})


def links_expected(lab: Lab, state: State) -> dict[str, dict[int, dict[str, bool]]]:
    """Per member the runner reaches, per corosync link not under saturation: whether
    ``corosync-cfgtool -s`` must show each peer connected on it."""
    members = [n.name for n in lab.members]
    out: dict[str, dict[int, dict[str, bool]]] = {}
    for me in sorted(state.powered - state.unplugged):
        out[me] = {
            link.number: {p: state.link_up(me, p, link.number) for p in members if p != me}
            for link in lab.links
            if link.number not in state.saturated
        }
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


# one-way delay, jitter a tenth: a first rung far below the token that must hold (the lab is
# settled), then the range where knet and the token give way (runs so far: the membership
# changed at 1000 or 2000 ms; a 200 ms rung never changed anything and cost 19 s a walk)
LADDER_MS = (5.0, 500.0, 1000.0, 2000.0, 4000.0)
LADDER_HOLD = 15.0  # seconds per rung: knet's ping timeout, the token (3.65 s) and consensus (4.4 s)
WINDOW = 30.0  # seconds a saturated link is held while the counters count


@dataclass(frozen=True)
class Ladder:
    """Delay (with a tenth of it as jitter) on what ``node`` sends on ``link``, raised rung
    by rung, each held ``hold_seconds``, until its peers' membership changes and it loses
    quorum; then cleared. What it measures is a timing: never expected, only recorded."""

    node: str
    link: int
    rungs_ms: tuple[float, ...] = LADDER_MS
    hold_seconds: float = LADDER_HOLD


@dataclass(frozen=True)
class Window:
    """The step's faults held for ``seconds`` while corosync's and knet's counters count
    (``corosync-cmapctl -m stats``) and every member's membership is watched."""

    seconds: float = WINDOW


@dataclass(frozen=True)
class Step:
    """One step of the walk: its events, then (``measure``) a ladder or a window, then
    ``undo``, then the state every member must reach. ``holds_membership``: the ring id
    (membership) seen before the events must not change; ``check_links``: each member's
    knet link states (``corosync-cfgtool -s``) must be those of :func:`links_expected`."""

    number: int
    title: str
    events: tuple[Event, ...]
    state: State
    expect: dict[str, Expect] = field(hash=False, compare=False, default_factory=dict)
    holds_membership: bool = False
    check_links: bool = False
    measure: Ladder | Window | None = None
    undo: tuple[Event, ...] = ()
    links: dict[str, dict[int, dict[str, bool]]] = field(hash=False, compare=False, default_factory=dict)

    @property
    def two_writers(self) -> bool:
        """The state this step must reach has two quorate partitions: the danger itself."""
        return quorate_partitions(self.expect) > 1


@dataclass(frozen=True)
class _Plan:
    title: str
    events: tuple[Event, ...]
    state: State
    holds_membership: bool = False
    measure: Ladder | Window | None = None
    undo: tuple[Event, ...] = ()


def walk(lab: Lab) -> list[Step]:
    """The failure walk for this lab. A lab with redundant corosync links walks its links
    (cable pulls, silent drops, a saturated link: knet's failover); a lab with one link walks
    node loss (clean and hard), qnetd loss, a partition and the last resort (``expected 1``),
    then a latency ladder and a saturated link on that one link."""
    members = [n.name for n in sorted(lab.members, key=lambda n: n.nodeid or 0)]
    everyone = frozenset(members)
    plan = [_Plan("all up", (Event(),), State(everyone))]
    plan += _link_walk(lab, members) if lab.is_redundant else _node_walk(lab, members)
    return [
        Step(
            i,
            p.title,
            p.events,
            p.state,
            expect(lab, p.state),
            p.holds_membership,
            lab.is_redundant,
            p.measure,
            p.undo,
            links_expected(lab, p.state),
        )
        for i, p in enumerate(plan, 1)
    ]


def _node_walk(lab: Lab, members: list[str]) -> list[_Plan]:
    everyone = frozenset(members)
    last, first = members[-1], members[0]
    plan = [
        _Plan(
            f"{last} powered off (clean shutdown)",
            (Event(Fault.POWER_OFF, (last,)),),
            State(everyone - {last}),
        )
    ]
    if len(members) >= 3:
        second = members[-2]
        plan.append(
            _Plan(
                f"{second} killed too (QEMU killed, no shutdown)",
                (Event(Fault.KILL, (second,)),),
                State(everyone - {last, second}),
            )
        )
        plan.append(
            _Plan(f"{last} and {second} back", (Event(Fault.POWER_ON, (last, second)),), State(everyone))
        )
    else:  # two members: the other one fails hard while the first is back
        plan.append(
            _Plan(
                f"{last} back, {first} killed (QEMU killed, no shutdown)",
                (Event(Fault.POWER_ON, (last,)), Event(Fault.KILL, (first,))),
                State(everyone - {first}),
            )
        )
        plan.append(_Plan(f"{first} back", (Event(Fault.POWER_ON, (first,)),), State(everyone)))
    if lab.witness is not None:
        plan.append(
            _Plan("qnetd stopped on the witness", (Event(Fault.QNETD_STOP),), State(everyone, qnetd=False))
        )
        plan.append(_Plan("qnetd back", (Event(Fault.QNETD_START),), State(everyone)))
    cut = State(everyone, cut=frozenset({last}))
    plan.append(_Plan(f"{last} cut off from the others and the witness", (Event(Fault.CUT, (last,)),), cut))
    heal: tuple[Event, ...] = (Event(Fault.HEAL, (last,)),)
    if len(members) >= 3 and lab.witness is not None:
        # the last resort on a split network, `pvecm expected 1` on the lone node: the
        # QDevice's configured vote keeps it blocked; with the QDevice taken out of its
        # running configuration it becomes a second writer
        forced = frozenset({(last, 1)})
        plan.append(
            _Plan(
                f"`pvecm expected 1` on the cut-off {last}: still blocked (the QDevice's vote counts)",
                (Event(Fault.EXPECTED, (last,), values=(1,)),),
                dataclasses.replace(cut, expected_set=forced),
            )
        )
        plan.append(
            _Plan(
                f"the QDevice taken out of {last}'s running config, `expected 1` again: two writers",
                (Event(Fault.FORGET_QDEVICE, (last,)), Event(Fault.EXPECTED, (last,), values=(1,))),
                dataclasses.replace(cut, expected_set=forced, no_qdevice=frozenset({last})),
            )
        )
        heal = (Event(Fault.RESTORE_QDEVICE, (last,)), *heal)
    plan.append(
        _Plan(
            "network healed" if len(heal) == 1 else f"{last}'s config read again, network healed",
            heal,
            State(everyone),
        )
    )
    if len(members) >= 3:
        link = lab.links[0].number
        clear = (Event(Fault.CLEAR),)
        plan.append(
            _Plan(
                f"latency on {last}'s link{link}, rung by rung, then cleared",
                (),
                State(everyone),
                measure=Ladder(last, link),
                undo=clear,
            )
        )
        plan.append(
            _Plan(
                f"link{link} saturated by bulk traffic, then cleared",
                (Event(Fault.SATURATE, link=link),),
                State(everyone),
                measure=Window(),
                undo=clear,
            )
        )
    return plan


def _link_walk(lab: Lab, members: list[str]) -> list[_Plan]:
    everyone = frozenset(members)
    last = members[-1]
    first, backup = lab.links[0].number, lab.links[-1].number
    numbers = tuple(link.number for link in lab.links)
    clear = (Event(Fault.CLEAR),)
    return [
        _Plan(
            f"{last}'s link{first} cable pulled: knet fails over, nobody leaves",
            (Event(Fault.UNPLUG, (last,), first),),
            State(everyone, links_down=frozenset({(last, first)})),
            holds_membership=True,
        ),
        _Plan(
            f"every cable of {last} pulled: it leaves",
            (Event(Fault.UNPLUG, (last,)),),
            State(
                everyone,
                links_down=frozenset((last, n) for n in numbers),
                lan_down=frozenset({last}),
                unplugged=frozenset({last}),
            ),
        ),
        _Plan(f"{last}'s cables back: it rejoins", (Event(Fault.REPLUG, (last,)),), State(everyone)),
        _Plan(
            f"link{first} silently dropped on every member: knet moves to link{backup}",
            (Event(Fault.DROP, tuple(members), first),),
            State(everyone, links_down=frozenset((m, first) for m in members)),
            holds_membership=True,
        ),
        _Plan(f"link{first} back", clear, State(everyone), holds_membership=True),
        _Plan(
            f"link{backup} saturated by bulk traffic: membership holds on link{first}",
            (Event(Fault.SATURATE, link=backup),),
            State(everyone, saturated=frozenset({backup})),
            holds_membership=True,
            measure=Window(),
        ),
        _Plan(f"link{backup} traffic stopped", clear, State(everyone), holds_membership=True),
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
