"""The cross-silo server's faults: which clients it waits for, since when, and when it gives up on one.

A mixin of :class:`~fedselect.fedml_runtime.cross_silo.FedSelectServerManager` (its state: ``pending``
answers by (kind, client) with the time each was asked for, ``live`` and ``failed`` clients, the
``deploy`` section, a :class:`~fedselect.fedml_runtime.grpc_channel.Prober` and an
:class:`~fedselect.fedml_runtime.deadlines.AnswerClock`). A client has failed when it never joins
(``deploy.join_timeout_s``), does not answer probes for ``deploy.peer_timeout_s`` (its port refuses
connections, or its process is stopped), answers probes but not the federation for longer than the
clock allows (``deploy.response_timeout_s``, or derived), reports a failure, or a message of its
certificate was refused; then ``deploy.on_client_failure`` decides.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from fedselect.fedml_runtime.grpc_channel import KEY_ROUND
from fedselect.fedml_runtime.messages import FederationError

log = logging.getLogger(__name__)


class ServerWatch:
    """Deadlines, probes and the failure policy of the server manager (a mixin: see the module docstring)."""

    pending: dict[tuple[str, int], float]
    live: set[int]
    failed: dict[int, str]
    deploy: Any
    descriptors: dict[int, dict[str, Any]]

    def _fail(self, cid: int, reason: str) -> None:
        if cid in self.failed:
            return
        self.failed[cid] = reason
        self.live.discard(cid)
        self.pending = {k: t for k, t in self.pending.items() if k[1] != cid}
        what = f"client {cid} (rank {cid + 1}) failed: {reason}"
        if self.deploy.on_client_failure == "error":
            raise FederationError(f"{what} (deploy.on_client_failure=error)")
        if len(self.live) < self.deploy.min_clients:
            raise FederationError(f"{what}; {len(self.live)} clients left, fewer than deploy.min_clients="
                                  f"{self.deploy.min_clients}")
        log.warning("%s; continuing with clients %s (deploy.on_client_failure=continue)", what, sorted(self.live))

    def _size(self, cid: int) -> int:
        d = self.descriptors.get(cid, {})
        return int(d.get("num_train", 0)) + int(d.get("num_test", 0))

    def _check_deadlines(self) -> None:
        s: Any = self
        now = time.monotonic()
        if s.phase == "join":
            if now - s.started > self.deploy.join_timeout_s:
                missing = [c for c in range(s.num_clients) if c not in self.descriptors]
                why = f"did not join within deploy.join_timeout_s={self.deploy.join_timeout_s:g} s"
                if self.deploy.on_client_failure == "error":
                    names = ", ".join(f"client {c} (rank {c + 1})" for c in missing)
                    raise FederationError(f"{names} {why} (deploy.on_client_failure=error)")
                for cid in missing:
                    self._fail(cid, why)
                s._advance()
            return
        for cid in sorted({c for _, c in self.pending}):
            down = s.prober.unreachable_for(cid + 1, now)
            if down > self.deploy.peer_timeout_s:
                self._fail(cid, f"its port refused connections or did not answer for {down:.0f} s "
                                "(deploy.peer_timeout_s)")
                continue
            for (kind, c), asked in sorted(self.pending.items()):
                limit = s.clock.limit(kind, self._size(cid))
                if c == cid and now - asked > limit:
                    self._fail(cid, f"no {kind} for {now - asked:.0f} s while it answered probes "
                                    f"({s.clock.describe(kind)}: {limit:.0f} s)")
                    break
        s._advance()

    def _expected(self, kind: str, cid: int, msg: Any) -> bool:
        """Whether ``msg`` is an answer of ``kind`` the server waits for from ``cid`` (then no longer)."""
        s: Any = self
        if (kind, cid) in self.pending and msg.get(KEY_ROUND) == s._round_of(kind):
            asked = self.pending.pop((kind, cid))
            s.clock.observe(kind, time.monotonic() - asked, self._size(cid))
            return True
        log.warning("ignored an unexpected %s from client %d (round %s)", kind, cid, msg.get(KEY_ROUND))
        return False

    def _on_refused(self, rank: int, reason: str) -> None:
        """The channel refused a message of a client's certificate (too large, queue full): it is lost."""
        s: Any = self
        if 1 <= rank <= s.num_clients and rank - 1 not in self.failed:
            self._fail(rank - 1, reason)
