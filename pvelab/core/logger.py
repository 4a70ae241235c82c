"""One logger for every report a run makes (after the NixOS test driver's ``logger.py``).

:class:`Progress` is the one progress sink: every long run (a build's stages, a boot
test, a rehearsal, ``invoke up``) says what it is doing through it, as
``[label 12.3s] message`` on stderr, timed from the start of the run, and, given a log
file, as ``== message`` there among the tools' full output.

:func:`junit` is the one JUnit writer: the scenario runner and the rehearsal hand it
their results as :class:`Case` values; the XML's shape is decided here only.
"""

from __future__ import annotations

import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path


class Progress:
    """``[label 12.3s] message`` lines on stderr (and ``== message`` in the log, if any)."""

    def __init__(self, label: str, log_path: Path | None = None):
        self.label, self.log_path, self.t0 = label, log_path, time.monotonic()
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def __call__(self, msg: str) -> None:
        print(f"[{self.label} {self.elapsed():6.1f}s] {msg}", file=sys.stderr, flush=True)
        if self.log_path is not None:
            self.log(f"== {msg}")

    def log(self, text: str) -> None:
        """A line for the log file only (a command, a tool's stderr)."""
        if self.log_path is not None:
            with open(self.log_path, "a") as fh:
                fh.write(text.rstrip("\n") + "\n")


@dataclass(frozen=True)
class Case:
    """One JUnit test case: passed unless it has a failure or an error message."""

    classname: str
    name: str
    seconds: float = 0.0
    output: str | None = None  # system-out
    failure: str | None = None  # the failure's message
    failure_text: str | None = None  # and its body
    error: str | None = None


def junit(suite: str, cases: list[Case], seconds: float) -> str:
    """A ``<testsuite>`` of ``cases``, counts and times filled in."""
    root = ET.Element(
        "testsuite",
        name=suite,
        tests=str(len(cases)),
        failures=str(sum(c.failure is not None for c in cases)),
        errors=str(sum(c.error is not None for c in cases)),
        time=f"{seconds:.2f}",
    )
    for c in cases:
        case = ET.SubElement(root, "testcase", classname=c.classname, name=c.name, time=f"{c.seconds:.2f}")
        if c.output is not None:
            ET.SubElement(case, "system-out").text = c.output
        if c.failure is not None:
            ET.SubElement(case, "failure", message=c.failure).text = c.failure_text
        if c.error is not None:
            ET.SubElement(case, "error", message=c.error)
    return ET.tostring(root, encoding="unicode", xml_declaration=True)
