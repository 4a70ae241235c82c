"""The corosync + QDevice deployment, as data: what the runbook tells an operator and
what the rehearsal runs are these same steps.

Each :class:`Action` runs as root on a set of hosts (the witness, every cluster member,
or the first member), installs packages, or copies a file between hosts.  Real Proxmox
VE wraps most of them: ``pvecm create``/``pvecm add`` (authkey, corosync.conf, corosync)
and ``pvecm qdevice setup`` (the QDevice certificates, exactly as listed here, then
corosync-qdevice).  The runbook shows the wrapper and the commands beneath it; the
rehearsal runs the commands, installing the packages from the host's cache (the VMs
have no network) instead of ``apt install``. Units are enabled with ``systemctl
--no-reload``: their files were loaded before (the packages' postinst reloads systemd;
the rehearsal's package layer has them from boot), and each implicit reload costs 2.7 s
under TCG.
"""

from __future__ import annotations

from dataclasses import dataclass

from pvelab.model.lab import Lab

WITNESS, MEMBERS, FIRST = "witness", "members", "first"
QNETD_DB = "/etc/corosync/qnetd/nssdb"
NODE_DB = "/etc/corosync/qdevice/net/nssdb"


@dataclass(frozen=True)
class Action:
    title: str
    on: str  # WITNESS | MEMBERS | FIRST (source host for a copy)
    commands: tuple[str, ...] = ()  # shell commands, run as root
    install: tuple[str, ...] = ()  # Debian packages
    copy: tuple[str, str, str, str] | None = None  # (source path, target hosts, target path, mode)
    wrapper: str = ""  # the Proxmox command that does this on real PVE
    rehearsal_only: bool = False  # only on these rehearsal images (compat services)


# Long on purpose: the deployment as one ordered table (runbook and rehearsal read the same list); data, not logic.
def actions(lab: Lab) -> list[Action]:
    """Every step from the baked wiring to a running cluster with its QDevice."""
    cluster = lab.cluster_name
    witness_ip = lab.witness.ip if lab.witness else ""
    qsetup = f"pvecm qdevice setup {witness_ip}"  # the Proxmox command the QDevice steps belong to
    first_ip = lab.members[0].ip
    member = lab.members[0].role_def  # its compat service and unit: what the stand-in steps touch
    conf = f"/etc/pvelab/{member.service}.json"
    steps = [
        Action(
            f"{member.service} gives UDP 5405 to corosync and may read votequorum",
            MEMBERS,
            (
                f"jq '.udp_ports = []' {conf} > {conf}.new && mv {conf}.new {conf}",
                "groupadd --system --force pvelab-quorum",
                f"mkdir -p /etc/corosync/uidgid.d /etc/systemd/system/{member.unit}.d",
                "printf 'uidgid {\\n  gid: pvelab-quorum\\n}\\n' > /etc/corosync/uidgid.d/pvelab-compat",
                f"printf '[Service]\\nGroup=pvelab-quorum\\n' > /etc/systemd/system/{member.unit}.d/quorum.conf",
                "systemctl daemon-reload",
                f"systemctl restart {member.unit}",
            ),
            rehearsal_only=True,
        ),
        Action(
            "install corosync and the QDevice client",
            MEMBERS,
            install=("corosync", "corosync-qdevice"),
            wrapper="part of Proxmox VE; add: apt install corosync-qdevice",
        ),
        Action(
            "make the cluster's authentication key",
            FIRST,
            ("corosync-keygen",),
            wrapper=f"pvecm create {cluster}",
        ),
        Action(
            "the same authkey on every member",
            FIRST,
            copy=("/etc/corosync/authkey", MEMBERS, "/etc/corosync/authkey", "0400"),
            wrapper=f"pvecm add {first_ip}",
        ),
        Action(
            "the baked corosync.conf, unchanged; start corosync",
            MEMBERS,
            (
                "install -m 0644 /etc/pve/corosync.conf /etc/corosync/corosync.conf",
                "systemctl --no-reload enable --now corosync.service",
            ),
            wrapper=f"pvecm create {cluster} / pvecm add {first_ip}",
        ),
    ]
    if lab.witness is None:
        return steps
    return [
        *steps,
        Action(
            "stop the stand-in before qnetd takes its port",
            WITNESS,
            (f"systemctl --no-reload disable --now {lab.witness.role_def.unit}",),
            rehearsal_only=True,
        ),
        Action(
            "install and start the QDevice daemon",
            WITNESS,
            ("systemctl --no-reload enable --now corosync-qnetd.service",),
            install=("corosync-qnetd",),
        ),
        Action(
            "initialise the qnetd CA (Debian's package has already done it)",
            WITNESS,
            (f"test -e {QNETD_DB}/qnetd-cacert.crt || corosync-qnetd-certutil -i",),
            wrapper=qsetup,
        ),
        Action(
            "the qnetd CA certificate to every member",
            WITNESS,
            copy=(f"{QNETD_DB}/qnetd-cacert.crt", MEMBERS, "/etc/pve/qnetd-cacert.crt", "0644"),
            wrapper=qsetup,
        ),
        Action(
            "initialise each member's QDevice certificate store",
            MEMBERS,
            ("corosync-qdevice-net-certutil -i -c /etc/pve/qnetd-cacert.crt",),
            wrapper=qsetup,
        ),
        Action(
            "certificate request for the cluster",
            FIRST,
            (f"corosync-qdevice-net-certutil -r -n {cluster}",),
            wrapper=qsetup,
        ),
        Action(
            "the request to the witness",
            FIRST,
            copy=(f"{NODE_DB}/qdevice-net-node.crq", WITNESS, "/tmp/qdevice-net-node.crq", "0600"),
            wrapper=qsetup,
        ),
        Action(
            "the witness signs it",
            WITNESS,
            (f"corosync-qnetd-certutil -s -c /tmp/qdevice-net-node.crq -n {cluster}",),
            wrapper=qsetup,
        ),
        Action(
            "the signed certificate back to the first member",
            WITNESS,
            copy=(f"{QNETD_DB}/cluster-{cluster}.crt", FIRST, f"{NODE_DB}/cluster-{cluster}.crt", "0644"),
            wrapper=qsetup,
        ),
        Action(
            "import it, export the PKCS#12 bundle",
            FIRST,
            (f"corosync-qdevice-net-certutil -M -c {NODE_DB}/cluster-{cluster}.crt",),
            wrapper=qsetup,
        ),
        Action(
            "the bundle to every member",
            FIRST,
            copy=(f"{NODE_DB}/qdevice-net-node.p12", MEMBERS, "/etc/pve/qdevice-net-node.p12", "0600"),
            wrapper=qsetup,
        ),
        Action(
            "import the bundle; start the QDevice client",
            MEMBERS,
            (
                "corosync-qdevice-net-certutil -m -c /etc/pve/qdevice-net-node.p12",
                "rm -f /etc/pve/qdevice-net-node.p12 /etc/pve/qnetd-cacert.crt",
                "systemctl --no-reload enable --now corosync-qdevice.service",
            ),
            wrapper=qsetup,
        ),
        Action(
            "reload the configuration cluster-wide",
            FIRST,
            ("corosync-cfgtool -R",),
            wrapper=qsetup,
        ),
    ]


def on(lab: Lab, target: str) -> list[str]:
    """The nodes an action's ``on`` names, before any fault (members by node id)."""
    members = [n.name for n in sorted(lab.members, key=lambda n: n.nodeid or 0)]
    if target == WITNESS:
        return [lab.witness.name] if lab.witness else []
    return members[:1] if target == FIRST else members


def installs(lab: Lab) -> dict[str, list[tuple[str, ...]]]:
    """``{node: the package sets the deployment installs there}``, in deployment order."""
    out: dict[str, list[tuple[str, ...]]] = {}
    for a in actions(lab):
        if a.install:
            for name in on(lab, a.on):
                out.setdefault(name, []).append(a.install)
    return out
