"""The planner's own process: the search, HetHub's bound and the timeline's drawing, beside the capture.

NOTE: [planner process] Capture and the passes run on one core: they are imports (torch,
transformers, torch._dynamo) and tracing. The search needs neither torch nor the graph, only
the blocks' costs, but its own imports (OR-Tools, which imports pandas) and the timeline's
(matplotlib) take about a second on a slow CPU. :class:`PlannerProcess` forks a process before
capture that imports them on the other core while the model is traced; the compiler then
sends it the costs, gets the decision back, and lowers the graph itself; the process draws the
timeline while the compiler emits the rank programs. The per-type searches of the bound (NOTE: [searches side by side] in
hetcompile/baselines.py) are forked from it. Every result is what the same calls give in one
process: the searches stop at deterministic budgets.

Where forking is not there (or inside a daemonic process, which may not have children) the
same calls run in the caller's process, one after the other.

The process and the bound's searches form a process group of their own. The compiler ends them
by closing its end of the pipe (the process stops the searches and exits) and, where that is not
enough or not waited for (an error or Ctrl-C in the compiler), by SIGKILL to the group: nothing in
them has to cooperate, so a search stuck anywhere cannot keep the compiler waiting. (Before, the
compiler sent SIGTERM, which raised SystemExit wherever the process was, for instance while it
stopped the bound's searches; a CI run hung once as the compiler stopped the process after the
planner's UserError, and so did 1 of about 490 runs of that test's command here.) Being outside
the terminal's foreground group, the process never sees the terminal's Ctrl-C; the compiler
handles it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import os
import signal
import traceback

from hetcompile.errors import UserError

# Blocked across a fork (here and for the bound's searches, hetcompile/baselines.py), so a signal
# that comes before the child has set its handlers waits for them instead of meeting the parent's.
FORK_BLOCKED_SIGNALS = {signal.SIGTERM, signal.SIGINT}


class _Planner:
    """What the planner process does with each request; also run in the caller where it cannot fork."""

    def __init__(self):
        # The imports that the process is there to take off the compiler's path.
        from hetcompile import baselines, planner, timeline

        timeline.preload()
        self._baselines, self._planner, self._timeline = baselines, planner, timeline
        self._stack = contextlib.ExitStack()
        self._per_type = None

    def start_bound(self, costs, cluster, schedule: str, seed: int) -> None:
        """Start the per-type searches of HetHub's bound (forked from here)."""
        self._per_type = self._stack.enter_context(
            self._baselines.per_type_beside(costs, cluster, schedule=schedule, seed=seed))

    def solve(self, costs, cluster, decision, kwargs, on_progress):
        """The planner's decision and report; a pinned ``decision`` is returned as is."""
        if decision is not None:
            return decision, self._planner.SolverReport(status="PINNED", gap=0.0, objective_s=0.0,
                                                        best_bound_s=0.0, wall_s=0.0, num_variables=0)
        return self._planner.solve(costs, cluster, on_progress=on_progress, **kwargs)

    def draw(self, plan) -> dict:
        return self._timeline.timeline_files(plan)

    def bound(self) -> dict[str, float]:
        return self._per_type()

    def close(self) -> None:
        self._stack.close()  # stops bound searches still running


def _serve(conn, compiler_end) -> None:
    """The planner process: answer requests until the compiler closes its end of the pipe."""
    compiler_end.close()  # inherited across the fork: open here, the compiler's close would not end the pipe
    _own_group(0)  # before the bound's searches are forked, so they are in it too
    # Blocked across the fork (see PlannerProcess): until here, a signal would have met the
    # compiler's handlers. Ctrl-C is the compiler's; a SIGTERM sent here ends the process.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORK_BLOCKED_SIGNALS)
    planner = None
    try:
        planner = _Planner()
        while True:
            try:
                name, args = conn.recv()
            except EOFError:
                return
            try:
                if name == "solve":
                    result = planner.solve(*args, on_progress=lambda *p: conn.send(("progress", p)))
                else:
                    result = getattr(planner, name)(*args)
                conn.send(("ok", result))
            except UserError as e:
                conn.send(("user_error", str(e)))
            except Exception:
                conn.send(("error", traceback.format_exc()))
    except OSError:  # the compiler went away mid-request (a broken pipe)
        pass
    finally:
        if planner is not None:
            planner.close()


class PlannerProcess:
    """The compiler's handle on the planner process (NOTE: [planner process]); a context manager.

    Each method sends one request and waits for its answer (:meth:`start_draw` waits in
    :meth:`drawn`); :class:`UserError`s come back as they were raised.
    """

    def __init__(self):
        self._conn = self._process = self._local = None
        self._answers = []  # in the caller's process: the answers of requests made, in order
        if "fork" not in multiprocessing.get_all_start_methods() or multiprocessing.current_process().daemon:
            self._local = _Planner()
            return
        ctx = multiprocessing.get_context("fork")
        self._conn, child = ctx.Pipe()
        # Blocked across the fork: a signal before the child has its handlers waits for them.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, FORK_BLOCKED_SIGNALS)
        try:
            self._process = ctx.Process(target=_serve, args=(child, self._conn), name="hetcompile-planner")
            self._process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        _own_group(self._process.pid)  # here too, so a close that comes first finds the group
        child.close()

    def __enter__(self) -> PlannerProcess:
        return self

    def __exit__(self, exc_type, *_) -> None:
        self.close(at_once=exc_type is not None)

    def _call(self, name: str, *args, on_progress=None):
        self._send(name, *args, on_progress=on_progress)
        return self._receive(name, on_progress=on_progress)

    def _send(self, name: str, *args, on_progress=None) -> None:
        if self._local is None:
            self._conn.send((name, args))
        elif name == "solve":
            self._answers.append(self._local.solve(*args, on_progress=on_progress))
        else:
            self._answers.append(getattr(self._local, name)(*args))

    def _receive(self, name: str, *, on_progress=None):
        """The answer to the oldest request not yet answered (the process answers in order)."""
        if self._local is not None:
            return self._answers.pop(0)
        while True:
            try:
                kind, value = self._conn.recv()
            except EOFError:
                raise RuntimeError(f"hetcompile's planner process died (exit code {self._process.exitcode}) "
                                   f"during {name}") from None
            if kind == "progress":
                if on_progress is not None:
                    on_progress(*value)
                continue
            if kind == "user_error":
                raise UserError(value)
            if kind == "error":
                raise RuntimeError(f"hetcompile's planner process failed during {name}:\n{value}")
            return value

    def start_bound(self, costs, cluster, *, schedule: str, seed: int) -> None:
        """Start HetHub's per-type searches (:func:`hetcompile.baselines.per_type_beside`)."""
        self._call("start_bound", costs, cluster, schedule, seed)

    def solve(self, costs, cluster, *, decision=None, on_progress=None, **kwargs):
        """:func:`hetcompile.planner.solve` (or a pinned ``decision`` as is): (decision, SolverReport)."""
        return self._call("solve", costs, cluster, decision, kwargs, on_progress=on_progress)

    def start_draw(self, plan) -> None:
        """Have :func:`hetcompile.timeline.timeline_files` draw ``plan`` (its sources are not sent)
        while the caller goes on; :meth:`drawn` waits for the files."""
        self._send("draw", dataclasses.replace(plan, sources={}))

    def drawn(self) -> dict:
        return self._receive("draw")

    def bound(self) -> dict[str, float]:
        """Wait for the per-type searches: each device type's throughput alone."""
        return self._call("bound")

    def close(self, *, at_once: bool = False) -> None:
        """End the process (and the bound's searches); ``at_once`` does not wait for a request in
        progress (after an error or Ctrl-C in the compiler)."""
        if self._local is not None:
            self._local.close()
            return
        self._conn.close()  # between requests, the process ends at the end of the pipe
        if not at_once:
            self._process.join(timeout=5)
        if self._process.is_alive():
            try:
                os.killpg(self._process.pid, signal.SIGKILL)  # the process and the bound's searches
            except ProcessLookupError:  # no group of its own: setpgid failed on both sides
                self._process.kill()
        self._process.join()


def _own_group(pid: int) -> None:
    """Make ``pid`` (0: the caller) the leader of a process group of its own; called on both sides
    of the fork, as shells do, so the group exists whichever runs first."""
    with contextlib.suppress(OSError):  # the other side did it, or the process has ended
        os.setpgid(pid, 0)
