"""TLS certificates for a Flower deployment: one CA and one SuperLink server certificate.

``fedaudit certs init DIR`` writes::

    DIR/ca.crt       CA certificate: copy it to every SuperNode and to whoever runs `fedaudit run`
    DIR/ca.key       CA private key: keep it off the network (only needed to issue new certificates)
    DIR/server.pem   SuperLink certificate, signed by the CA, with a SAN for every --host
    DIR/server.key   SuperLink private key: stays on the SuperLink host

Flower checks the SuperLink's certificate against ``ca.crt`` and the address it dials,
so the certificate needs a subjectAltName entry for every name or IP address clients
use (measured: IP 127.0.0.1 and DNS localhost for loopback) and extendedKeyUsage
serverAuth.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared.files import write_atomic
from shared.errors import BadInput, make_dir, read_input

CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY = "ca.crt", "ca.key", "server.pem", "server.key"
DEFAULT_HOSTS = ("127.0.0.1", "localhost")


@dataclass(frozen=True)
class CertPaths:
    directory: Path

    @property
    def ca_cert(self) -> Path:
        return self.directory / CA_CERT

    @property
    def ca_key(self) -> Path:
        return self.directory / CA_KEY

    @property
    def server_cert(self) -> Path:
        return self.directory / SERVER_CERT

    @property
    def server_key(self) -> Path:
        return self.directory / SERVER_KEY


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    name = host.strip()
    if not name or any(c.isspace() for c in name) or "/" in name or ":" in name:
        raise BadInput(f"--host {host!r} is neither an IP address nor a DNS name")
    return x509.DNSName(name)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def init_certs(directory: str | Path, hosts: list[str] | tuple[str, ...] = DEFAULT_HOSTS, days: int = 365) -> CertPaths:
    """Create a CA and a server certificate valid for ``hosts``; never overwrites."""
    paths = CertPaths(Path(directory).resolve())
    hosts = list(dict.fromkeys(hosts or DEFAULT_HOSTS))
    if not 1 <= days <= 36_500:
        raise BadInput(f"--days must be in 1..36500 (100 years), got {days}")
    sans = [_san(h) for h in hosts]
    if paths.directory.exists() and not paths.directory.is_dir():
        raise BadInput(f"certificate directory {paths.directory} exists and is not a directory")
    existing = [p.name for p in (paths.ca_cert, paths.ca_key, paths.server_cert, paths.server_key) if p.exists()]
    if existing:
        raise BadInput(f"certificate directory {paths.directory} already holds {', '.join(existing)}; refusing to overwrite")
    make_dir(paths.directory, "certificate directory", mode=0o700)

    now = dt.datetime.now(dt.timezone.utc)
    start, end = now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedaudit deployment CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, encipher_only=False, decipher_only=False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.KeyUsage(digital_signature=True, key_encipherment=False, key_cert_sign=False, crl_sign=False, content_commitment=False,
                          data_encipherment=False, key_agreement=True, encipher_only=False, decipher_only=False),
            critical=True,
        )
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    try:
        write_atomic(paths.ca_key, _key_pem(ca_key), 0o600)
        write_atomic(paths.server_key, _key_pem(server_key), 0o600)
        write_atomic(paths.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), 0o644)
        # Written last: a ca.crt present means the whole set exists.
        write_atomic(paths.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    except OSError as exc:
        for written in (paths.ca_key, paths.server_key, paths.server_cert):
            written.unlink(missing_ok=True)
        raise BadInput(f"cannot write certificates in {paths.directory}: {exc.strerror}") from None
    return paths


def server_paths(directory: str | Path) -> CertPaths:
    """The certificate set a SuperLink needs; :class:`BadInput` naming what is missing."""
    paths = CertPaths(Path(directory).resolve())
    if not paths.directory.is_dir():
        raise BadInput(f"certificate directory {paths.directory} not found; create it with `fedaudit certs init {directory}`")
    missing = [p.name for p in (paths.ca_cert, paths.server_cert, paths.server_key) if not p.exists()]
    if missing:
        raise BadInput(f"certificate directory {paths.directory} lacks {', '.join(missing)}; create it with `fedaudit certs init DIR`")
    return paths


def check_ca_file(path: str | Path) -> Path:
    """A readable PEM certificate (bundle); :class:`BadInput` otherwise."""
    path = Path(path).expanduser().resolve()
    data = read_input(path, "root certificate file")
    try:
        x509.load_pem_x509_certificates(data)
    except ValueError:
        raise BadInput(f"root certificate file {path} is not a PEM certificate") from None
    return path


def certificate_hosts(path: str | Path) -> list[str]:
    """The subjectAltName entries of a certificate (for messages and tests)."""
    cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(v) for v in san.get_values_for_type(x509.IPAddress)] + san.get_values_for_type(x509.DNSName)
