"""One error base class for everything an operator can be told in one line.

Every failure pvelab expects (a bad lab file, a missing host tool, a failed tool run,
a refused publish, a VM that does not come up) is a :class:`PvelabError` whose text is
the operator-facing message; ``tasks.py`` catches this one class and exits 2.
"""


class PvelabError(Exception):
    """An expected failure; ``str(exc)`` is the message for the operator."""

    exit_code = 2


class DiskFull(PvelabError):
    """A file system filled up: which one, during which stage. Exit 1: the run failed,
    the input was fine; what was there before is untouched (every writer stages and renames)."""

    exit_code = 1


NO_SPACE = "No space left on device"


def is_no_space(exc: BaseException) -> bool:
    import errno

    if isinstance(exc, DiskFull):
        return False
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc) + str(getattr(exc, "stderr", "") or "") + str(getattr(exc, "output", "") or "")
    return NO_SPACE in text or "Disk quota exceeded" in text


def disk_full(exc: BaseException, stage: str, *paths: object) -> DiskFull:
    """The DiskFull for ``exc``: of the file systems ``paths`` (and the file ``exc`` names)
    are on, the one with the least space left is named."""
    import os
    import shutil
    from pathlib import Path

    candidates = [Path(str(p)) for p in (getattr(exc, "filename", None), *paths) if p]
    best = None
    for p in candidates:
        while not p.exists() and p != p.parent:
            p = p.parent
        try:
            free = shutil.disk_usage(p).free
        except OSError:
            continue
        mount = p.resolve()
        while not os.path.ismount(mount) and mount != mount.parent:
            mount = mount.parent
        if best is None or free < best[0]:
            best = (free, mount)
    where = f"{best[1]} ({best[0] // (1 << 20)} MiB free)" if best else "a file system"
    return DiskFull(f"{where} is full: {stage} stopped (no space left on device); nothing was replaced")


class space_guard:
    """``with space_guard("publish", dest):`` a full file system inside becomes one DiskFull line."""

    def __init__(self, stage: str, *paths: object):
        self.stage, self.paths = stage, paths

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, exc: BaseException | None, tb: object) -> None:
        if exc is not None and is_no_space(exc):
            raise disk_full(exc, self.stage, *self.paths) from exc
