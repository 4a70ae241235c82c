"""Running tools: one progress line per stage on the console, full output in a log file.

Every long step of pvelab goes through :class:`Steps`: the console shows, through the
one progress sink (:class:`pvelab.core.logger.Progress`),
``[node 12.3s] stage ... done in Xs (total Ys)`` and, for long commands, a heartbeat with the
elapsed time and the tool's current phase; the tool's complete output is appended to
the node's log (``build/<node>/build.log``).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from pvelab.core.errors import PvelabError, disk_full, is_no_space
from pvelab.core.logger import Progress
from pvelab.core.paths import build_root, cache_dir

HEARTBEAT = float(os.environ.get("PVELAB_HEARTBEAT", "20"))
_PHASE = re.compile(
    r"dib-run-parts Running \S*/([a-z0-9-]+\.d/[^/\s]+)$|Running hooks from \S*/([a-z0-9.-]+\.d)\b"
)


class StepError(PvelabError):
    """A failed tool run: names the node, stage, command and log file."""


def fmt_secs(seconds: float) -> str:
    return f"{seconds:.1f}s" if seconds < 120 else f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


class Steps:
    def __init__(self, label: str, log_path: Path, env: dict[str, str] | None = None):
        self.label = label
        self.log_path = log_path
        self.env = dict(env or {})  # for every command of this run (e.g. repro.tool_env)
        self.start = time.monotonic()
        self.stage_name = "-"
        self.timings: dict[str, float] = {}
        # the file systems a full disk may be on, besides the log's (the cache, the build tree)
        self.space_paths: list[Path] = [cache_dir(), build_root()]
        self.progress = Progress(label, log_path)  # the console line and the log's "== " line

    def say(self, msg: str) -> None:
        self.progress(msg)

    def log(self, text: str) -> None:
        self.progress.log(text)

    @contextmanager
    def stage(self, name: str):
        self.stage_name = name
        t0 = time.monotonic()
        self.say(f"{name} ...")
        try:
            yield
        except BaseException as exc:
            self.say(
                f"{name} FAILED after {fmt_secs(time.monotonic() - t0)}: "
                f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            )
            if is_no_space(exc):
                raise disk_full(exc, f"{self.label}: {name}", self.log_path, *self.space_paths) from exc
            raise
        took = time.monotonic() - t0
        self.timings[name] = round(took, 1)
        self.say(f"{name} done in {fmt_secs(took)} (total {fmt_secs(time.monotonic() - self.start)})")

    # Long on purpose: the subprocess, its log tee, the heartbeat thread and the cleanup on interrupt belong together.
    def run(
        self, cmd: list[str], env: dict | None = None, cwd: Path | None = None, input: bytes | None = None
    ) -> None:
        """Run a command, its output appended to the log; raise StepError on failure."""
        self.log(f"$ {shlex.join(str(c) for c in cmd)}")
        full_env = dict(os.environ, **self.env, **(env or {}))
        with open(self.log_path, "ab") as log:
            proc = subprocess.Popen(
                [str(c) for c in cmd],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=full_env,
                cwd=cwd,
                stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            )
            assert proc.stdout is not None
            if input is not None and proc.stdin is not None:
                proc.stdin.write(input)
                proc.stdin.close()
            phase = [""]
            t0 = time.monotonic()
            done = threading.Event()

            def heartbeat():
                while not done.wait(HEARTBEAT):
                    where = f" ({phase[0]})" if phase[0] else ""
                    self.say(f"{self.stage_name}: {fmt_secs(time.monotonic() - t0)} elapsed{where}")

            hb = threading.Thread(target=heartbeat, daemon=True)
            hb.start()
            try:
                for line in proc.stdout:
                    log.write(line)
                    m = _PHASE.search(line.decode(errors="replace"))
                    if m:
                        phase[0] = m.group(1) or m.group(2) or phase[0]
                rc = proc.wait()
            except BaseException:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                raise
            finally:
                done.set()
        if rc != 0:
            raise StepError(
                f"{self.label}: {self.stage_name}: {Path(str(cmd[0])).name} exited {rc}; "
                f"last lines of {self.log_path}:\n{tail(self.log_path)}"
            )

    def capture(self, cmd: list[str], env: dict | None = None) -> str:
        """Run a short command and return its stdout (stderr to the log)."""
        self.log(f"$ {shlex.join(str(c) for c in cmd)}")
        res = subprocess.run(
            [str(c) for c in cmd],
            capture_output=True,
            text=True,
            env=dict(os.environ, **self.env, **(env or {})),
        )
        if res.stderr:
            self.log(res.stderr)
        if res.returncode != 0:
            raise StepError(
                f"{self.label}: {self.stage_name}: {shlex.join(str(c) for c in cmd)} "
                f"exited {res.returncode}: {res.stderr.strip()[-500:]}"
            )
        return res.stdout


def tail(path: Path, lines: int = 25) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, 2)
            fh.seek(max(0, fh.tell() - 16384))
            return "\n".join(fh.read().decode(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
