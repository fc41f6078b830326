"""Hearing about server shutdown inside a Python-backend stub process.

Triton does not finalize a decoupled model while any of its requests still waits for a FINAL
response, and it does not count such requests as in flight either: on SIGTERM it goes straight to
unloading, waits `--exit-timeout-secs` for the model, then exits hard -- the clients of in-flight
streams see their connection drop. To answer every request, the model must learn of the shutdown
from elsewhere: our launcher sends SIGTERM to Triton's whole process group (the stubs share it),
and this module turns that signal into a callback.
"""
from __future__ import annotations

import os
import signal
import threading
from typing import Callable


def on_sigterm(callback: Callable[[], None]) -> bool:
    """Call `callback` from a helper thread when this process gets SIGTERM (and do not die of it).

    Python runs signal handlers only on the main thread between bytecodes, and a stub's main thread
    waits in C++ for most of its life; the wakeup fd is written by the C-level handler at once, so a
    thread blocked on it reacts immediately. Returns False when it cannot be installed (not on the
    main thread), in which case the default behaviour is unchanged.
    """
    if threading.current_thread() is not threading.main_thread():
        return False
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)

    def wait() -> None:
        while os.read(read_fd, 1) != bytes([signal.SIGTERM]):
            pass
        callback()

    threading.Thread(target=wait, name="sigterm-watch", daemon=True).start()
    return True
