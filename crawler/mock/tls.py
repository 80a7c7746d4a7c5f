"""The mock server's TLS: a certificate authority and a server certificate made at start (with
trustme, which makes exactly this in a few lines on top of `cryptography`), for loopback and
every name of the bench's zone, and the CA written where the crawler can be told to trust it.

Nothing here is for a real server: the keys live as long as the mock server and are never reused.
"""

from __future__ import annotations

import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path

# What the certificate is good for: loopback by address and name, and the names
# `crawler bench --hosts N` makes (h0.bench.test, h1.bench.test, ...), one wildcard for all.
BENCH_ZONE = "bench.test"
IDENTITIES = ("127.0.0.1", "::1", "localhost", BENCH_ZONE, f"*.{BENCH_ZONE}")


@dataclass(frozen=True, slots=True)
class ServerCertificate:
    """PEM bytes, picklable: each mock server process makes its own context from them."""

    ca_pem: bytes
    chain_pem: bytes
    key_pem: bytes

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        # load_cert_chain reads only files (the ssl module has no cadata for a key): a private
        # temporary file, deleted once read.
        with tempfile.NamedTemporaryFile(suffix=".pem") as pem:
            pem.write(self.key_pem + self.chain_pem)
            pem.flush()
            context.load_cert_chain(pem.name)
        return context

    def client_context(self) -> ssl.SSLContext:
        """A client context that trusts this CA alone (for tests)."""
        return ssl.create_default_context(cadata=self.ca_pem.decode("ascii"))

    def write_ca(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_bytes(self.ca_pem)
        return path


def generate_certificate(identities: tuple[str, ...] = IDENTITIES) -> ServerCertificate:
    import trustme

    authority = trustme.CA(organization_name="crawler mock server")
    issued = authority.issue_cert(*identities)
    chain = b"".join(blob.bytes() for blob in issued.cert_chain_pems)
    return ServerCertificate(authority.cert_pem.bytes(), chain, issued.private_key_pem.bytes())
