#!/usr/bin/env bash
# Makes the files of the thinbd-tls Secret: a CA (ca.crt), the storage nodes' certificate
# (server.crt/server.key, name thinbd-storage, shared by every storage node) and the CSI
# plugin's client certificate (client.crt/client.key). The CA's key goes to OUTDIR/private/,
# which `--from-file=OUTDIR` does not pick up; keep it offline to issue more certificates.
#
#   deploy/tls/make-certs.sh OUTDIR [DAYS]
#   kubectl -n thinbd-system create secret generic thinbd-tls --from-file=OUTDIR
set -euo pipefail
out=${1:?usage: make-certs.sh OUTDIR [DAYS]}
days=${2:-825}
umask 077
mkdir -p "$out/private"
cd "$out"
key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

key private/ca.key
openssl req -x509 -new -key private/ca.key -out ca.crt -days "$days" -subj "/CN=thinbd CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"

issue() { # NAME COMMON-NAME EXTENSIONS
  key "$1.key"
  openssl req -new -key "$1.key" -out "private/$1.csr" -subj "/CN=$2"
  printf '%s\n' "$3" >"private/$1.ext"
  openssl x509 -req -in "private/$1.csr" -CA ca.crt -CAkey private/ca.key -CAcreateserial \
    -CAserial private/ca.srl -out "$1.crt" -days "$days" -extfile "private/$1.ext" 2>/dev/null
  rm -f "private/$1.csr" "private/$1.ext"
}
issue server thinbd-storage "subjectAltName=DNS:thinbd-storage
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth"
issue client thinbd-client "basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth"
echo "made ca.crt, server.crt/.key, client.crt/.key in $out (CA key: $out/private/ca.key)"
