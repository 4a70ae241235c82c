"""The release page (``index.html``): one static file, no scripts, styles inline, the
topology drawn inline and coloured by the boot tests and rehearsal of the release."""

from __future__ import annotations

import jinja2

from pvelab.core.paths import ROOT
from pvelab.model.lab import Lab
from pvelab.release.diagram import Checks, topology_svg


def template_env(html: bool) -> jinja2.Environment:
    """The release documents' templates (``pvelab/templates``); ``html`` escapes values."""
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(ROOT / "pvelab" / "templates")),
        undefined=jinja2.StrictUndefined,
        autoescape=html,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def release_page(lab: Lab, manifest: dict, changes_record: dict, checks: Checks) -> str:
    env = template_env(html=True)
    boot_ok = sum(1 for b in manifest["boot_tests"].values() if b["passed"])
    rehearsal_ok = all(r["passed"] for r in manifest["rehearsals"].values())
    if changes_record.get("first_release"):
        change_line = "first release"
    else:
        changed = changes_record["packages"]
        security = [p for p in changed if p["security"]]
        change_line = (
            f"{len(changed)} package change(s)"
            + (f", {len(security)} security" if security else "")
            + f", {len(changes_record['rendered_files'])} rendered file(s)"
        )
    return env.get_template("release-index.html.j2").render(
        m=manifest,
        c=changes_record,
        svg=topology_svg(lab, checks),
        boot_ok=boot_ok,
        rehearsal_ok=rehearsal_ok,
        change_line=change_line,
    )
