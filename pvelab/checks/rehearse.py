"""`invoke rehearse`: form the real cluster from the baked wiring and walk the quorum cases.

On the boot test's isolated network and copy-on-write overlays (nothing is written to
the built artefacts), the rehearsal installs Debian's corosync packages on the running
VMs only (fetched on the host, :mod:`pvelab.build.guestpkgs`), follows the deployment steps
of :mod:`pvelab.model.deploy` (the witness runbook's own list), checks the cluster with the
real tools, then walks the failure cases of :func:`pvelab.model.quorum.walk`: after each
event it polls ``corosync-quorumtool -s`` on every running member until each reports
what the lab's arithmetic expects, and records how long that took.
"""

from __future__ import annotations

import base64
import re
import shlex
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pvelab.build.guestlayer import layers
from pvelab.build.guestpkgs import PackageSet, fetch, identities, missing
from pvelab.checks.boottest import booted_lab
from pvelab.checks.scenario import run_scenario, summary
from pvelab.core.errors import PvelabError
from pvelab.core.locks import lab_lock, locking
from pvelab.core.logger import Case, Progress, junit
from pvelab.core.paths import cache_dir
from pvelab.core.run import Steps
from pvelab.model.artefacts import (
    JUNIT,
    REPORT,
    SUMMARY,
    ArtefactRef,
    BuildManifest,
    DeployRecord,
    NodeObservation,
    RehearsalReport,
    WalkStep,
    built,
    sha256,
    write_atomic,
)
from pvelab.model.deploy import MEMBERS, Action, actions, on
from pvelab.model.faults import SATURATE_MBIT, DriverError, Fault
from pvelab.model.lab import CustomTest, Lab, Scenario
from pvelab.model.media import DEFAULT_FIRMWARE, DEFAULT_MEDIUM, Firmware, Medium, boot_combination
from pvelab.model.quorum import Event, Expect, Ladder, Step, Window, walk
from pvelab.running.corotools import parse_cfgtool, parse_cmap_value, parse_quorumtool, parse_stats
from pvelab.running.driver import (
    Driver,
    RunState,
    link_faults_in_force,
    netns_name,
    parallel,
    read_state,
)
from pvelab.running.lifecycle import claim, describe
from pvelab.running.machine import Machine, MachineError

SETTLE_TIMEOUT = 300.0  # seconds for the cluster to reach an expected state (TCG, loaded host)
BOOT_TIMEOUT = 900.0  # a powered-on VM back to SSH
POLL_INTERVAL = 2.0
API_STATUS = (
    "curl -fsS -m 5 http://localhost:8006/api2/json/cluster/status"
    " | jq -c '[.data[] | select(.type == \"cluster\") | .quorate][0]'"
)


# Each deployment action's root shell starts so. systemd boots these nodes, so `systemctl
# enable` leaves out the SysV rc links of the packages' init scripts (corosync, qdevice and
# qnetd ship them): systemd-sysv-install runs update-rc.d, Perl, 5.5 s of an 8.5 s enable
# under TCG (measured on a running lab), three times on the way to a quorate cluster.
SCRIPT_HEAD = "set -e\nexport SYSTEMCTL_SKIP_SYSV=1\n"


class RehearsalError(PvelabError):
    pass


def unit_journal(m: Machine, command: str, lines: int = 25) -> str:
    """A failed command that started units: the last journal lines of each unit and of
    the services it requires (what systemctl's "see journalctl -xeu" points at; the QDevice
    client's cause is often in corosync's), for the error; "" for other commands."""
    named = re.findall(r"\b([\w@.-]+\.service)\b", command) if "systemctl" in command else []
    units = list(named)
    for unit in named:
        _, needs = m.sudo(f"systemctl show -p Requires --value {shlex.quote(unit)}")
        units += [u for u in needs.split() if u.endswith(".service") and u not in units]
    out = ""
    for unit in units:
        _, text = m.sudo(f"journalctl -b -u {shlex.quote(unit)} -n {lines} --no-pager -o short-monotonic")
        out += f"\n-- journal of {unit} on {m.name}:\n{text.strip()}"
    return out


# --------------------------------------------------------------------------- parsing the tools


def matches(expected: Expect, observed: dict[str, Any], with_qdevice: bool) -> bool:
    ok = (
        observed["quorate"] == expected.quorate
        and observed["expected_votes"] == expected.expected_votes
        and observed["total_votes"] == expected.total_votes
        and observed["quorum"] == expected.quorum
    )
    if with_qdevice:  # the Qdevice flag while the device is configured (it stays registered,
        # with no votes, after `forget-qdevice`), and whether its vote counts for this node
        ok = ok and ("Qdevice" in observed["flags"] or not expected.device)
        ok = ok and observed["qdevice_vote"] == expected.qdevice_vote
    return ok and (("Quorate" in observed["flags"]) == expected.quorate)


def expected_dict(e: Expect) -> dict[str, Any]:
    return {
        "expected_votes": e.expected_votes,
        "total_votes": e.total_votes,
        "quorum": e.quorum,
        "quorate": e.quorate,
        "qdevice_vote": e.qdevice_vote,
    }


# --------------------------------------------------------------------------- the run


def quorate_halves(step: Step, seen: dict[str, dict[str, Any]]) -> int:
    """In how many of the partitions the step makes (the model's) some member reports
    quorate right now: two or more is two writers, for as long as it lasts (a cut-off
    half that still holds a QDevice vote, or one forced quorate by hand)."""
    halves: dict[frozenset[str], list[str]] = {}
    for name, exp in step.expect.items():
        halves.setdefault(exp.members, []).append(name)
    return sum(any(seen[n]["quorum"]["quorate"] for n in names) for names in halves.values())


class Rehearsal:
    """One rehearsal on a booted lab: deploy, check, walk; fills ``report``."""

    def __init__(
        self,
        lab: Lab,
        booted: Driver,
        packages: dict[str, PackageSet],
        report: RehearsalReport,
        say: Progress,
    ):
        self.lab, self.booted, self.packages, self.report, self.say = lab, booted, packages, report, say
        self.members = [n.name for n in sorted(lab.members, key=lambda n: n.nodeid or 0)]
        self.witness = lab.witness.name if lab.witness else None
        self.down: set[str] = set()

    # ---------------------------------------------------------------- helpers
    @property
    def machines(self) -> dict[str, Machine]:
        return self.booted.machines

    def hosts(self, target: str) -> list[str]:
        return [h for h in on(self.lab, target) if target != MEMBERS or h not in self.down]

    def root(self, name: str, command: str, timeout: float = 120.0) -> str:
        status, out = self.machines[name].sudo(command, timeout=timeout)
        if status != 0:
            raise RehearsalError(f"{name}: `{command}` exited {status}: {out.strip()[-400:]}")
        return out

    def on_hosts(self, names: list[str], fn: Callable[[Machine], Any]) -> dict[str, Any]:
        def one(m: Machine) -> Any:
            try:
                return fn(m)
            except RehearsalError as exc:  # a command's failure, as the machine's error
                raise MachineError(str(exc)) from None

        results, errors = parallel({n: self.machines[n] for n in names}, one)
        if errors:
            raise RehearsalError("; ".join(errors.values()))
        return results

    def read_root_file(self, name: str, path: str) -> bytes:
        return base64.b64decode(self.root(name, f"base64 -w0 {shlex.quote(path)}"))

    def write_root_file(self, name: str, path: str, data: bytes, mode: str) -> None:
        tmp = Path(f"/tmp/pvelab-rehearsal-{name}-{Path(path).name}")
        local = self.booted.outdir / tmp.name
        local.write_bytes(data)
        try:
            self.machines[name].put(local, str(tmp))
        finally:
            local.unlink(missing_ok=True)
        self.root(name, f"install -m {mode} {tmp} {shlex.quote(path)} && rm -f {tmp}")

    # ---------------------------------------------------------------- deploy
    def install(self, names: list[str], packages: tuple[str, ...]) -> str:
        pset = self.packages[" ".join(packages)]
        want = identities(pset.debs)
        query = "dpkg-query -W -f '${Package} ${Version} ${db:Status-Abbrev}\\n' " + " ".join(sorted(want))

        def one(m: Machine) -> str:
            # a node booted over its package layer (pvelab.build.guestlayer) has them already
            if not missing(want, m.execute(query + " 2>/dev/null")[1]):
                return f"all {len(want)} packages already installed at these versions (the host-made layer)"
            m.succeed("rm -rf /tmp/pvelab-debs && mkdir -p /tmp/pvelab-debs")
            for deb in pset.debs:
                m.put(deb, f"/tmp/pvelab-debs/{deb.name}")
            # no service starts from a maintainer script: the deployment starts each one itself
            status, out = m.sudo(
                "printf '#!/bin/sh\\nexit 101\\n' > /usr/sbin/policy-rc.d"
                " && chmod 755 /usr/sbin/policy-rc.d"
                # no fsync per file: the overlay is thrown away with the VM
                " && DEBIAN_FRONTEND=noninteractive dpkg --force-unsafe-io -i /tmp/pvelab-debs/*.deb;"
                " rc=$?; rm -f /usr/sbin/policy-rc.d; rm -rf /tmp/pvelab-debs; exit $rc",
                timeout=900,
            )
            if status != 0:
                raise MachineError(f"{m.name}: dpkg -i exited {status}: {out.strip()[-600:]}")
            return out

        return "\n".join(f"[{n}] {o.strip()[-300:]}" for n, o in self.on_hosts(names, one).items())

    def run_action(self, a: Action, only: set[str] | None = None) -> DeployRecord:
        t0 = time.monotonic()
        targets = [h for h in self.hosts(a.on) if only is None or h in only]
        out = ""
        if a.copy:
            src_path, to, dst_path, mode = a.copy
            data = self.read_root_file(self.hosts(a.on)[0], src_path)
            targets = [h for h in self.hosts(to) if only is None or h in only]
            # to every target at once: each is an SFTP put and a sudo, a second or more of
            # emulated CPU on that guest alone
            self.on_hosts(targets, lambda m: self.write_root_file(m.name, dst_path, data, mode))
            out = f"{len(data)} bytes to {', '.join(targets)}"
        else:
            if a.install:
                out += self.install(targets, a.install)
            if a.commands:
                # one root shell per host for the whole action (each SSH + sudo round trip is
                # a second or more of emulated CPU); each command echoed before it runs, the
                # first failing one ends the script and is named
                script = SCRIPT_HEAD + "".join(f"echo {shlex.quote('$ ' + c)}\n{c}\n" for c in a.commands)

                def one(m: Machine) -> str:
                    status, text = m.sudo(script, timeout=300)
                    if status != 0:
                        ran = [line[2:] for line in text.splitlines() if line.startswith("$ ")]
                        failed = ran[-1] if ran else a.commands[0]
                        raise RehearsalError(
                            f"{m.name}: `{failed}` exited {status}: {text.strip()[-1500:]}"
                            + unit_journal(m, failed)
                        )
                    return text

                res = self.on_hosts(targets, one)
                out += "".join(f"[{n}] {o}" for n, o in res.items())
        record = DeployRecord(a.title, targets, round(time.monotonic() - t0, 1), True, out[-4000:])
        self.say(f"deploy: {a.title} on {', '.join(targets) or '-'} ({record.seconds}s)")
        return record

    def deploy(self) -> None:
        for a in actions(self.lab):
            try:
                self.report.deploy.append(self.run_action(a))
            except (RehearsalError, MachineError) as exc:
                self.report.deploy.append(DeployRecord(a.title, self.hosts(a.on), 0.0, False, str(exc)))
                raise

    def redeploy(self, names: set[str]) -> None:
        """A live (ISO) member powered on again has lost everything: deploy it again."""
        for a in actions(self.lab):
            copy_to_them = a.copy is not None and a.copy[1] == MEMBERS
            if a.on == MEMBERS or copy_to_them:
                self.run_action(a, only=names)

    # ---------------------------------------------------------------- checks
    def check_tools(self) -> None:
        """corosync-cfgtool on every member, corosync-qnetd-tool on the witness."""
        out = self.on_hosts(self.members, lambda m: self.root(m.name, "corosync-cfgtool -s"))
        for name, text in out.items():
            peers = [p for p in self.members if p != name]
            ids = {n.name: n.nodeid for n in self.lab.members}
            connected = {
                p: bool(re.search(rf"nodeid:\s+{ids[p]}:\s+(localhost|connected)", text)) for p in peers
            }
            self.report.checks[f"cfgtool {name}"] = {
                "passed": all(connected.values()),
                "links": connected,
                "output": text,
            }
        if self.witness:
            text = self.root(self.witness, "corosync-qnetd-tool -l")
            listed = {n: bool(re.search(rf"Node ID {self.lab.node(n).nodeid}:", text)) for n in self.members}
            ok = f'Cluster "{self.lab.cluster_name}"' in text and all(listed.values())
            self.report.checks[f"qnetd-tool {self.witness}"] = {"passed": ok, "nodes": listed, "output": text}
        for key, c in self.report.checks.items():
            self.say(f"check {key}: {'ok' if c['passed'] else 'FAILED'}")

    # ---------------------------------------------------------------- walk
    def apply(self, event: Event) -> None:
        """One walk event, as the running lab's fault of the same name."""
        fault = event.fault
        if fault is None:
            return
        line = self.booted.fault(
            fault, list(event.nodes), boot_timeout=BOOT_TIMEOUT, link=event.link, values=event.values
        )
        self.say(f"fault: {line}")
        if fault in (Fault.POWER_OFF, Fault.KILL):
            self.down |= set(event.nodes)
        elif fault is Fault.POWER_ON:
            self.down -= set(event.nodes)
            if not self.booted.medium.copy_on_write:
                self.redeploy(set(event.nodes))

    def observe(self, name: str, links: bool = False) -> dict[str, Any]:
        """One member as corosync and pve-compat see it: quorum figures, ring id, members,
        raw output, the API's quorate, and (``links``) knet's link states."""
        # one round trip per poll (Machine.probe): the walk polls every member every few
        # seconds, and each SSH channel and sudo is CPU the guests' corosync then lacks
        probes = {"quorum": "corosync-quorumtool -s", "api": API_STATUS}
        if links:
            probes["links"] = "corosync-cfgtool -s"
        got = self.machines[name].probe(probes, root=True, timeout=60)
        text, api = got["quorum"].output, got["api"].output.strip()
        seen: dict[str, Any] = {
            "quorum": parse_quorumtool(text),
            "raw": text,
            "api": int(api) if api in ("0", "1") else None,
        }
        if links:
            seen["cfgtool"], seen["links"] = got["links"].output, self.link_states(got["links"].output)
        return seen

    def cfgtool(self, m: Machine) -> tuple[str, dict[str, dict[str, str]]]:
        """``corosync-cfgtool -s`` as printed, and knet's state per link and peer by name."""
        _, cfg = m.sudo("corosync-cfgtool -s", timeout=30)
        return cfg, self.link_states(cfg)

    def link_states(self, cfg: str) -> dict[str, dict[str, str]]:
        """knet's state per link and peer by name, from ``corosync-cfgtool -s``."""
        ids = {str(n.nodeid): n.name for n in self.lab.members}
        return {
            link: {ids.get(nid, nid): st for nid, st in peers.items() if st != "localhost"}
            for link, peers in parse_cfgtool(cfg).items()
        }

    def reachable(self) -> list[str]:
        """The running members the runner can observe (an unplugged one cannot be)."""
        return [m for m in self.members if m not in self.down and self.machines[m].is_running()]

    def quorumtool(self, m: Machine) -> str:
        """``corosync-quorumtool -s`` as printed (it exits 2 when not quorate: not an error)."""
        return m.sudo("corosync-quorumtool -s", timeout=30)[1]

    def rings(self, names: list[str]) -> dict[str, str | None]:
        seen = self.on_hosts(names, lambda m: parse_quorumtool(self.quorumtool(m)))
        return {n: q["ring_id"] for n, q in seen.items()}

    def settle(
        self, step: Step, t0: float, timeout: float, before: dict[str, str | None] | None = None
    ) -> WalkStep:
        before = before or {}
        with_qdevice = self.witness is not None
        two_writers: float | None = None
        changed: dict[str, str | None] = {}
        while True:
            seen = self.on_hosts(sorted(step.expect), lambda m: self.observe(m.name, step.check_links))
            elapsed = round(time.monotonic() - t0, 1)
            nodes = []
            for name, exp in sorted(step.expect.items()):
                obs = seen[name]
                q = obs["quorum"]
                ok = matches(exp, q, with_qdevice) and obs["api"] == int(exp.quorate)
                links = obs.get("links", {})
                if step.check_links:
                    want = {
                        str(k): {p: "connected" if up else "down" for p, up in v.items()}
                        for k, v in step.links[name].items()
                    }
                    got = {
                        k: {p: "connected" if links.get(k, {}).get(p) == "connected" else "down" for p in v}
                        for k, v in want.items()
                    }
                    ok = ok and got == want
                if before.get(name) and q["ring_id"] != before[name]:
                    changed[name] = q["ring_id"]
                nodes.append(
                    NodeObservation(
                        name, expected_dict(exp), q, ok, obs["raw"], obs["api"], obs.get("cfgtool", ""), links
                    )
                )
            if quorate_halves(step, seen) > 1:
                two_writers = elapsed
            held = not changed if step.holds_membership else None
            done = all(n.passed for n in nodes) and held is not False
            if done or elapsed > timeout or held is False:
                failure = ""
                if held is False:
                    failure = f"membership changed (ring id {before} -> {changed})"
                return WalkStep(
                    step.number,
                    step.title,
                    [str(e) for e in [*step.events, *step.undo]],
                    done,
                    elapsed if done else None,
                    nodes,
                    membership_held=held,
                    two_writers_seconds=two_writers,
                    two_writers_expected=step.two_writers,
                    failure=failure,
                )
            time.sleep(POLL_INTERVAL)

    def walk(self, keep_going: bool) -> None:
        for step in walk(self.lab):
            self.say(f"step {step.number}: {step.title}")
            before = self.rings(self.reachable()) if step.holds_membership else {}
            t0 = time.monotonic()
            for event in step.events:
                self.apply(event)
            measurement: dict[str, Any] = {}
            if isinstance(step.measure, Ladder):
                measurement = self.ladder(step.measure)
            elif isinstance(step.measure, Window):
                measurement = self.window(step, step.measure)
            for event in step.undo:
                self.apply(event)
            timeout = SETTLE_TIMEOUT + (
                BOOT_TIMEOUT if any(e.fault is Fault.POWER_ON for e in step.events) else 0
            )
            result = self.settle(step, t0, timeout, before)
            if not step.check_links:  # knet's link states as the step ended, for the report
                seen = self.on_hosts([n.node for n in result.nodes], self.cfgtool)
                for n in result.nodes:
                    n.cfgtool, n.links = seen[n.node]
            result.measurement = measurement
            if measurement.get("insane"):
                result.passed, result.failure = False, measurement["insane"]
            if measurement.get("membership_changed") and step.holds_membership:
                result.passed, result.membership_held = False, False
                result.failure = result.failure or "membership changed during the window"
            self.report.steps.append(result)
            self.say(
                f"step {step.number}: {'settled' if result.passed else 'NOT as expected'}"
                f" after {result.settle_seconds if result.passed else timeout:.1f}s"
                + (f" ({result.failure})" if result.failure else "")
                + (f"; two writers for {result.two_writers_seconds}s" if result.two_writers_seconds else "")
            )
            if step.number == 1 and result.passed:
                self.report.first_quorate_seconds = round(self.say.elapsed(), 1)
                self.check_tools()
                self.run_lab_scenario()
            if not result.passed and not keep_going:
                break

    # ---------------------------------------------------------------- measurements
    def cmap(self, name: str, key: str) -> int | None:
        _, out = self.machines[name].sudo(f"corosync-cmapctl -g {key}", timeout=30)
        return parse_cmap_value(out)

    def watch(self, names: list[str], seconds: float, rings: dict[str, str | None]) -> dict[str, Any]:
        """Poll quorum on ``names`` for ``seconds``: the ring ids seen, whether each lost
        quorum, the last raw output."""
        seen_rings: dict[str, set[str]] = {n: {r} for n, r in rings.items() if r}
        lost: set[str] = set()
        last: dict[str, str] = {}
        end = time.monotonic() + seconds
        while True:
            out = self.on_hosts(names, self.quorumtool)
            for n, text in out.items():
                q = parse_quorumtool(text)
                if q["ring_id"]:
                    seen_rings.setdefault(n, set()).add(q["ring_id"])
                if not q["quorate"]:
                    lost.add(n)
                last[n] = text
            if time.monotonic() >= end:
                break
            time.sleep(min(POLL_INTERVAL, max(end - time.monotonic(), 0)))
        return {
            "ring_ids": {n: sorted(r) for n, r in seen_rings.items()},
            "membership_changed": any(len(r) > 1 for r in seen_rings.values()),
            "lost_quorum": sorted(lost),
            "quorumtool": last,
        }

    def ladder(self, lad: Ladder) -> dict[str, Any]:
        """Raise the delay on ``lad.node``'s link rung by rung; stop at the first rung where
        its peers' membership changed and it lost quorum. The token is read from cmap."""
        names = self.reachable()
        peer = next(n for n in names if n != lad.node)
        figures: dict[str, Any] = {
            "node": lad.node,
            "link": lad.link,
            "hold_seconds": lad.hold_seconds,
            "token_ms": self.cmap(peer, "runtime.config.totem.token"),
            "consensus_ms": self.cmap(peer, "runtime.config.totem.consensus"),
            "rungs": [],
            "membership_changed_at_ms": None,
            "quorum_lost_at_ms": None,
        }
        for ms in lad.rungs_ms:
            rings = self.rings(names)
            line = self.booted.fault(Fault.DELAY, [lad.node], link=lad.link, values=(ms, ms / 10))
            seen = self.watch(names, lad.hold_seconds, rings)
            rung = {"delay_ms": ms, "jitter_ms": ms / 10, "fault": line, **seen}
            figures["rungs"].append(rung)
            changed, lost = seen["membership_changed"], lad.node in seen["lost_quorum"]
            self.say(
                f"latency {ms:g} ms (jitter {ms / 10:g}) on {lad.node} link{lad.link}:"
                f" membership {'CHANGED' if changed else 'held'}, {lad.node}"
                f" {'lost quorum' if lost else 'quorate'}"
            )
            if changed and figures["membership_changed_at_ms"] is None:
                figures["membership_changed_at_ms"] = ms
            if lost and figures["quorum_lost_at_ms"] is None:
                figures["quorum_lost_at_ms"] = ms
            if changed and lost:
                break
        first = lad.rungs_ms[0]
        if figures["membership_changed_at_ms"] is None:
            figures["insane"] = f"no membership change up to {lad.rungs_ms[-1]:g} ms: was the delay applied?"
        elif figures["membership_changed_at_ms"] == first:
            figures["insane"] = (
                f"membership changed at the first rung ({first:g} ms): the lab was not settled"
            )
        return figures

    def window(self, step: Step, w: Window) -> dict[str, Any]:
        """Hold the step's faults for ``w.seconds``: corosync's and knet's counters before and
        after, the membership watched, the bytes the shaped ports passed."""
        names = self.reachable()
        stats = "corosync-cmapctl -m stats"
        before = self.on_hosts(names, lambda m: parse_stats(self.root(m.name, stats)))
        rings = self.rings(names)
        shaped0, t0 = self.booted.net.shaped_bytes(), time.monotonic()
        seen = self.watch(names, w.seconds, rings)
        shaped1, held = self.booted.net.shaped_bytes(), time.monotonic() - t0  # polls overrun
        raw = self.on_hosts(names, lambda m: self.root(m.name, stats))
        deltas: dict[str, dict[str, int]] = {}
        latency: dict[str, float] = {}  # knet link -> the highest average latency a member saw, ms
        for n in names:
            after = parse_stats(raw[n])
            gauge = re.compile(r"\.link(\d+)\.latency_ave$")
            for k, v in after.items():
                if (g := gauge.search(k)) is not None:
                    latency[g.group(1)] = max(latency.get(g.group(1), 0.0), round(v / 1000, 1))
            deltas[n] = {
                k: v - before[n].get(k, 0)
                for k, v in after.items()
                if v != before[n].get(k, 0) and ".latency" not in k  # counters, not gauges
            }
        mbit = {
            tap: round((shaped1.get(tap, 0) - shaped0.get(tap, 0)) * 8 / held / 1e6, 2) for tap in shaped1
        }

        def total(suffix: str) -> int:
            return sum(v for d in deltas.values() for k, v in d.items() if k.endswith(suffix))

        formed = max((d.get("stats.srp.operational_entered", 0) for d in deltas.values()), default=0)
        figures = {
            "seconds": w.seconds,
            "held_seconds": round(held, 1),
            **seen,
            # a ring id seen to change, or a membership formed between two polls
            "membership_changed": seen["membership_changed"] or formed > 0,
            "port_mbit": mbit,
            "retransmits": total(".mcast_retx"),
            "memberships_formed": formed,
            "knet_link_downs": total(".down_count"),
            "knet_latency_ms": latency,
            "counters": deltas,
            "stats": raw,
        }
        saturate = next((e for e in step.events if e.fault is Fault.SATURATE), None)
        rate = saturate.values[0] if saturate and saturate.values else SATURATE_MBIT
        if saturate and (not mbit or max(mbit.values()) < rate / 4):
            figures["insane"] = (
                f"the bulk traffic did not load the link: {mbit} Mbit/s at the ports (limit {rate:g})"
            )
        self.say(
            f"window {held:.0f}s: membership {'CHANGED' if figures['membership_changed'] else 'held'},"
            f" {figures['retransmits']} retransmits, {figures['knet_link_downs']} knet link downs,"
            f" ports {mbit} Mbit/s"
        )
        return figures

    def run_lab_scenario(self) -> None:
        """The lab's own scenario on the cluster members, now answered by the real cluster.

        The witness's assertions are left out: the deployment replaced its stand-in with
        the real corosync-qnetd, which ``corosync-qnetd-tool -l`` has checked already."""
        scenario = self.lab.scenario
        kept = tuple(
            CustomTest(t.name, tuple(a for a in t.assertions if a.on_vm != self.witness))
            for t in scenario.custom_tests
        )
        members_only = Scenario(scenario.name, tuple(t for t in kept if t.assertions))
        self.report.scenario = run_scenario(
            members_only, lambda vm, cmd: self.machines[vm].execute(cmd, timeout=60), timeout=60
        )
        self.say(f"lab scenario on the real cluster: {'passed' if self.report.scenario.passed else 'FAILED'}")


def guest_packages(lab: Lab, steps: Steps) -> dict[str, PackageSet]:
    """Every package set the deployment installs, fetched against the nodes' base image."""
    layout = lab.layout
    keys = {BuildManifest.from_json(layout.manifest(n.name)).base_key for n in lab.nodes}
    if len(keys) != 1:
        raise RehearsalError(
            f"the nodes of {lab.name} come from different base images ({', '.join(sorted(keys))}):"
            f" run `invoke build --lab {lab.path}`"
        )
    key = keys.pop()
    squashfs = cache_dir() / "base" / key / "filesystem.squashfs"
    if not squashfs.exists():
        raise RehearsalError(
            f"{squashfs} is missing (base {key} was pruned): run `invoke build --lab {lab.path}`"
        )
    sets = {}
    for a in actions(lab):
        if a.install:
            sets[" ".join(a.install)] = fetch(
                "+".join(a.install), a.install, squashfs, key, lab.release, steps
            )
    return sets


@locking("rehearse")
def rehearse(
    lab: Lab,
    media: str = DEFAULT_MEDIUM.name,
    firmware: str = DEFAULT_FIRMWARE.name,
    accel: str = "auto",
    keep_going: bool = False,
    outdir: Path | None = None,
    keep: bool = False,
    running: bool = False,
) -> RehearsalReport:
    """Boot the lab as ``invoke up --cluster`` does, walk the quorum cases as faults, take
    it down. ``keep`` leaves the lab running at the end (``invoke status``/``ssh``/``down``),
    even after a failed step; ``running`` walks the lab ``invoke up --cluster`` left
    running (and leaves it up)."""
    layout = lab.layout
    state = read_state(lab) if running else None
    if running and (state is None or state.liveness() or not state.cluster):
        raise RehearsalError(
            f"lab {lab.name} is not up with its cluster: invoke up --cluster --lab {lab.path}"
        )
    medium, fw = boot_combination(state.media, state.firmware) if state else boot_combination(media, firmware)
    outdir = outdir or layout.rehearsal_dir(medium.name)
    say = Progress("rehearse")
    for n in lab.nodes:
        if not layout.manifest(n.name).exists():
            raise RehearsalError(
                f"{layout.manifest(n.name)} is missing: run `invoke build --lab {lab.path}` first"
            )
    packages = guest_packages(lab, Steps("rehearse", outdir / "packages.log"))
    refs = {n.name: built(lab, n, medium.artefact) for n in lab.nodes}
    report = RehearsalReport(
        lab=lab.name,
        lab_file=str(lab.path),
        media=medium.name,
        firmware=fw.value,
        accel="",
        artefacts={k: ArtefactRef(str(p), sha256(p)) for k, p in refs.items()},
        packages={k: [d.name for d in v.debs] for k, v in packages.items()},
        lab_sha256=sha256(lab.path),
    )
    try:
        if state is not None:
            _walk_running(lab, state, packages, report, say, keep_going)
        else:
            _boot_and_walk(lab, medium, fw, accel, outdir, packages, report, say, keep_going, keep)
    except (RehearsalError, MachineError, DriverError) as exc:
        report.error = str(exc)
        say(f"FAILED: {exc}")
    report.wall_seconds = round(say.elapsed(), 1)
    write_reports(report, outdir)
    print(table(report), flush=True)
    return report


def _boot_and_walk(
    lab: Lab,
    medium: Medium,
    fw: Firmware,
    accel: str,
    outdir: Path,
    packages: dict[str, PackageSet],
    report: RehearsalReport,
    say: Progress,
    keep_going: bool,
    keep: bool,
) -> None:
    # --keep: the lab is booted as `invoke up` boots it, findable by status/ssh/down
    state_file = claim(lab) if keep else None
    kept: dict[str, Any] = {"netns": netns_name(lab), "state_file": state_file} if keep else {}
    workdir = lab.layout.run_dir if keep else outdir
    bases = layers(lab, medium, packages, Steps("rehearse", outdir / "layers.log"))
    with booted_lab(lab, lab.nodes, medium, fw, accel, workdir, say, bases=bases, **kept) as booted:
        report.accel = booted.accel
        report.boot_seconds = round(say.elapsed(), 1)
        report.guest_faults = booted.guest_faults
        run = Rehearsal(lab, booted, packages, report, say)
        try:
            run.deploy()
            t_walk = time.monotonic()
            run.walk(keep_going)
            report.walk_seconds = round(time.monotonic() - t_walk, 1)
        finally:
            if state_file is not None:
                kept_state = booted.detach(state_file)
                kept_state.cluster = bool(report.deploy) and all(d.passed for d in report.deploy)
                booted.save()
                print(describe(lab, kept_state), flush=True)


def _walk_running(
    lab: Lab,
    state: RunState,
    packages: dict[str, PackageSet],
    report: RehearsalReport,
    say: Progress,
    keep_going: bool,
) -> None:
    """The walk on a running lab (deployed by ``up --cluster``); it must start healed."""
    with lab_lock(lab.name, "rehearse --running"):
        driver = Driver.attach(lab, say)
        off = [n for n, m in driver.machines.items() if not m.is_running()]
        cut = driver.net.separated()
        links = link_faults_in_force(state.faults)
        if off or cut or links:
            raise RehearsalError(
                f"lab {lab.name} has faults in force ({', '.join(off)} off; {cut} cut; links: {links}):"
                " the walk starts from every node up and connected"
                " (invoke fault power-on / heal all / clear all)"
            )
        errors = driver.connect()
        if errors:
            raise RehearsalError("; ".join(errors.values()))
        report.accel = driver.accel
        report.boot_seconds = state.up_seconds
        deployed = lab.layout.run_dir / "deploy.json"
        if deployed.exists():
            report.deploy = RehearsalReport.from_json(deployed).deploy
        run = Rehearsal(lab, driver, packages, report, say)
        t_walk = time.monotonic()
        run.walk(keep_going)
        report.walk_seconds = round(time.monotonic() - t_walk, 1)


# --------------------------------------------------------------------------- output


def table(report: RehearsalReport) -> str:
    lines = [
        f"rehearsal {report.lab} ({report.media}, {report.accel}):",
        "votes: total/expected; +qd: the QDevice's vote counts for this node; api: pve-compat's quorate;"
        " links: peers connected per knet link as the step ended",
        f"{'step':<4} {'node':<12} {'expected':<25} {'observed':<25} {'api':<4} {'links':<11} {'settle':>7}  event",
    ]

    def cell(v: dict) -> str:
        return (
            f"{v.get('total_votes')}/{v.get('expected_votes')}{' +qd' if v.get('qdevice_vote') else ''}"
            f" {'quorate' if v.get('quorate') else 'NOT quorate'}"
        )

    def links(n: NodeObservation) -> str:
        return " ".join(
            f"l{k}:{sum(st == 'connected' for st in peers.values())}/{len(peers)}"
            for k, peers in n.links.items()
        )

    for s in report.steps:
        for i, n in enumerate(s.nodes):
            exp, obs = cell(n.expected), cell(n.observed)
            settle = f"{s.settle_seconds:.1f}s" if s.settle_seconds is not None else "never"
            lines.append(
                f"{s.number if i == 0 else '':<4} {n.node:<12} {exp:<25} {obs:<25} "
                f"{'-' if n.api_quorate is None else n.api_quorate!s:<4} {links(n) or '-':<11}"
                f" {settle if i == 0 else '':>7}"
                f"  {s.title if i == 0 else ''}{'' if n.passed else '   <-- MISMATCH'}".rstrip()
            )
        lines += [f"     {line}" for line in step_notes(s)]
    if report.scenario:
        lines.append(summary(report.scenario))
    for key, c in report.checks.items():
        lines.append(f"check {key}: {'ok' if c.get('passed') else 'FAILED'}")
    if report.error:
        lines.append(f"error: {report.error}")
    lines.append(
        f"{sum(s.passed for s in report.steps)} passed, {sum(not s.passed for s in report.steps)} failed"
        f" (walk steps); boot {report.boot_seconds}s, first quorate {report.first_quorate_seconds}s,"
        f" walk {report.walk_seconds}s, wall {report.wall_seconds}s"
    )
    return "\n".join(lines)


def step_notes(s: WalkStep) -> list[str]:
    """What a step measured or flagged, a line each: membership held, two writers, a
    latency ladder's rungs, a window's counters, why it failed."""
    notes = []
    if s.membership_held is not None:
        notes.append(f"membership {'held (ring id unchanged)' if s.membership_held else 'CHANGED'}")
    if s.two_writers_seconds is not None and s.two_writers_expected:
        notes.append(
            "DANGER: two partitions quorate at once: two writers (the split brain the warnings describe)"
        )
    elif s.two_writers_seconds is not None:
        notes.append(
            f"two partitions quorate at once for up to {s.two_writers_seconds:.1f}s after the event"
            " (until the cut-off side saw the split and lost its votes)"
        )
    elif s.two_writers_expected:
        notes.append("two writers expected, never seen")
    m = s.measurement
    if "rungs" in m:
        for r in m["rungs"]:
            notes.append(
                f"delay {r['delay_ms']:g} ms +/- {r['jitter_ms']:g}: membership"
                f" {'CHANGED' if r['membership_changed'] else 'held'},"
                f" lost quorum: {', '.join(r['lost_quorum']) or 'none'}"
            )
        notes.append(
            f"membership first changed at {m['membership_changed_at_ms']} ms, {m['node']} lost quorum at"
            f" {m['quorum_lost_at_ms']} ms (one-way, on its link{m['link']}); token {m['token_ms']} ms,"
            f" consensus {m['consensus_ms']} ms"
        )
    elif "seconds" in m:
        notes.append(
            f"{m.get('held_seconds', m['seconds']):g}s window: membership {'CHANGED' if m['membership_changed'] else 'held'},"
            f" lost quorum: {', '.join(m['lost_quorum']) or 'none'}; {m['retransmits']} retransmits,"
            f" {m['memberships_formed']} memberships formed, {m['knet_link_downs']} knet link downs"
            f" (knet's average latency at the end: {', '.join(f'link{k} {v:g} ms' for k, v in m.get('knet_latency_ms', {}).items())});"
            f" shaped ports {', '.join(f'{t} {v:g}' for t, v in m['port_mbit'].items())} Mbit/s"
        )
    if s.failure:
        notes.append(f"FAILED: {s.failure}")
    return notes


def to_junit(report: RehearsalReport) -> str:
    deploy = [
        Case("deploy", d.title, d.seconds, failure=None if d.passed else d.title, failure_text=d.output)
        for d in report.deploy
    ]
    steps = [
        Case(
            f"step {s.number}: {s.title}",
            n.node,
            s.settle_seconds or 0,
            output="\n".join([n.quorumtool, n.cfgtool, *step_notes(s)]).strip(),
            failure=None
            if n.passed and not s.failure
            else f"expected {n.expected}, observed {n.observed}, api quorate {n.api_quorate}, links {n.links}"
            + (f"; {s.failure}" if s.failure else ""),
        )
        for s in report.steps
        for n in s.nodes
    ]
    run = [Case("rehearsal", "run", error=report.error[:500])] if report.error else []
    return junit(f"rehearsal {report.lab}", deploy + steps + run, report.wall_seconds)


def write_reports(report: RehearsalReport, outdir: Path) -> None:
    write_atomic(outdir / REPORT, report.to_json())
    write_atomic(outdir / JUNIT, to_junit(report))
    write_atomic(outdir / SUMMARY, table(report) + "\n")


__all__ = ["rehearse"]
