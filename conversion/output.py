"""The output folder of a conversion: a user's files are never lost, and what a run leaves behind is cleaned up.

- Refused before anything is written: an output that is a symbolic link, that is or contains the current directory,
  that is, contains or lies inside an input of the conversion (the base, a source, an encoder, a projector; real paths
  compared), that exists without `force`, or that exists and is not a composite (with `force`: a composite is only
  ever replaced by a composite, never an arbitrary folder).
- One run per output at a time: `OutputRun` holds an exclusive lock on `.<name>.lock` beside the output for the
  whole run; a second run on the same output is refused at once, naming the first one's process.
- Every temporary folder beside the output (`.<name>.partial-*` where the composite is written, `.<name>.old-*` where
  `force` moves the previous output, `.<name>.verify-*` and `.<name>.search-*` scratch space) is recorded in the
  lock file *before* it is created. A run killed at any point (kill -9 included) leaves that record behind; the next
  run of the same output reads it, puts back a previous output that an interrupted replacement had moved aside (so the
  old and the new output are never both lost), and removes the folders the record names: only those, never a folder
  the record does not name.
"""

import contextlib
import errno
import json
import logging
import os
import re
import secrets
import shutil
import signal
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import ConversionError


logger = logging.getLogger(__name__)

# Roles of the temporary folders a run keeps beside its output.
_ROLES = ("partial", "old", "verify", "search")
COMPOSITE_MODEL_TYPE = "composite_mllm"

# Test hook, off unless set: `COMPOSITE_CONVERT_TEST_HOLD=<stage>:<flag file>` makes a run create the flag file when
# it reaches `<stage>` (one of HOLD_STAGES) and wait there until the file is deleted (then it goes on) or the run is
# killed, so that the tests can kill -9 a real run at an exact point, or change its files there. Nothing else reads it.
TEST_HOLD_VARIABLE = "COMPOSITE_CONVERT_TEST_HOLD"
HOLD_STAGES = ("locked", "shard-written", "written", "verifying", "replacing", "replaced")


def hold_for_test(stage: str) -> None:
    """The test hook above: a no-op unless `COMPOSITE_CONVERT_TEST_HOLD` names `stage`."""
    setting = os.environ.get(TEST_HOLD_VARIABLE)
    if not setting:
        return
    wanted, _, flag = setting.partition(":")
    if wanted != stage:
        return
    Path(flag).touch()
    while Path(flag).exists():
        time.sleep(0.05)


def output_path(output_dir: str | os.PathLike) -> Path:
    """The output as an absolute path (`.` and `..` folded, the last component not followed if it is a link),
    refusing paths that can never be a composite folder."""
    raw = os.fspath(output_dir)
    if not raw:
        raise ConversionError("The output folder is empty; give the path of the composite folder to create.")
    output = Path(os.path.abspath(os.path.expanduser(raw)))
    if output.parent == output:
        raise ConversionError(f"The output {raw!r} is the root of the file system; give a folder to create.")
    if output.is_symlink():
        target = os.readlink(output)
        state = "a dangling symbolic link" if not output.exists() else "a symbolic link"
        raise ConversionError(
            f"The output {raw!r} is {state} (to {target!r}); give the real folder path, or remove the link."
        )
    cwd = Path(os.path.realpath(os.getcwd()))
    real = Path(os.path.realpath(output))
    if real == cwd or real in cwd.parents:
        raise ConversionError(
            f"The output {raw!r} is {'the current directory' if real == cwd else 'a parent of the current directory'}"
            "; give a new folder for the composite (e.g. ./my-composite)."
        )
    return output


def is_composite_folder(folder: Path) -> bool:
    """A folder that a conversion or the trainer wrote: its config.json is a composite's."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(config, dict) and config.get("model_type") == COMPOSITE_MODEL_TYPE


def check_replaceable(output: Path, force: bool) -> None:
    """Refuse an existing output without `force`; with it, refuse anything but a composite or an empty folder."""
    if not os.path.lexists(output):
        return
    if not output.is_dir():
        raise ConversionError(
            f"The output {str(output)!r} exists and is not a folder; remove it or pick another path."
        )
    if not force:
        raise ConversionError(f"The output {str(output)!r} already exists; pass --force to replace it.")
    if any(output.iterdir()) and not is_composite_folder(output):
        raise ConversionError(
            f"The output {str(output)!r} exists and is not a composite (no config.json with model_type "
            f"{COMPOSITE_MODEL_TYPE!r}); --force only replaces a composite. Remove the folder yourself or pick "
            "another path."
        )


def refuse_overlap(output: Path, inputs: Iterable[tuple[Path, str]]) -> None:
    """Refuse an output that is, contains or lies inside one of `inputs` ((path, what) pairs), by real paths."""
    target = Path(os.path.realpath(output))
    for path, what in inputs:
        real = Path(os.path.realpath(path))
        if target == real:
            relation = "is"
        elif real in target.parents:
            relation = "lies inside"
        elif target in real.parents:
            relation = "contains"
        else:
            continue
        where = "" if str(real) in what else f" (at {real})"
        raise ConversionError(
            f"The output {str(output)!r} {relation} {what}{where}; writing there could destroy the inputs. Pick an "
            "output folder outside every input."
        )


class _Terminated(BaseException):
    """SIGTERM, turned into an exception so that a terminated run cleans up as on Ctrl-C."""


def _raise_terminated(signum, frame):
    raise _Terminated()


class OutputRun:
    """The lock and the record of temporary folders for one run of one output (a context manager; see the module
    docstring). On entry it waits for nothing: another run holding the lock is an error."""

    def __init__(self, output: Path):
        self.output = output
        self.parent = output.parent
        self.lock_path = self.parent / f".{output.name}.lock"
        self._fd: int | None = None
        self._created_parents: list[Path] = []
        self._previous_handler = None

    # The lock ---------------------------------------------------------------------------------------------------

    def __enter__(self) -> "OutputRun":
        self._make_parents()
        try:
            self._acquire()
            if threading.current_thread() is threading.main_thread():
                self._previous_handler = signal.signal(signal.SIGTERM, _raise_terminated)
            self._recover(self._previous_entries())
            os.ftruncate(self._fd, 0)
            self.record({"pid": os.getpid()})
            hold_for_test("locked")
        except BaseException as error:
            self._release(failed=True)
            if isinstance(error, _Terminated):
                raise KeyboardInterrupt("terminated") from None
            raise
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self._release(failed=kind is not None)
        if kind is _Terminated:
            raise KeyboardInterrupt("terminated") from None

    def _release(self, failed: bool) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._previous_handler = None
        if self._fd is not None:
            # Unlinked while still locked: a run that opened the same file meanwhile sees that its file is gone.
            with contextlib.suppress(OSError):
                os.unlink(self.lock_path)
            os.close(self._fd)
            self._fd = None
        if failed:
            for folder in reversed(self._created_parents):
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only if still empty

    def _make_parents(self) -> None:
        missing = [folder for folder in [self.parent, *self.parent.parents] if not folder.exists()]
        try:
            for folder in reversed(missing):
                folder.mkdir()
                self._created_parents.append(folder)
        except OSError as error:
            raise ConversionError(
                f"Cannot create the output's parent folder {str(self.parent)!r} ({error.strerror}); pick a writable "
                "place."
            ) from error

    def _acquire(self) -> None:
        while True:
            try:
                fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as error:
                raise ConversionError(
                    f"Cannot write beside the output in {str(self.parent)!r} ({error.strerror}); pick a writable "
                    "place."
                ) from error
            try:
                _lock(fd)
            except BlockingIOError:
                holder = _pid_in(self.lock_path)
                os.close(fd)
                raise ConversionError(
                    f"The output {str(self.output)!r} is being written by another conversion"
                    f"{f' (process {holder})' if holder else ''}; wait for it to finish or pick another output."
                ) from None
            # The previous holder may have unlinked the file between our open and our lock: lock the file on disk.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.lock_path))
            except FileNotFoundError:
                same = False
            if same:
                self._fd = fd
                return
            os.close(fd)

    def _previous_entries(self) -> list[dict]:
        with open(self.lock_path, encoding="utf-8", errors="replace") as handle:
            lines = handle.read().splitlines()
        entries = []
        for line in lines:
            with contextlib.suppress(json.JSONDecodeError):
                entry = json.loads(line)
                if isinstance(entry, dict):
                    entries.append(entry)
        return entries

    def record(self, entry: dict) -> None:
        """Append `entry` to the record in the lock file (written before the step it announces)."""
        os.write(self._fd, (json.dumps(entry) + "\n").encode())

    # Temporary folders ----------------------------------------------------------------------------------------

    def reserve(self, role: str) -> Path:
        """A new name beside the output for a temporary folder of `role`, recorded before anything is created."""
        assert role in _ROLES
        while True:
            path = self.parent / f".{self.output.name}.{role}-{os.getpid()}-{secrets.token_hex(4)}"
            if not os.path.lexists(path):
                self.record({"folder": path.name, "role": role})
                return path

    def new_folder(self, role: str) -> Path:
        """A new, recorded, empty temporary folder beside the output (permissions as the umask gives)."""
        path = self.reserve(role)
        try:
            path.mkdir()
        except OSError as error:
            raise ConversionError(
                f"Cannot write beside the output in {str(self.parent)!r} ({error.strerror}); pick a writable place."
            ) from error
        return path

    def _is_ours(self, name: object) -> bool:
        pattern = rf"\.{re.escape(self.output.name)}\.({'|'.join(_ROLES)})-[0-9]+-[0-9a-f]+"
        return isinstance(name, str) and re.fullmatch(pattern, name) is not None

    def _recover(self, entries: list[dict]) -> None:
        """Undo what an earlier, killed run of this output left: see the module docstring."""
        replaced = {entry.get("old") for entry in entries if entry.get("event") == "replaced"}
        for entry in entries:
            name, role = entry.get("folder"), entry.get("role")
            if not self._is_ours(name) or not os.path.lexists(self.parent / name):
                continue
            path = self.parent / name
            if role == "old" and name not in replaced:
                # The run was killed while replacing the output: the previous output is here, complete.
                if os.path.lexists(self.output):
                    raise ConversionError(
                        f"An earlier run of {str(self.output)!r} was interrupted while replacing it, and the previous "
                        f"output it had moved aside to {str(path)!r} is still there; keep one of the two (move or "
                        "delete that folder) and run again."
                    )
                os.replace(path, self.output)
                logger.warning(
                    "an earlier run of %s was interrupted while replacing it: the previous output is back in place",
                    self.output,
                )
                continue
            shutil.rmtree(path, ignore_errors=True)
            logger.info("removed %s, left by an earlier run that was interrupted", path.name)

    @contextlib.contextmanager
    def staged(self, force: bool) -> Iterator[Path]:
        """A temporary folder beside the output that replaces it when the block succeeds (see `_move_into_place`); on
        any error, Ctrl-C or SIGTERM it is removed and the output is as it was."""
        partial = self.new_folder("partial")
        try:
            yield partial
            self._move_into_place(partial, force)
        except _Terminated:
            shutil.rmtree(partial, ignore_errors=True)
            raise KeyboardInterrupt("terminated") from None
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise

    def _move_into_place(self, partial: Path, force: bool) -> None:
        """Rename `partial` to the output. An existing output (checked again: another program may have made one) is
        first renamed aside; if the second rename fails, it is renamed back. A kill between the two renames leaves
        the previous output aside, recorded, for the next run to put back."""
        check_replaceable(self.output, force)
        if not os.path.lexists(self.output):
            _rename(partial, self.output)
            return
        old = self.reserve("old")
        _rename(self.output, old)
        hold_for_test("replacing")
        try:
            _rename(partial, self.output)
        except BaseException:
            os.replace(old, self.output)
            raise
        self.record({"event": "replaced", "old": old.name})
        hold_for_test("replaced")
        shutil.rmtree(old, ignore_errors=True)


def _rename(source: Path, destination: Path) -> None:
    try:
        os.replace(source, destination)
    except OSError as error:
        if error.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise ConversionError(
                f"Cannot move the composite into {str(destination)!r}: something else was created there meanwhile "
                f"({error.strerror}); remove it and run again."
            ) from None
        raise ConversionError(f"Cannot move the composite into {str(destination)!r} ({error.strerror}).") from error


def _pid_in(lock_path: Path) -> int | None:
    """The process id a lock file's holder recorded on its first line, if readable."""
    try:
        with open(lock_path, encoding="utf-8") as handle:
            first = json.loads(handle.readline())
    except (OSError, ValueError):
        return None
    return first.get("pid") if isinstance(first, dict) and isinstance(first.get("pid"), int) else None


try:  # POSIX
    import fcntl

    def _lock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

except ImportError:  # Windows: a lock on the file's first byte (released by the system when the process dies)
    import msvcrt

    def _lock(fd: int) -> None:
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            raise BlockingIOError from None
