"""devtool.certs: the mesh's CA and certificates, their modes, owners and renewal."""
import datetime
import os
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from common import tls
from devtool import certs


def test_a_set_has_a_key_each_0600_signed_by_one_ca_with_the_service_name(tmp_path):
    certs.make(tmp_path)
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.pem").read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["ca.pem"] + [f"{r}.pem" for r in tls.ROLES] + [f"{r}-key.pem" for r in tls.ROLES])
    for role in tls.ROLES:
        files = tls.Files.in_dir(tmp_path, role)
        assert stat.S_IMODE(files.key.stat().st_mode) == 0o600, role
        assert stat.S_IMODE(files.cert.stat().st_mode) == 0o644, role
        cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
        assert cert.issuer == ca.subject
        ca.public_key().verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))
        usages = set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
        assert (ExtendedKeyUsageOID.SERVER_AUTH in usages) == (role == "service"), role
    service = x509.load_pem_x509_certificate(tls.Files.in_dir(tmp_path, "service").cert.read_bytes())
    names = service.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert tls.SERVER_NAME in names.get_values_for_type(x509.DNSName)
    # Nothing that could sign another certificate was written.
    assert b"PRIVATE KEY" not in b"".join(p.read_bytes() for p in tmp_path.iterdir() if not p.name.endswith("-key.pem"))


def test_if_absent_keeps_a_current_set_and_renews_one_about_to_expire(tmp_path):
    assert not certs.current(tmp_path)
    assert certs.main([str(tmp_path), "--if-absent"]) == 0
    first = (tmp_path / "ca.pem").read_bytes()
    assert certs.current(tmp_path)
    assert certs.main([str(tmp_path), "--if-absent"]) == 0
    assert (tmp_path / "ca.pem").read_bytes() == first
    certs.make(tmp_path, valid_days=certs.RENEW_DAYS - 1)
    assert not certs.current(tmp_path)
    assert certs.main([str(tmp_path), "--if-absent"]) == 0
    assert certs.current(tmp_path)
    (tmp_path / "operator-key.pem").unlink()
    assert not certs.current(tmp_path)


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_each_key_can_belong_to_its_reader(tmp_path):
    assert certs.main([str(tmp_path), "--owner", "envoy=101", "--owner", "service=65534"]) == 0
    assert (tmp_path / "envoy-key.pem").stat().st_uid == 101
    assert (tmp_path / "service-key.pem").stat().st_uid == 65534
    assert (tmp_path / "operator-key.pem").stat().st_uid == os.geteuid()
    with pytest.raises(SystemExit):
        certs.main([str(tmp_path), "--owner", "nobody=x"])


def test_validity_is_a_year(tmp_path):
    certs.make(tmp_path)
    cert = x509.load_pem_x509_certificate(tls.Files.in_dir(tmp_path, "envoy").cert.read_bytes())
    lasts = cert.not_valid_after_utc - datetime.datetime.now(datetime.timezone.utc)
    assert datetime.timedelta(days=certs.VALID_DAYS - 1) < lasts <= datetime.timedelta(days=certs.VALID_DAYS)
