"""The scenario runner's logic against real local sockets and commands (no VMs)."""

import json
import socket
import subprocess
import time
import xml.etree.ElementTree as ET

import pytest

from pvelab.build.render import compat_config
from pvelab.checks.scenario import run_scenario, summary, to_junit, write_reports
from pvelab.model.artefacts import BootReport
from pvelab.model.lab import Assertion, CustomTest, Scenario


def local(vm, command):
    res = subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=30)
    return res.returncode, res.stdout + res.stderr


@pytest.fixture
def service(lab, compat_modules):
    compat, pve_compat, _ = compat_modules
    cfg = json.loads(json.dumps(compat_config(lab, lab.node("pve-1"))))
    cfg.update(listen="127.0.0.1", http_port=0, tcp_ports=[0], udp_ports=[])
    svc = compat.Service(pve_compat.build(cfg)).start()
    yield svc
    svc.stop()


def scenario_for(api, tcp):
    return Scenario(
        "local-validation",
        (
            CustomTest(
                "ports",
                (
                    Assertion("port_listening", "pve-1", port=api),
                    Assertion("port_listening", "pve-1", port=tcp),
                ),
            ),
            CustomTest(
                "quorate",
                (
                    Assertion(
                        "command_output",
                        "pve-1",
                        # (jq 1.6 exits 0 on empty input, so curl's failure is checked on its own here)
                        command=f"body=$(curl -fsS http://127.0.0.1:{api}/api2/json/cluster/status) && "
                        'echo "$body" | jq -e \'.data[] | select(.type == "cluster") | .quorate == 1\' '
                        ">/dev/null && echo quorate",
                        expected_output="quorate",
                    ),
                ),
            ),
            CustomTest(
                "http",
                (
                    Assertion(
                        "http_responds",
                        "pve-1",
                        url=f"http://127.0.0.1:{api}/api2/json/version",
                        expected_status=200,
                    ),
                ),
            ),
        ),
    )


def test_all_pass_against_running_service(service):
    api = service.servers[0].port
    tcp = service.servers[1].port
    report = run_scenario(scenario_for(api, tcp), local, timeout=5, interval=0.2)
    assert report.passed, summary(report)
    assert [t.passed for t in report.tests] == [True, True, True]
    assert all(a.attempts == 1 for t in report.tests for a in t.assertions)
    assert "quorate" in report.tests[1].assertions[0].last_output
    assert summary(report).splitlines()[-1] == "3 passed, 0 failed"


def test_gate_fails_when_service_is_stopped(service):
    api = service.servers[0].port
    tcp = service.servers[1].port
    scenario = scenario_for(api, tcp)
    service.stop()
    report = run_scenario(scenario, local, timeout=1.0, interval=0.3)
    assert not report.passed
    assert [t.passed for t in report.tests] == [False, False, False]
    a = report.tests[1].assertions[0]
    assert a.attempts >= 2 and a.last_status != 0 and 0.5 <= a.seconds < 1.5
    assert summary(report).splitlines()[-1] == "0 passed, 3 failed"


def test_expected_word_must_appear(service):
    api = service.servers[0].port
    sc = Scenario(
        "s",
        (
            CustomTest(
                "t",
                (
                    Assertion(
                        "command_output",
                        "pve-1",
                        command=f"curl -fsS http://127.0.0.1:{api}/api2/json/version",
                        expected_output="no-such-word",
                    ),
                ),
            ),
        ),
    )
    report = run_scenario(sc, local, timeout=0.5, interval=0.2)
    assert not report.passed and '"repoid":"pve-1"' in report.tests[0].assertions[0].last_output


def test_exit_status_matters_even_with_the_word():
    sc = Scenario(
        "s",
        (
            CustomTest(
                "t",
                (
                    Assertion(
                        "command_output", "x", command="echo quorate; exit 3", expected_output="quorate"
                    ),
                ),
            ),
        ),
    )
    assert not run_scenario(sc, local, timeout=0.3, interval=0.1).passed


def test_a_late_service_is_waited_for(lab, compat_modules):
    compat, pve_compat, _ = compat_modules
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = json.loads(json.dumps(compat_config(lab, lab.node("pve-1"))))
    cfg.update(listen="127.0.0.1", http_port=port, tcp_ports=[], udp_ports=[])
    sc = Scenario("s", (CustomTest("t", (Assertion("port_listening", "pve-1", port=port),)),))
    import threading

    holder = {}
    timer = threading.Timer(
        1.0, lambda: holder.setdefault("svc", compat.Service(pve_compat.build(cfg)).start())
    )
    timer.start()
    try:
        report = run_scenario(sc, local, timeout=10, interval=0.3)
    finally:
        timer.join()
        holder["svc"].stop()
    assert report.passed and report.tests[0].assertions[0].attempts > 1


def test_executor_exception_is_a_failed_attempt():
    def broken(vm, command):
        raise ConnectionError("ssh lost")

    sc = Scenario("s", (CustomTest("t", (Assertion("port_listening", "pve-1", port=1),)),))
    r = run_scenario(sc, broken, timeout=0.2, interval=0.1)
    assert not r.passed and "ssh lost" in r.tests[0].assertions[0].last_output


def test_reports(service, tmp_path):
    api = service.servers[0].port
    result = run_scenario(scenario_for(api, service.servers[1].port), local, timeout=5, interval=0.2)
    report = BootReport(
        lab="l",
        lab_file="l.yaml",
        media="qcow2",
        firmware="bios",
        accel="tcg",
        accel_reason="requested",
        artefacts={},
        result=result,
    )
    js, xml = write_reports(report, tmp_path)
    data = json.loads(js.read_text())
    assert data["summary"] == {"passed": 3, "failed": 0} and data["accel"] == "tcg"
    assert data["result"]["tests"][0]["assertions"][0]["attempts"] == 1
    again = BootReport.from_json(js)  # the typed record reads back what it wrote
    assert again.result.tests[0].assertions[0].passed and again.passed
    suite = ET.parse(xml).getroot()
    assert suite.tag == "testsuite" and suite.get("tests") == "4" and suite.get("failures") == "0"
    assert {c.get("classname") for c in suite.iter("testcase")} == {"ports", "quorate", "http"}


def test_junit_marks_failures():
    sc = Scenario(
        "s", (CustomTest("t", (Assertion("command_output", "x", command="false", expected_output="y"),)),)
    )
    root = ET.fromstring(to_junit(run_scenario(sc, local, timeout=0.1, interval=0.1)))
    assert root.get("failures") == "1" and root.find("testcase/failure") is not None


def test_lab_scenario_is_the_one_run(lab):
    # the runner takes the Scenario from the lab model: 6 tests, 23 assertions
    assert len(lab.scenario.custom_tests) == 6
    assert sum(len(t.assertions) for t in lab.scenario.custom_tests) == 23


def test_missing_qemu_is_one_clear_line(lab, monkeypatch, tmp_path):
    """No QEMU on the host: the boot test says so before starting anything."""
    from pvelab.checks.boottest import BootTestError, boot_test
    from pvelab.model.artefacts import Layout

    for n in lab.nodes:
        path = Layout(lab.name).artefact(n.name, "qcow2")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"not really a disk")
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on it
    with pytest.raises(BootTestError, match="qemu-system-x86_64 not found: it boots the lab"):
        boot_test(lab, media="qcow2", firmware="bios", accel="tcg")


def test_a_tests_vms_are_polled_side_by_side_each_vm_in_order():
    """Inside one test the VMs run at once; one VM's assertions run one after another."""
    spans: list[tuple[str, str, float, float]] = []

    def timed(vm, command):
        t0 = time.monotonic()
        status, out = local(vm, command)
        spans.append((vm, command, t0, time.monotonic()))
        return status, out

    assertions = tuple(
        Assertion("command_output", vm, command=f"sleep 0.4; echo {vm}-{n}", expected_output=f"{vm}-{n}")
        for n in (1, 2)
        for vm in ("a", "b")
    )
    report = run_scenario(Scenario("s", (CustomTest("t", assertions),)), timed, timeout=5, interval=0.2)
    assert report.passed, summary(report)
    # results in the lab file's order, not in the order they finished
    assert [a.last_output for a in report.tests[0].assertions] == ["a-1", "b-1", "a-2", "b-2"]
    by_vm = {vm: sorted(s[2:] for s in spans if s[0] == vm) for vm in ("a", "b")}
    for (_s1, e1), (s2, _e2) in [by_vm["a"], by_vm["b"]]:
        assert e1 <= s2  # same VM: the second starts after the first ended
    (a_start, a_end), (b_start, b_end) = by_vm["a"][0], by_vm["b"][0]
    assert a_start < b_end and b_start < a_end  # different VMs: overlapping


def test_an_interrupt_stops_the_polling_at_once():
    """Ctrl-C or SIGTERM (KeyboardInterrupt in the main thread) while assertions are being
    polled unwinds at once: the VMs are torn down without first waiting out every deadline."""
    import signal
    import threading

    calls = []

    def never(vm, command):
        calls.append(vm)
        return 1, "not yet"

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    assertions = tuple(
        Assertion("command_output", vm, command="true", expected_output="never") for vm in ("a", "a", "b")
    )
    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 0.5)
    t0 = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            run_scenario(Scenario("s", (CustomTest("t", assertions),)), never, timeout=30, interval=0.1)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert time.monotonic() - t0 < 3
    time.sleep(0.2)  # a worker caught inside its command at the interrupt has returned by now
    polled = len(calls)
    time.sleep(0.5)
    assert len(calls) == polled  # the workers stopped too: nothing is polled after the unwind
    assert not [t for t in threading.enumerate() if t.name.startswith("assert")]
