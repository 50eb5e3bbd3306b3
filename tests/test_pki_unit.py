"""The stack's certificate authority (common/pki.py): files, modes, names, and a chain that verifies."""
from __future__ import annotations

import ssl
import stat
import subprocess
import threading

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.pki import PKI, client_context


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def openssl_verify(ca, cert, purpose: str) -> subprocess.CompletedProcess:
    return subprocess.run(["openssl", "verify", "-purpose", purpose, "-CAfile", str(ca), str(cert)],
                          capture_output=True, text=True)


def test_first_run_creates_the_authority_and_server_certificate_keys_private(tmp_path):
    pki = PKI(tmp_path / "pki")
    assert pki.ensure() == ["ca.crt", "ca.key", "server.crt"]
    assert mode(pki.directory) == 0o700
    assert mode(pki.ca_key) == 0o600 and mode(pki.server.key) == 0o600
    assert mode(pki.ca_cert) == 0o644
    verified = openssl_verify(pki.ca_cert, pki.server.cert, "sslserver")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    names = x509.load_pem_x509_certificate(pki.server.cert.read_bytes()).extensions \
        .get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", "rabbitmq"} <= set(names.get_values_for_type(x509.DNSName))
    # Created again only when missing.
    before = pki.ca_cert.read_bytes()
    assert pki.ensure() == []
    assert pki.ca_cert.read_bytes() == before


def test_a_device_certificate_names_the_device_and_only_authenticates_a_client(tmp_path):
    pki = PKI(tmp_path / "pki")
    identity = pki.ensure_device("4HHC2-392")
    assert identity.cert == tmp_path / "pki" / "devices" / "4HHC2-392.crt"
    assert mode(identity.key) == 0o600 and mode(pki.devices_dir) == 0o700
    cert = x509.load_pem_x509_certificate(identity.cert.read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "4HHC2-392"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["4HHC2-392"]
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == \
        [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert openssl_verify(pki.ca_cert, identity.cert, "sslclient").returncode == 0
    assert openssl_verify(pki.ca_cert, identity.cert, "sslserver").returncode != 0
    # Another authority's certificate does not verify against this one.
    other = PKI(tmp_path / "other")
    assert openssl_verify(pki.ca_cert, other.ensure_device("4HHC2-392").cert,
                          "sslclient").returncode != 0


def test_existing_device_files_are_kept_rotation_replaces_them_and_removal_deletes_them(tmp_path):
    pki = PKI(tmp_path / "pki")
    first = pki.ensure_device("A").cert.read_bytes()
    assert pki.ensure_device("A").cert.read_bytes() == first
    rotated = pki.reissue_device("A")
    assert rotated.cert.read_bytes() != first and mode(rotated.key) == 0o600
    pki.remove_device("A")
    assert not rotated.cert.exists() and not rotated.key.exists()


def test_processes_racing_for_a_new_authority_end_with_one(tmp_path):
    pkis = [PKI(tmp_path / "pki") for _ in range(4)]
    threads = [threading.Thread(target=pki.ensure_device, args=(f"D{n}",))
               for n, pki in enumerate(pkis)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for n in range(4):
        assert openssl_verify(pkis[0].ca_cert, pkis[0].device(f"D{n}").cert,
                              "sslclient").returncode == 0


def test_the_client_context_checks_the_broker_against_the_authority(tmp_path):
    pki = PKI(tmp_path / "pki")
    pki.ensure()
    context = client_context(pki.ca_cert, pki.ensure_device("A"))
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    with pytest.raises(FileNotFoundError):
        client_context(pki.ca_cert, pki.device("B"))  # never issued
