"""TLS certificates for a SuperLink and SuperNode keys, for trying authentication on one machine or a small
federation (``python -m fedclip_lightning.flower.keys DIR --host <superlink address> --nodes site1 site2``).

Writes ``ca.crt`` (give it to every SuperNode and to the ``flwr`` CLI), ``server.pem``/``server.key`` (the
SuperLink's, valid for the given hosts) and per node an EC key pair in OpenSSH format (``<node>`` stays on
the node; ``<node>.pub`` is registered with ``flwr supernode register``). A real federation may well use
its institution's certificate authority instead: Flower needs only these files.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID


@dataclass
class Certificates:
    ca: Path
    cert: Path
    key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(path: Path, data: bytes, private: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if private:
        path.chmod(0o600)
    return path


def tls_certificates(folder: Path, hosts: list[str], days: int = 365) -> Certificates:
    """A certificate authority and a SuperLink certificate for ``hosts`` (IP addresses or DNS names)."""
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca = (x509.CertificateBuilder().subject_name(_name("fedclip-lightning CA")).issuer_name(_name("fedclip-lightning CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    names = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    cert = (x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    return Certificates(
        ca=_write(folder / "ca.crt", ca.public_bytes(pem)),
        cert=_write(folder / "server.pem", cert.public_bytes(pem)),
        key=_write(folder / "server.key", key.private_bytes(pem, serialization.PrivateFormat.TraditionalOpenSSL,
                                                            serialization.NoEncryption()), private=True))


def node_key(path: Path) -> Path:
    """An EC (NIST P-384) key pair in OpenSSH format: ``path`` (private) and ``path.pub``; returns ``path``."""
    key = ec.generate_private_key(ec.SECP384R1())
    _write(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                   serialization.NoEncryption()), private=True)
    _write(path.with_name(path.name + ".pub"), key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                                             serialization.PublicFormat.OpenSSH))
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fedclip_lightning.flower.keys", description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--host", action="append", default=[], help="the SuperLink's address as nodes dial it "
                    "(repeat for several; default 127.0.0.1)")
    ap.add_argument("--nodes", nargs="*", default=[], help="a key pair per SuperNode name")
    a = ap.parse_args(argv)
    c = tls_certificates(a.folder, a.host or ["127.0.0.1"])
    print(f"SuperLink: --ssl-ca-certfile {c.ca} --ssl-certfile {c.cert} --ssl-keyfile {c.key}")
    for n in a.nodes:
        k = node_key(a.folder / n)
        print(f"{n}: flwr supernode register {k}.pub <connection>; "
              f"flower-supernode ... --root-certificates {c.ca} --auth-supernode-private-key {k}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
