"""Output folders and files written atomically, and never over something we did not make.

- `atomic_output_dir(out, force, replace_ours)`: write into a temporary sibling folder and
  rename it into place at the end; a failure leaves nothing behind; an existing non-empty
  output is refused unless `force`, or unless `replace_ours` and gemmascope-jax created it
  (the `OUTPUT_MARKER` file it writes into every such folder).
- `atomic_output_file(out)`: the same for one file (a temporary sibling file, flushed and
  fsynced, renamed over `out` on success; removed on failure).
- `check_replaceable(out, force, replace_ours)`: the refusal alone, for a verb that checks
  its output before loading anything.
- `read_json(path)` / `write_json(path, value)`: a JSON object file; a missing, unreadable or
  non-object file raises `FormatError`.
- `path_inside(folder, entry, source)`: a relative path read from a file, refused
  (`FormatError`) when it leaves the file's folder.
- `FormatError`: the one error type for a malformed file (`formats.io` names it too).

On the lowest floor (imports nothing of the package): every writer uses it, from the model's
`save_gemma3` to dictionary formats, caches, dashboards and quality cards.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


class FormatError(ValueError):
    """A dictionary file that is malformed or disagrees with its config; names file and tensor."""


def path_inside(folder: str | os.PathLike, entry, source: str | os.PathLike) -> Path:
    """The path `entry`, read from the file `source`, resolved relative to `folder` (the
    folder of `source`); FormatError when it is not a relative path string or when it leaves
    `folder` (an absolute path, `..`, or a symlink pointing out). Paths inside a file never
    reach beyond its folder; a user who means another place passes that path explicitly."""
    folder = Path(folder)
    if not isinstance(entry, str) or not entry or "\x00" in entry:
        raise FormatError(f"{source}: path entry {entry!r} is not a relative path string")
    rel = Path(entry)
    if rel.is_absolute():
        raise FormatError(
            f"{source}: path {entry!r} is absolute; paths in this file must be relative to "
            f"its folder {folder} (pass other files explicitly)"
        )
    resolved, base = (folder / rel).resolve(), folder.resolve()
    if resolved != base and base not in resolved.parents:
        raise FormatError(
            f"{source}: path {entry!r} resolves to {resolved}, outside the folder {folder}; "
            "refused (pass files outside it explicitly)"
        )
    return folder / rel


def read_json(path: str | os.PathLike, error: type[Exception] = FormatError) -> dict:
    """The JSON object in `path`; `error` (a ValueError type: FormatError, or the caller's
    own, e.g. the cache's) naming the file when it is missing, not JSON or not an object."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: file not found")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{path}: invalid JSON ({e})") from None
    if not isinstance(value, dict):
        raise error(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def write_json(path: str | os.PathLike, value: dict) -> None:
    Path(path).write_text(json.dumps(value, indent=2, sort_keys=False) + "\n")


# Written into every folder `atomic_output_dir` creates: "gemmascope-jax made this folder",
# so a later run may replace it (`replace_ours=True`) without deleting anything it did not make.
OUTPUT_MARKER = ".gemmascope-jax-output"


def created_by_us(path: str | os.PathLike) -> bool:
    """Whether the folder `path` was written by `atomic_output_dir` (holds `OUTPUT_MARKER`)."""
    return (Path(path) / OUTPUT_MARKER).is_file()


def check_replaceable(out: str | os.PathLike, *, force: bool = False, replace_ours: bool = False):
    """Raise FileExistsError unless `out` may be replaced: it does not exist, is an empty
    folder, was created by gemmascope-jax and `replace_ours` is set, or `force` is set. Even
    with `force`, the filesystem root, the home folder, the working folder and its parents
    are never replaced."""
    out = Path(out)
    if not (out.exists() or out.is_symlink()):
        return
    resolved = out.resolve()
    cwd = Path.cwd().resolve()
    if out.is_dir() and (
        resolved == Path(resolved.anchor)
        or resolved == Path.home().resolve()
        or resolved == cwd
        or resolved in cwd.parents
    ):
        raise FileExistsError(
            f"{out} ({resolved}) is the filesystem root, the home folder or the working folder "
            "(or one of its parents): refusing to replace it, even with --force; give a new "
            "folder for the output"
        )
    if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
        return
    if force or (replace_ours and out.is_dir() and created_by_us(out)):
        return
    what = "a file" if not out.is_dir() else "not empty"
    mine = "" if out.is_dir() and created_by_us(out) else ", and gemmascope-jax did not create it"
    raise FileExistsError(
        f"{out} already exists ({what}{mine}): refusing to replace it; pass --force "
        "(force=True) to replace it, or choose another output folder"
    )


@contextlib.contextmanager
def atomic_output_dir(
    out: str | os.PathLike, *, force: bool = False, replace_ours: bool = False
) -> Iterator[Path]:
    """Yield a fresh temporary folder next to `out`; on success it replaces `out`.

    An existing `out` that is not an empty folder is refused (FileExistsError, before anything
    is written) unless `force`, or unless `replace_ours` and it holds `OUTPUT_MARKER` (a
    folder an earlier `atomic_output_dir` wrote). The new folder gets the marker.
    """
    out = Path(out)
    check_replaceable(out, force=force, replace_ours=replace_ours)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
        (tmp / OUTPUT_MARKER).write_text('{"created_by": "gemmascope-jax"}\n')
        check_replaceable(out, force=force, replace_ours=replace_ours)  # appeared meanwhile?
        if out.is_symlink() or out.is_file():
            out.unlink()
        elif out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_output_file(out: str | os.PathLike, mode: str = "w") -> Iterator:
    """Yield an open temporary file next to `out` (`mode` "w" or "wb"); on success it is
    flushed, fsynced and renamed over `out`, so readers see the old file or the whole new one."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
