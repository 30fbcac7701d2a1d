"""Safe file output: a file qfrewrite writes appears complete, or not at all, and never in place of an input.

* :func:`atomic_path` / :func:`atomic_write_bytes`: one file, written to a temporary name beside it and renamed onto
  it when complete.
* :class:`OutputSet`: every output of one job, all or nothing. Each output is *planned* before the long work
  (:meth:`OutputSet.add`): it is compared with every other output and with every input (symlinks resolved,
  ``os.path.samefile`` where both exist, case folded in a folder that ignores case), an output inside an input folder
  (a SavedModel, the calibration images) is refused, and its folder is checked for writing by creating and removing a
  probe file. The outputs are then *staged* under temporary names beside their targets and renamed together when the
  ``with`` block ends without error. On any failure, Ctrl-C included, the staged files are removed and every file
  that was there before is left as it was (a rename that fails half-way through the set is undone from hard-linked
  backups). Ctrl-C during the renames is held until they are done.
* :func:`one_output`: the same for a single file (the API's ``to_tflite(path)``, ``to_json(path)``).
* Files are given mode ``0o666 & ~umask``, as any file the user creates (``mkstemp`` alone gives 0600).
  :func:`file_mode` reads the umask.

A path clash or an unwritable folder raises :class:`~qfrewrite.errors.OutputError` naming both paths.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple, Union

from .errors import OutputError

__all__ = ["atomic_write_bytes", "atomic_path", "file_mode", "OutputSet", "one_output"]

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
_UMASK_LOCK = threading.Lock()


def file_mode() -> int:
    """The mode of a new regular file under the current umask (``0o666 & ~umask``)."""
    try:  # Linux: read it without changing it (os.umask can only be read by setting it)
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask


def _temp_beside(path: Path, tag: str) -> Path:
    """An empty temporary file in ``path``'s folder, hidden, keeping the suffix (readers that go by it still work)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".{tag}{path.suffix}", dir=str(path.parent))
    os.close(fd)
    return Path(tmp)


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``, on error removed.

    An existing file at ``path`` is replaced only when the new one is complete; the new file follows the umask.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = _temp_beside(path, "tmp")
    try:
        yield tmp_path
        os.chmod(tmp_path, file_mode())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def _real(path: PathLike) -> Path:
    return Path(os.path.realpath(os.path.abspath(os.fspath(path))))


def _inside(path: Path, folder: Path) -> bool:
    return folder == path or folder in path.parents


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _probe_folder(folder: Path) -> bool:
    """Create and remove a file in ``folder``; return whether the folder ignores case. Raises OSError."""
    fd, probe = tempfile.mkstemp(prefix=".qfrewrite-probe-", dir=str(folder))
    os.close(fd)
    try:
        other = Path(probe).with_name(Path(probe).name.swapcase())
        return other.exists()
    finally:
        os.unlink(probe)


@dataclass
class _Output:
    path: Path            # as given (for messages)
    target: Path          # symlinks resolved: the file that will be replaced
    what: str
    fold_case: bool
    staged: Optional[Path] = None
    created_dirs: List[Path] = field(default_factory=list)

    @property
    def key(self) -> Tuple[str, str]:
        name = self.target.name.casefold() if self.fold_case else self.target.name
        return str(self.target.parent), name


@contextlib.contextmanager
def _interrupts_held():
    """Hold SIGINT (Ctrl-C) until the block ends (main thread only), then deliver it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    try:
        old = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    except (ValueError, OSError):  # no signal support here
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
        if caught:
            raise KeyboardInterrupt


@contextlib.contextmanager
def one_output(path: PathLike, what: str, inputs: Iterable[Tuple] = ()) -> Iterator[Path]:
    """One output, planned as in an :class:`OutputSet` with ``inputs`` before the block runs; yields the temporary
    file to write, renamed onto ``path`` when the block ends without error."""
    with OutputSet(inputs) as outs:
        yield outs.stage(outs.add(path, what))


class OutputSet:
    """The outputs of one job, written all or nothing (see the module docstring).

    ``inputs``: ``(what, path)`` pairs (``path`` may be ``None`` or a non-path object, then ignored): files the job
    reads, and folders it reads from (a SavedModel, an image folder). Use as a context manager::

        with OutputSet([("the model", model_path), ("the images", data_dir)]) as outs:
            report = outs.add("out.json", "--json")      # checked now, before the long work
            ...                                           # the long work
            outs.write_bytes(report, data)                # staged under a temporary name
        # here every output is in place; after an exception none has changed
    """

    def __init__(self, inputs: Iterable[Tuple] = ()):
        self._inputs: List[Tuple[str, Path, Path, Optional[Callable[[Path], bool]]]] = []
        self._outputs: Dict[Path, _Output] = {}
        self._done = False
        for item in inputs:
            self.add_input(item[1], item[0], *item[2:])

    # -- planning ------------------------------------------------------------------------------------------------
    def add_input(self, path, what: str, reads: Optional[Callable[[Path], bool]] = None) -> None:
        """Declare a file or folder the job reads (``None``, a model object or a path that does not exist: ignored).

        No output may replace it; in a folder, no output may be a file the job reads: ``reads(relative_path)``
        decides (default: every file in it, as for a SavedModel).
        """
        if isinstance(path, (str, os.PathLike)) and os.path.lexists(path):  # what does not exist cannot be lost
            entry = (what, Path(path), _real(path), reads)
            self._inputs.append(entry)
            for out in self._outputs.values():
                self._check_against_input(out, *entry)

    def add(self, path: PathLike, what: str) -> Path:
        """Plan the output ``path`` (described as ``what`` in messages) and return it as a Path.

        Raises :class:`OutputError` when it clashes with an input or another output, exists and is not a regular file
        (or is read-only), or its folder cannot be written.
        """
        given = Path(path)
        if given in self._outputs and self._outputs[given].what == what:  # planned already, by the same step
            return given
        target = _real(given)
        if target.exists() and not target.is_file():
            kind = "a folder" if target.is_dir() else "not a regular file"
            raise OutputError(f"{what} {given}: {target if target != given else 'it'} is {kind}; give a file path")
        if target.exists() and not os.access(target, os.W_OK):
            raise OutputError(f"{what} {given}: the existing file is read-only; it is left as it is")
        folder = _nearest_existing(target.parent)
        shown = _nearest_existing(given.parent)  # as the user spelled it
        if not folder.is_dir():
            raise OutputError(f"{what} {given}: {shown} is a file, not a folder")
        try:
            fold_case = _probe_folder(folder)
        except OSError as exc:
            raise OutputError(f"{what} {given}: cannot write in {shown} ({exc.strerror or exc}); "
                              f"nothing was written") from None
        out = _Output(given, target, what, fold_case)
        for entry in self._inputs:
            self._check_against_input(out, *entry)
        for other in self._outputs.values():
            if other.key == out.key or (other.key[0] == out.key[0] and (other.fold_case or fold_case)
                                        and other.key[1].casefold() == out.key[1].casefold()):
                raise OutputError(f"{what} {given} and {other.what} {other.path} are the same file; "
                                  f"give them different paths")
        self._outputs[given] = out
        return given

    @staticmethod
    def _check_against_input(out: _Output, what_in: str, p_in: Path, real_in: Path,
                             reads: Optional[Callable[[Path], bool]]) -> None:
        same = real_in == out.target
        if not same and out.target.exists() and real_in.exists():
            with contextlib.suppress(OSError):
                same = os.path.samefile(real_in, out.target)
        if not same and out.fold_case and real_in.parent == out.target.parent:
            same = real_in.name.casefold() == out.target.name.casefold()
        if same:
            raise OutputError(f"{out.what} {out.path} is {what_in} {p_in}: qfrewrite never overwrites its inputs; "
                              f"give another path")
        if real_in.is_dir() and _inside(out.target, real_in) \
                and (reads is None or reads(out.target.relative_to(real_in))):
            raise OutputError(f"{out.what} {out.path} would be read as part of {what_in} {p_in}; "
                              f"write it elsewhere")

    # -- staging -------------------------------------------------------------------------------------------------
    def _planned(self, path: PathLike) -> _Output:
        out = self._outputs.get(Path(path))
        if out is None:
            raise KeyError(f"{path} is not a planned output (call add() first)")
        return out

    def stage(self, path: PathLike) -> Path:
        """The temporary file (created empty, beside the target) to write the planned output ``path`` into."""
        out = self._planned(path)
        if out.staged is None:
            missing = []
            p = out.target.parent
            while not p.exists():
                missing.append(p)
                p = p.parent
            try:
                for d in reversed(missing):
                    d.mkdir()
                    out.created_dirs.append(d)
                out.staged = _temp_beside(out.target, "partial")
            except OSError as exc:
                raise OutputError(f"cannot write {out.what} {out.path}: {exc.strerror or exc}") from None
        return out.staged

    def staged(self, path: PathLike) -> Path:
        """Where the content of the planned output ``path`` is until the set is committed."""
        out = self._planned(path)
        if out.staged is None:
            raise KeyError(f"{path} has not been written yet")
        return out.staged

    def write_bytes(self, path: PathLike, data: bytes) -> Path:
        """Stage ``data`` as the planned output ``path``; returns the staged file."""
        tmp = self.stage(path)
        try:
            tmp.write_bytes(data)
        except OSError as exc:  # a full disk, a quota
            out = self._planned(path)
            raise OutputError(f"cannot write {out.what} {out.path}: {exc.strerror or exc}") from None
        return tmp

    # -- the end -------------------------------------------------------------------------------------------------
    def commit(self) -> None:
        """Rename every staged output onto its target; on a failure, undo those already renamed."""
        if self._done:
            return
        staged = [o for o in self._outputs.values() if o.staged is not None]
        mode = file_mode()
        backups: List[Tuple[_Output, bool, Optional[Path]]] = []
        with _interrupts_held():
            try:
                for o in staged:
                    os.chmod(o.staged, mode)
                    existed, backup = o.target.exists(), None
                    if existed:
                        backup = _temp_beside(o.target, "previous")
                        try:
                            os.unlink(backup)
                            os.link(o.target, backup)
                        except OSError:  # no hard links here: a copy
                            shutil.copy2(o.target, backup)
                    backups.append((o, existed, backup))
                    os.replace(o.staged, o.target)
                    o.staged = None
            except BaseException as exc:
                for o, existed, backup in reversed(backups):
                    with contextlib.suppress(OSError):
                        if backup is not None:
                            os.replace(backup, o.target)
                        elif not existed and o.staged is None:
                            o.target.unlink()
                self.discard()
                if isinstance(exc, OSError):
                    raise OutputError(f"writing the outputs failed ({exc}); the files that were there are "
                                      f"unchanged") from None
                raise
            finally:
                for _, _, backup in backups:
                    if backup is not None:
                        with contextlib.suppress(OSError):
                            backup.unlink()
        self._done = True
        for o in staged:
            log.info("wrote %s", o.path)

    def discard(self) -> None:
        """Remove every staged file and the folders made for them; the targets are left as they were."""
        for o in self._outputs.values():
            if o.staged is not None:
                with contextlib.suppress(OSError):
                    o.staged.unlink()
                o.staged = None
            for d in reversed(o.created_dirs):
                with contextlib.suppress(OSError):
                    d.rmdir()  # only when empty
            o.created_dirs.clear()
        self._done = True

    def __enter__(self) -> "OutputSet":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()

    def __contains__(self, path) -> bool:
        return Path(path) in self._outputs

    @property
    def paths(self) -> List[Path]:
        return list(self._outputs)
