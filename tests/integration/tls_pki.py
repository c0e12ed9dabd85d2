"""A test PKI made with certtool (GnuTLS): a CA and certificates it signs.

Shared by tests/integration/test_nbd_tls.py and the VM lane's nbd-client test
(tests/vm/test_nbd_client.py). Files use the layout rpointd's tls.dir, qemu and
nbdkit expect: ca-cert.pem, <role>-cert.pem, <role>-key.pem.
"""
import subprocess


def certtool(*args):
    subprocess.run(["certtool", *args], check=True, capture_output=True)


def make_ca(d, name):
    d.mkdir(parents=True, exist_ok=True)
    certtool("--generate-privkey", "--key-type=ecdsa", "--outfile", str(d / "ca-key.pem"))
    (d / "ca.info").write_text(f'cn = "{name}"\nca\ncert_signing_key\nexpiration_days = 30\n')
    certtool("--generate-self-signed", "--load-privkey", str(d / "ca-key.pem"), "--template",
             str(d / "ca.info"), "--outfile", str(d / "ca-cert.pem"))


def make_cert(ca, d, role, cn, extra=""):
    """role: server or client; writes <role>-cert.pem and <role>-key.pem into d."""
    key, cert, info = d / f"{role}-key.pem", d / f"{role}-cert.pem", d / f"{role}.info"
    certtool("--generate-privkey", "--key-type=ecdsa", "--outfile", str(key))
    usage = "tls_www_server" if role == "server" else "tls_www_client"
    info.write_text(f'cn = "{cn}"\n{extra}{usage}\nsigning_key\nexpiration_days = 30\n')
    certtool("--generate-certificate", "--load-privkey", str(key), "--load-ca-certificate",
             str(ca / "ca-cert.pem"), "--load-ca-privkey", str(ca / "ca-key.pem"), "--template",
             str(info), "--outfile", str(cert))
