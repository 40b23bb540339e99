"""FedML cross-silo client manager for our algorithms (the server side: :mod:`.cross_silo`).

A subclass of FedML's ``ClientMasterManager`` driving one of our ClientTrainers through FedML's
``TrainerDistAdapter``/``FedMLTrainer`` (``set_model_params`` -> ``on_before_local_training`` ->
``train`` -> ``on_after_local_training`` -> ``get_model_params``), with what the stock manager
lacks:

* it joins with a descriptor of its data (sizes, classes, normalization; never the data);
* a model message says what to do with the model: evaluate it for the previous round
  (personalized model, own test split, counts sent back), then plan and/or train this round;
* the planning exchange of a two-phase algorithm: ``set_model_params(global)`` ->
  ``plan_report()`` up, then ``receive_plan(plan)`` and training when the plan comes down;
* it leaves, with an error, when the server's port stops answering or the server stays silent
  too long, and tells the server when its own training fails.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from fedselect.deploy_config import DeployConfig
from fedselect.fedml_bridge import import_fedml
from fedselect.fedml_runtime.deadlines import SilenceClock
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
    MSG_C2S_EVAL_RESULT,
    MSG_C2S_PLAN_REPORT,
    MSG_S2C_PLAN,
    STATUS_FAILED,
    FederationError,
    eval_to_json,
    run_until_done,
    to_json,
)
from fedselect.fedml_runtime.transport import Transport, message_cap

import_fedml()
from fedml.core.distributed.communication.message import Message  # noqa: E402
from fedml.cross_silo.client.fedml_client_master_manager import ClientMasterManager  # noqa: E402
from fedml.cross_silo.client.message_define import MyMessage  # noqa: E402

log = logging.getLogger(__name__)


class FedSelectClientManager(ClientMasterManager):
    """Rank ``client_id + 1`` of a cross-silo federation; ``adapter`` wraps our ClientTrainer."""

    def __init__(self, args: Any, adapter: Any, *, client_id: int, num_clients: int, deploy: DeployConfig,
                 descriptor: dict[str, Any], transport: Transport, snapshots: Any = None) -> None:
        self.deploy = deploy
        # this client's own checkpoints (fedselect.runner.federation_checkpoint.ClientSnapshots), if any
        self.snapshots = snapshots
        self.transport = transport
        self.model_cap = message_cap(adapter.trainer.trainer.model.state_dict())
        super().__init__(args, adapter, None, client_id + 1, num_clients, "GRPC")
        self.client_id = client_id
        self.descriptor = descriptor
        self.trainer = adapter.trainer.trainer  # our ClientTrainer, behind FedML's FedMLTrainer
        self.global_params: Any = None
        self.train_round: int | None = None
        self.download_nbytes = 0
        self.joined = False
        self.dataset_ready = False
        self.error: str | None = None
        self.finished = False
        self.last_heard = time.monotonic()
        self.rounds_trained = 0
        self.prober = Prober(self.com_manager, deploy.heartbeat_s)
        self.com_manager.on_idle = self._guarded(self._check_server)
        self.silence = SilenceClock(deploy.join_timeout_s, deploy.response_timeout_s)
        if deploy.response_timeout_s is not None:
            self.com_manager.rpc_timeout_s = deploy.response_timeout_s
        self.com_manager.on_refused = self._guarded(self._on_refused)

    def _init_manager(self) -> None:
        self.com_manager = FedSelectChannel(self.args.grpc_ipconfig_path, self.rank, self.size, self.args,
                                            transport=self.transport, message_cap=self.model_cap)
        self.com_manager.add_observer(self)

    def register_message_receive_handlers(self) -> None:
        for msg_type, handler in ((MyMessage.MSG_TYPE_CONNECTION_IS_READY, self._on_ready),
                                  (MyMessage.MSG_TYPE_S2C_CHECK_CLIENT_STATUS, self._on_check),
                                  (MyMessage.MSG_TYPE_S2C_INIT_CONFIG, self._on_model),
                                  (MyMessage.MSG_TYPE_S2C_SYNC_MODEL_TO_CLIENT, self._on_model),
                                  (MSG_S2C_PLAN, self._on_plan),
                                  (MyMessage.MSG_TYPE_S2C_FINISH, self._on_finish)):
            self.register_message_receive_handler(msg_type, self._guarded(handler))

    def receive_message(self, msg_type: Any, msg_params: Any) -> None:
        handler = self.message_handler_dict.get(msg_type)
        if handler is None:
            log.warning("ignored a message of unknown type %r", msg_type)
            return
        if msg_params.get_sender_id() != msg_params.get_receiver_id():  # not the local "ready" note
            now = time.monotonic()
            self.silence.heard(now - self.last_heard)
            self.last_heard = now
        handler(msg_params)

    def _guarded(self, fn: Any) -> Any:
        def run(*a: Any) -> None:
            if self.finished:
                return
            try:
                fn(*a)
            except Exception as exc:
                ours = isinstance(exc, (FederationError, PeerUnreachable))
                reason = str(exc) if ours else f"{type(exc).__name__}: {exc}"
                log.error("client %d stops: %s", self.client_id, reason)
                if not isinstance(exc, PeerUnreachable):  # tell the server, so it need not wait for a timeout
                    self._status(STATUS_FAILED, reason=reason, connect_timeout=2.0, quiet=True)
                self._leave(reason)
        return run

    def run_federation(self) -> None:
        """Take part until the server ends the federation; raise :class:`FederationError` on failure."""
        run_until_done(self, lambda: self._status(STATUS_FAILED, reason="the client was interrupted",
                                                  connect_timeout=2.0, quiet=True))

    def _leave(self, error: str | None) -> None:
        self.finished = True
        self.error = error
        self.finish()

    # ---- sending ------------------------------------------------------------------------------
    def _send(self, msg_type: Any, params: dict[str, Any], *, connect_timeout: float | None = None) -> None:
        msg = Message(msg_type, self.rank, 0)
        for key, value in params.items():
            msg.add_params(key, value)
        self.com_manager.connect_timeout_s = connect_timeout or self.deploy.peer_timeout_s
        self.send_message(msg)

    def _status(self, status: str, *, reason: str = "", connect_timeout: float | None = None,
                quiet: bool = False) -> None:
        params = {MyMessage.MSG_ARG_KEY_CLIENT_STATUS: status, MyMessage.MSG_ARG_KEY_CLIENT_OS: "PythonClient",
                  KEY_DESCRIPTOR: json.dumps(self.descriptor), KEY_REASON: reason}
        try:
            self._send(MyMessage.MSG_TYPE_C2S_CLIENT_STATUS, params, connect_timeout=connect_timeout)
        except PeerUnreachable:
            if not quiet:
                raise

    # ---- handlers -----------------------------------------------------------------------------
    def _on_ready(self, _msg: Any) -> None:
        if not self.joined:
            self.joined = True
            # the server may start after this client: wait for its port up to the join timeout
            self._status(self.ONLINE_STATUS_FLAG, connect_timeout=self.deploy.join_timeout_s)
            log.info("client %d joined", self.client_id)

    def _on_check(self, _msg: Any) -> None:
        self._status(self.ONLINE_STATUS_FLAG)

    def _on_model(self, msg: Any) -> None:
        round_idx = int(msg.get(KEY_ROUND))
        params = msg.get(MyMessage.MSG_ARG_KEY_MODEL_PARAMS)
        if self.snapshots is not None:
            note = msg.get(KEY_RESTORE)  # the first model message: a new federation, or where to resume
            if note is not None:
                self.snapshots.restore(json.loads(note), self.trainer)
            self.snapshots.prune(int(msg.get(KEY_CHECKPOINTED) if msg.get(KEY_CHECKPOINTED) is not None else -1))
        if not self.dataset_ready:  # FedML hands the trainer its sample count here
            self.trainer_dist_adapter.update_dataset(self.client_id)
            self.dataset_ready = True
        eval_round = int(msg.get(KEY_EVAL_ROUND))
        if eval_round >= 0:
            self.trainer.set_model_params(params)
            result = self.trainer.test(None, self.trainer_dist_adapter.device, self.args)
            self._send(MSG_C2S_EVAL_RESULT, {KEY_ROUND: eval_round, KEY_EVAL: eval_to_json(result)})
        if not msg.get(KEY_TRAIN):
            return
        # the simulation counts the download before the client takes the model in
        self.download_nbytes = self.trainer.download_nbytes(params)
        self.global_params, self.train_round = params, round_idx
        if msg.get(KEY_PLAN):
            self.trainer.set_model_params(params)
            report = to_json(self.trainer.plan_report(), f"client {self.client_id}'s plan report")
            self._send(MSG_C2S_PLAN_REPORT, {KEY_ROUND: round_idx, KEY_REPORT: report})
        else:
            self._train()

    def _on_plan(self, msg: Any) -> None:
        if self.train_round is None or int(msg.get(KEY_ROUND)) != self.train_round:
            log.warning("ignored a plan for round %s (waiting for round %s)", msg.get(KEY_ROUND), self.train_round)
            return
        self.trainer.receive_plan(json.loads(msg.get(KEY_PLAN)))
        self._train()

    def _train(self) -> None:
        round_idx = self.train_round
        self.trainer.set_model_params(self.global_params)
        # FedML's stock path: FedMLTrainer.train runs the trainer's hooks and returns its upload
        upload, num_samples = self.trainer_dist_adapter.train(round_idx)
        loss = float(self.trainer.last_train_stats.mean_loss)
        # JSON text carries NaN/Inf as tokens Python reads back; the server skips non-finite losses
        meta = {"train_loss": loss, "download_nbytes": self.download_nbytes,
                "metrics": {k: float(v) for k, v in self.trainer.round_metrics().items()}}
        self.global_params, self.train_round = None, None
        self.rounds_trained += 1
        if self.snapshots is not None:  # before the upload: a checkpoint of this round may count on it
            self.snapshots.save(round_idx, self.trainer)
        self._send(MyMessage.MSG_TYPE_C2S_SEND_MODEL_TO_SERVER,
                   {MyMessage.MSG_ARG_KEY_MODEL_PARAMS: upload, MyMessage.MSG_ARG_KEY_NUM_SAMPLES: num_samples,
                    KEY_ROUND: round_idx, KEY_META: json.dumps(meta)})

    def _on_refused(self, _rank: int, reason: str) -> None:
        raise FederationError(f"a message from the server was lost: {reason}")

    def _on_finish(self, msg: Any) -> None:
        reason = msg.get(KEY_REASON) or None
        if reason:
            log.error("client %d: the server stopped the federation: %s", self.client_id, reason)
        elif self.snapshots is not None:
            self.snapshots.clear()  # finished: nothing to resume
        self._leave(f"the server stopped the federation: {reason}" if reason else None)

    def _check_server(self) -> None:
        """Leave when the server stops answering probes, or it stays silent past every deadline."""
        down = self.prober.unreachable_for(0)
        if down > self.deploy.peer_timeout_s:
            address, port = self.com_manager.endpoint(0)
            raise PeerUnreachable(0, f"{address}:{port}",
                                  f"the server's port refused connections for {down:.0f} s (deploy.peer_timeout_s)")
        silent = time.monotonic() - self.last_heard
        if silent > self.silence.limit():
            raise FederationError(f"no message from the server for {silent:.0f} s while it answered probes "
                                  "(deploy.join_timeout_s + deploy.response_timeout_s, or derived when unset)")
