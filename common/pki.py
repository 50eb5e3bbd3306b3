"""The stack's certificate authority: the brokers' certificate and one client certificate per device.

Files under the PKI directory (WEBOS_PKI_DIR, default `.stack/pki/`):

    ca.crt  ca.key                    the authority (ca.key: 0600, never leaves this directory)
    server.crt  server.key            the brokers' certificate: localhost, 127.0.0.1, rabbitmq
    devices/<device>.crt  .key        a device's identity: CN and DNS name = the device id
    devices/<device>.password         only with the plain MQTT listener on (WEBOS_PLAIN_LISTENERS)

Each file is created only when missing (a lock keeps two processes from racing), keys with mode
0600 in a 0700 directory. Keys are ECDSA P-256: a TLS handshake with them costs a fraction of
an RSA one, which matters when thousands of devices connect at once.
"""
from __future__ import annotations

import datetime
import fcntl
import ipaddress
import os
import secrets
import ssl
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_NAME = "webos pipeline local CA"
# rabbitmq, rabbitmq-2, rabbitmq-3: the brokers' names under docker compose (docker-compose.yml,
# docker-compose.cluster.yml).
SERVER_DNS_NAMES = ("localhost", "rabbitmq", "rabbitmq-2", "rabbitmq-3")
SERVER_IPS = ("127.0.0.1", "::1")
CA_DAYS, SERVER_DAYS, DEVICE_DAYS = 3650, 825, 397


@dataclass(frozen=True)
class Identity:
    """A certificate and its private key, as files."""

    cert: Path
    key: Path


class PKI:
    """The certificate files in `directory`, created on demand."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.ca_cert = self.directory / "ca.crt"
        self.ca_key = self.directory / "ca.key"
        self.server = Identity(self.directory / "server.crt", self.directory / "server.key")
        self.devices_dir = self.directory / "devices"

    def device(self, device: str) -> Identity:
        """Where `device`'s certificate and key are (whether or not they exist yet)."""
        return Identity(self.devices_dir / f"{device}.crt", self.devices_dir / f"{device}.key")

    def ensure(self) -> list[str]:
        """The authority and the brokers' certificate; the names of the files it created."""
        with self._locked():
            created = self._ensure_ca()
            if created or not (self.server.cert.exists() and self.server.key.exists()):
                self._issue(self.server, "webos broker", server=True)
                created.append(self.server.cert.name)
        return created

    def ensure_device(self, device: str) -> Identity:
        """`device`'s certificate, issued now if it has none (the authority too, if missing)."""
        identity = self.device(device)
        if identity.cert.exists() and identity.key.exists():
            return identity
        with self._locked():
            self._ensure_ca()
            if not (identity.cert.exists() and identity.key.exists()):
                self._issue(identity, device, server=False)
        return identity

    def reissue_device(self, device: str) -> Identity:
        """A new key and certificate for `device` (rotation); the old files are replaced."""
        with self._locked():
            self._ensure_ca()
            identity = self.device(device)
            self._issue(identity, device, server=False)
        return identity

    def device_password(self, device: str) -> str:
        """`device`'s password for the plain MQTT listener (generated into
        devices/<device>.password, 0600, when missing). Only the plain listener uses it."""
        path = self.devices_dir / f"{device}.password"
        if not path.exists():
            with self._locked():
                if not path.exists():
                    write_private(path, secrets.token_urlsafe(18).encode(), 0o600)
        return path.read_text().strip()

    def remove_device(self, device: str) -> None:
        """Delete `device`'s files (the broker refuses it once its user is gone too)."""
        identity = self.device(device)
        for path in (identity.cert, identity.key, self.devices_dir / f"{device}.password"):
            path.unlink(missing_ok=True)

    # -- issuing ------------------------------------------------------------------------------

    @contextmanager
    def _locked(self):
        self.devices_dir.mkdir(parents=True, exist_ok=True)
        for directory in (self.directory, self.devices_dir):
            directory.chmod(0o700)
        with open(self.directory / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _ensure_ca(self) -> list[str]:
        if self.ca_cert.exists() and self.ca_key.exists():
            return []
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_NAME)])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True, crl_sign=True,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256())
        )
        _write_key(self.ca_key, key)
        write_private(self.ca_cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        return [self.ca_cert.name, self.ca_key.name]

    def _issue(self, identity: Identity, common_name: str, server: bool) -> None:
        ca_key = serialization.load_pem_private_key(self.ca_key.read_bytes(), password=None)
        ca_cert = x509.load_pem_x509_certificate(self.ca_cert.read_bytes())
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        if server:
            names = [x509.DNSName(name) for name in SERVER_DNS_NAMES]
            names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in SERVER_IPS]
            usage, days = ExtendedKeyUsageOID.SERVER_AUTH, SERVER_DAYS
        else:
            # The broker takes the user from the CN and the MQTT client id from this DNS name.
            names, usage, days = [x509.DNSName(common_name)], ExtendedKeyUsageOID.CLIENT_AUTH, DEVICE_DAYS
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        _write_key(identity.key, key)
        write_private(identity.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _write_key(path: Path, key) -> None:
    write_private(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()), 0o600)


def write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write whole or not at all, with `mode` from the first byte (a key is never readable)."""
    partial = path.with_name(f".{path.name}.partial")
    partial.unlink(missing_ok=True)
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(descriptor, "wb") as file:
        file.write(data)
    os.replace(partial, path)


def client_context(ca_cert: Path, identity: Identity | None = None) -> ssl.SSLContext:
    """TLS for a client of the brokers: the broker's certificate checked against `ca_cert`
    (hostname included); with `identity`, this client's own certificate too."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_cert))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if identity is not None:
        context.load_cert_chain(str(identity.cert), str(identity.key))
    return context
