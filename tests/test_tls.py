"""Issue 17, first part: the cross-silo channel lets no one in.

Channels of ranks 0..2 run in this process on loopback ports (fast); one integration test runs
real federations (TLS and ``deploy.insecure``) and attacks the TLS one while it runs.
"""

from __future__ import annotations

import json
import logging
import stat
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from cryptography import x509

from fedselect.certs import load_party, rank_of_certificate, write_federation
from fedselect.cli import main
from fedselect.config import ConfigError, load_config_dict
from fedselect.fedml_runtime.transport import MB, Transport, message_cap, transport_for
from fedselect.runner.processes import Fleet, free_port_block, member_argv

from .conftest import REPO
from .test_cross_silo import tiny_folder  # noqa: F401  (the fixture: a 3-class ImageFolder tree)

CONNECT_S = 2.0


# ------------------------------------------------------------------ helpers

@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    """Two independent federations' certificates: "a" (ours) and "b" (another CA)."""
    root = tmp_path_factory.mktemp("pki")
    for name in ("a", "b"):
        write_federation(root / name, clients=2, server_host="127.0.0.1")
    return {"a": root / "a", "b": root / "b"}


def files(folder: Path, rank: int) -> dict[str, Path]:
    return {"deploy.ca_cert": folder / "ca.pem", "deploy.cert": folder / f"rank-{rank}.pem",
            "deploy.key": folder / f"rank-{rank}.key"}


def transport(folder: Path | None, rank: int, **kw: Any) -> Transport:
    tls = load_party(files(folder, rank), rank) if folder is not None else None
    return Transport(rank=rank, tls=tls, **kw)


class Channels:
    """Channels of ranks 0..2 on a fresh block of loopback ports; all stopped at the end."""

    def __init__(self, tmp_path: Path) -> None:
        from fedselect.fedml_runtime.grpc_channel import Endpoint, write_ipconfig

        self.port = free_port_block(3)
        self.ipconfig = write_ipconfig(tmp_path / "ip.csv",
                                       [Endpoint(r, "127.0.0.1", self.port + r) for r in range(3)])
        self.open: list[Any] = []

    def make(self, rank: int, tr: Transport, cap: int | None = None) -> Any:
        from fedselect.fedml_runtime.grpc_channel import FedSelectChannel

        ch = FedSelectChannel(self.ipconfig, rank, 2, None, transport=tr, message_cap=cap)
        ch.connect_timeout_s = CONNECT_S
        self.open.append(ch)
        return ch

    def close(self) -> None:
        for ch in self.open:
            ch.stop_receive_message()


@pytest.fixture
def channels(tmp_path):
    c = Channels(tmp_path)
    yield c
    c.close()


def message(msg_type: Any, sender: int, receiver: int, **params: Any) -> Any:
    from fedml.core.distributed.communication.message import Message

    msg = Message(msg_type, sender, receiver)
    for key, value in params.items():
        msg.add_params(key, value)
    return msg


def drain(ch: Any) -> list[Any]:
    """What the receive loop would act on, in order (None: dropped or refused)."""
    out = []
    while not ch.grpc_servicer.message_q.empty():
        out.append(ch.accept(ch.grpc_servicer.message_q.get_nowait()))
    return out


def raw_send(port: int, data: bytes, creds: grpc.ChannelCredentials | None, name: str = "fedselect-rank-0") -> None:
    """What a stranger can do: one sendMessage RPC, with or without TLS credentials."""
    from fedml.core.distributed.communication.grpc import grpc_comm_manager_pb2, grpc_comm_manager_pb2_grpc

    url = f"127.0.0.1:{port}"
    channel = (grpc.secure_channel(url, creds, options=[("grpc.ssl_target_name_override", name)]) if creds
               else grpc.insecure_channel(url))
    try:
        stub = grpc_comm_manager_pb2_grpc.gRPCCommManagerStub(channel)
        stub.sendMessage(grpc_comm_manager_pb2.CommRequest(client_id=1, message=data), timeout=CONNECT_S)
    finally:
        channel.close()


def forged_failure(claimed_rank: int = 1) -> bytes:
    from fedml.cross_silo.server.message_define import MyMessage

    from fedselect.fedml_runtime.grpc_channel import encode_message
    from fedselect.fedml_runtime.messages import KEY_REASON, STATUS_FAILED

    return encode_message(message(MyMessage.MSG_TYPE_C2S_CLIENT_STATUS, claimed_rank, 0,
                                  **{MyMessage.MSG_ARG_KEY_CLIENT_STATUS: STATUS_FAILED, KEY_REASON: "forged"}))


# ------------------------------------------------------------------ certificates and config

def test_certs_command_output_verifies(tmp_path, capsys):
    out = tmp_path / "certs"
    assert main(["certs", "--out", str(out), "--clients", "2", "--server-host", "10.0.0.1", "--days", "30"]) == 0
    printed = capsys.readouterr().out
    assert "rank-2.key" in printed and "client rank 2 only (secret)" in printed and "keep it offline" in printed
    ca = x509.load_pem_x509_certificate((out / "ca.pem").read_bytes())
    for rank in range(3):
        cert = x509.load_pem_x509_certificate((out / f"rank-{rank}.pem").read_bytes())
        cert.verify_directly_issued_by(ca)  # raises unless signed by the CA
        assert rank_of_certificate(cert) == rank
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert f"fedselect-rank-{rank}" in san.get_values_for_type(x509.DNSName)
        if rank == 0:
            assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.1"]
        assert 29 <= (cert.not_valid_after_utc - cert.not_valid_before_utc).days <= 31
        assert load_party(files(out, rank), rank).rank == rank
    for key in out.glob("*.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    assert sorted(p.name for p in out.glob("*.key")) == ["ca.key", "rank-0.key", "rank-1.key", "rank-2.key"]
    # never silently replaces a CA (its certificates would stop working)
    assert main(["certs", "--out", str(out), "--clients", "2", "--server-host", "h"]) == 2
    assert "exists" in capsys.readouterr().err


def test_tls_files_are_checked_naming_key_and_file(tmp_path, pki):
    def deploy(**kw: Any) -> Any:
        return load_config_dict({"data": {"partition": {"num_clients": 2}}, "deploy": kw}).deploy

    a, b = pki["a"], pki["b"]
    good = {"ca_cert": str(a / "ca.pem"), "cert": str(a / "rank-{rank}.pem"), "key": str(a / "rank-{rank}.key")}
    assert transport_for(deploy(**good), 1, 2).tls.rank == 1
    assert transport_for(deploy(insecure=True), 1, 2).tls is None  # no files needed
    missing = tmp_path / "nowhere" / "ca.pem"
    with pytest.raises(ConfigError, match=f"'deploy.ca_cert' names {missing}, which does not exist"):
        transport_for(deploy(**{**good, "ca_cert": str(missing)}), 0, 2)
    with pytest.raises(ConfigError, match=r"'deploy.cert': .*rank-2.pem is the certificate of rank 2, not of rank 1"):
        transport_for(deploy(**{**good, "cert": str(a / "rank-2.pem")}), 1, 2)
    with pytest.raises(ConfigError, match=r"'deploy.key': .*rank-2.key is not the key of"):
        transport_for(deploy(**{**good, "key": str(a / "rank-2.key")}), 1, 2)
    with pytest.raises(ConfigError, match=r"'deploy.cert': .*is not signed by the CA"):
        transport_for(deploy(**{**good, "cert": str(b / "rank-{rank}.pem"), "key": str(b / "rank-{rank}.key")}), 1, 2)
    with pytest.raises(ConfigError, match="deploy.max_message_mb"):
        deploy(max_message_mb=0)


def test_serve_without_certificates_is_one_error_line_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default paths certs/... do not exist here
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({"data": {"partition": {"num_clients": 2}},
                                  "tracking": {"results_dir": str(tmp_path / "results")}}))
    for argv in (["serve", "--config", str(config)], ["join", "--config", str(config), "--rank", "1"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("fedselect: error: ") and "'deploy.ca_cert'" in err[0], err
        assert "certs/ca.pem" in err[0] and "fedselect certs" in err[0]
    assert not (tmp_path / "results" / "mlflow.db").exists()  # nothing started


# ------------------------------------------------------------------ the channel

def test_certificate_from_another_ca_or_none_is_refused_at_connect(channels, pki, caplog):
    server = channels.make(0, transport(pki["a"], 0))
    stranger = channels.make(1, transport(pki["b"], 1))  # a valid-looking rank 1 of another federation
    started = time.monotonic()
    with pytest.raises(Exception, match="rank 0 at .* is unreachable: no connection within 2 s"):
        stranger.send_message(message(3, 1, 0, x=1))
    assert time.monotonic() - started < 2 * CONNECT_S + 2
    a = load_party(files(pki["a"], 1), 1)
    no_cert = grpc.ssl_channel_credentials(root_certificates=a.ca_pem)  # trusts our CA, shows nothing
    for creds in (no_cert, None):
        with pytest.raises(grpc.RpcError) as info:
            raw_send(channels.port, forged_failure(), creds)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert server.grpc_servicer.message_q.empty()  # nothing got in


def test_client_checks_the_server_certificate(tmp_path, pki):
    chans = Channels(tmp_path)
    try:
        chans.make(0, transport(pki["b"], 0))  # the server of another federation at our server's address
        client = chans.make(1, transport(pki["a"], 1))
        with pytest.raises(Exception, match="is unreachable"):
            client.send_message(message(3, 1, 0, x=1))
    finally:
        chans.close()


def test_rank_2_cannot_send_as_rank_1(channels, pki, caplog):
    server = channels.make(0, transport(pki["a"], 0))
    rank2 = channels.make(2, transport(pki["a"], 2))
    rank2.send_message(message(3, 2, 0, x=1))  # as itself: accepted
    rank2.client_rank = rank2.client_id = 1  # the same process now claims rank 1
    rank2.send_message(message(3, 1, 0, x=2))
    with caplog.at_level(logging.WARNING):
        got = drain(server)
    assert [m.get("x") if m is not None else None for m in got] == [1, None]
    assert server.dropped_messages == 1
    assert "claiming to come from rank 1, sent with the certificate of rank 2" in caplog.text


def test_forged_status_from_another_certificate_is_dropped(channels, pki):
    server = channels.make(0, transport(pki["a"], 0))
    rank2 = load_party(files(pki["a"], 2), 2)
    creds = grpc.ssl_channel_credentials(root_certificates=rank2.ca_pem, private_key=rank2.key_pem,
                                         certificate_chain=rank2.cert_pem)
    raw_send(channels.port, forged_failure(claimed_rank=1), creds)
    assert drain(server) == [None] and server.dropped_messages == 1


def test_a_forgery_unread_at_the_stop_is_still_logged(channels, pki, caplog):
    server = channels.make(0, transport(pki["a"], 0))
    rank2 = channels.make(2, transport(pki["a"], 2))
    rank2.send_message(message(3, 2, 0, x=1))  # legitimate, but the federation is over before it is read
    rank2.client_rank = rank2.client_id = 1
    rank2.send_message(message(3, 1, 0, x=2))  # forged
    with caplog.at_level(logging.INFO):
        server.stop_receive_message()
    assert server.dropped_messages == 1 and server.traffic == []  # the record's bytes are what was used
    assert "claiming to come from rank 1, sent with the certificate of rank 2" in caplog.text
    assert "left unread at the stop: a message of type 3 from rank 2" in caplog.text
    assert server.grpc_servicer.message_q.empty()


def test_a_client_hears_only_the_server(channels, pki):
    channels.make(0, transport(pki["a"], 0))
    client1 = channels.make(1, transport(pki["a"], 1))
    client2 = channels.make(2, transport(pki["a"], 2))
    with pytest.raises(Exception, match="refused the message: PERMISSION_DENIED: rank 2 may not send to rank 1"):
        client2.send_message(message(3, 2, 1, x=1))
    assert client1.grpc_servicer.message_q.empty()


def test_oversized_message_is_refused_naming_the_sender(channels, pki):
    from fedselect.fedml_runtime.grpc_channel import MessageRefused

    server = channels.make(0, transport(pki["a"], 0), cap=64 * 1024)
    client = channels.make(1, transport(pki["a"], 1), cap=MB)
    lost: list[tuple[int, str]] = []
    server.on_refused = lambda rank, reason: lost.append((rank, reason))
    with pytest.raises(MessageRefused, match=r"refused the message: RESOURCE_EXHAUSTED: refused a message of "
                                             r"[\d,]+ bytes from rank 1 \(its certificate\): over the cap of 65,536"):
        client.send_message(message(3, 1, 0, blob=torch.zeros(25_000)))  # 100 kB
    # beyond twice the cap gRPC itself refuses it, unread
    with pytest.raises(MessageRefused, match="RESOURCE_EXHAUSTED"):
        client.send_message(message(3, 1, 0, blob=torch.zeros(100_000)))
    assert drain(server) == [None] and lost[0][0] == 1 and "from rank 1" in lost[0][1]
    assert len(server.refused) == 1
    # the sender checks its own cap first
    with pytest.raises(MessageRefused, match="over the cap of 1,048,576 bytes"):
        client.send_message(message(3, 1, 0, blob=torch.zeros(300_000)))


def test_server_cap_grows_once_the_model_is_known(channels, pki):
    """The server listens before it knows the model (join cap 16 MiB); a larger model's cap relistens."""
    from fedselect.fedml_runtime.grpc_channel import MessageRefused
    from fedselect.fedml_runtime.transport import JOIN_CAP_BYTES

    server = channels.make(0, transport(pki["a"], 0))
    client = channels.make(1, transport(pki["a"], 1), cap=64 * MB)
    assert server.message_cap == JOIN_CAP_BYTES
    big = message(3, 1, 0, blob=torch.zeros(5 * MB))  # 20 MiB
    with pytest.raises(MessageRefused, match="the join phase's cap"):
        client.send_message(big)
    server.set_message_cap(40 * MB, "from the model")
    client.send_message(big)
    got = [m for m in drain(server) if m is not None]
    assert len(got) == 1 and got[0].get("blob").numel() == 5 * MB


def test_insecure_channel_names_the_claimed_sender(channels):
    from fedselect.fedml_runtime.grpc_channel import MessageRefused

    channels.make(0, Transport(rank=0), cap=64 * 1024)
    client = channels.make(1, Transport(rank=1), cap=MB)
    with pytest.raises(MessageRefused, match=r"from ipv4:127.0.0.1:\d+ \(claims rank 1\)"):
        client.send_message(message(3, 1, 0, blob=torch.zeros(25_000)))


def test_receive_queue_is_bounded(channels, pki):
    from fedselect.fedml_runtime.grpc_channel import MessageRefused

    server = channels.make(0, transport(pki["a"], 0, queue_size=2))
    client = channels.make(1, transport(pki["a"], 1))
    client.rpc_timeout_s = 1.0  # a sender waits for room at most its RPC deadline
    for i in range(2):
        client.send_message(message(3, 1, 0, x=i))
    with pytest.raises(MessageRefused, match=r"the receive queue \(2\) stayed full"):
        client.send_message(message(3, 1, 0, x=2))
    assert [m.get("x") for m in drain(server)] == [0, 1]


def test_message_cap_is_sized_from_the_model():
    from fedselect.algorithms.payload import encode_upload
    from fedselect.fedml_runtime.grpc_channel import encode_message
    from fedselect.models import build_cnn

    model = build_cnn(num_classes=10, in_channels=3, image_size=32)
    state = model.state_dict()
    values = sum(t.numel() * t.element_size() for t in state.values())
    cap = message_cap(state)
    assert values < cap <= values * 1.25 + (values + 7) // 8 * 1.25 + 4 * MB + 1
    whole = encode_message(message(2, 0, 1, model_params=dict(state), fedselect_round=0))
    upload = encode_upload(state, {n: torch.rand_like(t, dtype=torch.float) > 0.5 for n, t in state.items()
                                   if t.is_floating_point()}, client_id=0, num_samples=10)
    half = encode_message(message(3, 1, 0, model_params=upload))
    assert len(whole) < cap and len(half) < cap
    fixed = load_config_dict({"deploy": {"insecure": True, "max_message_mb": 3}}).deploy
    assert transport_for(fixed, 0, 2).max_message_bytes == 3 * MB
    assert transport_for(fixed, 0, 5).queue_size == 28


# ------------------------------------------------------------------ federations (real processes)

def _federation(tmp_path: Path, raw: dict, *, attack: bool) -> tuple[dict | None, Fleet, float, list[str]]:
    from .test_cross_silo import write_config

    config = write_config(tmp_path, raw)
    record = tmp_path / "federated.json"
    port = free_port_block(4)
    overrides = [f"deploy.server_port={port}"]
    notes: list[str] = []
    started = time.monotonic()
    with Fleet(tmp_path / "logs") as fleet:
        server = fleet.start("server", member_argv("serve", config, overrides, [], "--out", str(record)), cwd=REPO)
        for rank in (1, 2):
            fleet.start(f"client-{rank}", member_argv("join", config, overrides, [], "--rank", str(rank)), cwd=REPO)
        if attack:
            from .test_cross_silo import wait_for

            wait_for(server, "round 1/")
            certs = Path(raw["deploy"]["ca_cert"]).parent
            rank2 = load_party(files(certs, 2), 2)
            holder_of_2 = grpc.ssl_channel_credentials(root_certificates=rank2.ca_pem, private_key=rank2.key_pem,
                                                       certificate_chain=rank2.cert_pem)
            raw_send(port, forged_failure(claimed_rank=1), holder_of_2)  # delivered, then dropped
            notes.append("forged by the holder of rank 2's certificate: delivered")
            for creds in (None, grpc.ssl_channel_credentials(root_certificates=rank2.ca_pem)):
                try:
                    raw_send(port, forged_failure(claimed_rank=1), creds)
                    notes.append("stranger: delivered")
                except grpc.RpcError as exc:
                    notes.append(f"stranger: {exc.code().name}")
        fleet.wait(timeout_s=240, leader="server", grace_s=20)
    return (json.loads(record.read_text()) if record.exists() else None), fleet, time.monotonic() - started, notes


@pytest.mark.integration
def test_tls_federation_matches_insecure_and_ignores_forgeries(tmp_path, tiny_folder, pki):  # noqa: F811
    from .test_cross_silo import logs, raw_config

    a = pki["a"]
    base = raw_config(tmp_path, tiny_folder, train={"rounds": 3})
    secure = {**base, "deploy": {**base["deploy"], "ca_cert": str(a / "ca.pem"), "cert": str(a / "rank-{rank}.pem"),
                                 "key": str(a / "rank-{rank}.key")}}
    insecure = {**base, "deploy": {**base["deploy"], "insecure": True}}
    (tmp_path / "tls").mkdir()
    (tmp_path / "plain").mkdir()
    tls_record, tls_fleet, tls_s, notes = _federation(tmp_path / "tls", secure, attack=True)
    plain_record, plain_fleet, plain_s, _ = _federation(tmp_path / "plain", insecure, attack=False)
    assert tls_record is not None and all(m.returncode == 0 for m in tls_fleet.members), logs(tls_fleet)
    assert plain_record is not None and all(m.returncode == 0 for m in plain_fleet.members), logs(plain_fleet)
    print(f"\nwall seconds: TLS {tls_s:.1f}, insecure {plain_s:.1f}; "
          f"record wall TLS {tls_record['wall_seconds']:.1f}, insecure {plain_record['wall_seconds']:.1f}")
    for key in ("per_client_acc", "mean_acc_per_round", "bytes_up_per_round", "bytes_down_per_round",
                "final_mean_acc", "wire_bytes_up_per_round", "wire_bytes_down_per_round"):
        assert tls_record[key] == plain_record[key], key
    # the forged FAILED status had no effect; strangers were refused at connect
    assert tls_record["clients_failed"] == {} and tls_record["evaluated_clients"] == [0, 1]
    assert notes == ["forged by the holder of rank 2's certificate: delivered", "stranger: UNAVAILABLE",
                     "stranger: UNAVAILABLE"]
    text = tls_fleet.members[0].log_path.read_text()
    assert "claiming to come from rank 1, sent with the certificate of rank 2" in text
    assert "mutual TLS" in text
