"""Same inputs, same bytes: the one clock and the identifiers a node build uses.

Everything time- or randomness-dependent in a node's artefacts comes from here:

* one timestamp, ``SOURCE_DATE_EPOCH`` (the caller's, or the newest date of the archive
  suites the base was built from), for file times in the squashfs layers, the ext4 root
  (debugfs/resize2fs via ``E2FSPROGS_FAKE_TIME``, e2fsck via ``E2FSCK_TIME``), the FAT images (mtools honours
  ``SOURCE_DATE_EPOCH``) and the ISO's volume and directory dates (pycdlib, see
  :func:`fixed_clock`);
* identifiers (GPT GUIDs, the MBR id, FAT volume ids) derived from the lab and node names,
  so two nodes differ and two builds of one node do not.
"""

from __future__ import annotations

import hashlib
import os
import time
import types
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from email.utils import parsedate_to_datetime

NAMESPACE = uuid.UUID("6f1c1a52-8f1e-4d4c-9d62-7076656c6162")  # pvelab's uuid5 namespace


def source_date_epoch(archive_state: dict[str, dict]) -> int:
    """``SOURCE_DATE_EPOCH`` if set, else the newest Date of the base's archive suites."""
    if os.environ.get("SOURCE_DATE_EPOCH", "").isdigit():
        return int(os.environ["SOURCE_DATE_EPOCH"])
    dates = []
    for state in archive_state.values():
        try:
            dates.append(int(parsedate_to_datetime(state.get("date", "")).timestamp()))
        except (TypeError, ValueError):
            continue
    return max(dates, default=0)


def tool_env(epoch: int) -> dict[str, str]:
    """The environment that makes the build's tools use ``epoch`` instead of the clock."""
    # E2FSCK_TIME: e2fsck reads its own variable for the check time it records
    return {"SOURCE_DATE_EPOCH": str(epoch), "E2FSPROGS_FAKE_TIME": str(epoch), "E2FSCK_TIME": str(epoch)}


def derived_uuid(*parts: str) -> uuid.UUID:
    return uuid.uuid5(NAMESPACE, "/".join(parts))


def derived_u32(*parts: str) -> int:
    return int.from_bytes(hashlib.sha256("/".join(parts).encode()).digest()[:4], "little")


@contextmanager
def fixed_clock(epoch: int, *modules: types.ModuleType) -> Iterator[None]:
    """Let ``modules`` (pycdlib's, which read ``time.time()``/``time.localtime()`` for
    every date they write and offer no parameter for it) see ``epoch`` as now, in UTC."""
    clock = types.SimpleNamespace(
        time=lambda: float(epoch),
        localtime=lambda secs=None: time.gmtime(epoch if secs is None else secs),
        gmtime=time.gmtime,
        strftime=time.strftime,
        mktime=time.mktime,
        timezone=0,
        altzone=0,
        daylight=0,
    )
    saved = [(m, m.time) for m in modules if hasattr(m, "time")]
    try:
        for m, _ in saved:
            m.time = clock  # type: ignore[attr-defined]
        yield
    finally:
        for m, orig in saved:
            m.time = orig  # type: ignore[attr-defined]
