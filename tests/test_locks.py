"""One writer per lab: a second run waits or refuses with one line; a killed run's lock
is taken over and what it left (QEMU, namespace) is removed by the next run."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pvelab.core import locks
from pvelab.core.paths import DEFAULT_LAB, ROOT

LAB = "proxmox-3node-cluster"  # DEFAULT_LAB's name
HOLD = """
import sys, time
from pvelab.core import locks
with locks.lab_lock({lab!r}, "build"):
    {body}
    print("held", flush=True)
    time.sleep(float(sys.argv[1]))
"""


@pytest.fixture
def build_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("PVELAB_BUILD_DIR", str(tmp_path))
    return tmp_path


def holder(seconds: float, body: str = "pass") -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD.format(lab=LAB, body=body), str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_second_run_refuses_with_no_wait_before_any_work(build_dir):
    proc = holder(60)
    try:
        res = subprocess.run(
            [str(Path(sys.executable).parent / "invoke"), "build", "--no-wait", "--lab", str(DEFAULT_LAB)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=dict(os.environ, PVELAB_BUILD_DIR=str(build_dir)),
            timeout=60,
        )
    finally:
        proc.kill()
        proc.wait()
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert f"lab {LAB} is busy" in lines[0] and f"pid {proc.pid}" in lines[0] and "started " in lines[0]
    assert "Traceback" not in res.stderr
    assert not (build_dir / LAB / "pve-1").exists()  # no work started: nothing rendered


def test_second_run_waits_and_says_so_once(build_dir, capsys):
    proc = holder(2)
    t0 = time.monotonic()
    with locks.lab_lock(LAB, "boot-test") as me:
        waited = time.monotonic() - t0
        assert me.pid == os.getpid()
    proc.wait()
    out = capsys.readouterr().out
    assert out.count("is busy") == 1 and "waiting for it to finish" in out
    assert waited > 1.0
    assert "taken over" not in out  # the first holder ended cleanly
    assert locks.lock_path(LAB).read_text() == ""  # a clean end leaves nothing to sweep


def test_reentrant_within_one_process(build_dir):
    with locks.lab_lock(LAB, "nightly"), locks.lab_lock(LAB, "build") as inner:
        assert inner.command == "pvelab nightly"  # the outer holder's record stays
    with locks.no_wait(), locks.lab_lock(LAB, "build"):
        pass


@pytest.mark.skipif(os.geteuid() != 0, reason="makes a network namespace: root")
def test_killed_holder_is_taken_over_and_its_leftovers_removed(build_dir, capsys):
    ns = f"pvelab-locktest-{os.getpid()}"
    body = (
        f"import subprocess; subprocess.run(['ip', 'netns', 'add', {ns!r}], check=True); "
        f"locks.leave(netns={ns!r}); "
        "q = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)', '-name', 'locktest-vm'], "
        "start_new_session=True); "
        "locks.leave(qemu=('locktest-vm', q.pid)); print(q.pid, flush=True)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD.format(lab=LAB, body=body), "300"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert proc.stdout is not None
    fake_qemu = int(proc.stdout.readline())
    assert proc.stdout.readline().strip() == "held"
    try:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert Path(f"/run/netns/{ns}").exists() and locks.pid_alive(fake_qemu)
        with locks.lab_lock(LAB, "boot-test"):
            pass
        line = capsys.readouterr().out.strip()
        assert len(line.splitlines()) == 1
        assert f"pid {proc.pid}" in line and "lock taken over" in line
        assert f"QEMU of locktest-vm (pid {fake_qemu}) killed" in line and f"namespace {ns} (bridge" in line
        for _ in range(50):
            if not locks.pid_alive(fake_qemu):
                break
            time.sleep(0.1)
        assert not locks.pid_alive(fake_qemu)
        assert not Path(f"/run/netns/{ns}").exists()
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        try:
            os.kill(fake_qemu, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_reused_pid_is_not_killed(build_dir, capsys):
    # the record names a guest whose QEMU is gone; its pid now belongs to another program
    other = subprocess.Popen(["sleep", "60"])
    try:
        path = locks.lock_path(LAB)
        path.parent.mkdir(parents=True)
        path.write_text(locks.Holder(999999, "invoke up", "then", [], {"pve-1": other.pid}).to_json())
        with locks.lab_lock(LAB, "up"):
            pass
        assert "nothing of it was still running" in capsys.readouterr().out
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()
