"""SIGTERM / SIGINT during training: a flag the loop checks after each step, and a watchdog that ends
the process within `grace_s` when the main thread cannot get there (blocked in a save or in
compilation).

The watchdog learns of a signal from `signal.set_wakeup_fd`, which the interpreter writes at once even
while the main thread sits in native code. After `grace_s` without a clean exit it runs the cleanup
callbacks (remove a partial checkpoint, release the run lock), prints one line and calls `os._exit`
(Orbax's non-daemon threads cannot keep the process alive).
"""
from __future__ import annotations

import os
import signal
import socket
import sys
import threading
from typing import Callable

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
  """Context manager: `received` is the first stop signal's number (or None)."""

  def __init__(self, grace_s: float, describe: Callable[[], str] = lambda: "",
               cleanup: tuple[Callable[[], None], ...] = ()):
    self.grace_s = float(grace_s)
    self.describe, self.cleanup = describe, cleanup
    self.received: int | None = None
    self._old: dict = {}
    self._old_fd = -1
    self._done = threading.Event()
    self._pair: tuple[socket.socket, socket.socket] | None = None
    self._thread: threading.Thread | None = None

  def __enter__(self):
    if threading.current_thread() is not threading.main_thread():
      return self           # signals belong to the main thread; leave them alone
    for s in STOP_SIGNALS:
      self._old[s] = signal.signal(s, self._handle)
    r, w = socket.socketpair()
    r.setblocking(True)
    w.setblocking(False)
    self._pair = (r, w)
    self._old_fd = signal.set_wakeup_fd(w.fileno(), warn_on_full_buffer=False)
    self._thread = threading.Thread(target=self._watch, name="mhc-stop-watchdog", daemon=True)
    self._thread.start()
    return self

  def _handle(self, signum, frame):
    if self.received is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt   # a second Ctrl-C: give up on saving
    self.received = signum

  def _watch(self):
    r = self._pair[0]
    while not self._done.is_set():
      try:
        data = r.recv(64)
      except OSError:
        return
      if not data:
        return
      sigs = [b for b in data if b in (int(s) for s in STOP_SIGNALS)]
      if sigs and not self._done.wait(self.grace_s):
        self._expire(sigs[0])
        return

  def _expire(self, signum: int):
    for fn in self.cleanup:
      try:
        fn()
      except Exception:  # noqa: BLE001 - best effort on the way out
        pass
    detail = self.describe()
    print(f"error: stopped by {signal.Signals(signum).name}: could not stop cleanly within "
          f"{self.grace_s:g} s (train.stop_timeout_s); no new checkpoint"
          + (f"; {detail}" if detail else ""), file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(128 + signum)

  def __exit__(self, *exc):
    self._done.set()
    if self._pair is not None:
      signal.set_wakeup_fd(self._old_fd)
      try:
        self._pair[1].send(b"\0")      # wake the watchdog so that it sees `_done`
      except OSError:
        pass
      self._thread.join(1.0)
      for sock in self._pair:
        sock.close()
    for s, h in self._old.items():
      signal.signal(s, h)
