"""The faults a running lab can be put through: the one vocabulary of ``invoke fault``,
of the running lab (:class:`pvelab.running.driver.Driver`) and of the rehearsal's walk
(:func:`pvelab.model.quorum.walk`), which names its events in it."""

from __future__ import annotations

import enum

from pvelab.core.errors import PvelabError


class DriverError(PvelabError):
    """A running lab cannot do what was asked (one line, exit status 2)."""


class Target(enum.Enum):
    """What a fault is applied to."""

    NODES = "NODE[,NODE...]"  # one or more nodes
    GROUPS = "A,B C"  # every node of the lab, in named groups
    NODES_OR_ALL = "NODE|all"
    VERB = "stop|start"  # qnetd's
    NODES_LINK = "NODE[,NODE...] [LINK]"  # a corosync link's NIC of each node (default: every NIC)
    DELAY = "NODE LINK MS [JITTER_MS]"
    LOSS = "NODE LINK PERCENT"
    LINK = "LINK [MBIT [QUEUE_MS]]"  # every NIC of one corosync link
    VOTES = "NODE VOTES"
    NOTHING = ""


class Fault(enum.Enum):
    """The faults a running lab can be put through; each one line, each reversible."""

    POWER_OFF = "power-off"
    KILL = "kill"
    POWER_ON = "power-on"
    CUT = "cut"
    PARTITION = "partition"
    HEAL = "heal"
    QNETD_STOP = "qnetd-stop"
    QNETD_START = "qnetd-start"
    UNPLUG = "unplug"  # carrier down on a NIC, as a pulled cable (QEMU's set_link)
    REPLUG = "replug"
    DROP = "drop"  # frames silently dropped at the bridge port, the link still up
    DELAY = "delay"  # netem on the guest's NIC: latency and jitter on what it sends
    LOSS = "loss"  # netem: a share of what it sends lost
    # bulk traffic between the members over a rate-limited link, as a backup on a shared NIC
    SATURATE = "saturate"
    CLEAR = "clear"  # every link fault undone: replugged, nothing dropped, no netem, no bulk traffic
    # the operator's last resort, `pvecm expected N` (corosync-quorumtool -e N) on one node
    EXPECTED = "expected"
    # the QDevice taken out of a node's running corosync configuration (the way an operator
    # gets past the QDevice's guard on a lone node), and corosync.conf read again
    FORGET_QDEVICE = "forget-qdevice"
    RESTORE_QDEVICE = "restore-qdevice"

    @property
    def target(self) -> Target:
        return {
            Fault.PARTITION: Target.GROUPS,
            Fault.HEAL: Target.NODES_OR_ALL,
            Fault.QNETD_STOP: Target.VERB,
            Fault.QNETD_START: Target.VERB,
            Fault.UNPLUG: Target.NODES_LINK,
            Fault.REPLUG: Target.NODES_LINK,
            Fault.DROP: Target.NODES_LINK,
            Fault.DELAY: Target.DELAY,
            Fault.LOSS: Target.LOSS,
            Fault.SATURATE: Target.LINK,
            Fault.CLEAR: Target.NOTHING,
            Fault.EXPECTED: Target.VOTES,
        }.get(self, Target.NODES)

    @property
    def is_link(self) -> bool:
        """A fault of the network's links (cable, filter, netem), undone by ``clear``."""
        return self in (
            Fault.UNPLUG,
            Fault.REPLUG,
            Fault.DROP,
            Fault.DELAY,
            Fault.LOSS,
            Fault.SATURATE,
            Fault.CLEAR,
        )

    @property
    def is_by_hand(self) -> bool:
        """An operator's own corosync command on a node (``pvecm expected``, its config)."""
        return self in (Fault.EXPECTED, Fault.FORGET_QDEVICE, Fault.RESTORE_QDEVICE)

    @property
    def is_power(self) -> bool:
        return self in (Fault.POWER_OFF, Fault.KILL, Fault.POWER_ON)

    @property
    def is_network(self) -> bool:
        return self in (Fault.CUT, Fault.PARTITION, Fault.HEAL)

    @classmethod
    def parse(cls, word: str) -> Fault:
        if word == "qnetd":  # `invoke fault qnetd stop|start`
            raise DriverError("fault qnetd: say `qnetd stop` or `qnetd start`")
        for f in cls:
            if f.value == word:
                return f
        raise DriverError(f"fault: {word!r}: unknown fault (known: {cli_faults()})")


def cli_faults() -> str:
    words = [f.value for f in Fault if not f.value.startswith("qnetd")]
    return ", ".join([*words, "qnetd stop|start"])


# `saturate LINK` by default: a 5 Mbit/s link with two seconds of queue (a NIC's or a
# switch port's buffer filled by a backup's bulk transfer: what corosync's packets wait behind)
SATURATE_MBIT = 5.0
SATURATE_QUEUE_MS = 2000.0
SATURATE_PORT = 5999  # the bulk transfers' TCP port on the members
