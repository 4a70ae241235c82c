"""`invoke nightly`: build, boot-test every medium, rehearse, publish; any failure publishes nothing.

* **Fresh**: the build re-reads the Debian archive's state; the base is rebuilt exactly
  when Debian published something (:mod:`pvelab.build.archive_state`).
* **Only what changed**: node builds are reproducible, so when the artefacts come out
  byte for byte as the latest release's, the nightly stops there, publishes nothing and
  says so (exit 0); ``force`` goes on. A boot test or rehearsal that already passed on
  exactly these bytes is not run again (the publish gate counts it).
* **Loud and harmless on failure**: the previous release stays and ``latest`` does not
  move (publishing is the last step); ``status.json`` beside the releases says what
  failed and where its logs are, and the ``on_failure`` command runs with that file's
  path in ``PVELAB_STATUS``.

The installer ISOs are boot-tested by installing (``--media install``): a release carries
them only when that install test passed on exactly their bytes.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pvelab.build.pipeline import build, git_commit
from pvelab.checks.boottest import boot_test
from pvelab.checks.rehearse import rehearse
from pvelab.core.errors import PvelabError
from pvelab.core.locks import locking
from pvelab.core.logger import Progress
from pvelab.model.artefacts import (
    REPORT,
    BootReport,
    RecordError,
    RehearsalReport,
    ReleasesDir,
    write_atomic,
)
from pvelab.model.lab import Lab
from pvelab.model.media import NIGHTLY_BOOT_TESTS, REHEARSAL_MEDIUM
from pvelab.release.evidence import Report, passed_on, unchanged_since
from pvelab.release.publish import Release, destination, publish

# the (medium, firmware) matrix and the rehearsal's medium: pvelab.model.media.NIGHTLY_BOOT_TESTS
BOOT_TESTS = tuple((m.name, fw.name) for m, fw in NIGHTLY_BOOT_TESTS)
REHEARSAL_MEDIA = REHEARSAL_MEDIUM.name
HOOK_TIMEOUT = 300


class NightlyFailed(PvelabError):
    exit_code = 1


@dataclass
class Status:
    """``DEST/<lab>/status.json``: what the last nightly did."""

    lab: str
    result: str = "running"  # running | published | unchanged | failed
    stage: str = ""  # the stage running, or where it failed
    error: str = ""
    logs: list[str] = field(default_factory=list)
    release: str = ""  # published or unchanged: that release's folder name
    latest: str = ""  # what `latest` names after this run
    skipped: list[str] = field(default_factory=list)  # tests that had passed on these exact bytes
    started: str = ""
    finished: str = ""
    git_commit: str = ""

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(asdict(self), indent=2) + "\n")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _logs(lab: Lab, stage: str) -> list[str]:
    """Where a stage's full output is."""
    layout = lab.layout
    if stage == "build":
        return [str(layout.base_log)] + [str(layout.build_log(n.name)) for n in lab.nodes]
    if stage.startswith("boot-test "):
        media, firmware = stage.split()[1].split("/")
        return [str(layout.boot_test_dir(media, firmware))]
    if stage.startswith("rehearsal"):
        return [str(layout.rehearsal_dir(REHEARSAL_MEDIA))]
    return []


def _already_passed(lab: Lab, report_path: Path, record: type[Report], media: str) -> bool:
    """The boot test / rehearsal report there passed on exactly the built bytes (evidence.passed_on)."""
    try:
        report = record.from_json(report_path)
    except RecordError:
        return False
    return report.media == media and passed_on(lab, report)


def run_hook(command: str, status_path: Path, status: Status, say: Progress) -> None:
    """The ``--on-failure`` command, through the shell, with the status in its environment."""
    env = dict(
        os.environ,
        PVELAB_STATUS=str(status_path),
        PVELAB_LAB=status.lab,
        PVELAB_FAILED_STAGE=status.stage,
        PVELAB_ERROR=status.error,
    )
    try:
        res = subprocess.run(["sh", "-c", command], env=env, timeout=HOOK_TIMEOUT)
        if res.returncode != 0:
            say(f"--on-failure command exited {res.returncode}")
    except subprocess.TimeoutExpired:
        say(f"--on-failure command still running after {HOOK_TIMEOUT}s; left alone")


# Long on purpose: the nightly's stages, each recorded in status.json before it runs.
@locking("nightly")
def nightly(
    lab: Lab,
    dest: str | Path | None,
    keep: int | None,
    accel: str,
    gpg_key: str | None,
    force: bool = False,
    on_failure: str | None = None,
) -> Release | None:
    """Run the nightly; returns the release published (or the unchanged latest one)."""
    labdir = destination(lab, dest)
    status_path = ReleasesDir(labdir).status
    status = Status(lab.name, started=_now(), git_commit=git_commit())
    say = Progress("nightly")

    def stage(name: str) -> None:
        status.stage = name
        status.write(status_path)
        say(name)

    try:
        stage("build")
        build(lab, verify=True)  # every cached file hashed: damage below the file system too
        same = None if force else unchanged_since(lab, labdir)
        if same is not None:
            status.result, status.release, status.latest = "unchanged", same.name, same.name
            return Release(same, same.name, [], new=False)
        layout = lab.layout
        for media, firmware in BOOT_TESTS:
            report = layout.boot_test_dir(media, firmware) / REPORT
            if _already_passed(lab, report, BootReport, media):
                status.skipped.append(f"boot-test {media}/{firmware}")
                say(f"boot test {media}/{firmware} already passed on these bytes")
                continue
            stage(f"boot-test {media}/{firmware}")
            if not boot_test(lab, media=media, firmware=firmware, accel=accel).passed:
                raise NightlyFailed(f"boot test {media}/{firmware} FAILED")
        report = layout.rehearsal_dir(REHEARSAL_MEDIA) / REPORT
        if _already_passed(lab, report, RehearsalReport, REHEARSAL_MEDIA):
            status.skipped.append(f"rehearsal {REHEARSAL_MEDIA}")
            say(f"rehearsal {REHEARSAL_MEDIA} already passed on these bytes")
        else:
            stage(f"rehearsal {REHEARSAL_MEDIA}")
            if not rehearse(lab, media=REHEARSAL_MEDIA, accel=accel).passed:
                raise NightlyFailed("rehearsal FAILED")
        stage("publish")
        rel = publish(lab, dest, keep=keep, gpg_key=gpg_key, force=force)
        status.result = "published" if rel.new else "unchanged"
        status.release = status.latest = rel.name
        return rel
    except BaseException as exc:
        status.result = "failed"
        status.error = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        status.logs = _logs(lab, status.stage)
        try:
            latest = ReleasesDir(labdir).latest_file.read_text().strip()
        except OSError:
            latest = ""
        status.latest = latest
        status.finished = _now()
        status.write(status_path)
        say(
            f"FAILED at {status.stage}: {status.error}; nothing published"
            + (f"; latest is still {latest}" if latest else "")
            + f"; status: {status_path}"
        )
        if on_failure:
            run_hook(on_failure, status_path, status, say)
        raise
    finally:
        if status.result != "failed":
            status.finished = _now()
            status.write(status_path)
