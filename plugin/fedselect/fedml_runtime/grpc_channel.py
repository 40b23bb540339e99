"""FedML's GRPC channel with a safe wire format, a blocking receive loop, byte counts and probes.

What FedML 0.9.6's ``GRPCCommManager`` does, and what this subclass changes:

* It ``pickle.loads`` whatever arrives on its port: anyone who can connect can run code in the
  process. Here a message travels as ``torch.save`` of its parameters and is read back with
  ``torch.load(weights_only=True)`` (tensors, containers, numbers, strings and the allow-listed
  :data:`WIRE_TYPES` only), and a message from a rank not in the ipconfig is dropped.
* It listens and connects without TLS, and the sender's rank is a field of the message. Here
  (unless ``deploy.insecure``) every connection is mutual TLS with certificates of the
  federation's CA, the sender's rank is the one its certificate names, and a message claiming
  another rank is dropped and logged (:mod:`.transport`).
* It accepts messages of up to 1000 MB into an unbounded queue. Here a message over the cap
  (from the model, or ``deploy.max_message_mb``) is refused naming its sender, and the queue is
  bounded: a sender waits while it is full.
* Its receive loop polls the queue without sleeping (one core at 100 % while idle). Here it
  blocks on the queue, waking every ``poll_s`` to run ``on_idle`` (deadlines, liveness probes).
* A send to an unreachable peer fails at once; here it waits up to ``connect_timeout_s`` for
  the peer's port (so the starting order does not matter) and raises :class:`PeerUnreachable`.
* Every message's serialized size is recorded (:attr:`FedSelectChannel.traffic`): the bytes on
  the wire, beside the counts the algorithms log.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import queue
import socket
import time
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import torch

from fedselect.core.masks import PackedTensor
from fedselect.fedml_bridge import import_fedml
from fedselect.fedml_runtime.receiver import Incoming, Servicer
from fedselect.fedml_runtime.transport import Transport
from fedselect.load_errors import load_failure

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
# how a peer that answered says no
REFUSALS = (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED)
# a refused TLS handshake looks like a closed socket to the side that was refused
TLS_HINT = (" (TLS: do both hold certificates of this federation's CA, and does the peer's name the rank it is "
            "reached as?)")


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


class MessageRefused(PeerUnreachable):
    """The peer answered but refused the message (too large, queue full, not a permitted sender)."""

    def __init__(self, rank: int, address: str, reason: str) -> None:
        ConnectionError.__init__(self, f"rank {rank} at {address} refused the message: {reason}")
        self.rank = rank


class FedSelectChannel(GRPCCommManager):
    """FedML's GRPC comm manager with the changes listed in the module docstring.

    FedML's ``__init__`` (insecure port, unbounded queue, 1000 MB limit) is replaced, not called.
    """

    def __init__(self, ipconfig_path: str | Path, rank: int, size: int, args: Any, *,
                 transport: Transport | None = None, message_cap: int | None = None, poll_s: float = 0.5) -> None:
        self.poll_s = poll_s
        self.connect_timeout_s = 30.0
        # an accepted send only enqueues at the peer, so a whole message, not training, is waited for
        self.rpc_timeout_s: float | None = 600.0
        self.traffic: list[Traffic] = []
        self.on_idle: Callable[[], None] | None = None
        # on_refused(rank, reason): a message of a certified rank was refused by the receiving handler
        self.on_refused: Callable[[int, str], None] | None = None
        self.dropped_messages = 0
        self.refused: list[str] = []
        self.transport = transport or Transport(rank=rank)
        self.message_cap = self.transport.initial_cap(message_cap)
        self.cap_source = "deploy.max_message_mb" if self.transport.max_message_bytes else (
            "from the model; deploy.max_message_mb overrides" if message_cap else
            "the join phase's cap, before the model is known")
        # FedML's attributes, as its __init__ sets them
        self._topic, self._observers, self.args = "fedml", [], args
        self.grpc_ipconfig_path, self.grpc_mappings = str(ipconfig_path), {}
        self.client_rank = self.client_id = rank
        self.client_num = size
        self.node_type = "server" if rank == 0 else "client"
        self._init_grpc_mappings()
        if rank not in self.grpc_mappings:
            raise RuntimeError(f"rank {rank} is not in the ipconfig {ipconfig_path}")
        self.grpc_servicer = Servicer(self, self.transport.queue_size)
        self.grpc_server: grpc.Server | None = None
        self._listen()
        self.is_running = True

    def _limit_options(self) -> list[tuple[str, Any]]:
        # gRPC itself refuses what is beyond twice the cap, unread; up to there the handler names the sender
        limit = 2 * self.message_cap + 4096
        return [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit),
                ("grpc.enable_http_proxy", 0)]

    def _listen(self) -> None:
        """Start (or restart, with the current cap) this rank's gRPC server on its own address."""
        self.opts = self._limit_options()
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=max(1, self.client_num)), options=self.opts)
        grpc_comm_manager_pb2_grpc.add_gRPCCommManagerServicer_to_server(self.grpc_servicer, server)
        m = self.grpc_mappings[self.client_rank]
        address = f"{m.grpc_server_ip}:{m.grpc_server_port}"
        try:
            bound = (server.add_secure_port(address, self.transport.server_credentials()) if self.transport.secure
                     else server.add_insecure_port(address))
            why = "bind failed"
        except RuntimeError as exc:  # grpc cannot bind the port
            bound, why = 0, str(exc)
        if not bound:
            raise RuntimeError(f"rank {self.client_rank} cannot listen on {address} ({why}); is another process "
                               "using it?")
        server.start()
        self.grpc_server = server
        log.info("rank %d listening on %s with %s, messages up to %d bytes", self.client_rank, address,
                 self.transport.describe(), self.message_cap)

    def set_message_cap(self, nbytes: int, source: str) -> None:
        """Change the message cap (the server, once the model is known); relistens if gRPC's own limit
        must grow. Call it when no peer is sending (between joining and the first model message)."""
        if self.transport.max_message_bytes:
            return  # configured: fixed
        grow = nbytes > self.message_cap
        self.message_cap, self.cap_source = int(nbytes), source
        if grow and self.grpc_server is not None:
            self.grpc_server.stop(0).wait(5)
            self._listen()

    def permitted_sender(self, rank: int | None) -> bool:
        """The server hears from the clients in its ipconfig, a client from the server only."""
        if rank is None or rank == self.client_rank:
            return False
        return rank in self.grpc_mappings if self.client_rank == 0 else rank == 0

    def refuse(self, rank: int | None, reason: str) -> None:
        """Log a message refused in the RPC handler; a certified sender's refusal reaches the loop."""
        log.warning("%s", reason)
        self.refused.append(reason)
        if rank is not None:
            with contextlib.suppress(queue.Full):
                self.grpc_servicer.message_q.put_nowait(Incoming(b"", rank, reason))

    def endpoint(self, rank: int) -> tuple[str, int]:
        """(address, port) at which ``rank`` is reached."""
        m = self.grpc_mappings[int(rank)]
        return (m.ingress_ip or m.grpc_server_ip), int(m.grpc_server_port)

    def _open(self, receiver: int, url: str) -> grpc.Channel:
        if not self.transport.secure:
            return grpc.insecure_channel(url, options=self.opts)
        options = [*self.opts, ("grpc.ssl_target_name_override", self.transport.target_name(receiver))]
        return grpc.secure_channel(url, self.transport.channel_credentials(), options=options)

    def answers(self, rank: int, timeout: float) -> bool:
        """Whether ``rank`` completes a connection (TCP, then the TLS handshake and HTTP/2 setup) in time."""
        address, port = self.endpoint(rank)
        if not port_open(address, port, timeout=min(1.0, timeout)):
            return False  # refused: no need to wait
        channel = self._open(rank, f"{address}:{port}")
        try:
            grpc.channel_ready_future(channel).result(timeout=timeout)
            return True
        except grpc.FutureTimeoutError:
            return False
        finally:
            channel.close()

    def send_message(self, msg: Message) -> None:
        receiver = int(msg.get_receiver_id())
        if receiver not in self.grpc_mappings:
            raise PeerUnreachable(receiver, "?", "rank not in the ipconfig")
        address, port = self.endpoint(receiver)
        url = f"{address}:{port}"
        data = encode_message(msg)
        if len(data) > self.message_cap:
            raise MessageRefused(receiver, url, f"this message of {len(data):,} bytes is over the cap of "
                                                f"{self.message_cap:,} bytes ({self.cap_source})")
        channel = self._open(receiver, url)
        request = grpc_comm_manager_pb2.CommRequest(client_id=self.client_id, message=data)
        stub = grpc_comm_manager_pb2_grpc.gRPCCommManagerStub(channel)
        try:
            try:  # at once: grpc's channel_ready_future polls every 0.2 s, a fifth of a second per message
                stub.sendMessage(request, timeout=self.rpc_timeout_s)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:  # no connection: wait for the peer's port
                    raise
                self._send_when_ready(receiver, url, channel, stub, request)
        except grpc.RpcError as exc:
            kind = MessageRefused if exc.code() in REFUSALS else PeerUnreachable
            raise kind(receiver, url, f"{exc.code().name}: {exc.details()}") from None
        finally:
            channel.close()
        self.traffic.append(Traffic("sent", str(msg.get_type()), receiver, msg.get(KEY_ROUND), len(data)))

    def _send_when_ready(self, receiver: int, url: str, channel: grpc.Channel, stub: Any, request: Any) -> None:
        """Wait up to ``connect_timeout_s`` for the peer's port, then send; :class:`PeerUnreachable` if not."""
        try:
            grpc.channel_ready_future(channel).result(timeout=self.connect_timeout_s)
            not_ready = ""
        except grpc.FutureTimeoutError:  # one try still: it fails at once, saying why
            not_ready = f"no connection within {self.connect_timeout_s:g} s; "
        try:
            stub.sendMessage(request, timeout=self.rpc_timeout_s)
        except grpc.RpcError as exc:
            if exc.code() in REFUSALS:
                raise
            hint = TLS_HINT if not_ready and self.transport.secure else ""
            raise PeerUnreachable(receiver, url, f"{not_ready}{exc.code().name}: {exc.details()}{hint}") from None

    def accept(self, item: Incoming) -> Message | None:
        """The message in ``item`` if it may be acted on, else None (dropped and logged)."""
        if item.refused is not None:
            if self.on_refused is not None and item.peer_rank is not None:
                self.on_refused(item.peer_rank, item.refused)
            return None
        msg = self._screen(item)
        if msg is not None:
            self.traffic.append(Traffic("received", str(msg.get_type()), int(msg.get_sender_id()),
                                        msg.get(KEY_ROUND), len(item.data)))
        return msg

    def _screen(self, item: Incoming) -> Message | None:
        """Decode ``item`` and check its claimed sender; a forgery or stranger is counted and logged."""
        try:
            msg = decode_message(item.data)
        except Exception as exc:  # a stranger's bytes must not stop the federation
            self.dropped_messages += 1
            log.warning("dropped an unreadable message of %d bytes: %s", len(item.data), load_failure(exc))
            return None
        sender = int(msg.get_sender_id())
        if sender not in self.grpc_mappings or sender == self.client_rank:
            self.dropped_messages += 1
            log.warning("dropped a message claiming to come from rank %s, not a peer in the ipconfig", sender)
            return None
        if self.transport.secure and sender != item.peer_rank:
            self.dropped_messages += 1
            log.warning("dropped a message of type %s claiming to come from rank %d, sent with the certificate of "
                        "rank %s", msg.get_type(), sender, item.peer_rank)
            return None
        return msg

    def message_handling_subroutine(self) -> None:
        while self.is_running:
            try:
                item = self.grpc_servicer.message_q.get(timeout=self.poll_s)
            except queue.Empty:
                if self.on_idle is not None:
                    self.on_idle()
                continue
            msg = self.accept(item)
            if msg is None:
                continue
            for observer in self._observers:
                observer.receive_message(msg.get_type(), msg)

    def stop_receive_message(self) -> None:
        self.is_running = False
        # grace 0: pending handlers are cancelled; the peers have what they need by now
        if self.grpc_server is not None:
            self.grpc_server.stop(0).wait(5)
        self._screen_unread()

    def _screen_unread(self) -> None:
        """Screen what arrived but was not read before the stop: a forgery that came in after the last
        upload is still logged, not lost. Nothing is acted on, and ``traffic`` (the record's bytes)
        stays what the federation used."""
        while True:
            try:
                item = self.grpc_servicer.message_q.get_nowait()
            except queue.Empty:
                return
            if item.refused is None and (msg := self._screen(item)) is not None:
                log.info("left unread at the stop: a message of type %s from rank %s", msg.get_type(),
                         msg.get_sender_id())


class Prober:
    """Rate-limited liveness probes: since when has each peer not answered?

    A probe connects as a message would (TLS handshake included) and waits for the connection to be
    ready: a peer whose port refuses connections fails at once, and so does, after the probe's
    timeout, a peer whose process no longer completes a connection (stopped with SIGSTOP, frozen),
    which the kernel's TCP handshake alone would still report as there.
    """

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
            if self.channel.answers(rank, timeout=max(2.0, min(self.heartbeat_s, 5.0))):
                self.down_since.pop(rank, None)
            else:
                self.down_since.setdefault(rank, now)
        since = self.down_since.get(rank)
        return 0.0 if since is None else now - since
