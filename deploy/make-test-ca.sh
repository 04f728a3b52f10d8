#!/usr/bin/env bash
# Makes a private test CA and a server certificate signed by it, for HTTPS between
# hq-puller and branch-listener (see deploy/INSTALL.md, "TLS").
#
#   deploy/make-test-ca.sh OUT_DIR NAME [NAME...]
#
# NAME: the host names and/or IP addresses HQ uses in the location's url (every NAME
# goes into the certificate's subjectAltName; the first is also its CN).
# Writes into OUT_DIR (created when missing):
#   ca.pem, ca.key          the CA (reused when OUT_DIR already holds one: run the
#                           script once per branch with the same OUT_DIR)
#   <first NAME>.pem, .key  the server certificate chain and its key (mode 0600)
# Give ca.pem to HQ (`ca_file`), the server pair to the branch (`tls_cert_file`,
# `tls_key_file`). For tests and small installations: a production CA keeps its key
# offline. Needs openssl.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 OUT_DIR NAME [NAME...]   (NAME: host name or IP address)" >&2
  exit 2
fi
command -v openssl >/dev/null || { echo "$0: openssl not found (apt-get install openssl)" >&2; exit 1; }
out=$1; shift
mkdir -p "$out"
umask 077
days=${CA_DAYS:-825}
if [ ! -f "$out/ca.pem" ] || [ ! -f "$out/ca.key" ]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -keyout "$out/ca.key" -out "$out/ca.pem" -days "$days" \
    -subj "/CN=branch-replication test CA" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
  chmod 644 "$out/ca.pem"
fi
first=$1
san=""
for n in "$@"; do
  if [[ $n =~ ^[0-9.]+$ || $n == *:* ]]; then san+="IP:$n,"; else san+="DNS:$n,"; fi
done
san=${san%,}
ext=$(mktemp)
trap 'rm -f "$ext" "$out/$first.csr"' EXIT
printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=%s\n' "$san" >"$ext"
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
  -keyout "$out/$first.key" -out "$out/$first.csr" -subj "/CN=$first" 2>/dev/null
openssl x509 -req -in "$out/$first.csr" -CA "$out/ca.pem" -CAkey "$out/ca.key" \
  -CAcreateserial -out "$out/$first.pem" -days "$days" -extfile "$ext" 2>/dev/null
chmod 600 "$out/$first.key"
chmod 644 "$out/$first.pem"
echo "CA:          $out/ca.pem"
echo "certificate: $out/$first.pem ($san)"
echo "key:         $out/$first.key"
