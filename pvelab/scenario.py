"""Scenario runner: the lab file's assertions, polled on their VMs, reported as JSON/JUnit.

The scenario comes from the lab model (never a second copy). Each assertion runs on
its ``on_vm`` through an executor ``(vm, command) -> (exit status, output)`` (SSH on
the booted guests; a local shell in the fast tests) and is polled until it passes or
its deadline passes.

* ``port_listening``: ``ss`` on the guest shows a TCP listener on the port;
* ``command_output``: the command exits 0 and its output contains the expected text;
* ``http_responds``: ``curl`` on the guest gets the expected HTTP status.
"""

from __future__ import annotations

import json
import shlex
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from .lab import Assertion, Scenario

Executor = Callable[[str, str], tuple[int, str]]


def assertion_command(a: Assertion) -> str:
    if a.type == "port_listening":
        return f"ss -Hltn 'sport = :{int(a.port)}'"
    if a.type == "command_output":
        return a.command
    return f"curl -s -o /dev/null -m 10 -w '%{{http_code}}' {shlex.quote(a.url)}"


def evaluate(a: Assertion, status: int, output: str) -> bool:
    if a.type == "port_listening":
        return status == 0 and bool(output.strip())
    if a.type == "command_output":
        return status == 0 and a.expected_output in output
    return output.strip().endswith(str(a.expected_status))


def describe(a: Assertion) -> str:
    if a.type == "port_listening":
        return f"{a.on_vm}: port {a.port} listening"
    if a.type == "command_output":
        return f"{a.on_vm}: `{a.command}` -> {a.expected_output}"
    return f"{a.on_vm}: {a.url} -> HTTP {a.expected_status}"


@dataclass
class AssertionResult:
    description: str
    on_vm: str
    type: str
    passed: bool
    attempts: int
    last_status: int
    last_output: str
    seconds: float


@dataclass
class TestResult:
    name: str
    passed: bool
    seconds: float
    assertions: list[AssertionResult] = field(default_factory=list)


@dataclass
class Report:
    scenario: str
    passed: bool
    tests: list[TestResult]
    seconds: float
    context: dict = field(default_factory=dict)

    @property
    def counts(self) -> tuple[int, int]:
        ok = sum(t.passed for t in self.tests)
        return ok, len(self.tests) - ok

    def to_dict(self) -> dict:
        d = asdict(self)
        d["summary"] = {"passed": self.counts[0], "failed": self.counts[1]}
        return d


def run_assertion(a: Assertion, execute: Executor, timeout: float, interval: float) -> AssertionResult:
    t0 = time.monotonic()
    deadline = t0 + timeout
    attempts, status, output = 0, -1, ""
    command = assertion_command(a)
    while True:
        attempts += 1
        try:
            status, output = execute(a.on_vm, command)
        except Exception as exc:  # noqa: BLE001 - a lost VM is a failed attempt, reported
            status, output = -1, f"{type(exc).__name__}: {exc}"
        if evaluate(a, status, output):
            return AssertionResult(describe(a), a.on_vm, a.type, True, attempts, status,
                                   output.strip()[-2000:], round(time.monotonic() - t0, 2))
        if time.monotonic() + interval > deadline:
            return AssertionResult(describe(a), a.on_vm, a.type, False, attempts, status,
                                   output.strip()[-2000:], round(time.monotonic() - t0, 2))
        time.sleep(interval)


def run_scenario(scenario: Scenario, execute: Executor, timeout: float = 120.0,
                 interval: float = 3.0, context: dict | None = None) -> Report:
    t0 = time.monotonic()
    tests = []
    for test in scenario.custom_tests:
        ts = time.monotonic()
        results = [run_assertion(a, execute, timeout, interval) for a in test.assertions]
        tests.append(TestResult(test.name, all(r.passed for r in results),
                                round(time.monotonic() - ts, 2), results))
    return Report(scenario.name, all(t.passed for t in tests), tests,
                  round(time.monotonic() - t0, 2), dict(context or {}))


# --------------------------------------------------------------------------- output

def summary(report: Report) -> str:
    lines = [f"scenario {report.scenario}:"]
    for t in report.tests:
        lines.append(f"  [{'PASS' if t.passed else 'FAIL'}] {t.name} ({t.seconds:.1f}s)")
        for a in t.assertions:
            if not a.passed:
                lines.append(f"      FAIL {a.description}: {a.attempts} attempts, exit {a.last_status}, "
                             f"last output: {a.last_output[-200:]!r}")
    ok, bad = report.counts
    lines.append(f"{ok} passed, {bad} failed")
    return "\n".join(lines)


def to_junit(report: Report) -> str:
    cases = [(t, a) for t in report.tests for a in t.assertions]
    suite = ET.Element("testsuite", name=report.scenario, tests=str(len(cases)),
                       failures=str(sum(not a.passed for _, a in cases)), errors="0",
                       time=f"{report.seconds:.2f}")
    for t, a in cases:
        case = ET.SubElement(suite, "testcase", classname=t.name, name=a.description,
                             time=f"{a.seconds:.2f}")
        out = ET.SubElement(case, "system-out")
        out.text = f"attempts: {a.attempts}\nexit status: {a.last_status}\noutput:\n{a.last_output}"
        if not a.passed:
            fail = ET.SubElement(case, "failure", message=f"{a.description} failed after {a.attempts} attempts")
            fail.text = a.last_output
    return ET.tostring(ET.ElementTree(suite).getroot(), encoding="unicode", xml_declaration=True)


def write_reports(report: Report, outdir: Path) -> tuple[Path, Path]:
    outdir.mkdir(parents=True, exist_ok=True)
    js, xml = outdir / "report.json", outdir / "junit.xml"
    for path, text in ((js, json.dumps(report.to_dict(), indent=2) + "\n"), (xml, to_junit(report))):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return js, xml
