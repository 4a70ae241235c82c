"""Scenario assertion types, each defined once: its fields, its command, its verdict.

The lab parser reads an assertion through its type's entry (required fields, their
kinds), and the scenario runner asks the same entry for the shell command to run on
the guest, whether an (exit status, output) pair passes, and a one-line description.
An unknown type is a validation error, never a silent default.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Assertion:
    type: str
    on_vm: str
    port: int | None = None
    command: str | None = None
    expected_output: str | None = None
    url: str | None = None
    expected_status: int = 200

    @property
    def kind(self) -> AssertionType:
        return ASSERTION_TYPES[self.type]

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"type": self.type, "on_vm": self.on_vm}
        d.update({f.name: getattr(self, f.name) for f in self.kind.fields})
        return d


@dataclass(frozen=True)
class Field:
    name: str
    kind: type
    required: bool = True
    default: Any = None


@dataclass(frozen=True)
class AssertionType:
    name: str
    fields: tuple[Field, ...]
    command: Callable[[Assertion], str]
    passes: Callable[[Assertion, int, str], bool]
    describe: Callable[[Assertion], str]
    listening_port: Callable[[Assertion], int | None] = lambda a: None  # the port it proves open

    def port_checked(self, a: Assertion) -> int | None:
        """The port on ``a.on_vm`` a pass of ``a`` proves listening (None: it checks no port)."""
        return self.listening_port(a)


def _port_listening_cmd(a: Assertion) -> str:
    return f"ss -Hltn 'sport = :{int(a.port or 0)}'"


def _http_cmd(a: Assertion) -> str:
    return f"curl -s -o /dev/null -m 10 -w '%{{http_code}}' {shlex.quote(a.url or '')}"


ASSERTION_TYPES: dict[str, AssertionType] = {
    t.name: t
    for t in (
        AssertionType(
            name="port_listening",
            fields=(Field("port", int),),
            command=_port_listening_cmd,
            passes=lambda a, status, out: status == 0 and bool(out.strip()),
            describe=lambda a: f"{a.on_vm}: port {a.port} listening",
            listening_port=lambda a: a.port,
        ),
        AssertionType(
            name="command_output",
            fields=(Field("command", str), Field("expected_output", str)),
            command=lambda a: a.command or "",
            passes=lambda a, status, out: status == 0 and (a.expected_output or "") in out,
            describe=lambda a: f"{a.on_vm}: `{a.command}` -> {a.expected_output}",
        ),
        AssertionType(
            name="http_responds",
            fields=(Field("url", str), Field("expected_status", int, required=False, default=200)),
            command=_http_cmd,
            passes=lambda a, status, out: out.strip().endswith(str(a.expected_status)),
            describe=lambda a: f"{a.on_vm}: {a.url} -> HTTP {a.expected_status}",
        ),
    )
}
