"""Writing files so that nothing is lost and nothing is overwritten by mistake.

Every JSON, JSONL and YAML file and Deep-Thinking state dlngraph writes goes
through `write_atomic`:
a temporary file in the target's directory, flushed and fsynced, renamed over
the target, then the directory fsynced, so a crash (even SIGKILL or a power
cut) leaves the old file or the new one, never half of one. Logs that grow
line by line go through `append_jsonl`, which fsyncs each append.

`check_output` guards a path the user names (`--out`, `-o`): it refuses the
spec and its data files, anything that is not a regular file (a directory,
/dev/full, a pipe: an atomic rename would replace the device node itself) and,
unless `force`, an existing file. A write that fails (full disk, no
permission) is a `RuntimeFailure` naming the path, never a traceback.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from dlngraph.errors import RuntimeFailure
from dlngraph.yamlsource import file_kind


class OutputRefused(RuntimeFailure):
    """An output path that must not be written: a usage error (exit 2)."""

    exit_code = 2


def check_output(path: str | Path, *, protected: Mapping[str, str | Path] | None = None, force: bool = False) -> Path:
    """`path` if writing it is safe, else `OutputRefused`.

    `protected` maps a description ("the spec", "data file dev") to a file the
    output must never replace, with or without `force`: the same file through
    another name (a symlink, a hard link, `./x` for `x`) counts too.
    """
    path = Path(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        return path
    except OSError as exc:
        raise OutputRefused(f"cannot write {path}: {exc.strerror}", hint="choose another output path") from None
    for what, other in sorted((protected or {}).items()):
        try:
            same = os.path.samefile(path, other)
        except OSError:
            same = False
        if same:
            raise OutputRefused(
                f"refusing to write {path}: it is {what} ({other})",
                hint="write the output to another path; --force never replaces an input",
            )
    if not stat.S_ISREG(info.st_mode):
        raise OutputRefused(
            f"refusing to write {path}: it is {file_kind(info.st_mode)}",
            hint="name a regular file to write (an atomic write would replace the node itself)",
        )
    if not force:
        raise OutputRefused(f"{path} already exists", hint="pass --force to replace it, or choose another path")
    return path


def _mode(path: Path) -> int:
    """The mode a new file gets: the replaced file's, else 0666 less the umask."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot sync a directory; the rename is still atomic
        pass
    finally:
        os.close(fd)


def write_atomic(path: str | Path, content: str | bytes) -> Path:
    """Write `content` (text as UTF-8) to `path` (parents created) so that a crash leaves the old
    file or the new one."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise RuntimeFailure(f"cannot write {path}: {exc.strerror}", hint="check the directory exists and is writable") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content.encode("utf-8") if isinstance(content, str) else content)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _mode(path))
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise RuntimeFailure(
                f"cannot write {path}: {exc.strerror or exc}",
                hint="free disk space or pick a writable location; the previous file, if any, is unchanged",
            ) from None
        raise
    _fsync_directory(path.parent)
    return path


def jsonl_text(rows: Iterable[Mapping[str, Any]]) -> str:
    """One JSON object per line, keys sorted, non-ASCII kept."""
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)


def write_jsonl(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> Path:
    return write_atomic(path, jsonl_text(rows))


def write_yaml(path: str | Path, data: Mapping[str, Any], *, sort_keys: bool = True) -> Path:
    return write_atomic(path, yaml.safe_dump(dict(data), sort_keys=sort_keys, allow_unicode=True, width=100))


def append_jsonl(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> None:
    """Append lines to a log and fsync them; a crash can tear only the last line."""
    text = jsonl_text(rows)
    if not text:
        return
    path = Path(path)
    try:
        with path.open("a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        raise RuntimeFailure(f"cannot append to {path}: {exc.strerror}", hint="free disk space, then resume the run") from None


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Every complete line of a JSONL log dlngraph wrote ([] for a missing file); a torn
    last line (a crash mid-append) is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows
