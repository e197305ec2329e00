"""How the SDK reaches a server: endpoint normalisation, credentials (a
bearer token, TLS and mutual TLS) and channels with the settings every
Muster connection wants."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import grpc

from ._errors import ConfigError

#: Largest message the SDK accepts. What it sends is bounded by the server
#: alone (its ``max_message_bytes``), so an oversized request is answered
#: RESOURCE_EXHAUSTED naming that setting, whatever its size.
MAX_MESSAGE_SIZE = 64 * 1024 * 1024
#: HTTP/2 pings find a dead peer on an idle connection long before TCP would.
KEEPALIVE_INTERVAL_MS = 20_000
KEEPALIVE_TIMEOUT_MS = 10_000

Metadata = tuple[tuple[str, str], ...]


def _read(what: str, path: str | os.PathLike[str]) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise ConfigError(f"{what} {path}: {err}") from err


@dataclass(frozen=True)
class Credentials:
    """The token, CA and client certificate a client or agent connects with.

    With TLS settings, endpoints without a scheme mean ``https://``. The
    token is sent as ``authorization: Bearer <token>`` on every call and is
    never shown by ``repr``.
    """

    token: str | None = field(default=None, repr=False)
    tls_ca: bytes | None = field(default=None, repr=False)
    tls_cert: bytes | None = field(default=None, repr=False)
    tls_key: bytes | None = field(default=None, repr=False)

    @classmethod
    def create(
        cls,
        token: str | None = None,
        tls_ca: str | os.PathLike[str] | None = None,
        tls_cert: str | os.PathLike[str] | None = None,
        tls_key: str | os.PathLike[str] | None = None,
        *,
        env: bool = True,
    ) -> Credentials:
        """From arguments, each falling back (with ``env``) to ``MUSTER_TOKEN``,
        ``MUSTER_TLS_CA``, ``MUSTER_TLS_CERT`` and ``MUSTER_TLS_KEY``; the TLS
        values are file paths."""

        def pick(value: str | os.PathLike[str] | None, name: str) -> str | os.PathLike[str] | None:
            if value is not None and str(value) != "":
                return value
            return (os.environ.get(name) or None) if env else None

        raw_token = pick(token, "MUSTER_TOKEN")
        token_text = str(raw_token).strip() if raw_token is not None else ""
        if token_text and not all(0x20 < ord(c) < 0x7F for c in token_text):
            raise ConfigError("the token must be printable ASCII")
        ca = pick(tls_ca, "MUSTER_TLS_CA")
        cert = pick(tls_cert, "MUSTER_TLS_CERT")
        key = pick(tls_key, "MUSTER_TLS_KEY")
        if (cert is None) != (key is None):
            raise ConfigError("a TLS client certificate needs both tls_cert and tls_key")
        return cls(
            token=token_text or None,
            tls_ca=_read("TLS CA", ca) if ca is not None else None,
            tls_cert=_read("TLS certificate", cert) if cert is not None else None,
            tls_key=_read("TLS key", key) if key is not None else None,
        )

    @property
    def uses_tls(self) -> bool:
        """Whether TLS settings were given."""
        return self.tls_ca is not None or self.tls_cert is not None

    def metadata(self) -> Metadata:
        """The call metadata carrying the token, if any."""
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()


def normalize_endpoint(raw: str, tls: bool) -> str:
    """Adds ``http://`` (``https://`` with ``tls``) when the endpoint has no
    scheme and checks it is an http(s) URL with a host; with ``tls``, plain
    ``http://`` is refused."""
    trimmed = raw.strip()
    if not trimmed:
        raise ConfigError("invalid endpoint: endpoint is empty")
    if "://" in trimmed:
        scheme = trimmed.split("://", 1)[0]
        if scheme == "http" and tls:
            raise ConfigError(
                f"invalid endpoint: {trimmed}: TLS settings are given, so the endpoint must be https:// "
                "(or have no scheme)"
            )
        if scheme not in ("http", "https"):
            raise ConfigError(
                f"invalid endpoint: {trimmed}: scheme {scheme} is not supported, use http or https"
            )
        url = trimmed
    else:
        url = f"{'https' if tls else 'http'}://{trimmed}"
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError as err:
        raise ConfigError(f"invalid endpoint: {trimmed}: {err}") from err
    if not host or " " in parts.netloc:
        raise ConfigError(f"invalid endpoint: {trimmed}: no host")
    del port
    return url


def open_channel(url: str, credentials: Credentials) -> grpc.aio.Channel:
    """A channel (not yet connected) to a normalised endpoint."""
    parts = urlsplit(url)
    default_port = 443 if parts.scheme == "https" else 80
    host = parts.hostname or ""
    target = f"[{host}]" if ":" in host else host
    target = f"{target}:{parts.port or default_port}"
    options = [
        ("grpc.max_send_message_length", -1),
        ("grpc.max_receive_message_length", MAX_MESSAGE_SIZE),
        ("grpc.keepalive_time_ms", KEEPALIVE_INTERVAL_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # Each agent connection is its own; the SDK does its own reconnects.
        ("grpc.use_local_subchannel_pool", 1),
        ("grpc.enable_retries", 0),
    ]
    if parts.scheme == "https":
        tls = grpc.ssl_channel_credentials(
            root_certificates=credentials.tls_ca,
            private_key=credentials.tls_key,
            certificate_chain=credentials.tls_cert,
        )
        return grpc.aio.secure_channel(target, tls, options=options)
    return grpc.aio.insecure_channel(target, options=options)
