#!/usr/bin/env bash
# Makes the certificates the TLS tests use, with openssl, in DIR:
#   ca.pem                the CA the broker trusts for client certificates
#   server.pem/.key       the broker's certificate (CN=localhost, SAN localhost and 127.0.0.1), signed by ca
#   client.pem/.key       a client certificate with CN=$CLIENT_CN (default "alice"), signed by ca
#   rogue-ca.pem          a CA the broker does not trust
#   rogue.pem/.key        a client certificate signed by rogue-ca
# Keys are unencrypted PKCS#8 (EC P-256); certificates last one day.
#
#   bash tests/tls/make-certs.sh DIR [CLIENT_CN]
set -euo pipefail

dir="$1"
client_cn="${2:-alice}"
mkdir -p "$dir"
cd "$dir"

key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

ca() { # name subject
    key "$1.key"
    openssl req -x509 -new -key "$1.key" -subj "/CN=$2" -days 1 -out "$1.pem" \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
}

leaf() { # name subject ca extensions
    key "$1.key"
    openssl req -new -key "$1.key" -subj "/CN=$2" -out "$1.csr"
    printf '%s\n' "$4" > "$1.ext"
    openssl x509 -req -in "$1.csr" -CA "$3.pem" -CAkey "$3.key" -CAcreateserial \
        -days 1 -extfile "$1.ext" -out "$1.pem" 2>/dev/null
    rm -f "$1.csr" "$1.ext"
}

ca ca "Warren test CA"
ca rogue-ca "Rogue CA"
leaf server localhost ca \
    "basicConstraints=CA:FALSE
keyUsage=digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=DNS:localhost,IP:127.0.0.1"
leaf client "$client_cn" ca \
    "basicConstraints=CA:FALSE
keyUsage=digitalSignature
extendedKeyUsage=clientAuth"
leaf rogue "$client_cn" rogue-ca \
    "basicConstraints=CA:FALSE
keyUsage=digitalSignature
extendedKeyUsage=clientAuth"
