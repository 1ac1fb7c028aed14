"""A throwaway certificate authority for the fake ARM endpoint.

Invariant: the server certificate covers 127.0.0.1, ::1 and localhost and is signed by a fresh
CA whose PEM is written where clients are told to find it (``connection_verify=`` in the
Azure SDK); a temporary directory made for it is reported so its owner can remove it.
"""

from __future__ import annotations

import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path

import trustme


@dataclass(frozen=True)
class TlsMaterial:
    context: ssl.SSLContext
    ca_file: Path
    created_dir: Path | None


def make_tls(ca_file: Path | None) -> TlsMaterial:
    """Blocking (key generation, file write): call it off the event loop."""
    authority = trustme.CA(organization_name="sidecar simulator")
    certificate = authority.issue_cert("127.0.0.1", "::1", "localhost")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    certificate.configure_cert(context)
    created: Path | None = None
    if ca_file is None:
        created = Path(tempfile.mkdtemp(prefix="sidecar-sim-"))
        ca_file = created / "ca.pem"
    else:
        ca_file.parent.mkdir(parents=True, exist_ok=True)
    authority.cert_pem.write_to_path(str(ca_file))
    return TlsMaterial(context, ca_file, created)
