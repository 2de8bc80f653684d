"""Space-time schedules for pipeline parallelism, and a discrete-event simulator.

A schedule says, for every pipeline position (a *slot*: the device group
that runs one stage, or with interleaving several), the order in which it
runs the forward (``F``) and backward (``B``) of each micro-batch of its
stages. It is the same IR as ``torch.distributed.pipelining``: one small value
type, :class:`Action`, printed as ``"1F0"`` (stage 1, forward, micro-batch 0)
with an exact inverse parser. A schedule is ``list[list[Action]]``, one list
per slot; every data-parallel replica of a slot runs its slot's list. Without
interleaving slot s runs stage s; interleaved, with ``chunks`` stages per slot
and ``p`` slots, slot s runs stages s, s + p, s + 2p, ... (the model goes
round the slots ``chunks`` times, Megatron's virtual pipeline).

- :func:`gpipe`, :func:`one_f_one_b`, :func:`interleaved_1f1b`,
  :func:`make_schedule` build schedules in the orders that ``ScheduleGPipe``,
  ``Schedule1F1B`` and Megatron's interleaved 1F1B execute.
- :func:`validate` checks a schedule and, when it would deadlock, raises a
  ``ValueError`` that shows a step-by-stage grid (:func:`format_grid`) with the
  stuck step marked.
- :func:`simulate` predicts one training step's timeline from per-stage
  compute and communication times; :func:`to_chrome_trace` turns it into a
  Chrome/Perfetto trace.

Example::

    >>> sched = make_schedule("1f1b", num_stages=2, num_microbatches=3)
    >>> [str(a) for a in sched[0]]
    ['0F0', '0F1', '0B0', '0F2', '0B1', '0B2']
    >>> tl = simulate(sched, fwd_s=[1, 1], bwd_s=[2, 2], send_fwd_s=[0, 0],
    ...               send_bwd_s=[0, 0], allreduce_s=[0, 0])
    >>> tl.step_time_s, tl.peak_in_flight
    (12.0, (2, 1))

NOTE: [Data dependencies between stages]
Stage s's F(m) consumes stage s-1's F(m) output; stage s's B(m) consumes stage
s+1's B(m) input gradient; the last stage's B(m) starts from its own F(m)
(the loss). Stage s's B(m) also needs its own F(m), which :func:`validate`
guarantees by requiring F(m) before B(m) in the stage's list. Both the
deadlock check and the simulator use exactly these edges.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from hetcompile.errors import UserError

__all__ = [
    "Action",
    "Schedule",
    "SCHEDULES",
    "Span",
    "Timeline",
    "format_grid",
    "gpipe",
    "interleaved_1f1b",
    "make_schedule",
    "one_f_one_b",
    "simulate",
    "to_chrome_trace",
    "validate",
]

FORWARD = "F"
BACKWARD = "B"
_KINDS = (FORWARD, BACKWARD)
SEND_F, SEND_B = "send_" + FORWARD, "send_" + BACKWARD  # the spans of a forward's and a backward's send

# No leading zeros, so that str(Action.parse(text)) == text for every accepted text.
_ACTION_RE = re.compile(r"(0|[1-9][0-9]*)([FB])(0|[1-9][0-9]*)")


@dataclass(frozen=True, order=True)
class Action:
    """One compute step of one stage on one micro-batch, printed like torch: ``"1F0"``.

    Example::

        >>> str(Action(1, "F", 0)), Action.parse("1B3")
        ('1F0', Action(stage=1, kind='B', microbatch=3))
    """

    stage: int
    kind: str  # "F" (forward) or "B" (full backward: input and weight gradients)
    microbatch: int

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"Action kind must be one of {_KINDS}, got {self.kind!r}")
        if self.stage < 0 or self.microbatch < 0:
            raise ValueError(
                f"Action stage and microbatch must be >= 0, got stage={self.stage}, "
                f"microbatch={self.microbatch}"
            )

    def __str__(self) -> str:
        return f"{self.stage}{self.kind}{self.microbatch}"

    @staticmethod
    def parse(text: str) -> Action:
        """Exact inverse of ``str``: ``Action.parse("1B3") == Action(1, "B", 3)``."""
        match = _ACTION_RE.fullmatch(text)
        if match is None:
            raise ValueError(
                f"Invalid action {text!r}: expected <stage><F|B><microbatch> "
                "with no spaces or leading zeros, e.g. '1F0' or '2B3'"
            )
        stage, kind, microbatch = match.groups()
        return Action(int(stage), kind, int(microbatch))


Schedule = list[list[Action]]  # schedule[slot] = the actions that slot runs, in order


def _check_sizes(num_stages: int, num_microbatches: int) -> None:
    if num_stages < 1 or num_microbatches < 1:
        raise ValueError(
            f"A schedule needs num_stages >= 1 and num_microbatches >= 1, "
            f"got num_stages={num_stages}, num_microbatches={num_microbatches}"
        )


def gpipe(num_stages: int, num_microbatches: int) -> Schedule:
    """Fill-drain: every forward, then every backward, in torch ``ScheduleGPipe``'s order.

    Example::

        >>> [str(a) for a in gpipe(2, 2)[1]]
        ['1F0', '1F1', '1B0', '1B1']
    """
    _check_sizes(num_stages, num_microbatches)
    return [
        [Action(s, FORWARD, m) for m in range(num_microbatches)]
        + [Action(s, BACKWARD, m) for m in range(num_microbatches)]
        for s in range(num_stages)
    ]


def one_f_one_b(num_stages: int, num_microbatches: int) -> Schedule:
    """1F1B in torch ``Schedule1F1B``'s order: warm-up forwards, steady F/B pairs, cool-down.

    Stage s runs min(S - s - 1, M) warm-up forwards, so it holds at most
    min(S - s, M) micro-batches of activations instead of GPipe's M. Unlike
    torch, M < S is allowed (it just never reaches the steady state).

    Example::

        >>> [str(a) for a in one_f_one_b(2, 3)[0]]
        ['0F0', '0F1', '0B0', '0F2', '0B1', '0B2']
    """
    _check_sizes(num_stages, num_microbatches)
    schedule: Schedule = []
    for s in range(num_stages):
        num_warmup = min(num_stages - s - 1, num_microbatches)
        actions = [Action(s, FORWARD, m) for m in range(num_warmup)]
        next_bwd = 0
        for next_fwd in range(num_warmup, num_microbatches):
            actions.append(Action(s, FORWARD, next_fwd))
            actions.append(Action(s, BACKWARD, next_bwd))
            next_bwd += 1
        actions.extend(Action(s, BACKWARD, m) for m in range(next_bwd, num_microbatches))
        schedule.append(actions)
    return schedule


def interleaved_1f1b(num_stages: int, num_microbatches: int, chunks: int) -> Schedule:
    """Interleaved 1F1B (Megatron's virtual pipeline): ``p = num_stages / chunks`` slots, slot r
    running stages r, r + p, ..., so the fill and drain bubble shrinks ``chunks`` times.

    Micro-batches go round in groups of p: slot r runs the forwards of chunk 0 for
    micro-batches 0..p-1, then chunk 1 for the same ones, and so on; backwards go
    through the chunks in reverse. Slot r runs ``2 (p - r - 1) + (chunks - 1) p``
    warm-up forwards, then alternates one forward and one backward. Needs
    ``num_microbatches`` to be a multiple of p, as Megatron and torch do.

    Example::

        >>> [" ".join(map(str, actions)) for actions in interleaved_1f1b(4, 2, chunks=2)]
        ['0F0 0F1 2F0 2F1 2B0 2B1 0B0 0B1', '1F0 1F1 3F0 3B0 3F1 3B1 1B0 1B1']
    """
    _check_sizes(num_stages, num_microbatches)
    if chunks < 1 or num_stages % chunks:
        raise ValueError(f"Interleaving needs num_stages to be a multiple of chunks, got num_stages={num_stages}, "
                         f"chunks={chunks}")
    p = num_stages // chunks
    if num_microbatches % p:
        raise UserError(f"The interleaved schedule needs the micro-batch count to be a multiple of the {p} pipeline "
                        f"slots, got {num_microbatches} micro-batches. Choose a multiple of {p}, or the 1f1b "
                        "schedule.")
    total = num_microbatches * chunks

    def action(r: int, k: int, kind: str) -> Action:
        chunk = (k // p) % chunks
        if kind == BACKWARD:
            chunk = chunks - 1 - chunk
        return Action(chunk * p + r, kind, (k // (p * chunks)) * p + k % p)

    schedule: Schedule = []
    for r in range(p):
        num_warmup = min(2 * (p - r - 1) + (chunks - 1) * p, total)
        actions = [action(r, k, FORWARD) for k in range(num_warmup)]
        for k in range(total - num_warmup):
            actions += [action(r, num_warmup + k, FORWARD), action(r, k, BACKWARD)]
        actions += [action(r, k, BACKWARD) for k in range(total - num_warmup, total)]
        schedule.append(actions)
    return schedule


SCHEDULES: dict[str, Callable[..., Schedule]] = {
    "gpipe": gpipe,
    "1f1b": one_f_one_b,
    "interleaved": interleaved_1f1b,
}


def make_schedule(name: str, num_stages: int, num_microbatches: int, chunks: int = 1) -> Schedule:
    """Build the schedule called ``name`` (a key of :data:`SCHEDULES`); ``chunks`` stages per slot.

    Example::

        >>> len(make_schedule("gpipe", num_stages=4, num_microbatches=8))
        4
        >>> len(make_schedule("interleaved", num_stages=4, num_microbatches=8, chunks=2))
        2
    """
    if name not in SCHEDULES:
        # UserError (a ValueError) because the name comes from the CLI / API user.
        raise UserError(
            f"Unknown pipeline schedule {name!r}; valid names are "
            f"{', '.join(sorted(SCHEDULES))}"
        )
    if name == "interleaved":
        return interleaved_1f1b(num_stages, num_microbatches, chunks)
    if chunks != 1:
        raise UserError(f"The {name} schedule runs one stage per device group; {chunks} stages per group need "
                        "the interleaved schedule.")
    return SCHEDULES[name](num_stages, num_microbatches)


def format_grid(
    columns: Sequence[Sequence[Action | None]],
    *,
    marked_step: int | None = None,
    marker: str = "<-- STUCK",
) -> str:
    """A step-by-stage grid: one column per stage, one row per step, like torch's.

    ``columns[s][t]`` is what stage s runs at step t (``None`` for idle). A plain
    schedule prints with step = position in the stage's list.

    Example::

        >>> print(format_grid(gpipe(2, 1), marked_step=1))
                Stage 0 Stage 1
        Step 0: 0F0     1F0
        Step 1: 0B0     1B0     <-- STUCK
    """
    num_steps = max((len(col) for col in columns), default=0)
    step_labels = [f"Step {t:0{len(str(max(num_steps - 1, 0)))}d}:" for t in range(num_steps)]
    label_width = max((len(label) for label in step_labels), default=0) + 1
    headers = [f"Stage {s}" for s in range(len(columns))]
    cells = [
        [str(col[t]) if t < len(col) and col[t] is not None else "" for t in range(num_steps)]
        for col in columns
    ]
    widths = [max([len(h)] + [len(c) for c in cells[s]]) for s, h in enumerate(headers)]
    lines = [" " * label_width + " ".join(h.ljust(w) for h, w in zip(headers, widths))]
    for t in range(num_steps):
        row = " ".join(cells[s][t].ljust(widths[s]) for s in range(len(columns)))
        if t == marked_step:
            row += " " + marker
        lines.append((step_labels[t].ljust(label_width) + row).rstrip())
    return "\n".join(line.rstrip() for line in lines)


def _dependency(action: Action, num_stages: int) -> Action | None:
    """The action on another stage (or the loss) whose output ``action`` consumes.

    See NOTE: [Data dependencies between stages].
    """
    key = _dependency_key(action.stage, action.kind, action.microbatch, num_stages)
    return None if key is None else Action(*key)


def _dependency_key(stage: int, kind: str, microbatch: int, num_stages: int) -> tuple[int, str, int] | None:
    """:func:`_dependency` as a plain tuple: the simulator's inner loop runs it for every action."""
    if kind == FORWARD:
        return None if stage == 0 else (stage - 1, FORWARD, microbatch)
    if stage == num_stages - 1:
        return (stage, FORWARD, microbatch)
    return (stage + 1, BACKWARD, microbatch)


def num_stages_of(schedule: Sequence[Sequence[Action]]) -> int:
    """How many stages a schedule runs: a multiple of its slots (one list per slot)."""
    return 1 + max((a.stage for actions in schedule for a in actions), default=-1)


def validate(schedule: Sequence[Sequence[Action]]) -> None:
    """Raise ``ValueError`` unless ``schedule`` is complete, ordered and deadlock-free.

    Checks that slot r's list holds only the actions of stages r, r + p, ...
    (p = number of lists), each F(m) and B(m) of those stages exactly once for
    every micro-batch m in 0..M-1 (M = 1 + the largest micro-batch index seen),
    F(m) before B(m), and that running every slot in lock-step with blocking
    receives finishes.

    Example::

        >>> validate(one_f_one_b(4, 8))
        >>> validate([[Action(0, "B", 0), Action(0, "F", 0)]])
        Traceback (most recent call last):
        ...
        ValueError: Stage 0 runs 0B0 before 0F0; a backward needs its forward's activations
    """
    num_slots = len(schedule)
    if num_slots == 0:
        raise ValueError("A schedule needs at least one stage, got an empty list")
    num_microbatches = 1 + max((a.microbatch for actions in schedule for a in actions), default=-1)
    if num_microbatches == 0:
        raise ValueError("The schedule has no actions; every stage needs F and B per micro-batch")
    num_stages = num_stages_of(schedule)

    expected = {(kind, m) for kind in _KINDS for m in range(num_microbatches)}
    for r, actions in enumerate(schedule):
        wrong_stage = [str(a) for a in actions if a.stage % num_slots != r]
        if wrong_stage:
            what = f"Stage {r}'s list" if num_stages == num_slots else f"Slot {r}'s list"
            raise ValueError(
                f"{what} holds actions of other stages: {', '.join(wrong_stage)}; "
                f"schedule[r] must contain only the actions of stages r, r + {num_slots}, ..."
            )
        seen: dict[tuple[int, str, int], int] = {}
        for position, a in enumerate(actions):
            key = (a.stage, a.kind, a.microbatch)
            if key in seen:
                raise ValueError(
                    f"Stage {a.stage} runs {a} twice (positions {seen[key]} and {position}); "
                    "each F and B must appear exactly once"
                )
            seen[key] = position
            if a.kind == BACKWARD and (a.stage, FORWARD, a.microbatch) not in seen:
                raise ValueError(
                    f"Stage {a.stage} runs {a} before {Action(a.stage, FORWARD, a.microbatch)}; "
                    "a backward needs its forward's activations"
                )
        for s in range(r, num_stages, num_slots):
            missing = sorted(expected - {(k, m) for st, k, m in seen if st == s},
                             key=lambda k: (k[1], _KINDS.index(k[0])))
            if missing:
                names = ", ".join(str(Action(s, kind, m)) for kind, m in missing)
                raise ValueError(
                    f"Stage {s} never runs {names}; with {num_microbatches} micro-batches "
                    "every stage needs F and B for each"
                )

    if num_stages % num_slots:
        raise ValueError(f"The schedule runs {num_stages} stages on {num_slots} lists; with interleaving every "
                         "list runs the same number of stages (stage s on list s % lists)")

    _check_deadlock_free(schedule)


def _check_deadlock_free(schedule: Sequence[Sequence[Action]]) -> None:
    """Lock-step run: at each step every slot runs its next action if its input arrived.

    An input "arrives" when its producer ran at an earlier step, which models
    blocking receives. If no slot can move while some still have work, the
    schedule deadlocks on a real cluster too.
    """
    num_slots, num_stages = len(schedule), num_stages_of(schedule)
    next_index = [0] * num_slots
    done: set[tuple[int, str, int]] = set()
    columns: list[list[Action | None]] = [[] for _ in range(num_slots)]
    while any(next_index[r] < len(schedule[r]) for r in range(num_slots)):
        ran_now: list[tuple[int, str, int]] = []
        for r in range(num_slots):
            if next_index[r] == len(schedule[r]):
                columns[r].append(None)
                continue
            action = schedule[r][next_index[r]]
            dep = _dependency_key(action.stage, action.kind, action.microbatch, num_stages)
            if dep is None or dep in done:
                ran_now.append((action.stage, action.kind, action.microbatch))
                columns[r].append(action)
                next_index[r] += 1
            else:
                columns[r].append(None)
        if not ran_now:
            # The last row (all idle) becomes the stuck row: show what each slot waits on.
            stuck_step = len(columns[0]) - 1
            waits = []
            for r in range(num_slots):
                if next_index[r] < len(schedule[r]):
                    blocked = schedule[r][next_index[r]]
                    columns[r][stuck_step] = blocked
                    waits.append(f"  {blocked} waits for {_dependency(blocked, num_stages)}")
            grid = format_grid(columns, marked_step=stuck_step)
            raise ValueError(
                f"The schedule deadlocks at step {stuck_step}: every unfinished stage "
                "waits for data that the stage it needs has not produced yet.\n"
                + "\n".join(waits)
                + "\nReorder the stages' lists (F(m) on stage s needs F(m) on s-1; "
                "B(m) on s needs B(m) on s+1).\n"
                + grid
            )
        done.update(ran_now)


@dataclass(frozen=True)
class Span:
    """One interval on a stage's compute track (F, B) or communication track (the rest)."""

    stage: int
    kind: str  # "F", "B", "send_F", "send_B", "allreduce" or "update"
    microbatch: int  # -1 for "allreduce", which covers all micro-batches
    start_s: float
    end_s: float

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s


@dataclass(frozen=True)
class Timeline:
    """Predicted timeline of one training step (a prediction, not a decision)."""

    spans: tuple[Span, ...]  # sorted by (start_s, stage, kind, microbatch)
    step_time_s: float  # end of the last span, all-reduces included
    # Idle compute time / (num_slots * step_time_s); time spent in the
    # all-reduce counts as idle because it is not F/B compute.
    bubble_fraction: float
    # Per stage, its micro-batches whose forward finished and whose backward has not, at
    # the moment its slot holds the most (without interleaving: the stage's most): how many
    # micro-batches of activations it must hold.
    peak_in_flight: tuple[int, ...]


def _check_stage_times(name: str, values: Sequence[float], num_stages: int) -> None:
    if len(values) != num_stages:
        raise ValueError(
            f"{name} has {len(values)} entries but the schedule has {num_stages} stages; "
            "pass one time per stage"
        )
    negative = [s for s, v in enumerate(values) if v < 0]
    if negative:
        raise ValueError(f"{name} must be >= 0, got negative times for stages {negative}")


def simulate(
    schedule: Sequence[Sequence[Action]],
    *,
    fwd_s: Sequence[float],
    bwd_s: Sequence[float],
    send_fwd_s: Sequence[float],
    send_bwd_s: Sequence[float],
    allreduce_s: Sequence[float],
    update_s: Sequence[float] | None = None,
    notice_fwd_s: Sequence[float] | None = None,
    notice_bwd_s: Sequence[float] | None = None,
    shared_allreduce_s: Sequence[tuple[Sequence[int], float]] = (),
) -> Timeline:
    """Discrete-event run of one step of ``schedule``; all times in seconds, one per stage.

    Each slot (one list of the schedule: one stage, or its interleaved stages) is one
    compute resource that runs its actions in list order.
    An action starts when its stage is free and its input has arrived: the
    producer's end plus the producer's send time (``send_fwd_s[s]`` from s to
    s+1, ``send_bwd_s[s]`` from s to s-1). Sends are asynchronous: they are
    spans on the sender's communication track and never delay its compute.
    ``allreduce_s[s]`` starts after stage s's slot ran its last action, and ``update_s[s]``
    (optimizer step and end-of-step bookkeeping; none when omitted) after it.
    ``shared_allreduce_s``: (stages, seconds) of each all-reduce that spans stages (parameters
    that blocks of several stages use, such as tied embeddings), in program order: it runs after
    the stages' own all-reduces, once all of their slots reached it, and before any update.
    ``notice_fwd_s[s]`` / ``notice_bwd_s[s]`` (indexed like the sends): the time the
    consumer's receive notice takes to reach stage s; given, data leaves only once the
    consumer has posted its receive and the notice has arrived (see NOTE: [receives
    posted in program order]); omitted, as soon as it is produced.
    ``fwd_s[s]``/``bwd_s[s]`` should be the slowest replica's time, since
    every replica waits for the slowest one.

    Example::

        >>> tl = simulate(gpipe(1, 4), fwd_s=[1.0], bwd_s=[2.0], send_fwd_s=[0.0],
        ...               send_bwd_s=[0.0], allreduce_s=[0.5])
        >>> tl.step_time_s
        12.5
    """
    validate(schedule)
    num_slots, num_stages = len(schedule), num_stages_of(schedule)
    for name, values in (
        ("fwd_s", fwd_s),
        ("bwd_s", bwd_s),
        ("send_fwd_s", send_fwd_s),
        ("send_bwd_s", send_bwd_s),
        ("allreduce_s", allreduce_s),
        ("update_s", [0.0] * num_stages if update_s is None else update_s),
        ("notice_fwd_s", [0.0] * num_stages if notice_fwd_s is None else notice_fwd_s),
        ("notice_bwd_s", [0.0] * num_stages if notice_bwd_s is None else notice_bwd_s),
    ):
        _check_stage_times(name, values, num_stages)
    # A nonzero send with no receiver means the caller's lists are shifted by one stage.
    if send_fwd_s[-1] != 0 or send_bwd_s[0] != 0:
        raise ValueError(
            f"send_fwd_s[-1] (last stage, no next stage) and send_bwd_s[0] (first stage, "
            f"no previous stage) must be 0, got {send_fwd_s[-1]} and {send_bwd_s[0]}; "
            "send_fwd_s[s] is the time from stage s to s+1, send_bwd_s[s] from s to s-1"
        )

    end_s: dict[tuple[int, str, int], float] = {}  # (stage, kind, micro-batch) -> when it ends
    spans: list[Span] = []
    next_index = [0] * num_slots
    free_at_s = [0.0] * num_slots  # per slot: one compute resource runs all of its stages
    posted_s = [0.0] * num_slots  # per slot: when the receives of its next action were posted

    # NOTE: [receives posted in program order] A rank posts the receives of an action when it
    # reaches the action before it (NOTE: [receives one action ahead] in hetcompile/lowering.py;
    # the first action's at the step's start), and a rendezvous transport (gloo, NCCL p2p) sends
    # the data only once the receiver's notice has reached the sender: so data that was ready
    # long before still arrives one link latency (the notice) plus the send after the consumer
    # posted the receive. On gloo between CPU processes a receive posted only when its action
    # was reached measured twice the one-way latency of a ping-pong (benchmarks/RESULTS.md,
    # "Predictor accuracy").
    # Without notices (the datasheet model) data leaves as soon as it is produced.
    rendezvous = notice_fwd_s is not None or notice_bwd_s is not None
    notice_fwd = [0.0] * num_stages if notice_fwd_s is None else notice_fwd_s
    notice_bwd = [0.0] * num_stages if notice_bwd_s is None else notice_bwd_s

    def arrival_s(dep: tuple[int, str, int], consumer_slot: int) -> float:
        stage, kind, _ = dep
        if stage % num_slots == consumer_slot:  # the same devices (the loss's own forward): no transfer
            return end_s[dep]
        send = send_fwd_s if kind == FORWARD else send_bwd_s
        if not rendezvous:
            return end_s[dep] + send[stage]
        notice = notice_fwd if kind == FORWARD else notice_bwd
        return max(end_s[dep], posted_s[consumer_slot] + notice[stage]) + send[stage]

    # validate() proved the lock-step run finishes, so each sweep schedules at
    # least one action; start times do not depend on the sweep order because
    # every action starts as early as its slot order and inputs allow.
    remaining = sum(len(actions) for actions in schedule)
    while remaining:
        for r in range(num_slots):
            while next_index[r] < len(schedule[r]):
                action = schedule[r][next_index[r]]
                s, kind, m = action.stage, action.kind, action.microbatch
                dep = _dependency_key(s, kind, m, num_stages)
                if dep is not None and dep not in end_s:
                    break
                ready_s = 0.0 if dep is None else arrival_s(dep, r)
                start_s = max(free_at_s[r], ready_s)
                posted_s[r] = free_at_s[r]  # reaching this action posts the next one's receives
                duration_s = fwd_s[s] if kind == FORWARD else bwd_s[s]
                done_s = end_s[s, kind, m] = free_at_s[r] = start_s + duration_s
                spans.append(Span(s, kind, m, start_s, done_s))
                if kind == FORWARD and s < num_stages - 1:
                    spans.append(Span(s, SEND_F, m, done_s, done_s + send_fwd_s[s]))
                if kind == BACKWARD and s > 0:
                    spans.append(Span(s, SEND_B, m, done_s, done_s + send_bwd_s[s]))
                next_index[r] += 1
                remaining -= 1

    at_s = list(free_at_s)
    for r in range(num_slots):  # a slot's stages all-reduce one after another, ...
        for s in range(r, num_stages, num_slots):
            spans.append(Span(s, "allreduce", -1, at_s[r], at_s[r] + allreduce_s[s]))
            at_s[r] += allreduce_s[s]
    for stages, seconds in shared_allreduce_s:  # ... then with the other stages that hold their parameters, ...
        slots = sorted({s % num_slots for s in stages})
        start_s = max(at_s[r] for r in slots)
        for s in stages:
            spans.append(Span(s, "allreduce", -1, start_s, start_s + seconds))
        for r in slots:
            at_s[r] = start_s + seconds
    for r in range(num_slots):  # ... then update
        for s in range(r, num_stages, num_slots):
            if update_s is not None and update_s[s] > 0:
                spans.append(Span(s, "update", -1, at_s[r], at_s[r] + update_s[s]))
                at_s[r] += update_s[s]

    step_time_s = max(span.end_s for span in spans)
    busy_s = sum(span.duration_s for span in spans if span.kind in _KINDS)
    capacity_s = num_slots * step_time_s
    bubble_fraction = (capacity_s - busy_s) / capacity_s if capacity_s > 0 else 0.0
    spans.sort(key=lambda span: (span.start_s, span.stage, span.kind, span.microbatch))
    peak = [0] * num_stages
    for actions in schedule:
        for s, count in _peak_in_flight(actions).items():
            peak[s] = count
    return Timeline(
        spans=tuple(spans),
        step_time_s=step_time_s,
        bubble_fraction=bubble_fraction,
        peak_in_flight=tuple(peak),
    )


def _peak_in_flight(actions: Sequence[Action]) -> dict[int, int]:
    """Per stage of one slot: its micro-batches in flight at the moment the slot holds the most.

    Timing-independent: a slot's own list order decides when it holds activations.
    """
    in_flight: dict[int, int] = {a.stage: 0 for a in actions}
    at_peak, most = dict(in_flight), 0
    for a in actions:
        in_flight[a.stage] += 1 if a.kind == FORWARD else -1
        if sum(in_flight.values()) > most:
            most, at_peak = sum(in_flight.values()), dict(in_flight)
    return at_peak


_COMPUTE_TID = 0
_COMM_TID = 1


def to_chrome_trace(timeline: Timeline, stage_names: Sequence[str] | None = None) -> dict:
    """Chrome trace-event JSON (open in Perfetto / chrome://tracing), times in microseconds.

    One process per stage, with a compute thread (F, B) and a comm thread
    (sends, all-reduce). ``json.dump`` the result to a ``.json`` file.

    Example::

        >>> tl = simulate(gpipe(1, 1), fwd_s=[1e-3], bwd_s=[2e-3], send_fwd_s=[0],
        ...               send_bwd_s=[0], allreduce_s=[0])
        >>> [e["name"] for e in to_chrome_trace(tl)["traceEvents"] if e["ph"] == "X"]
        ['0F0', '0B0', 'allreduce']
    """
    num_stages = 1 + max((span.stage for span in timeline.spans), default=-1)
    if stage_names is None:
        stage_names = [f"stage {s}" for s in range(num_stages)]
    if len(stage_names) != num_stages:
        raise ValueError(
            f"stage_names has {len(stage_names)} names but the timeline has {num_stages} stages"
        )
    events: list[dict] = []

    def metadata(name: str, pid: int, tid: int, args: dict) -> dict:
        return {"name": name, "ph": "M", "pid": pid, "tid": tid, "args": args}

    for s, stage_name in enumerate(stage_names):
        events.append(metadata("process_name", s, _COMPUTE_TID, {"name": stage_name}))
        events.append(metadata("process_sort_index", s, _COMPUTE_TID, {"sort_index": s}))
        for tid, thread_name in ((_COMPUTE_TID, "compute"), (_COMM_TID, "comm")):
            events.append(metadata("thread_name", s, tid, {"name": thread_name}))
    for span in timeline.spans:
        if span.kind in _KINDS:
            name, tid = str(Action(span.stage, span.kind, span.microbatch)), _COMPUTE_TID
        elif span.kind == "allreduce":
            name, tid = "allreduce", _COMM_TID
        elif span.kind == "update":
            name, tid = "update", _COMPUTE_TID
        else:
            name, tid = f"{span.kind} mb{span.microbatch}", _COMM_TID
        events.append(
            {
                "name": name,
                "cat": span.kind,
                "ph": "X",
                "pid": span.stage,
                "tid": tid,
                "ts": span.start_s * 1e6,
                "dur": span.duration_s * 1e6,
                "args": {"stage": span.stage, "microbatch": span.microbatch},
            }
        )
    return {"traceEvents": events, "displayTimeUnit": "ms"}
