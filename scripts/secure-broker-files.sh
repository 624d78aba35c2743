#!/usr/bin/env bash
# Makes the files docker-compose-ng.secure.yml mounts, in mosquitto/secure/ (git-ignored):
# a CA (ca.pem, ca.key), the broker's certificate for the host names "mosquitto" and
# "localhost" (server.pem, server.key), a random password for the user "lps-bridge"
# (bridge-password) and Mosquitto's password file for it (passwords).
# Needs openssl and mosquitto_passwd (Debian: openssl, mosquitto). Existing files are kept;
# delete the folder to make new ones.
set -euo pipefail
cd "$(dirname "$0")/../mosquitto"
mkdir -p secure
cd secure
user=lps-bridge

if [ ! -f ca.pem ]; then
  openssl req -x509 -newkey rsa:3072 -nodes -days 825 -subj "/CN=LPS broker CA" \
    -keyout ca.key -out ca.pem 2>/dev/null
fi
if [ ! -f server.pem ]; then
  openssl req -newkey rsa:3072 -nodes -subj "/CN=mosquitto" \
    -keyout server.key -out server.csr 2>/dev/null
  printf 'subjectAltName=DNS:mosquitto,DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' > server.ext
  openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 825 \
    -extfile server.ext -out server.pem 2>/dev/null
  rm -f server.csr server.ext
fi
if [ ! -f bridge-password ]; then
  head -c 24 /dev/urandom | base64 | tr -d '/+=\n' > bridge-password
fi
if [ ! -f passwords ]; then
  mosquitto_passwd -b -c passwords "$user" "$(cat bridge-password)"
fi
# The broker (user mosquitto in its container) and the bridges (LPS_UID) read them.
chmod 0644 ca.pem server.pem server.key passwords bridge-password
echo "mosquitto/secure: CA, broker certificate, user $user and its password ready"
