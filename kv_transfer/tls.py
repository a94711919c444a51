"""TLS for KV over gRPC: PEM files read once, credentials for the server and the sender.

KVTLS(cert, key, ca): the decode worker's KV server presents cert/key; prefill workers
trust ca (default: the cert itself, for a self-signed cluster certificate).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

from engine.errors import InvalidRequestError


@dataclass(frozen=True, slots=True)
class KVTLS:
    cert_pem: bytes
    key_pem: bytes
    ca_pem: bytes
    server_name: str = ""  # name the sender checks in the cert ("" = the endpoint's host)

    @classmethod
    def from_files(cls, cert: str, key: str, ca: str = "", server_name: str = "") -> KVTLS:
        def read(path: str, what: str) -> bytes:
            try:
                return Path(path).read_bytes()
            except OSError as exc:
                raise InvalidRequestError(f"cannot read the KV TLS {what} {path}: {exc}") from None

        cert_pem = read(cert, "certificate")
        return cls(cert_pem, read(key, "key"), read(ca, "CA") if ca else cert_pem, server_name)

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.key_pem, self.cert_pem)])

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.ca_pem)
