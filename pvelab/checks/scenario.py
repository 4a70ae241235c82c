"""Scenario runner: the lab file's assertions, polled on their VMs, reported as JSON/JUnit.

The scenario comes from the lab model (never a second copy). Each assertion runs on
its ``on_vm`` through an executor ``(vm, command) -> (exit status, output)`` (SSH on
the booted guests; a local shell in the fast tests) and is polled until it passes or
its deadline passes. What each assertion type runs and when it passes is defined once,
in :mod:`pvelab.model.assertions`. Tests run one after the other; inside a test, the VMs are
polled side by side (each VM's own assertions in the lab file's order), and the results
keep the lab file's order.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pvelab.core.logger import Case, junit
from pvelab.model.artefacts import (
    JUNIT,
    REPORT,
    AssertionResult,
    BootReport,
    ScenarioResult,
    TestResult,
    write_atomic,
)
from pvelab.model.assertions import Assertion
from pvelab.model.lab import Scenario

Executor = Callable[[str, str], tuple[int, str]]
# Pause before an assertion's next attempt. Each attempt runs a command in a guest that
# may still be booting, so not much shorter; a scenario started right after the last SSH
# login mostly waits for services that are seconds away, so not much longer.
RETRY_INTERVAL = 1.0


def run_assertion(
    a: Assertion,
    execute: Executor,
    timeout: float,
    interval: float,
    stop: threading.Event | None = None,
) -> AssertionResult:
    """Poll ``a`` until it passes or its deadline passes; a set ``stop`` (the run is being
    interrupted) ends the polling at once, as a failure."""
    stop = stop or threading.Event()
    t0 = time.monotonic()
    deadline = t0 + timeout
    attempts, status, output = 0, -1, ""
    kind = a.kind
    command = kind.command(a)
    while True:
        attempts += 1
        try:
            status, output = execute(a.on_vm, command)
        except Exception as exc:
            status, output = -1, f"{type(exc).__name__}: {exc}"
        if kind.passes(a, status, output):
            return AssertionResult(
                kind.describe(a),
                a.on_vm,
                a.type,
                True,
                attempts,
                status,
                output.strip()[-2000:],
                round(time.monotonic() - t0, 2),
            )
        if time.monotonic() + interval > deadline or stop.wait(interval):
            return AssertionResult(
                kind.describe(a),
                a.on_vm,
                a.type,
                False,
                attempts,
                status,
                output.strip()[-2000:],
                round(time.monotonic() - t0, 2),
            )


def run_test_assertions(
    assertions: Sequence[Assertion], execute: Executor, timeout: float, interval: float
) -> list[AssertionResult]:
    """One test's assertions: one worker per VM, each VM's in order; results in file order.

    Ctrl-C or SIGTERM (a KeyboardInterrupt here) stops every worker's polling and unwinds
    at once, so the caller tears the VMs down without first waiting out every deadline
    (a worker still inside a guest command ends when its VM is gone)."""
    by_vm: dict[str, list[int]] = {}
    for i, a in enumerate(assertions):
        by_vm.setdefault(a.on_vm, []).append(i)
    results: dict[int, AssertionResult] = {}

    stop = threading.Event()

    def run_vm(indices: list[int]) -> None:
        for i in indices:
            if stop.is_set():
                return
            results[i] = run_assertion(assertions[i], execute, timeout, interval, stop)

    pool = ThreadPoolExecutor(max_workers=max(1, len(by_vm)), thread_name_prefix="assert")
    try:
        list(pool.map(run_vm, by_vm.values()))  # re-raises a worker's exception
    except BaseException:
        stop.set()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    return [results[i] for i in range(len(assertions))]


def run_scenario(
    scenario: Scenario, execute: Executor, timeout: float = 120.0, interval: float = RETRY_INTERVAL
) -> ScenarioResult:
    t0 = time.monotonic()
    tests = []
    for test in scenario.custom_tests:
        ts = time.monotonic()
        results = run_test_assertions(test.assertions, execute, timeout, interval)
        tests.append(
            TestResult(test.name, all(r.passed for r in results), round(time.monotonic() - ts, 2), results)
        )
    return ScenarioResult(scenario.name, all(t.passed for t in tests), tests, round(time.monotonic() - t0, 2))


# --------------------------------------------------------------------------- output


def summary(report: ScenarioResult) -> str:
    lines = [f"scenario {report.scenario}:"]
    for t in report.tests:
        lines.append(f"  [{'PASS' if t.passed else 'FAIL'}] {t.name} ({t.seconds:.1f}s)")
        for a in t.assertions:
            if not a.passed:
                lines.append(
                    f"      FAIL {a.description}: {a.attempts} attempts, exit {a.last_status}, "
                    f"last output: {a.last_output[-200:]!r}"
                )
    ok, bad = report.counts
    lines.append(f"{ok} passed, {bad} failed")
    return "\n".join(lines)


def to_junit(report: ScenarioResult) -> str:
    return junit(
        report.scenario,
        [
            Case(
                t.name,
                a.description,
                a.seconds,
                output=f"attempts: {a.attempts}\nexit status: {a.last_status}\noutput:\n{a.last_output}",
                failure=None if a.passed else f"{a.description} failed after {a.attempts} attempts",
                failure_text=a.last_output,
            )
            for t in report.tests
            for a in t.assertions
        ],
        report.seconds,
    )


def write_reports(report: BootReport, outdir: Path) -> tuple[Path, Path]:
    js, xml = outdir / REPORT, outdir / JUNIT
    write_atomic(js, report.to_json())
    write_atomic(xml, to_junit(report.result))
    return js, xml
