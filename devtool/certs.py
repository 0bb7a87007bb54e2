"""The mesh's certificate authority and its leaf certificates (see common.tls).

    python -m devtool.certs DIR [--if-absent] [--owner ROLE=UID ...]

`./dev up` makes a fresh set under its data dir at every start; docker-compose's
`certs` container makes one in a volume with --if-absent (kept while it is valid
for RENEW_DAYS more) and gives each key to the user that reads it. The CA's key is
never written anywhere: once the leaves are signed nobody can mint another.
Keys are 0600, certificates 0644.
"""
import argparse
import datetime
import ipaddress
import pathlib
import sys

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common import tls
from devtool import files

VALID_DAYS = 365
RENEW_DAYS = 30
# Services answer calls and make them (router -> ledger, auth -> ledger); Envoy and
# operators only make them.
USAGES = {"service": (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH),
          "envoy": (ExtendedKeyUsageOID.CLIENT_AUTH,),
          "operator": (ExtendedKeyUsageOID.CLIENT_AUTH,)}


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "token-service mesh"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make(directory: pathlib.Path, owners: dict[str, int] | None = None,
         valid_days: int = VALID_DAYS) -> None:
    """A new CA and a certificate and key for each role of common.tls, in `directory`."""
    owners = owners or {}
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=valid_days)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("token-service mesh CA")
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    for role in tls.ROLES:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder().subject_name(_name(f"{role}.{tls.SERVER_NAME}")).issuer_name(ca_name)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(start).not_valid_after(end)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage(list(USAGES[role])), critical=False))
        if ExtendedKeyUsageOID.SERVER_AUTH in USAGES[role]:
            builder = builder.add_extension(x509.SubjectAlternativeName([
                x509.DNSName(tls.SERVER_NAME), x509.DNSName("localhost"),
                x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        paths = tls.Files.in_dir(directory, role)
        files.write(paths.key, _key_pem(key), 0o600, owners.get(role))
        files.write(paths.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644, None)
    # The CA last: a set whose ca.pem exists is complete (see current()).
    files.write(directory / "ca.pem", ca.public_bytes(serialization.Encoding.PEM), 0o644, None)


def current(directory: pathlib.Path, renew_days: int = RENEW_DAYS) -> bool:
    """Whether `directory` holds a whole set still valid for `renew_days` more."""
    try:
        pems = [tls.Files.in_dir(directory, role) for role in tls.ROLES]
        ca = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
        leaves = [x509.load_pem_x509_certificate(files.cert.read_bytes()) for files in pems]
        if not all(files.key.exists() for files in pems):
            return False
    except (OSError, ValueError):
        return False
    deadline = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=renew_days)
    return all(cert.not_valid_after_utc > deadline for cert in (ca, *leaves)) \
        and all(cert.issuer == ca.subject for cert in leaves)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m devtool.certs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", type=pathlib.Path)
    parser.add_argument("--if-absent", action="store_true",
                        help=f"keep a whole set that is valid for {RENEW_DAYS} more days")
    parser.add_argument("--owner", action="append", default=[], metavar="ROLE=UID",
                        help="give that role's key to that user (it stays 0600)")
    args = parser.parse_args(argv)
    owners = {}
    for item in args.owner:
        role, _, uid = item.partition("=")
        if role not in tls.ROLES or not uid.isdigit():
            parser.error(f"--owner takes ROLE=UID with ROLE one of {', '.join(tls.ROLES)}, got {item!r}")
        owners[role] = int(uid)
    if args.if_absent and current(args.directory):
        print(f"{args.directory}: the mesh's certificates are current")
        return 0
    make(args.directory, owners)
    print(f"{args.directory}: a new CA and certificates for {', '.join(tls.ROLES)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
