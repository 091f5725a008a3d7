#!/bin/sh
# Self-signed certificate for a first start or a test host; use a real one in production
# (same file names: deploy/nginx/certs/tls.crt and tls.key).
set -eu
dir=$(dirname "$0")/certs
host=${1:-${REV_HOSTNAME:-localhost}}
mkdir -p "$dir"
openssl req -x509 -newkey rsa:2048 -nodes -days 365 \
    -subj "/CN=$host" -addext "subjectAltName=DNS:$host" \
    -keyout "$dir/tls.key" -out "$dir/tls.crt"
chmod 600 "$dir/tls.key"
echo "wrote $dir/tls.crt and $dir/tls.key for $host"
