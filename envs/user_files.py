"""Every file a user hands the project is read through here: data sets, game files, metrics, checkpoints' manifests
and state, saved configs, evaluation and grid results, model configs.

What a reader gets, or a `UserFileError` (a `ValueError`) whose message names the file, the line where there is one,
and the fix:
  - regular files only: a folder, FIFO, socket or device (a symlink to `/dev/zero` included) is refused before a
    byte is read; the file is opened non-blocking and checked again on the open descriptor (`fstat`), so a FIFO
    swapped in between never blocks the reader;
  - a size cap per kind of file (`max_bytes`; the message says how to raise it: `$OPD_AGENTS_MAX_FILE_MIB`);
  - UTF-8 decoding errors and JSON syntax errors with the file, line and column; `NaN` / `Infinity` are refused (JSON
    has no such values); nesting deeper than `MAX_DEPTH` is refused, and so is an integer too long to convert;
  - shape and type validation of what was parsed against a pydantic model (`validate`), the first problems named
    with their place in the file (e.g. `record 3: answer: ...`).
JSON Lines are read line by line (`iter_jsonl`), so a file is never held in memory twice.

Lives under envs/ because environments import nothing of the framework; it imports only the standard library and
pydantic, so the framework's ground floor (config loading) reads through it too (`tests/test_import_graph.py` counts
it as ground floor).
"""
from __future__ import annotations

import io
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

MAX_DEPTH = 64
MIB = 1 << 20
MAX_LINE_BYTES = 16 * MIB
LIMIT_ENV = "OPD_AGENTS_MAX_FILE_MIB"
_SHOWN_ERRORS = 3

M = TypeVar("M", bound=BaseModel)


class UserFileError(ValueError):
    """A user's file cannot be used; the message names the file and the fix."""


def size_limit(default: int) -> int:
    """`default` bytes, or `$OPD_AGENTS_MAX_FILE_MIB` MiB when that is set (it raises every cap alike)."""
    raw = os.environ.get(LIMIT_ENV)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise UserFileError(f"${LIMIT_ENV}={raw!r} must be a whole number of MiB >= 1")
    return value * MIB


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def check_regular(path: str | os.PathLike[str], what: str = "file") -> Path:
    """`path` (with `~` expanded) if it is a regular file (symlinks followed); else a UserFileError naming it."""
    path = Path(path).expanduser()
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise UserFileError(f"{what} {str(path)!r} does not exist") from None
    except OSError as exc:
        raise UserFileError(f"{what} {str(path)!r} cannot be read: {exc.strerror}") from None
    if not stat.S_ISREG(mode):
        raise UserFileError(f"{what} {str(path)!r} is {_kind(mode)}, not a regular file; give a regular file")
    return path


def _too_big(path: Path, what: str, size: int, max_bytes: int) -> UserFileError:
    return UserFileError(f"{what} {str(path)!r} is {size / MIB:,.1f} MiB, over the {max_bytes / MIB:,.1f} MiB limit "
                         f"for this kind of file; split it, or raise every limit with ${LIMIT_ENV}=<MiB>")


def open_regular(path: str | os.PathLike[str], max_bytes: int, what: str = "file") -> io.BufferedReader:
    """An open binary handle on `path`, checked on the descriptor itself: regular, at most `max_bytes` bytes."""
    path = check_regular(path, what)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise UserFileError(f"{what} {str(path)!r} cannot be opened: {exc.strerror}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_size > max_bytes:
        os.close(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UserFileError(f"{what} {str(path)!r} is {_kind(info.st_mode)}, not a regular file")
        raise _too_big(path, what, info.st_size, max_bytes)
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_bytes(path: str | os.PathLike[str], max_bytes: int, what: str = "file") -> bytes:
    """The bytes of a regular file of at most `max_bytes` (a file growing past the cap while read is refused too)."""
    with open_regular(path, max_bytes, what) as handle:
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise _too_big(Path(path), what, len(data), max_bytes)
    return data


def _line_of(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def decode(data: bytes, path: str | os.PathLike[str], what: str = "file", line: int | None = None) -> str:
    """`data` as UTF-8; an undecodable byte is an error naming the file and its line."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        where = line if line is not None else _line_of(data, exc.start)
        raise UserFileError(f"{what} {str(path)!r}: line {where} is not UTF-8 text (byte {data[exc.start]:#04x}); "
                            "save it as UTF-8") from None


def read_text(path: str | os.PathLike[str], max_bytes: int, what: str = "file") -> str:
    """The text of a regular UTF-8 file of at most `max_bytes` (a leading byte-order mark is dropped)."""
    return decode(read_bytes(path, max_bytes, what), path, what).removeprefix("\ufeff")


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value (write null, or a number)")


def check_depth(value: Any, max_depth: int = MAX_DEPTH) -> None:
    """ValueError when lists/objects nest deeper than `max_depth` (walked iteratively)."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            if depth > max_depth:
                raise ValueError(f"the JSON nests deeper than {max_depth} levels")
            children = node.values() if isinstance(node, dict) else node
            stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))


def parse_json(text: str, path: str | os.PathLike[str], what: str = "file", line: int | None = None,
               max_depth: int = MAX_DEPTH, allow_nan: bool = False) -> Any:
    """One JSON value from `text` (the whole file, or line `line` of a JSON Lines file); errors name the place.
    `allow_nan` lets Python's own `NaN` / `Infinity` through (files this project wrote with `json.dumps`)."""
    try:
        value = json.loads(text, parse_constant=None if allow_nan else _no_constant)
        check_depth(value, max_depth)
        return value
    except json.JSONDecodeError as exc:
        number = line if line is not None else exc.lineno
        raise UserFileError(f"{what} {str(path)!r}: line {number} is not valid JSON ({exc.msg} at column "
                            f"{exc.colno})") from None
    except RecursionError:
        problem = f"the JSON nests deeper than {max_depth} levels"
    except ValueError as exc:  # NaN/Infinity, depth, or an integer of more digits than Python converts
        problem = str(exc).split(";")[0]
    at = f" line {line}:" if line is not None else ""
    raise UserFileError(f"{what} {str(path)!r}:{at} {problem}") from None


def load_json(path: str | os.PathLike[str], max_bytes: int, what: str = "file", max_depth: int = MAX_DEPTH,
              allow_nan: bool = False) -> Any:
    """The JSON value in a regular file of at most `max_bytes` (`allow_nan`: see `parse_json`)."""
    return parse_json(read_text(path, max_bytes, what), path, what, max_depth=max_depth, allow_nan=allow_nan)


def iter_lines(path: str | os.PathLike[str], max_bytes: int, what: str = "file",
               max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[int, bytes]]:
    """(line number, raw line without its newline) of a regular file of at most `max_bytes`, read line by line; a
    line over `max_line_bytes` is an error naming it."""
    with open_regular(path, max_bytes, what) as handle:
        number, total = 0, 0
        while raw := handle.readline(max_line_bytes + 1):
            number += 1
            total += len(raw)
            if total > max_bytes:
                raise _too_big(Path(path), what, total, max_bytes)
            if len(raw) > max_line_bytes:
                raise UserFileError(f"{what} {str(path)!r}: line {number} is longer than {max_line_bytes / MIB:g} MiB; "
                                    "is it the right file?")
            yield number, raw.rstrip(b"\r\n")


def iter_jsonl(path: str | os.PathLike[str], max_bytes: int, what: str = "file",
               strict: bool = True) -> Iterator[tuple[int, Any]]:
    """(line number, value) per non-blank line of a JSON Lines file. `strict`: a bad line is a UserFileError;
    otherwise it is yielded as (number, UserFileError) for the caller to skip or report."""
    for number, raw in iter_lines(path, max_bytes, what):
        if not raw.strip():
            continue
        try:
            value: Any = parse_json(decode(raw, path, what, number), path, what, number)
        except UserFileError as exc:
            if strict:
                raise
            value = exc
        yield number, value


def _place(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc) or "the top level"


def validate(model: type[M], data: Any, path: str | os.PathLike[str], what: str = "file", where: str = "") -> M:
    """`data` (parsed from `path`) as a `model`; the first problems named with their place (`where`: e.g.
    `record 3`), bounded in length."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        problems = [f"{_place(e['loc'])}: {e['msg']}" for e in err.errors()[:_SHOWN_ERRORS]]
        more = f" (and {err.error_count() - _SHOWN_ERRORS} more)" if err.error_count() > _SHOWN_ERRORS else ""
        at = f": {where}" if where else ""
        text = "; ".join(p if len(p) <= 200 else p[:200] + "..." for p in problems)
        raise UserFileError(f"{what} {str(path)!r}{at} has the wrong shape: {text}{more}") from None

