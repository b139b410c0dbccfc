"""One run per workdir: a run holds `workdir/run.lock` (its host, process id, start time and a
heartbeat it renews) while it trains, and a second run on the same workdir is refused, on local
disks and on gs:// alike. A hold whose process is gone (same host) or whose heartbeat stopped
(another host, for longer than `STALE_S`) is taken over, with a line saying so.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid

import jax
from etils import epath

log = logging.getLogger("dino_jax")

LOCK_FILE = "run.lock"
HEARTBEAT_S = 30.0
# A hold on another host whose heartbeat is older than this is taken to be dead: several
# heartbeats missed, longer than any pause of a live run's background thread.
STALE_S = 300.0


class WorkdirHeld(ValueError):
    """Another live run holds the workdir."""


class RunLock:
    """`with RunLock(workdir):` holds the workdir for this run (process 0 of a multi-process run
    holds it for all); raises WorkdirHeld if another live run holds it."""

    def __init__(self, workdir: str | epath.PathLike):
        self.path = epath.Path(workdir) / LOCK_FILE
        self.enabled = jax.process_index() == 0
        self._token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> RunLock:
        if not self.enabled:
            return self
        holder = _read(self.path)
        if holder is not None:
            why = _stale(holder)
            if why is None:
                raise WorkdirHeld(
                    f"{self.path.parent} is held by a run on {holder.get('host')} (process "
                    f"{holder.get('pid')}, started {holder.get('started')}): stop that run "
                    "first, or give this one another --workdir."
                )
            log.warning(
                "Taking over %s from the run on %s (process %s, started %s): %s.",
                self.path.parent,
                holder.get("host"),
                holder.get("pid"),
                holder.get("started"),
                why,
            )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._record = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "token": self._token,
        }
        self._write()
        # Object stores have no exclusive create: of two runs that wrote at once, the one whose
        # token is read back holds the workdir.
        if (_read(self.path) or {}).get("token") != self._token:
            raise WorkdirHeld(
                f"{self.path.parent} was taken by another run starting with this one."
            )
        self._thread = threading.Thread(target=self._beat, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if not self.enabled or self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        if (_read(self.path) or {}).get("token") == self._token:
            self.path.unlink()

    def _write(self) -> None:
        self.path.write_text(json.dumps({**self._record, "heartbeat": time.time()}))

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            self._write()


def _read(path: epath.Path) -> dict | None:
    """The hold recorded at `path`; None if there is none (or it does not parse: a write cut
    short, which no live run leaves behind)."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _stale(holder: dict) -> str | None:
    """Why the hold is dead, or None if its run may still live."""
    if holder.get("host") == socket.gethostname():
        try:
            os.kill(int(holder.get("pid", -1)), 0)
        except ProcessLookupError:
            return "its process is gone"
        except PermissionError:
            return None  # alive, another user's
        return None
    age = time.time() - float(holder.get("heartbeat", 0))
    if age > STALE_S:
        return f"its heartbeat stopped {age:.0f} s ago"
    return None
