"""How long a cross-silo process waits for an answer from a peer that is still reachable.

A peer that is gone (its port refuses connections) or stopped (its process completes no
connection: SIGSTOP, a frozen VM) is noticed by the liveness probes within ``deploy.peer_timeout_s``
(:class:`~fedselect.fedml_runtime.grpc_channel.Prober`). What is left is a peer that answers
probes but not the federation (hung): ``deploy.response_timeout_s`` bounds the wait for one
expected answer. Set, it is that many seconds. Unset (the default), it is derived from the
federation's own pace, :class:`AnswerClock`:

* until the first answer of a kind (an upload, a plan report, an evaluation) has come from any
  client, :data:`FIRST_ANSWER_S` (half an hour: a first round includes warming up, and there is
  nothing to derive from yet);
* afterwards, for client c: ``max(FLOOR_S, FACTOR x r x size_c)``, where ``r`` is the slowest
  seconds per sample any client has taken for that kind so far and ``size_c`` is client c's
  train + test samples. Ten times the slowest pace seen absorbs load spikes on shared machines and
  clients of different sizes; the floor covers the constant costs (model transfer, start-up).

So a hung client of a federation whose rounds take 5 s is given up after 2 minutes, not an hour,
and one whose rounds take 10 minutes is never given up on for being slow.
"""

from __future__ import annotations

FIRST_ANSWER_S = 1800.0
FLOOR_S = 120.0
FACTOR = 10.0


class AnswerClock:
    """Per kind of answer, the slowest pace seen; the time limit for the next one."""

    def __init__(self, fixed_s: float | None) -> None:
        self.fixed_s = fixed_s
        self.pace: dict[str, float] = {}  # kind -> slowest seconds per sample

    def observe(self, kind: str, seconds: float, size: int) -> None:
        """An answer of ``kind`` came ``seconds`` after it was asked for, from a client of ``size`` samples."""
        self.pace[kind] = max(self.pace.get(kind, 0.0), max(0.0, seconds) / max(1, size))

    def limit(self, kind: str, size: int) -> float:
        """Seconds to wait for an answer of ``kind`` from a client of ``size`` samples."""
        if self.fixed_s is not None:
            return self.fixed_s
        pace = self.pace.get(kind)
        return FIRST_ANSWER_S if pace is None else max(FLOOR_S, FACTOR * pace * max(1, size))

    def describe(self, kind: str) -> str:
        """Where :meth:`limit` comes from, for messages."""
        if self.fixed_s is not None:
            return "deploy.response_timeout_s"
        if kind not in self.pace:
            return f"deploy.response_timeout_s unset: {FIRST_ANSWER_S:g} s for the first {kind}"
        return (f"deploy.response_timeout_s unset: {FACTOR:g}x the slowest {kind} so far per sample, "
                f"at least {FLOOR_S:g} s")


class SilenceClock:
    """A client's patience with a silent server (one that answers probes but sends nothing):
    ``join_timeout_s`` plus ``response_timeout_s``, or, unset, plus the larger of
    :data:`FIRST_ANSWER_S` and :data:`FACTOR` times the longest gap between the server's messages so far
    (a client may legitimately wait a whole round, or several when it is not sampled)."""

    def __init__(self, join_timeout_s: float, fixed_s: float | None) -> None:
        self.join_timeout_s = join_timeout_s
        self.fixed_s = fixed_s
        self.longest_gap = 0.0

    def heard(self, gap: float) -> None:
        self.longest_gap = max(self.longest_gap, gap)

    def limit(self) -> float:
        extra = self.fixed_s if self.fixed_s is not None else max(FIRST_ANSWER_S, FACTOR * self.longest_gap)
        return self.join_timeout_s + extra
