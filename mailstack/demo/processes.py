"""Child processes of the demo: one process group each, logs merged into one tagged stream.

Each child starts in its own session (so its process group id is its pid), which
lets :meth:`Supervisor.stop` signal the child together with anything it forked,
and keeps a terminal's Ctrl-C away from the children: the demo receives SIGINT
and stops them in order. On Linux a child also gets SIGKILL if the demo itself
dies without cleaning up (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TextIO

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
# Lines of a child's output kept to explain why it exited early.
TAIL_LINES = 30
# Width of the tag column in the merged log stream ("there.test" and a space).
TAG_WIDTH = 11


def _die_with_parent() -> None:  # pragma: no cover - runs in the forked child
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def mailstack_command(*arguments: str) -> list[str]:
    """Return the command line running ``mailstack ARGUMENTS`` with this interpreter."""
    return [sys.executable, "-m", "mailstack", *arguments]


@dataclass
class Child:
    tag: str
    process: asyncio.subprocess.Process
    tail: list[str] = field(default_factory=list)
    reader: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        return self.process.pid


class ChildFailed(Exception):
    """A child process exited before it was asked to stop."""

    def __init__(self, child: Child) -> None:
        self.child = child
        tail = "".join(f"\n    {line}" for line in child.tail[-10:])
        super().__init__(f"{child.tag} exited with status {child.process.returncode}; its last output:{tail or ' (none)'}")


class Supervisor:
    """Start, watch and stop the demo's child processes; copy their output to ``sink``."""

    def __init__(self, sink: TextIO, *, tag_width: int = TAG_WIDTH) -> None:
        self.sink = sink
        self.tag_width = tag_width
        self.children: list[Child] = []

    async def start(self, tag: str, command: Sequence[str], *, env: dict[str, str] | None = None) -> Child:
        """Start a long-running ``command`` whose output lines go to the sink tagged with ``tag``."""
        process = await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
            env=env,
        )
        child = Child(tag, process)
        child.reader = asyncio.create_task(self._copy_output(child), name=f"output of {tag}")
        self.children.append(child)
        log.info("started %s (pid %d): %s", tag, process.pid, " ".join(command))
        return child

    async def run(self, tag: str, command: Sequence[str], *, input_text: str | None = None, timeout: float = 120.0) -> str:
        """Run a short ``command`` to completion and return its standard output.

        Raise ChildFailed with its output when it exits non-zero or takes longer than ``timeout``.
        """
        process = await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.PIPE if input_text is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        child = Child(tag, process)
        self.children.append(child)
        try:
            stdout, stderr = await asyncio.wait_for(
                process.communicate(input_text.encode() if input_text is not None else None), timeout
            )
        except (asyncio.TimeoutError, asyncio.CancelledError):
            await self._terminate(child, grace=1.0)
            raise
        finally:
            self.children.remove(child)
        if process.returncode != 0:
            child.tail = (stdout + stderr).decode(errors="replace").splitlines()
            raise ChildFailed(child)
        return stdout.decode(errors="replace")

    async def _copy_output(self, child: Child) -> None:
        assert child.process.stdout is not None
        prefix = f"{child.tag:<{self.tag_width}}| "
        while True:
            try:
                line = await child.process.stdout.readline()
            except ValueError:  # a line longer than the stream limit: skip what was read
                continue
            if not line:
                return
            text = line.decode(errors="replace").rstrip("\r\n")
            child.tail.append(text)
            del child.tail[:-TAIL_LINES]
            self.sink.write(prefix + text + "\n")
            self.sink.flush()

    async def wait_for_failure(self) -> Child:
        """Return the first long-running child that exits; runs until cancelled otherwise."""
        waits = {asyncio.create_task(child.process.wait()): child for child in self.children}
        try:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waits:
                task.cancel()
        child = waits[next(iter(done))]
        if child.reader is not None:
            await child.reader
        return child

    async def stop(self, grace: float) -> None:
        """Send SIGTERM to every child's process group, then SIGKILL to those still running after ``grace`` seconds."""
        await asyncio.gather(*(self._terminate(child, grace) for child in reversed(self.children)))
        for child in self.children:
            if child.reader is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await child.reader

    async def _terminate(self, child: Child, grace: float) -> None:
        process = child.process
        if process.returncode is None:
            log.info("stopping %s (pid %d)", child.tag, process.pid)
            _signal_group(process.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), grace)
            except asyncio.TimeoutError:
                log.warning("%s (pid %d) did not stop within %.1f s; killing it", child.tag, process.pid, grace)
        # The group may still hold processes that the child forked, even after it exited.
        _signal_group(process.pid, signal.SIGKILL)
        if process.returncode is None:
            await process.wait()


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)
