"""FedML's GRPC channel with a safe wire format, a blocking receive loop, byte counts and probes.

What FedML 0.9.6's ``GRPCCommManager`` does, and what this subclass changes:

* It ``pickle.loads`` whatever arrives on its port: anyone who can connect can run code in the
  process. Here a message travels as ``torch.save`` of its parameters and is read back with
  ``torch.load(weights_only=True)`` (tensors, containers, numbers, strings and the allow-listed
  :data:`WIRE_TYPES` only), and a message from a rank not in the ipconfig is dropped. There is
  still no authentication and no encryption (docs/DEPLOYMENT.md).
* Its receive loop polls the queue without sleeping (one core at 100 % while idle). Here it
  blocks on the queue, waking every ``poll_s`` to run ``on_idle`` (deadlines, liveness probes).
* A send to an unreachable peer fails at once; here it waits up to ``connect_timeout_s`` for
  the peer's port (so the starting order does not matter) and raises :class:`PeerUnreachable`.
* Every message's serialized size is recorded (:attr:`FedSelectChannel.traffic`): the bytes on
  the wire, beside the counts the algorithms log.
"""

from __future__ import annotations

import csv
import io
import logging
import queue
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import torch

from fedselect.core.masks import PackedTensor
from fedselect.fedml_bridge import import_fedml

import_fedml()
from fedml.core.distributed.communication.grpc import (  # noqa: E402  (needs the offline patch first)
    grpc_comm_manager_pb2,
    grpc_comm_manager_pb2_grpc,
)
from fedml.core.distributed.communication.grpc.grpc_comm_manager import GRPCCommManager  # noqa: E402
from fedml.core.distributed.communication.message import Message  # noqa: E402

log = logging.getLogger(__name__)

# classes besides tensors and plain containers that may travel in a message (mask bits)
WIRE_TYPES: list[type] = [PackedTensor]
# the message parameter every fedselect message carries its round index in
KEY_ROUND = "fedselect_round"


class PeerUnreachable(ConnectionError):
    """A message could not be delivered: the peer's port did not answer in time."""

    def __init__(self, rank: int, address: str, reason: str) -> None:
        super().__init__(f"rank {rank} at {address} is unreachable: {reason}")
        self.rank = rank


@dataclass(frozen=True)
class Traffic:
    """One message as it crossed the wire."""

    direction: str  # "sent" | "received"
    msg_type: str
    peer: int
    round_idx: int | None
    nbytes: int


@dataclass(frozen=True)
class Endpoint:
    """Where one rank listens (``bind``) and where the others reach it (``address``)."""

    rank: int
    address: str
    port: int
    bind: str | None = None


def write_ipconfig(path: str | Path, endpoints: Sequence[Endpoint]) -> Path:
    """FedML 0.9.6's GRPC ipconfig CSV: ``eid,rank,grpc_server_ip,grpc_server_port,ingress_ip``.

    FedML binds a rank's server to ``grpc_server_ip`` and connects to ``ingress_ip`` when set,
    so an endpoint with a separate bind interface (0.0.0.0 behind NAT) gets both columns.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["eid", "rank", "grpc_server_ip", "grpc_server_port", "ingress_ip"])
        for e in endpoints:
            writer.writerow([e.rank, e.rank, e.bind or e.address, e.port, e.address if e.bind else ""])
    return path


def encode_message(msg: Message) -> bytes:
    """A message's type, sender, receiver and parameters as ``torch.save`` bytes."""
    buf = io.BytesIO()
    torch.save({"type": msg.get_type(), "sender": msg.get_sender_id(), "receiver": msg.get_receiver_id(),
                "params": msg.get_params()}, buf)
    return buf.getvalue()


def decode_message(data: bytes) -> Message:
    """Read :func:`encode_message` bytes without executing anything they contain."""
    with torch.serialization.safe_globals(WIRE_TYPES):
        blob = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or not {"type", "sender", "receiver", "params"} <= set(blob):
        raise ValueError("not a fedselect wire message")
    msg = Message(blob["type"], int(blob["sender"]), int(blob["receiver"]))
    msg.init(dict(blob["params"]))
    return msg


def port_open(address: str, port: int, timeout: float = 1.0) -> bool:
    """Whether something accepts TCP connections at ``address:port`` (a liveness probe)."""
    try:
        with socket.create_connection((address, port), timeout=timeout):
            return True
    except OSError:
        return False


class FedSelectChannel(GRPCCommManager):
    """FedML's GRPC comm manager with the changes listed in the module docstring."""

    def __init__(self, ipconfig_path: str | Path, rank: int, size: int, args: Any, *, poll_s: float = 0.5) -> None:
        self.poll_s = poll_s
        self.connect_timeout_s = 30.0
        # an accepted send only enqueues at the peer, so a whole message, not training, is waited for
        self.rpc_timeout_s: float | None = 600.0
        self.traffic: list[Traffic] = []
        self.on_idle: Callable[[], None] | None = None
        self.dropped_messages = 0
        try:
            super().__init__(str(ipconfig_path), client_rank=rank, client_num=size, args=args)
        except RuntimeError as exc:  # grpc cannot bind the port
            raise RuntimeError(f"rank {rank} cannot listen on its port ({exc}); is another process using it?") from exc

    def endpoint(self, rank: int) -> tuple[str, int]:
        """(address, port) at which ``rank`` is reached."""
        m = self.grpc_mappings[int(rank)]
        return (m.ingress_ip or m.grpc_server_ip), int(m.grpc_server_port)

    def send_message(self, msg: Message) -> None:
        receiver = int(msg.get_receiver_id())
        if receiver not in self.grpc_mappings:
            raise PeerUnreachable(receiver, "?", "rank not in the ipconfig")
        address, port = self.endpoint(receiver)
        url = f"{address}:{port}"
        data = encode_message(msg)
        channel = grpc.insecure_channel(url, options=self.opts)
        try:
            try:
                grpc.channel_ready_future(channel).result(timeout=self.connect_timeout_s)
            except grpc.FutureTimeoutError:
                raise PeerUnreachable(receiver, url, f"no answer within {self.connect_timeout_s:g} s") from None
            request = grpc_comm_manager_pb2.CommRequest(client_id=self.client_id, message=data)
            try:
                grpc_comm_manager_pb2_grpc.gRPCCommManagerStub(channel).sendMessage(request,
                                                                                    timeout=self.rpc_timeout_s)
            except grpc.RpcError as exc:
                raise PeerUnreachable(receiver, url, f"{exc.code().name}: {exc.details()}") from None
        finally:
            channel.close()
        self.traffic.append(Traffic("sent", str(msg.get_type()), receiver, msg.get(KEY_ROUND), len(data)))

    def message_handling_subroutine(self) -> None:
        while self.is_running:
            try:
                data = self.grpc_servicer.message_q.get(timeout=self.poll_s)
            except queue.Empty:
                if self.on_idle is not None:
                    self.on_idle()
                continue
            try:
                msg = decode_message(data)
            except Exception as exc:  # a stranger's bytes must not stop the federation
                self.dropped_messages += 1
                log.warning("dropped an unreadable message of %d bytes: %s", len(data), str(exc)[:200])
                continue
            sender = int(msg.get_sender_id())
            if sender not in self.grpc_mappings or sender == self.client_rank:
                self.dropped_messages += 1
                log.warning("dropped a message claiming to come from rank %s, not a peer in the ipconfig", sender)
                continue
            self.traffic.append(Traffic("received", str(msg.get_type()), sender, msg.get(KEY_ROUND), len(data)))
            for observer in self._observers:
                observer.receive_message(msg.get_type(), msg)

    def stop_receive_message(self) -> None:
        self.is_running = False
        # grace 0: pending handlers are cancelled; the peers have what they need by now
        self.grpc_server.stop(0).wait(5)


class Prober:
    """Rate-limited liveness probes: when did each peer's port stop answering?"""

    def __init__(self, channel: FedSelectChannel, heartbeat_s: float) -> None:
        self.channel = channel
        self.heartbeat_s = heartbeat_s
        self.last_probe: dict[int, float] = {}
        self.down_since: dict[int, float] = {}

    def unreachable_for(self, rank: int, now: float | None = None) -> float:
        """Seconds ``rank`` has refused connections (0 while it answers); probes at most every heartbeat."""
        now = time.monotonic() if now is None else now
        if now - self.last_probe.get(rank, -1e18) >= self.heartbeat_s:
            self.last_probe[rank] = now
            address, port = self.channel.endpoint(rank)
            if port_open(address, port, timeout=min(1.0, self.heartbeat_s)):
                self.down_since.pop(rank, None)
            else:
                self.down_since.setdefault(rank, now)
        since = self.down_since.get(rank)
        return 0.0 if since is None else now - since
