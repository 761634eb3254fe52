"""The access log: the pure line formatter, the writer (one write of whole lines a loop turn,
reopen after rotation, drops counted, never raises), [log] validation, and lines written by a
loopback relay."""

from __future__ import annotations

import contextlib
import json
import os
import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.unit.test_relay_loop import DEADLINE, Upstream, echo, running, wait_for
from tproxyd.relay import accesslog
from tproxyd.relay.accesslog import AccessLog, batches, line, rfc3339, tcp_line
from tproxyd.relay.connection import Connection
from tproxyd.state.errors import ConfigError
from tproxyd.state.loader import loads

T = 1764683754.1239  # 2025-12-02T13:55:54.123Z


def test_a_line_is_one_json_object_with_the_issues_fields_in_order():
    text = line(T, "tcp", ("10.0.0.1", 40000), ("198.18.2.1", 443), "direct", "direct", 12, 3456,
                1.2345, 0.0031, "client_fin")
    assert text.endswith(b"\n") and text.count(b"\n") == 1
    doc = json.loads(text)
    assert list(doc) == ["ts", "proto", "client", "dst", "route", "via", "bytes_up",
                         "bytes_down", "duration_ms", "connect_ms", "end"]
    assert doc == {"ts": "2025-12-02T13:55:54.123Z", "proto": "tcp", "client": "10.0.0.1:40000",
                   "dst": "198.18.2.1:443", "route": "direct", "via": "direct", "bytes_up": 12,
                   "bytes_down": 3456, "duration_ms": 1234, "connect_ms": 3, "end": "client_fin"}


def test_ipv6_in_brackets_domain_and_error_when_known_and_escaped():
    doc = json.loads(line(T, "tcp", ("2001:db8:1::2", 5), ("2001:db8:2::1", 80), 'r"1', "up\\x",
                          0, 0, 0.0, None, "upstream_error", domain="example.com",
                          error='HTTP/1.1 403 "no"'))
    assert doc["client"] == "[2001:db8:1::2]:5" and doc["dst"] == "[2001:db8:2::1]:80"
    assert doc["domain"] == "example.com" and list(doc)[4] == "domain"
    assert doc["route"] == 'r"1' and doc["via"] == "up\\x"
    assert doc["connect_ms"] is None
    assert doc["error"] == 'HTTP/1.1 403 "no"' and list(doc)[-1] == "error"


def test_no_domain_or_error_keys_when_unknown():
    doc = json.loads(line(T, "udp", ("10.0.0.1", 1), ("10.0.0.2", 53), "direct", "direct", 1, 2,
                          0.5, None, "udp_expired"))
    assert "domain" not in doc and "error" not in doc


@pytest.mark.parametrize("t, text", [
    (0.0, "1970-01-01T00:00:00.000Z"),
    (T, "2025-12-02T13:55:54.123Z"),
    (T + 1, "2025-12-02T13:55:55.123Z"),  # the cached second moves on
    (T + 0.8769, "2025-12-02T13:55:55.000Z"),
])
def test_rfc3339_milliseconds_utc(t, text):
    assert rfc3339(t) == text


class Route:
    def __init__(self, name: str) -> None:
        self.name, self.action = name, "via"


@pytest.mark.parametrize("client, dst, route, upstream, domain, error, end, connected", [
    (("10.0.0.1", 40000), ("198.18.2.1", 443), None, None, None, "", "client_fin", 0.0031),
    (("2001:db8:1::2", 5), ("2001:db8:2::1", 80), Route('r"1'), "up\\x", "example.com",
     'HTTP/1.1 403 "no"', "upstream_error", None),
    (("10.0.0.1", 1), ("10.0.0.2", 2), Route("corp"), "corp", None, "refused", "server_reset",
     0.5),  # an error kept, but only an upstream_error line says it
])
def test_a_connections_line_is_the_line_of_its_facts(client, dst, route, upstream, domain, error,
                                                     end, connected):
    a, b = socket.socketpair()
    with a, b:
        conn = Connection(a, client, b, dst, 100.0, use_splice=False)
        conn.route, conn.upstream, conn.domain, conn.error = route, upstream, domain, error
        conn.connected_at = None if connected is None else 100.0 + connected
        conn.up.bytes, conn.down.bytes = 12, 3456
        got = tcp_line(conn, end, 101.2345, T)
    want = line(T, "tcp", client, dst, route.name if route else "direct", upstream or "direct",
                12, 3456, 1.2345, connected, end, domain=domain,
                error=error if end == "upstream_error" else None)
    assert got == want
    json.loads(got)


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


class Drops:
    def __init__(self) -> None:
        self.n = 0

    def __call__(self) -> None:
        self.n += 1


def test_a_file_gets_whole_lines_appended_mode_0640(tmp_path):
    path = str(tmp_path / "access.log")
    drops = Drops()
    log = AccessLog(path, drops)
    log.write(b'{"a":1}\n')
    log.write(b'{"a":2}\n')
    log.close()
    log.close()  # runs once
    assert read(path) == b'{"a":1}\n{"a":2}\n'
    assert os.stat(path).st_mode & 0o777 == 0o640
    assert drops.n == 0


def test_a_rotated_file_is_reopened_checked_at_most_once_a_second(tmp_path):
    path = str(tmp_path / "access.log")
    now = [100.0]
    log = AccessLog(path, Drops(), clock=lambda: now[0])
    log.write(b"1\n")
    log.flush()  # the loop's turn ends
    os.rename(path, path + ".1")  # logrotate without copytruncate
    now[0] += 0.5
    log.write(b"2\n")  # within the second: still the old file
    log.flush()
    now[0] += 0.6
    log.write(b"3\n")
    log.close()
    assert read(path + ".1") == b"1\n2\n"
    assert read(path) == b"3\n"


def test_a_full_disk_drops_and_counts_lines_never_raises():
    drops = Drops()
    log = AccessLog("/dev/full", drops)
    for _ in range(3):
        log.write(b"x\n")
        log.flush()
    log.write(b"y\n")
    log.write(b"z\n")
    log.close()  # a turn of two lines
    assert drops.n == 5


def test_a_turns_lines_go_out_in_one_write_of_whole_lines(tmp_path, monkeypatch):
    path = str(tmp_path / "access.log")
    log = AccessLog(path, Drops())
    writes = []
    real = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: writes.append(data) or real(fd, data))
    log.flush()  # nothing pending: no write
    for n in range(3):
        log.write(b'{"n":%d}\n' % n)
    log.flush()
    log.write(b'{"n":3}\n')
    log.close()
    assert writes == [b'{"n":0}\n{"n":1}\n{"n":2}\n', b'{"n":3}\n']
    assert read(path) == b"".join(writes)


@given(st.lists(st.binary(max_size=300).map(lambda b: b.replace(b"\n", b"") + b"\n")),
       st.integers(1, 1000))
def test_batches_keep_every_line_whole_and_in_order_within_the_limit(lines, limit):
    out = batches(lines, limit)
    assert b"".join(data for data, _ in out) == b"".join(lines)
    assert sum(n for _, n in out) == len(lines)
    for data, n in out:
        assert data.count(b"\n") == n and data.endswith(b"\n")
        assert len(data) <= limit or n == 1  # only a line longer than the limit goes over it


def test_stderr_lines_of_a_turn_go_out_in_writes_of_at_most_pipe_buf(monkeypatch):
    r, w = os.pipe()
    saved = os.dup(2)
    os.dup2(w, 2)
    writes = []
    try:
        log = AccessLog("stderr", drops := Drops())
        real = os.write
        monkeypatch.setattr(os, "write", lambda fd, data: writes.append(data) or real(fd, data))
        lines = [b"%04d" % n + b"x" * 995 + b"\n" for n in range(12)]  # 12,000 bytes, one turn
        for one in lines:
            log.write(one)
        log.close()
        monkeypatch.undo()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(w)
    got = b""
    while chunk := os.read(r, 65536):
        got += chunk
    os.close(r)
    assert got == b"".join(lines) and drops.n == 0
    assert [len(data) for data in writes] == [4000, 4000, 4000]  # cut between lines


def test_a_write_cut_short_counts_every_line_not_written_whole(tmp_path, monkeypatch):
    log = AccessLog(str(tmp_path / "access.log"), drops := Drops())
    monkeypatch.setattr(os, "write", lambda fd, data: 10)  # the disk filled after 10 bytes
    for n in range(3):
        log.write(b'{"n":%d}\n' % n)  # 8 bytes each: one whole line written, two lost
    log.flush()
    assert drops.n == 2
    monkeypatch.undo()
    log.close()


def test_an_unopenable_file_drops_lines_and_is_tried_again(tmp_path, caplog):
    path = str(tmp_path / "later" / "access.log")
    now = [0.0]
    drops = Drops()
    log = AccessLog(path, drops, clock=lambda: now[0])
    log.write(b"1\n")
    log.flush()
    now[0] += 1.5
    log.write(b"1\n")  # tried again, failed again: logged once
    log.flush()
    assert sum("lines are dropped" in r.message for r in caplog.records) == 1
    os.mkdir(tmp_path / "later")
    now[0] += 1.5
    log.write(b"2\n")
    log.close()
    assert drops.n == 2 and read(path) == b"2\n"


def test_a_full_stderr_pipe_drops_lines_without_blocking(monkeypatch):
    r, w = os.pipe()
    saved = os.dup(2)
    os.dup2(w, 2)
    try:
        drops = Drops()
        log = AccessLog("stderr", drops)
        assert os.get_blocking(2)  # fd 2 itself is left blocking: it is shared
        chunk = b"y" * 4095 + b"\n"
        for _ in range(64):  # 256 KiB into a 64 KiB pipe nobody reads, a line a turn
            log.write(chunk)
            log.flush()
        log.close()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(w)
        os.close(r)
    assert 0 < drops.n < 64


def test_stderr_as_a_socket_is_written_without_waiting():
    a, b = socket.socketpair()
    saved = os.dup(2)
    os.dup2(a.fileno(), 2)
    try:
        log = AccessLog("stderr", Drops())
        log.write(b"hello\n")
        log.close()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        a.close()
    assert b.recv(100) == b"hello\n"
    b.close()


@pytest.mark.parametrize("value", ["off", "stderr", "/var/log/tproxyd/access.log"])
def test_log_access_accepts_off_stderr_and_absolute_paths(value):
    assert loads(f'[log]\naccess = "{value}"\n').log.access == value


def test_log_access_is_off_by_default():
    assert loads("[relay]\n").log.access == "off"
    assert accesslog.open_log("off", Drops()) is None


@pytest.mark.parametrize("text, message", [
    ('access = "access.log"', "log.access"),
    ('access = "/var/log/"', "log.access"),
    ("access = 1", "log.access"),
    ('acess = "off"', "log.acess"),
])
def test_log_access_errors_name_the_key(text, message):
    with pytest.raises(ConfigError) as err:
        loads(f"[log]\n{text}\n")
    assert message in str(err.value)


def test_the_relay_writes_one_line_per_connection_with_exact_bytes(tmp_path):
    path = tmp_path / "access.log"
    up = Upstream(echo)
    with running(up.addr, access_log=str(path)) as (relay, addr):
        with socket.create_connection(addr, timeout=DEADLINE) as c:
            c.sendall(b"x" * 1000)
            got = b""
            while len(got) < 1000:
                got += c.recv(65536)
            c.shutdown(socket.SHUT_WR)
            assert c.recv(10) == b""
        wait_for(lambda: relay.counters.closed == 1, "the connection to end")
    (doc,) = [json.loads(x) for x in path.read_bytes().splitlines()]
    assert doc["end"] == "client_fin" and doc["proto"] == "tcp"
    assert doc["bytes_up"] == doc["bytes_down"] == 1000
    assert doc["dst"] == f"{up.addr[0]}:{up.addr[1]}"
    assert doc["route"] == doc["via"] == "direct"
    assert isinstance(doc["connect_ms"], int) and doc["duration_ms"] >= doc["connect_ms"]
    assert relay.counters.access_log_dropped == 0


def test_a_connection_refused_over_the_limit_gets_its_line(tmp_path):
    path = tmp_path / "access.log"
    up = Upstream(echo)
    with running(up.addr, access_log=str(path), max_connections=1) as (relay, addr), \
            socket.create_connection(addr, timeout=DEADLINE) as held:
        held.sendall(b"x")
        assert held.recv(1) == b"x"
        with contextlib.suppress(ConnectionResetError), \
                socket.create_connection(addr, timeout=DEADLINE) as refused:
            assert refused.recv(1) == b""  # or reset, even before connect() returned
        wait_for(lambda: relay.counters.refused == 1, "the refusal")
        relay.stop()  # while held is open: closed first, it could end by client_fin instead
        wait_for(lambda: len(path.read_bytes().splitlines()) == 2, "the held one's line")
    docs = [json.loads(x) for x in path.read_bytes().splitlines()]
    assert docs[0]["end"] == "over_limit" and docs[0]["bytes_up"] == docs[0]["bytes_down"] == 0
    assert docs[0]["connect_ms"] is None and docs[1]["end"] == "drained"  # the held one, at stop
