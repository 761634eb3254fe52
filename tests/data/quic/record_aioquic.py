"""Records a real QUIC client's first datagrams (tests/data/quic/aioquic-*.hex) from aioquic's
sans-IO QuicConnection: no socket, no network, nothing listens. Debian 12's curl has no HTTP/3,
so aioquic (PyPI) is the recording client; it is not a dependency of tproxyd or its tests:
    python3 -m venv /tmp/aq && /tmp/aq/bin/pip install aioquic
    cd tests/data/quic && /tmp/aq/bin/python record_aioquic.py
"""
import aioquic
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection


def record(name, server_name, alpn):
    cfg = QuicConfiguration(is_client=True, server_name=server_name, alpn_protocols=alpn)
    conn = QuicConnection(configuration=cfg)
    conn.connect(("198.51.100.1", 443), now=0.0)
    dgs = [d for d, _ in conn.datagrams_to_send(now=0.0)]
    with open(name, "w") as f:
        f.write(f"# aioquic {aioquic.__version__} client Initial datagrams, SNI {server_name}, "
                f"ALPN {len(alpn)} protocols\n")
        for d in dgs:
            f.write(d.hex() + "\n")
    print(name, [len(d) for d in dgs])
record("aioquic-h3.hex", "quic.example.com", ["h3"])
record("aioquic-two-datagrams.hex", "Big.QUIC.example.org", ["h3"] + [chr(97 + i) * 250 for i in range(6)])
