"""Certificates made at test time: certificate authorities, server certificates, client certificates.

Made in-process with `cryptography` rather than the openssl command: no subprocesses, nothing
that depends on the installed OpenSSL's version, defaults or config file (which decide, for
example, whether `req -x509` marks a CA as one), EC keys in milliseconds instead of RSA's
hundreds, and each certificate carries exactly the subject, SANs and key usage a test asserts on.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_VALID = datetime.timedelta(days=1)


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key, both PEM files."""

    cert: Path
    key: Path


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return path


class Authority:
    """A self-signed CA whose certificate is written to `<folder>/<name>.pem`, issuing into the same folder."""

    def __init__(self, folder: Path, name: str):
        self._folder = folder
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        ca = x509.BasicConstraints(ca=True, path_length=0)
        self._cert = self._build(self._name, self._key.public_key(), [(ca, True)])
        self.cert = folder / f"{name}.pem"
        self.cert.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))

    def _build(self, subject: x509.Name, public_key, extensions) -> x509.Certificate:
        now = datetime.datetime.now(datetime.timezone.utc)
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(self._name).public_key(public_key)
                   .serial_number(x509.random_serial_number()).not_valid_before(now - _VALID)
                   .not_valid_after(now + _VALID))
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical)
        return builder.sign(self._key, hashes.SHA256())

    def issue(self, common_name: str, *, server: bool = False) -> Issued:
        """A certificate for `common_name`: a server's for 127.0.0.1 and localhost, or a client's (no SANs,
        so that grpc takes its CN as the peer's identity)."""
        key = ec.generate_private_key(ec.SECP256R1())
        extensions = [(x509.BasicConstraints(ca=False, path_length=None), True)]
        if server:
            names = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            extensions += [(x509.SubjectAlternativeName(names), False),
                           (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)]
        else:
            extensions.append((x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False))
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        cert = self._build(subject, key.public_key(), extensions)
        cert_path = self._folder / f"{common_name}.pem"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return Issued(cert_path, _write_key(key, self._folder / f"{common_name}.key"))
