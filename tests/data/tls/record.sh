#!/bin/sh
# Records real ClientHellos and HTTP requests as test data (tests/data/tls/*.bin, *.http):
# a listener on 127.0.0.1 writes each connection's first bytes to a file, and curl, openssl
# s_client and Python's ssl connect to it. Everything runs inside a throwaway network namespace
# (unshare -n): no listener ever opens in the host's. Needs root (unshare); rerun to refresh.
#   sh tests/data/tls/record.sh
set -eu
here=$(cd "$(dirname "$0")" && pwd)
exec unshare -n sh -c '
set -eu
ip link set lo up
cd "$1"
python3 - <<PY &
import socket, select, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 8443)); s.listen(8)
while True:
    c, _ = s.accept()
    data = b""
    while select.select([c], [], [], 0.5)[0]:
        chunk = c.recv(65536)
        if not chunk:
            break
        data += chunk
    tag = open("/tmp/tpxsniff-tag").read().strip()
    open(tag, "wb").write(data)
    c.close()
PY
listener=$!
trap "kill $listener" EXIT
sleep 0.5
cap() { echo "$1" > /tmp/tpxsniff-tag; shift; "$@" >/dev/null 2>&1 </dev/null || true; sleep 0.8; }
cap curl-tls13.bin curl -sk --max-time 2 --resolve www.example.com:8443:127.0.0.1 https://www.example.com:8443/
cap curl-tls12.bin curl -sk --max-time 2 --tlsv1.2 --tls-max 1.2 --resolve Mixed.Example.ORG:8443:127.0.0.1 https://Mixed.Example.ORG:8443/
for groups in X25519 P-256 X25519:P-256 P-384:P-521 X448 ffdhe2048; do
    tag=$(echo "$groups" | tr ":A-Z" "-a-z")
    cap "openssl-$tag.bin" timeout 2 openssl s_client -connect 127.0.0.1:8443 -servername "sni-$tag.example.net" -groups "$groups"
done
# a real ClientHello over 1.5 KB in several records: openssl 3.0 has no ML-KEM, so a 1024-byte
# ffdhe8192 key share, plus ALPN, cut into records of at most 512 bytes by -max_send_frag
cap openssl-ffdhe8192-records.bin timeout 2 openssl s_client -connect 127.0.0.1:8443 -servername big.example.net -groups ffdhe8192 -alpn h2,http/1.1,$(python3 -c "print(\",\".join(\"x\" * 60 + str(i) for i in range(4)))") -max_send_frag 512
cap openssl-nosni.bin timeout 2 openssl s_client -connect 127.0.0.1:8443 -noservername
cap python-ssl.bin python3 -c "
import socket, ssl
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
s = socket.create_connection((\"127.0.0.1\", 8443), timeout=2)
ctx.wrap_socket(s, server_hostname=\"python.example.com\")"
# Python ssl with a long ALPN list: 2 KB in one record, over two TCP segments on a real path
cap python-ssl-large.bin python3 -c "
import socket, ssl
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
ctx.set_alpn_protocols([\"h2\"] + [chr(97 + i) * 250 for i in range(6)])
s = socket.create_connection((\"127.0.0.1\", 8443), timeout=2)
ctx.wrap_socket(s, server_hostname=\"large.python.example\")"
cap curl-http11.http curl -s --max-time 2 --resolve plain.example.com:8443:127.0.0.1 http://plain.example.com:8443/path?q=1
cap curl-http-proxy.http curl -s --max-time 2 -x http://127.0.0.1:8443 http://absolute.example.com/x
cap curl-http-ipv6.http curl -s --max-time 2 -g "http://127.0.0.1:8443/" -H "Host: [2001:db8::1]:8080"
rm -f /tmp/tpxsniff-tag
' sh "$here"
