"""Certificates of a cross-silo federation: a CA and one key + certificate per party (``fedselect certs``).

Every party (rank 0 the server, rank K client K) gets one certificate, signed by the federation's
own CA, that names its rank: common name and a DNS name ``fedselect-rank-K``, plus any host
names or addresses it is reached at. The same certificate serves both directions of FedML's
push-based GRPC channel (each party listens, and connects to the others), so it is valid for TLS
server and client authentication. A receiver reads the sender's rank from the certificate the
TLS handshake verified, and a sender checks that the receiver's certificate names the rank it
means to reach (:mod:`fedselect.fedml_runtime.transport`).

Keys are ECDSA P-256, written with mode 0600. Only the ``cryptography`` library is used.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedselect.options import ConfigError

RANK_PREFIX = "fedselect-rank-"
CA_CERT = "ca.pem"
CA_KEY = "ca.key"


def rank_name(rank: int) -> str:
    """The name a party's certificate carries (common name and DNS name): ``fedselect-rank-K``."""
    return f"{RANK_PREFIX}{int(rank)}"


def rank_from_name(name: str | bytes | None) -> int | None:
    """The rank in a ``fedselect-rank-K`` name, else None."""
    if isinstance(name, bytes):
        name = name.decode("ascii", "replace")
    if not name or not name.startswith(RANK_PREFIX) or not name[len(RANK_PREFIX):].isdigit():
        return None
    return int(name[len(RANK_PREFIX):])


def cert_file(rank: int) -> str:
    return f"rank-{rank}.pem"


def key_file(rank: int) -> str:
    return f"rank-{rank}.key"


def rank_of_certificate(cert: x509.Certificate) -> int | None:
    """The rank a certificate's common name states (None: not a fedselect party certificate)."""
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return rank_from_name(str(names[0].value)) if len(names) == 1 else None


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def make_ca(days: int, *, name: str = "fedselect federation CA") -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA that may sign party certificates only (path length 0)."""
    key = _new_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def make_party(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, rank: int, hosts: Sequence[str],
               days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """Key and certificate of party ``rank``: CN and DNS name ``fedselect-rank-K``, plus ``hosts``."""
    key = _new_key()
    now = dt.datetime.now(dt.timezone.utc)
    names = [x509.DNSName(rank_name(rank)), *(_san(h) for h in hosts if h)]
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, rank_name(rank))]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return key, cert


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, 0o600)  # whatever the umask


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


@dataclass(frozen=True)
class Issued:
    """One file ``write_federation`` wrote, and the machine it belongs on."""

    path: Path
    machine: str


def write_federation(out: str | os.PathLike, *, clients: int, server_host: str, days: int = 365,
                     client_hosts: Sequence[str] = (), force: bool = False, keep_ca_key: bool = True) -> list[Issued]:
    """A CA and the key + certificate of the server (rank 0) and ``clients`` clients, under ``out``.

    Refuses to overwrite an existing CA unless ``force`` (certificates it signed would stop
    working). ``client_hosts[K-1]``, when given, is added to client K's certificate.
    """
    if clients < 1:
        raise ValueError("--clients must be >= 1")
    if days < 1:
        raise ValueError("--days must be >= 1")
    if client_hosts and len(client_hosts) != clients:
        raise ValueError(f"--client-hosts lists {len(client_hosts)} hosts for {clients} clients")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if not force and ((out / CA_CERT).exists() or (out / CA_KEY).exists()):
        raise FileExistsError(f"{out / CA_CERT} exists: certificates it signed would stop working; "
                              "choose another --out or pass --force")
    ca_key, ca_cert = make_ca(days)
    _write_cert(out / CA_CERT, ca_cert)
    issued = [Issued(out / CA_CERT, "every machine (server and all clients)")]
    if keep_ca_key:
        _write_key(out / CA_KEY, ca_key)
        issued.append(Issued(out / CA_KEY, "no machine of the federation: keep it offline (it signs new parties)"))
    for rank in range(clients + 1):
        hosts = [server_host] if rank == 0 else ([client_hosts[rank - 1]] if client_hosts else [])
        key, cert = make_party(ca_key, ca_cert, rank, hosts, days)
        _write_cert(out / cert_file(rank), cert)
        _write_key(out / key_file(rank), key)
        machine = f"the server ({server_host}), rank 0" if rank == 0 else f"client rank {rank} only"
        issued += [Issued(out / cert_file(rank), machine), Issued(out / key_file(rank), machine + " (secret)")]
    return issued


# ------------------------------------------------------------------------------ loading, checked

@dataclass(frozen=True)
class PartyCredentials:
    """One party's PEM bytes, checked: the certificate chains to the CA and names ``rank``."""

    rank: int
    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes


def _read(path: Path, key: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"config key '{key}': cannot read {path}: {exc.strerror}") from exc


def load_party(paths: dict[str, Path], rank: int) -> PartyCredentials:
    """Read ``paths`` (config key -> file: ``deploy.ca_cert``, ``deploy.cert``, ``deploy.key``) and
    check them; every problem is a :class:`ConfigError` naming the key and the file."""
    ca_key, cert_key, key_key = "deploy.ca_cert", "deploy.cert", "deploy.key"
    ca_pem, cert_pem, key_pem = _read(paths[ca_key], ca_key), _read(paths[cert_key], cert_key), \
        _read(paths[key_key], key_key)
    try:
        ca = x509.load_pem_x509_certificate(ca_pem)
    except ValueError as exc:
        raise ConfigError(f"config key '{ca_key}': {paths[ca_key]} is not a PEM certificate ({exc})") from exc
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as exc:
        raise ConfigError(f"config key '{cert_key}': {paths[cert_key]} is not a PEM certificate ({exc})") from exc
    try:
        private = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"config key '{key_key}': {paths[key_key]} is not an unencrypted PEM private key "
                          f"({exc})") from exc
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise ConfigError(f"config key '{cert_key}': {paths[cert_key]} is not signed by the CA in "
                          f"{paths[ca_key]} (deploy.ca_cert)") from exc
    named = rank_of_certificate(cert)
    if named != rank:
        raise ConfigError(f"config key '{cert_key}': {paths[cert_key]} is the certificate of "
                          f"{'rank ' + str(named) if named is not None else 'no fedselect rank'}, not of rank {rank}")
    if private.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) \
            != cert.public_key().public_bytes(serialization.Encoding.DER,
                                              serialization.PublicFormat.SubjectPublicKeyInfo):
        raise ConfigError(f"config key '{key_key}': {paths[key_key]} is not the key of {paths[cert_key]}")
    now = dt.datetime.now(dt.timezone.utc)
    for key, path, c in ((ca_key, paths[ca_key], ca), (cert_key, paths[cert_key], cert)):
        if not c.not_valid_before_utc <= now <= c.not_valid_after_utc:
            raise ConfigError(f"config key '{key}': {path} is valid only from {c.not_valid_before_utc:%Y-%m-%d} "
                              f"to {c.not_valid_after_utc:%Y-%m-%d}")
    return PartyCredentials(rank, ca_pem, cert_pem, key_pem)
