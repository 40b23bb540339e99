"""FedML cross-silo server manager for our algorithms: rounds, two-phase plans, evaluation, faults.

FedML's stock ``FedMLServerManager`` trains every client every round, evaluates on the server
(which holds no data here), waits forever for a client that died, and has no room for an extra
exchange. This subclass keeps FedML's messages (INIT_CONFIG / SYNC_MODEL down, SEND_MODEL up,
CLIENT_STATUS, FINISH) and their handlers' shape, and adds:

* the same round as :class:`~fedselect.fedml_runtime.simulation.SimulationFlow`, hook for hook:
  clients sampled by (seed, round), uploads averaged in client order, every client evaluated on
  its own test split after the rounds the simulation evaluates;
* the optional planning exchange of a two-phase algorithm (``needs_plan``/``plan_round`` on the
  server, ``plan_report``/``receive_plan`` on the client) as new message types with JSON text;
* evaluation piggybacks on the next round's model message: the model a client trains in round
  r is the one it evaluates for round r-1, so evaluation costs no extra download;
* faults: a client that never joins, stops answering or reports a failure is dropped or stops
  the federation (``deploy.on_client_failure``); every peer is told to finish either way.

The client side is :mod:`fedselect.fedml_runtime.cross_silo_client`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from fedselect.algorithms.payload import payload_nbytes
from fedselect.algorithms.server import BadUpdateError
from fedselect.config import ExperimentConfig
from fedselect.engine import EvalResult
from fedselect.fedml_bridge import import_fedml
from fedselect.fedml_runtime.deadlines import AnswerClock
from fedselect.fedml_runtime.grpc_channel import KEY_ROUND, FedSelectChannel, PeerUnreachable, Prober
from fedselect.fedml_runtime.messages import (
    KEY_CHECKPOINTED,
    KEY_DESCRIPTOR,
    KEY_EVAL,
    KEY_EVAL_ROUND,
    KEY_META,
    KEY_PLAN,
    KEY_REASON,
    KEY_REPORT,
    KEY_RESTORE,
    KEY_TRAIN,
    MODEL_MESSAGES,
    MSG_C2S_EVAL_RESULT,
    MSG_C2S_PLAN_REPORT,
    MSG_S2C_PLAN,
    STATUS_FAILED,
    FederationError,
    eval_due,
    eval_from_json,
    run_until_done,
    to_json,
)
from fedselect.fedml_runtime.server_watch import ServerWatch
from fedselect.fedml_runtime.simulation import RoundResult, aggregate_round, json_nbytes, sample_clients
from fedselect.fedml_runtime.transport import Transport, message_cap
from fedselect.fedml_runtime.upload_checks import check_meta, check_sender
from fedselect.options import ConfigError

import_fedml()
from fedml.core.distributed.communication.message import Message  # noqa: E402
from fedml.cross_silo.server.fedml_server_manager import FedMLServerManager  # noqa: E402
from fedml.cross_silo.server.message_define import MyMessage  # noqa: E402

log = logging.getLogger(__name__)

class FedSelectServerManager(ServerWatch, FedMLServerManager):
    """Rank 0 of a cross-silo federation of ``num_clients`` silos (ranks 1..N, client id = rank - 1).

    ``on_joined(descriptors)`` is called once every client has joined (or the join timeout let the
    federation go on without some) and returns our ServerAggregator; ``on_round_end(result, wire)``
    gets each finished round (a :class:`RoundResult`, as the simulation gives its logger) and the
    bytes its messages took on the wire.
    """

    def __init__(self, args: Any, *, config: ExperimentConfig, on_joined: Callable[[dict[int, dict[str, Any]]], Any],
                 on_round_end: Callable[[RoundResult, dict[str, float]], None], transport: Transport,
                 checkpoints: Any = None) -> None:
        self.config = config
        # the federation's checkpoint (fedselect.runner.federation_checkpoint.FederationCheckpointer), if any:
        # the round to start at, who had failed, the rounds each client trained in; notes for the clients
        self.checkpoints = checkpoints
        self.deploy = config.deploy
        self.transport = transport
        self.num_clients = num_clients = config.data.partition.num_clients
        super().__init__(args, None, None, 0, num_clients, "GRPC")
        self.rounds = config.train.rounds
        self.on_joined = on_joined
        self.on_round_end = on_round_end
        self.server: Any = None
        self.descriptors: dict[int, dict[str, Any]] = {}
        self.live: set[int] = set()
        # clients given up on before a checkpoint stay so: the server does not wait for them to join
        self.failed: dict[int, str] = dict(checkpoints.failed) if checkpoints is not None else {}
        # the rounds each client trained in (its round counter), for the checkpoints
        self.trained: dict[int, list[int]] = (
            {c: list(r) for c, r in checkpoints.trained.items()} if checkpoints is not None else {})
        self.phase = "join"
        self.round_idx = 0
        self.pending: dict[tuple[str, int], float] = {}
        self.sampled: list[int] = []
        self.sent_init: set[int] = set()
        self.uploads: dict[int, tuple[float, Any, dict[str, Any]]] = {}
        self.reports: dict[int, str] = {}
        self.plans: dict[int, str] = {}
        self.plan_pending = False
        self.evals: dict[int, EvalResult] = {}
        self.rejected: list[tuple[int, str]] = []
        self.stashed: tuple[RoundResult, dict[str, float]] | None = None
        self.error: str | None = None
        self.config_error: ConfigError | None = None
        self.started = time.monotonic()
        self.round_started: dict[int, float] = {}
        self.prober = Prober(self.com_manager, self.deploy.heartbeat_s)
        self.com_manager.on_idle = self._guarded(self._check_deadlines)
        self.clock = AnswerClock(self.deploy.response_timeout_s)
        if self.deploy.response_timeout_s is not None:
            self.com_manager.rpc_timeout_s = self.deploy.response_timeout_s
        self.com_manager.on_refused = self._guarded(self._on_refused, advance=True)

    # ---- FedML plumbing ---------------------------------------------------------------------
    def _init_manager(self) -> None:
        self.com_manager = FedSelectChannel(self.args.grpc_ipconfig_path, self.rank, self.size, self.args,
                                            transport=self.transport)
        self.com_manager.add_observer(self)

    def register_message_receive_handlers(self) -> None:
        for msg_type, handler in ((MyMessage.MSG_TYPE_CONNECTION_IS_READY, lambda _m: None),
                                  (MyMessage.MSG_TYPE_C2S_CLIENT_STATUS, self._on_status),
                                  (MyMessage.MSG_TYPE_C2S_SEND_MODEL_TO_SERVER, self._on_upload),
                                  (MSG_C2S_PLAN_REPORT, self._on_report),
                                  (MSG_C2S_EVAL_RESULT, self._on_eval)):
            self.register_message_receive_handler(msg_type, self._guarded(handler, advance=True))

    def receive_message(self, msg_type: Any, msg_params: Any) -> None:
        handler = self.message_handler_dict.get(msg_type)
        if handler is None:
            log.warning("ignored a message of unknown type %r from rank %s", msg_type, msg_params.get_sender_id())
            return
        handler(msg_params)

    def _guarded(self, fn: Callable[..., None], advance: bool = False) -> Callable[..., None]:
        """Any error in a handler or deadline check stops the federation and tells every client."""
        def run(*a: Any) -> None:
            if self.phase == "done":
                return
            try:
                fn(*a)
                if advance:
                    self._advance()
            except Exception as exc:
                log.error("federation stopped: %s", exc)
                if isinstance(exc, ConfigError):  # e.g. a budget the clients' model cannot meet: exit 2
                    self.config_error = exc
                self._stop(f"{type(exc).__name__}: {exc}" if not isinstance(exc, FederationError) else str(exc))
        return run

    def run_federation(self) -> None:
        """Serve until the federation ends; raise :class:`FederationError` if it failed."""
        # on Ctrl-C clients leave now, not after deploy.peer_timeout_s
        try:
            run_until_done(self, lambda: self._stop("the server was interrupted"))
        except FederationError:
            if self.config_error is not None:  # the config's fault, reported as such (exit status 2)
                raise self.config_error from None
            raise

    # ---- sending ------------------------------------------------------------------------------
    def _send(self, cid: int, msg_type: Any, params: Mapping[str, Any], *,
              connect_timeout: float | None = None) -> bool:
        msg = Message(msg_type, 0, cid + 1)
        for key, value in params.items():
            msg.add_params(key, value)
        self.com_manager.connect_timeout_s = connect_timeout or self.deploy.peer_timeout_s
        try:
            self.send_message(msg)
            return True
        except PeerUnreachable as exc:
            if self.phase != "done":
                self._fail(cid, str(exc))
            return False

    def _send_model(self, cid: int, global_params: Any, *, train: bool, eval_round: int | None, plan: bool) -> None:
        msg_type = (MyMessage.MSG_TYPE_S2C_SYNC_MODEL_TO_CLIENT if cid in self.sent_init
                    else MyMessage.MSG_TYPE_S2C_INIT_CONFIG)
        params = {MyMessage.MSG_ARG_KEY_MODEL_PARAMS: global_params, MyMessage.MSG_ARG_KEY_CLIENT_INDEX: str(cid),
                  KEY_ROUND: self.round_idx, KEY_TRAIN: train,
                  KEY_EVAL_ROUND: -1 if eval_round is None else eval_round, KEY_PLAN: plan}
        if self.checkpoints is not None:  # where the client starts from, and what it may forget
            if cid not in self.sent_init:
                params[KEY_RESTORE] = json.dumps(self.checkpoints.restore_note(cid))
            params[KEY_CHECKPOINTED] = self.checkpoints.written
        self.sent_init.add(cid)
        self._send(cid, msg_type, params)

    def _stop(self, reason: str | None) -> None:
        """End the federation: tell every live client (briefly; it may be gone), stop serving."""
        if self.phase == "done":
            return
        self.phase = "done"
        self.error = reason
        for cid in sorted(self.live):
            self._send(cid, MyMessage.MSG_TYPE_S2C_FINISH, {MyMessage.MSG_ARG_KEY_CLIENT_INDEX: str(cid),
                                                             KEY_REASON: reason or ""}, connect_timeout=2.0)
        self.finish()

    # ---- handlers -----------------------------------------------------------------------------
    def _client_of(self, msg: Any) -> int:
        cid = int(msg.get_sender_id()) - 1
        if not 0 <= cid < self.num_clients:
            raise FederationError(f"message from rank {cid + 1}, not a client of this federation")
        return cid

    def _round_of(self, kind: str) -> int | None:
        return self.stashed[0].round_idx if kind == "eval" and self.stashed else self.round_idx

    def _on_status(self, msg: Any) -> None:
        cid = self._client_of(msg)
        status = msg.get(MyMessage.MSG_ARG_KEY_CLIENT_STATUS)
        if status == STATUS_FAILED:
            self._fail(cid, f"reported: {msg.get(KEY_REASON)}")
        elif status == self.ONLINE_STATUS_FLAG and self.phase == "join" and cid not in self.failed:
            self.descriptors[cid] = json.loads(msg.get(KEY_DESCRIPTOR))
            self.live.add(cid)
            log.info("client %d joined (%d/%d)", cid, len(self.descriptors), self.num_clients)
        elif status == self.ONLINE_STATUS_FLAG and cid not in self.live:
            log.warning("client %d came online after the federation started without it; ignored", cid)

    def _on_upload(self, msg: Any) -> None:
        cid = self._client_of(msg)
        if not self._expected("upload", cid, msg):
            return
        self.trained.setdefault(cid, []).append(self.round_idx)  # it trained, whatever becomes of its upload
        payload = msg.get(MyMessage.MSG_ARG_KEY_MODEL_PARAMS)
        try:
            meta = check_meta(msg.get(KEY_META))
            # an upload speaks for the client that sent it, weighted by the sample count it joined with
            weight = check_sender(payload, msg.get(MyMessage.MSG_ARG_KEY_NUM_SAMPLES), client_id=cid,
                                  joined_with=self.descriptors[cid]["num_train"], certified=self.transport.secure)
        except ValueError as exc:
            return self._reject(cid, str(exc))
        self.uploads[cid] = (weight, payload, meta)

    def _reject(self, cid: int, reason: str) -> None:
        """An upload that cannot be averaged in: stop (train.on_bad_update=error) or drop it, logged."""
        if self.config.train.on_bad_update == "error":
            raise BadUpdateError(f"rejected update from client {cid}: {reason} (train.on_bad_update=error)")
        log.warning("dropping update from client %d: %s", cid, reason)
        self.rejected.append((cid, reason))

    def _on_report(self, msg: Any) -> None:
        cid = self._client_of(msg)
        if self._expected("report", cid, msg):
            self.reports[cid] = msg.get(KEY_REPORT)

    def _on_eval(self, msg: Any) -> None:
        cid = self._client_of(msg)
        if self._expected("eval", cid, msg):
            self.evals[cid] = eval_from_json(msg.get(KEY_EVAL))

    # ---- the round ----------------------------------------------------------------------------
    def _waiting(self, kind: str) -> bool:
        return any(k == kind for k, _ in self.pending)

    def _advance(self) -> None:
        if self.phase == "join":
            if len(self.descriptors) + len(self.failed) >= self.num_clients:
                self.server = self.on_joined(dict(sorted(self.descriptors.items())))
                # nobody sends while the clients wait for their first model: the cap may grow now
                self.com_manager.set_message_cap(message_cap(self.server.model.state_dict()),
                                                 "from the model; deploy.max_message_mb overrides")
                self.phase = "rounds"
                # a resumed federation goes on after its checkpoint's round
                self._start_round(self.checkpoints.start_round if self.checkpoints is not None else 0)
            else:
                return
        while self.phase in ("rounds", "final"):
            if self.stashed is not None and not self._waiting("eval"):
                result, wire = self.stashed
                self.stashed = None
                result.evaluation = dict(sorted(self.evals.items())) or None
                self.on_round_end(result, wire)
            elif self.phase == "final":
                if self.stashed is None:
                    self._stop(None)
                return
            elif self.plan_pending and not self._waiting("report"):
                self._send_plans()
            elif not self.plan_pending and self.stashed is None and not self._waiting("upload"):
                self._aggregate()
            else:
                return

    def _start_round(self, round_idx: int) -> None:
        self.round_idx = self.args.round_idx = round_idx
        self.round_started[round_idx] = time.monotonic()
        final = round_idx >= self.rounds
        train = self.config.train
        self.sampled = [] if final else [c for c in sample_clients(self.num_clients, train.participation,
                                                                     self.config.seed, round_idx) if c in self.live]
        eval_round = self.stashed[0].round_idx if self.stashed else None
        recipients = sorted(set(self.sampled) | (self.live if eval_round is not None else set()))
        self.plan_pending = bool(self.sampled) and bool(self.server.needs_plan(round_idx))
        self.uploads, self.reports, self.plans, self.evals, self.rejected = {}, {}, {}, {}, []
        now = time.monotonic()
        for cid in recipients:
            if eval_round is not None:
                self.pending[("eval", cid)] = now
            if cid in self.sampled:
                self.pending[("upload", cid)] = now
                if self.plan_pending:
                    self.pending[("report", cid)] = now
        global_params = self.server.get_model_params()
        for cid in recipients:
            if cid in self.live:
                self._send_model(cid, global_params, train=cid in self.sampled, eval_round=eval_round,
                                 plan=self.plan_pending and cid in self.sampled)
        if final:
            self.phase = "final"

    def _send_plans(self) -> None:
        self.plan_pending = False
        reports = {cid: json.loads(text) for cid, text in sorted(self.reports.items())}
        plans = self.server.plan_round(self.round_idx, reports) if reports else {}
        missing = sorted(set(reports) - set(plans))
        if missing:
            raise FederationError(f"server.plan_round returned no plan for clients {missing}")
        for cid in sorted(reports):
            if cid in self.live:
                self.plans[cid] = to_json(plans[cid], f"the plan for client {cid}")
                self._send(cid, MSG_S2C_PLAN, {KEY_ROUND: self.round_idx, KEY_PLAN: self.plans[cid]})

    def _aggregate(self) -> None:
        """Aggregate the round exactly as SimulationFlow.run_round does, then start the next one."""
        cids = sorted(self.uploads)
        uploads = [(self.uploads[c][0], self.uploads[c][1]) for c in cids]
        metas = [self.uploads[c][2] for c in cids]
        bytes_up = sum(payload_nbytes(p) for _, p in uploads) + sum(json_nbytes(json.loads(t))
                                                                    for t in self.reports.values())
        bytes_down = sum(int(m["download_nbytes"]) for m in metas) + sum(len(t.encode()) for t in self.plans.values())
        dropped, server_metrics = aggregate_round(self.server, uploads)
        if self.checkpoints is not None and self.checkpoints.due(self.round_idx):
            self.checkpoints.capture(self.round_idx)  # before the next round's plans can change the server
        dropped = self.rejected + dropped
        losses = [float(m["train_loss"]) for m in metas if math.isfinite(float(m["train_loss"]))]
        result = RoundResult(round_idx=self.round_idx, sampled=list(self.sampled),
                             train_loss=float(np.mean(losses)) if losses else float("nan"), bytes_up=bytes_up,
                             bytes_down=bytes_down, client_metrics={c: self.uploads[c][2]["metrics"] for c in cids},
                             dropped=dropped, server_metrics=server_metrics)
        wire = self.wire_bytes(self.round_idx)
        wire["round_seconds"] = time.monotonic() - self.round_started[self.round_idx]
        if eval_due(self.round_idx, self.rounds, self.config.train.eval_every):
            self.stashed = (result, wire)
        else:
            self.on_round_end(result, wire)
        self._start_round(self.round_idx + 1)

    def wire_bytes(self, round_idx: int) -> dict[str, float]:
        """Serialized bytes of round ``round_idx``'s training messages: model down to its trainers and
        plans down; uploads and plan reports up (evaluation traffic is not a round's training)."""
        up = down = 0
        for t in self.com_manager.traffic:
            if t.round_idx != round_idx:
                continue
            if t.direction == "received" and t.msg_type in (str(MyMessage.MSG_TYPE_C2S_SEND_MODEL_TO_SERVER),
                                                            str(MSG_C2S_PLAN_REPORT)):
                up += t.nbytes
            elif t.direction == "sent" and (t.msg_type == str(MSG_S2C_PLAN) or
                                            (t.msg_type in MODEL_MESSAGES and t.peer - 1 in self.sampled)):
                down += t.nbytes
        return {"wire_bytes_up_round": up, "wire_bytes_down_round": down}
