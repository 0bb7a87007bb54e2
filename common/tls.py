"""Mutual TLS on every internal hop: the mesh's credential is a certificate, not a shared token.

Every service listens with TLS and requires a client certificate signed by the mesh's
own CA (devtool.certs makes them); Envoy, the services calling each other, the health
check and the operators' CLI each present one. Envoy loads its certificate and key by
file name, so neither its config nor its /config_dump holds anything that grants access.
A directory (TOKENS_TLS_DIR) holds ca.pem and, per role, ROLE.pem and ROLE-key.pem.
"""
import dataclasses
import pathlib

import grpc

# The name every service certificate carries and every client checks, whatever address
# (127.0.0.1, a compose DNS name, several replicas) it dialled.
SERVER_NAME = "tokens.internal"
ROLES = ("service", "envoy", "operator")


@dataclasses.dataclass(frozen=True)
class Files:
    ca: pathlib.Path
    cert: pathlib.Path
    key: pathlib.Path

    @classmethod
    def in_dir(cls, directory: str | pathlib.Path, role: str) -> "Files":
        if role not in ROLES:
            raise ValueError(f"unknown TLS role {role!r}; known: {', '.join(ROLES)}")
        base = pathlib.Path(directory)
        return cls(ca=base / "ca.pem", cert=base / f"{role}.pem", key=base / f"{role}-key.pem")

    def read(self) -> tuple[bytes, bytes, bytes]:
        """(CA, certificate chain, private key), as PEM."""
        return self.ca.read_bytes(), self.cert.read_bytes(), self.key.read_bytes()


def server_credentials(files: Files) -> grpc.ServerCredentials:
    """TLS that also demands a client certificate signed by the mesh's CA: a caller without
    one fails in the handshake, before any method (health included) is reached."""
    ca, cert, key = files.read()
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)


def channel_credentials(files: Files) -> grpc.ChannelCredentials:
    ca, cert, key = files.read()
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


# Client channel options that go with channel_credentials.
CHANNEL_OPTIONS = (("grpc.ssl_target_name_override", SERVER_NAME),)


def blocking_channel(target: str, files: Files) -> grpc.Channel:
    """A synchronous channel with the mesh's client certificate (health checks, tests)."""
    return grpc.secure_channel(target, channel_credentials(files), options=CHANNEL_OPTIONS)
