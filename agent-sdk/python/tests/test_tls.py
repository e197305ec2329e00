"""TLS and mutual TLS end to end, with certificates made here: an agent
and a client on ``https://`` with a CA, a client certificate and a token."""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import muster
from muster.v1 import task_pb2

from .conftest import Agents, MusterServer

TOKEN = "py-sdk-tls-test-bootstrap-token-0123456789abcdef"


def make_cert(
    directory: Path,
    name: str,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    usage: x509.ObjectIdentifier | None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Writes ``name.pem`` and ``name.key``: a CA when ``issuer`` is None,
    else a leaf for ``usage`` (server or client authentication)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer[0].subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if usage == ExtendedKeyUsageOID.SERVER_AUTH:
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    certificate = builder.sign(issuer[1] if issuer else key, hashes.SHA256())
    (directory / f"{name}.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    (directory / f"{name}.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return certificate, key


async def test_an_agent_and_a_client_work_over_mutual_tls(
    make_server: Callable[..., MusterServer], agents: Agents, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca = make_cert(tmp_path, "ca", None, None)
    make_cert(tmp_path, "server", ca, ExtendedKeyUsageOID.SERVER_AUTH)
    make_cert(tmp_path, "client", ca, ExtendedKeyUsageOID.CLIENT_AUTH)
    server = make_server(
        "--tls-client-ca",
        str(tmp_path / "ca.pem"),
        env={
            "MUSTER_BOOTSTRAP_TOKEN": TOKEN,
            "MUSTER_TLS_CERT": str(tmp_path / "server.pem"),
            "MUSTER_TLS_KEY": str(tmp_path / "server.key"),
        },
    )
    for name in ("MUSTER_TOKEN", "MUSTER_TLS_CA", "MUSTER_TLS_CERT", "MUSTER_TLS_KEY"):
        monkeypatch.delenv(name, raising=False)

    async def echo(ctx: muster.TaskContext) -> bytes:
        return ctx.payload

    # No scheme with TLS settings means https://.
    agents.start(
        server.address,
        {"py-echo": echo},
        name="py-tls",
        token=TOKEN,
        tls_ca=tmp_path / "ca.pem",
        tls_cert=tmp_path / "client.pem",
        tls_key=tmp_path / "client.key",
    )
    monkeypatch.setenv("MUSTER_TOKEN", TOKEN)
    monkeypatch.setenv("MUSTER_TLS_CA", str(tmp_path / "ca.pem"))
    monkeypatch.setenv("MUSTER_TLS_CERT", str(tmp_path / "client.pem"))
    monkeypatch.setenv("MUSTER_TLS_KEY", str(tmp_path / "client.key"))
    async with muster.Client(server.address) as client:
        assert client.endpoint.startswith("https://")
        done = await client.wait((await client.submit("py-echo", b"over tls")).id, timeout=20)
    assert done.state == task_pb2.TASK_STATE_SUCCEEDED
    assert done.output == b"over tls"

    # A client without a certificate is refused by the handshake.
    monkeypatch.delenv("MUSTER_TLS_CERT")
    monkeypatch.delenv("MUSTER_TLS_KEY")
    async with muster.Client(f"https://{server.address}") as no_cert:
        with pytest.raises(muster.RpcError) as refused:
            await no_cert.list()
    assert refused.value.code == grpc.StatusCode.UNAVAILABLE
