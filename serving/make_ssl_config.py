"""Write TF-Serving's --ssl_config_file (an SSLConfig text proto) from PEM files.

TF-Serving wants the key and certificates inline in that file, not as paths:

    python serving/make_ssl_config.py --key tls/server.key --cert tls/server.pem \
        [--client-ca tls/ca.pem] --out tls/ssl_config.txt

With --client-ca, clients must present a certificate signed by that CA (client_verify). The output
holds the private key, so it is written readable by its owner only.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def _quoted(text: str) -> str:
    """A protobuf text-format string literal."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def ssl_config(key_pem: str, cert_pem: str, client_ca_pem: str | None = None) -> str:
    lines = [f"server_key: {_quoted(key_pem)}", f"server_cert: {_quoted(cert_pem)}"]
    if client_ca_pem:
        lines += [f"custom_ca: {_quoted(client_ca_pem)}", "client_verify: true"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--key", required=True, type=Path, help="server private key (PEM)")
    parser.add_argument("--cert", required=True, type=Path, help="server certificate chain (PEM)")
    parser.add_argument("--client-ca", type=Path, help="CA that signs client certificates (PEM); requires them")
    parser.add_argument("--out", required=True, type=Path, help="the SSLConfig file to write")
    args = parser.parse_args()
    text = ssl_config(args.key.read_text(), args.cert.read_text(),
                      args.client_ca.read_text() if args.client_ca else None)
    fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)


if __name__ == "__main__":
    main()
