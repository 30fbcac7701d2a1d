"""Keep the start-up lines of TensorFlow's and LiteRT's native code off the user's terminal.

Measured with TensorFlow 2.21 (``python -c "import tensorflow"``, stderr captured): the import prints, twice (two
native libraries each hold a copy of absl)::

    WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
    I0000 00:00:... port.cc:153] oneDNN custom operations are on. You may see slightly different numerical ...

``TF_CPP_MIN_LOG_LEVEL`` (2 or 3), ``ABSL_MIN_LOG_LEVEL`` and ``GLOG_minloglevel`` leave both lines in place: absl
writes them before any log setting is read. LiteRT prints ``INFO: Created TensorFlow Lite XNNPACK delegate for CPU.``
the first time an interpreter allocates its tensors. These are written by C++ straight to file descriptor 2, so no
Python-level filter sees them.

:func:`quiet_native_stderr` points descriptor 2 at a temporary file for the length of a block and, after it, writes
back every captured line except those matching :data:`NOISE`: a real native error still reaches the terminal (after
the block). :func:`quiet_tensorflow_import` makes the first ``import tensorflow`` (also when Keras imports it) run
inside that block, through an import hook, so that nothing imports TensorFlow before it is needed. The command line
installs the hook unless ``-vv``; :data:`ENABLED` off (``-vv``) lets every line through.
"""
from __future__ import annotations

import contextlib
import importlib.abc
import os
import re
import sys
import tempfile
import threading
from typing import Iterator

__all__ = ["NOISE", "ENABLED", "quiet_native_stderr", "quiet_tensorflow_import"]

#: Native start-up lines that say nothing a user can act on.
NOISE = re.compile(
    r"All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|oneDNN custom operations are on"
    r"|This TensorFlow binary is optimized to use available CPU instructions"
    r"|To enable the following instructions: .* rebuild TensorFlow"
    r"|Created TensorFlow Lite XNNPACK delegate for CPU"
    r"|Unable to register cu(DNN|FFT|BLAS) factory"
    r"|computation placer already registered"
)

#: Filtering on (the command line turns it off at -vv).
ENABLED = True

_LOCK = threading.Lock()


@contextlib.contextmanager
def quiet_native_stderr() -> Iterator[None]:
    """Capture file descriptor 2 during the block; afterwards write back all lines but the :data:`NOISE`."""
    if not ENABLED or not _LOCK.acquire(blocking=False):  # nested or concurrent use: the outer block filters
        yield
        return
    try:
        try:
            saved = os.dup(2)
        except OSError:  # no descriptor 2 (a detached process)
            yield
            return
        with tempfile.TemporaryFile() as capture:
            for stream in (sys.stderr, sys.__stderr__):
                with contextlib.suppress(Exception):
                    stream.flush()
            os.dup2(capture.fileno(), 2)
            try:
                yield
            finally:
                for stream in (sys.stderr, sys.__stderr__):
                    with contextlib.suppress(Exception):
                        stream.flush()
                os.dup2(saved, 2)
                os.close(saved)
                capture.seek(0)
                kept = [line for line in capture.read().splitlines(keepends=True)
                        if not NOISE.search(line.decode("utf-8", "replace"))]
                if kept:
                    os.write(2, b"".join(kept))
    finally:
        _LOCK.release()


class _QuietLoader(importlib.abc.Loader):
    """Runs a module's own loader inside :func:`quiet_native_stderr`; the module keeps its real loader."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        module.__loader__ = self._loader
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self._loader
        with quiet_native_stderr():
            self._loader.exec_module(module)


class _QuietFinder(importlib.abc.MetaPathFinder):
    def __init__(self, names):
        self.names = frozenset(names)

    def find_spec(self, fullname, path, target=None):
        if fullname not in self.names or fullname in sys.modules:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _QuietLoader(spec.loader)
                return spec
        return None


def quiet_tensorflow_import() -> None:
    """Make the first import of TensorFlow run inside :func:`quiet_native_stderr` (once per process)."""
    if "tensorflow" in sys.modules or any(isinstance(f, _QuietFinder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _QuietFinder({"tensorflow"}))
