"""The one way lmkit writes files: to a temporary name beside the target, then a rename.

A crash (or kill -9) mid-write leaves the previous file, or no file, never half of one. A write that fails
(disk full, read-only folder) ends in a UserError naming the path, and the temporary file is removed.

Fault-injection hook, for benchmarks/faults.py and tests/test_faults.py only: with `LMKIT_SLOW_WRITES=SECONDS` in
the environment, `atomic_write` sleeps that long after the temporary file is written and before the rename, so a
kill -9 can be aimed inside a write. It is read at each call; unset (the default) or 0, nothing waits.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable

from toolkit.errors import UserError

_REASONS = {errno.ENOSPC: "the disk is full", errno.EACCES: "permission denied", errno.EROFS: "read-only file system",
            errno.EDQUOT: "disk quota exceeded"}


def write_error(path: Path, e: OSError) -> UserError:
    reason = _REASONS.get(e.errno, e.strerror or str(e))
    return UserError(f"cannot write {path}: {reason}")


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> None:
    """`write(tmp)` writes the whole file at `tmp`; it then replaces `path` in one rename."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        _slow_write_hook()
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise write_error(path, e) from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _slow_write_hook() -> None:
    """The fault-injection pause (see the module docstring): `LMKIT_SLOW_WRITES` seconds, read now."""
    delay = os.environ.get("LMKIT_SLOW_WRITES")
    if delay:
        time.sleep(float(delay))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def build_atomically(out_dir: str | Path, build: Callable[[Path], object]):
    """`build(tmp_dir)` fills a fresh `<out_dir>.partial`; on success it replaces `out_dir` (an existing one is
    removed only then), on failure it is removed. Returns what `build` returned."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        result = build(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(out_dir, e) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result
