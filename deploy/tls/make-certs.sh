#!/usr/bin/env bash
# Makes the files of the thinbd-tls Secret: a CA (ca.crt), the storage nodes' certificate
# (server.crt/server.key, name thinbd-storage, shared by every storage node), the CSI
# plugin's client certificate (client.crt/client.key) and the snapshot metadata sidecar's
# (snapshot-metadata.crt/.key, for its Service in NAMESPACE). The CA's key goes to
# OUTDIR/private/, which `--from-file=OUTDIR` does not pick up; keep it offline to issue more
# certificates. OUTDIR/manifests/snapshotmetadataservice.yaml is the SnapshotMetadataService
# resource with this CA, to apply after the driver.
#
#   deploy/tls/make-certs.sh OUTDIR [DAYS] [NAMESPACE]
#   kubectl -n thinbd-system create secret generic thinbd-tls --from-file=OUTDIR
set -euo pipefail
out=${1:?usage: make-certs.sh OUTDIR [DAYS] [NAMESPACE]}
days=${2:-825}
ns=${3:-thinbd-system}
umask 077
mkdir -p "$out/private" "$out/manifests"
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
issue snapshot-metadata "thinbd-snapshot-metadata.$ns.svc" "subjectAltName=DNS:thinbd-snapshot-metadata.$ns.svc,DNS:thinbd-snapshot-metadata.$ns.svc.cluster.local
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth"
cat >manifests/snapshotmetadataservice.yaml <<EOF
apiVersion: cbt.storage.k8s.io/v1alpha1
kind: SnapshotMetadataService
metadata:
  name: thinbd.csi.io
spec:
  address: thinbd-snapshot-metadata.$ns.svc:6443
  audience: thinbd-snapshot-metadata
  caCert: $(base64 -w0 ca.crt)
EOF
echo "made ca.crt, server.crt/.key, client.crt/.key, snapshot-metadata.crt/.key in $out (CA key: $out/private/ca.key; SnapshotMetadataService: $out/manifests/)"
