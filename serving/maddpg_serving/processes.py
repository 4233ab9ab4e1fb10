"""Child processes that must never outlive their owner: servers, comparison servers, ``kubectl port-forward``.

Every such process is started in a session (process group) of its own, so that it and whatever it starts (Triton's
python stubs, uvicorn workers) can be ended together by the group's id; waiting for it to become ready is bounded; and
stopping it is always SIGTERM to the group, a bounded wait, then SIGKILL to the group, so a stub that outlived its
server goes too. One helper for the three places that do it (the local tritonserver, the benchmark's comparison server,
the Kubernetes port-forward).

Ports come from :func:`reserve_ports`, the one port reserver: sockets are held open together while ports are chosen,
so the kernel cannot hand out the same port twice to servers started side by side.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import time
from typing import IO, Callable, Mapping, Sequence

log = logging.getLogger(__name__)


class ProcessExited(Exception):
    """The process ended while we waited for it to become ready (``returncode`` says how)."""

    def __init__(self, returncode: int):
        super().__init__(f"exited with status {returncode}")
        self.returncode = returncode


class ReadyTimeout(Exception):
    """The process was still running but not ready when the wait ran out."""


def start_group(argv: Sequence[str], *, output: IO[bytes] | int | None = subprocess.DEVNULL,
                env: Mapping[str, str] | None = None, stderr: IO | int | None = subprocess.STDOUT) -> subprocess.Popen:
    """Start ``argv`` as the leader of a new process group; stdin is closed, output goes to ``output``."""
    return subprocess.Popen(list(argv), stdout=output, stderr=stderr, stdin=subprocess.DEVNULL,
                            env=None if env is None else dict(env), start_new_session=True)


def wait_ready(process: subprocess.Popen, is_ready: Callable[[], bool], timeout: float,
               interval: float = 0.2) -> None:
    """Poll ``is_ready`` until it says yes, at most ``timeout`` seconds.

    Raises :class:`ProcessExited` as soon as the process has ended and :class:`ReadyTimeout` when time is up; the caller
    turns them into its own error (with its log) and stops the process.
    """
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise ProcessExited(process.returncode)
        if is_ready():
            return
        if time.monotonic() >= deadline:
            raise ReadyTimeout(f"not ready after {timeout:.0f} s")
        time.sleep(interval)


def stop_group(process: subprocess.Popen, timeout: float = 10.0, name: str = "process") -> int | None:
    """SIGTERM the group, wait up to ``timeout`` s for its leader, then SIGKILL whatever is left of the group.

    Returns the leader's exit status (negative: the signal that ended it). Safe to call on a process that has already
    ended; the SIGKILL still reaches children that outlived it in the same group.
    """
    status = process.poll()
    if status is None:
        _signal_group(process.pid, signal.SIGTERM)
        try:
            status = process.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("%s (pid %d) ignored SIGTERM for %.0f s; killing its process group", name, process.pid, timeout)
    _signal_group(process.pid, signal.SIGKILL)
    if status is None:
        status = process.wait(timeout)
    return status


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):  # the whole group is gone already
        pass


def reserve_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct free ports (held open together so the kernel cannot hand out the same one twice)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()
