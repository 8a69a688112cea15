"""The TCP protocol's state machines, driven directly: no sockets, no event loop, no clock.

:mod:`streamlet.sources._tcp_protocol` decides what a connection's bytes
mean; these tests feed it bytes (split where a socket might split them) and
read the events, so each rule of the protocol in :mod:`streamlet.sources.tcp`
is checked by itself, byte-exact, in microseconds.
"""

from __future__ import annotations

from collections import deque

import pytest

from streamlet.sources._tcp_protocol import (
    MAX_SEQ,
    PLAIN_REFUSED,
    AckWhenDurable,
    ClientState,
    End,
    Event,
    Hello,
    NumberedLines,
    Outbox,
    PlainLines,
    PlainMode,
    Refuse,
    ServerConnection,
    ServerLine,
    ack_line,
    busy_line,
    error_line,
    parse_server_line,
    resume_line,
)


def connection(*, max_line: int = 32, allow_plain: bool = True) -> ServerConnection:
    return ServerConnection(max_line=max_line, allow_plain=allow_plain, hello_timeout=10.0)


def feed(conn: ServerConnection, *pieces: bytes, eof: bool = False) -> list[Event]:
    events: list[Event] = []
    for piece in pieces:
        events += conn.receive_data(piece)
    if eof:
        events += conn.receive_eof()
    return events


def numbered(events: list[Event]) -> list[tuple[int, bytes]]:
    return [line for e in events if isinstance(e, NumberedLines) for line in e.lines]


def acks(events: list[Event]) -> list[int]:
    return [e.seq for e in events if isinstance(e, AckWhenDurable)]


def refusals(events: list[Event]) -> list[str]:
    return [e.message for e in events if isinstance(e, Refuse)]


# -- framing ----------------------------------------------------------------------


def test_lines_split_across_reads_at_every_byte_come_out_whole() -> None:
    data = b"@hello c1\r\n1 alpha\n2 \n3\r\n17 x y\n"
    whole = feed(connection(), data)
    conn = connection()
    split = feed(conn, *(data[i : i + 1] for i in range(len(data))))
    expected = [(1, b"alpha"), (2, b""), (3, b""), (17, b"x y")]
    assert numbered(whole) == numbered(split) == expected
    assert whole[0] == split[0] == Hello("c1")
    assert acks(split) == [1, 2, 3, 17]  # one ack per read that held lines
    assert acks(whole) == [17]
    assert conn.client_id == "c1"
    assert conn.mode == "numbered"


def test_a_partial_line_waits_for_its_end_and_the_lines_of_one_read_come_together() -> None:
    conn = connection()
    assert feed(conn, b"first li") == []
    assert conn.mode == "first"
    assert feed(conn, b"ne\nsec") == [PlainMode(), PlainLines([b"first line"])]
    assert feed(conn, b"ond\nthird\r\nfou") == [PlainLines([b"second", b"third"])]
    assert feed(conn, eof=True) == [End(unfinished=3)]
    assert conn.mode == "closed"
    assert feed(conn, b"more\n") == []


def test_a_first_line_not_beginning_with_at_is_the_first_plain_record() -> None:
    conn = connection()
    assert feed(conn, b"x\n@hello c1\n") == [PlainMode(), PlainLines([b"x", b"@hello c1"])]
    conn = connection()
    assert feed(conn, b"@plain\n@data\n") == [PlainMode(), PlainLines([b"@data"])]


@pytest.mark.parametrize(
    "pieces",
    [
        [b"@hello c1\n1 ok\n2 " + b"x" * 31 + b"\n3 after\n"],
        [b"@hello c1\n1 ok\n2 " + b"x" * 31],
        [b"@hello c1\n1 ok\n", b"2 " + b"x" * 20, b"x" * 20],
        [b"@hello c1\n1 ok\n", b"2 " + b"x" * 30 + b"\r\n"],  # 33 bytes with its CR
    ],
    ids=["complete", "unfinished", "grown", "cr-counts"],
)
def test_an_overlong_numbered_line_is_refused_after_the_lines_before_it(
    pieces: list[bytes],
) -> None:
    events = feed(connection(max_line=32), *pieces)
    assert numbered(events) == [(1, b"ok")]
    assert acks(events) == [1]
    assert refusals(events) == [
        "line too long (max 32 bytes); split the record or raise TcpSource(max_line=...)"
    ]
    assert isinstance(events[-1], Refuse)


def test_a_line_of_exactly_max_line_bytes_fits() -> None:
    events = feed(connection(max_line=8), b"12345678\n1234567\r\n")
    assert events == [PlainMode(), PlainLines([b"12345678", b"1234567"])]
    hello = b"@hello " + b"c" * 25  # 32 bytes
    assert feed(connection(max_line=32), hello + b"\n") == [Hello("c" * 25)]


@pytest.mark.parametrize(
    "first",
    [
        b"@" + b"h" * 40,
        b"@" + b"h" * 40 + b"\n",
        b"@hello " + b"c" * 26 + b"\n",  # one byte over
        b"@hello " + b"c" * 25 + b"\r\n",  # one byte over with its CR
        b"y" * 33 + b"\n",
    ],
)
def test_an_overlong_first_line_is_refused(first: bytes) -> None:
    conn = connection(max_line=32)
    events = feed(conn, first[:5], first[5:])
    assert refusals(events) == [
        "line too long (max 32 bytes); split the record or raise TcpSource(max_line=...)"
    ]
    assert conn.mode == "closed"


def test_an_overlong_plain_line_is_refused_after_the_lines_before_it() -> None:
    events = feed(connection(max_line=4), b"ab\ncd\n", b"abcde\nok\n")
    assert events[:2] == [PlainMode(), PlainLines([b"ab", b"cd"])]
    assert events[2:] == [
        Refuse("line too long (max 4 bytes); split the record or raise TcpSource(max_line=...)")
    ]


# -- numbered lines -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "shown"),
    [
        (b"0 zero", "b'0 zero'"),
        (b"%d over" % (MAX_SEQ + 1), "b'9223372036854775808 over'"),
        (b"00000000000000000001 twenty-digits", "b'00000000000000000001 twenty-digits'"),
        (b"-1 minus", "b'-1 minus'"),
        (b"x1 letter", "b'x1 letter'"),
        (b" 1 leading-space", "b' 1 leading-space'"),
        (b"", "b''"),
        (b"\xff\xfe", "b'\\xff\\xfe'"),
        (b"1" * 45, "b'" + "1" * 40 + "'..."),
    ],
)
def test_a_bad_sequence_number_is_refused_with_the_line_and_what_is_expected(
    line: bytes, shown: str
) -> None:
    events = feed(connection(max_line=64), b"@hello c1\n5 five\n" + line + b"\n6 six\n")
    assert numbered(events) == [(5, b"five")]
    assert acks(events) == [5]
    assert refusals(events) == [
        f"malformed line {shown}: expected '<seq> <payload>' with seq a decimal number from 1"
        f" to {MAX_SEQ}; fix the client's line format"
    ]


def test_the_largest_sequence_number_is_accepted() -> None:
    events = feed(connection(max_line=64), b"@hello c1\n%d last\n" % MAX_SEQ)
    assert numbered(events) == [(MAX_SEQ, b"last")]
    assert refusals(events) == []


@pytest.mark.parametrize("again", [b"7 again", b"3 back"])
def test_sequence_numbers_must_increase_within_a_connection_gaps_allowed(again: bytes) -> None:
    conn = connection()
    events = feed(conn, b"@hello c1\n3 a\n7 b\n", again + b"\n9 c\n")
    assert numbered(events) == [(3, b"a"), (7, b"b")]
    assert acks(events) == [7]
    seq = again.split()[0].decode()
    assert refusals(events) == [
        f"sequence number {seq} after 7: sequence numbers must increase within a connection;"
        " resend unacknowledged lines in order"
    ]


def test_a_second_hello_on_a_connection_is_a_malformed_line() -> None:
    events = feed(connection(), b"@hello c1\n1 a\n@hello c1\n2 b\n")
    assert events[0] == Hello("c1")
    assert numbered(events) == [(1, b"a")]
    assert refusals(events) == [
        "malformed line b'@hello c1': expected '<seq> <payload>' with seq a decimal number"
        f" from 1 to {MAX_SEQ}; fix the client's line format"
    ]


def test_a_second_hello_elsewhere_takes_the_id_over_with_this_refusal() -> None:
    old = connection()
    feed(old, b"@hello c1\n1 a\n")
    assert old.taken_over() == Refuse(
        "another connection said '@hello c1'; it is served instead of this one (a client id"
        " must be used by one client at a time)"
    )
    assert old.mode == "closed"
    assert feed(old, b"2 b\n") == []


# -- the first line -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("first", "message"),
    [
        (b"@hello \n", "bad hello b'@hello '"),
        (b"@hello a b\n", "bad hello b'@hello a b'"),
        (b"@hello " + b"c" * 129 + b"\n", "bad hello b'@hello " + "c" * 33 + "'..."),
        (b"@hello \xc3\xa9\n", "bad hello b'@hello \\xc3\\xa9'"),
        (b"@hello\n", "unknown command b'@hello'"),
        (b"@bye\n", "unknown command b'@bye'"),
        (b"@\r\n", "unknown command b'@'"),
    ],
)
def test_a_bad_first_command_is_refused(first: bytes, message: str) -> None:
    conn = connection(max_line=256)
    events = feed(conn, first + b"1 a\n")
    assert len(events) == 1
    assert refusals(events)[0].startswith(message + ": ")
    assert conn.client_id is None


@pytest.mark.parametrize("first", [b"x", b"\n", b" @hello c1\n"])
def test_a_plain_client_is_refused_at_its_first_byte_when_plain_is_not_allowed(
    first: bytes,
) -> None:
    conn = connection(allow_plain=False)
    assert feed(conn, first[:1]) == [Refuse(PLAIN_REFUSED)]
    assert feed(conn, first[1:] + b"more\n") == []


def test_at_plain_is_refused_when_plain_is_not_allowed_but_hello_is_served() -> None:
    assert feed(connection(allow_plain=False), b"@plain\nx\n") == [Refuse(PLAIN_REFUSED)]
    events = feed(connection(allow_plain=False), b"@hello c1\n1 a\n")
    assert events == [Hello("c1"), NumberedLines([(1, b"a")]), AckWhenDurable(1)]


def test_the_hello_deadline_holds_until_the_first_line_unless_it_is_plain() -> None:
    conn = connection()
    assert conn.awaiting_hello
    feed(conn, b"@hel")
    assert conn.awaiting_hello
    feed(conn, b"lo c1\n")
    assert not conn.awaiting_hello
    plain = connection()
    feed(plain, b"typing slowly")
    assert not plain.awaiting_hello
    assert plain.mode == "first"
    assert connection().hello_timed_out() == Refuse(
        "no complete first line within 10.0 s; a numbered client sends '@hello <client-id>' at once"
    )


def test_an_end_before_the_first_line_stores_nothing() -> None:
    assert feed(connection(), b"@hello c", eof=True) == [End(unfinished=8)]
    assert feed(connection(), eof=True) == [End(unfinished=0)]


# -- the duplicate filter and acks --------------------------------------------------


def test_after_resume_a_resent_line_is_a_duplicate_and_a_new_one_is_fresh() -> None:
    # A restart recovered 5 as durable: @resume 5; the client resends 4..7.
    client: ClientState[str] = ClientState("c1", durable=5, stored=5)
    conn = connection()
    events = feed(conn, b"@hello c1\n4 d\n5 e\n6 f\n7 g\n")
    [lines] = [e for e in events if isinstance(e, NumberedLines)]
    assert client.fresh(lines.lines) == [(6, b"f"), (7, b"g")]
    client.stored_through(7, "block-1")
    assert acks(events) == [7]
    assert client.blocking(5) is None  # 4 and 5 were durable already: acked at once
    assert client.blocking(7) == (7, "block-1")
    # The same lines again on a new connection, before block-1 is durable.
    again = numbered(feed(connection(), b"@hello c1\n6 f\n7 g\n8 h\n"))
    assert client.fresh(again) == [(8, b"h")]
    client.stored_through(8, "block-2")
    entry = client.blocking(8)
    assert entry == (7, "block-1")  # the older store first: acks never run ahead
    client.settle(entry)
    assert client.durable == 7
    assert client.blocking(7) is None
    assert client.blocking(8) == (8, "block-2")


def test_two_waiters_settling_one_entry_keep_the_durable_mark_exact() -> None:
    # One handle covers both entries (stores into one block); an old and a
    # new connection of the id both wait on the oldest.
    client: ClientState[str] = ClientState("c1", 0, 10, deque([(5, "b"), (10, "b")]))
    first = client.blocking(5)
    late = client.blocking(10)
    assert first is late is not None
    client.settle(first)
    assert client.durable == 5
    assert client.pending == deque([(10, "b")])
    last = client.blocking(10)
    assert last == (10, "b")
    client.settle(last)
    client.settle(late)  # already popped by the other waiter: the mark never goes back
    assert client.durable == 10
    assert not client.pending


# -- server lines and the client's side ------------------------------------------


def test_server_lines_are_byte_exact() -> None:
    assert resume_line(0) == b"@resume 0"
    assert ack_line(MAX_SEQ) == b"@ack 9223372036854775807"
    assert busy_line(64) == b"@busy too many connections (max 64); try again later"
    assert error_line("bad \u00e9") == b"@error bad \\xe9"


@pytest.mark.parametrize(
    ("line", "said"),
    [
        (b"@resume 12", ServerLine("resume", 12)),
        (b"@ack 7", ServerLine("ack", 7)),
        (b"@ack x", ServerLine("malformed-ack")),
        (b"@ack 12345678901234567890", ServerLine("malformed-ack")),
        (b"@resume x", ServerLine("command")),
        (b"@error  line too long ", ServerLine("error", text="line too long")),
        (b"@busy full", ServerLine("busy", text="full")),
        (b"@later 1", ServerLine("command")),
        (b"1 data", ServerLine("unexpected")),
        (b"", ServerLine("unexpected")),
    ],
)
def test_a_client_reads_what_a_server_line_says(line: bytes, said: ServerLine) -> None:
    assert parse_server_line(line) == said


def test_the_outbox_numbers_keeps_until_acked_and_rewrites_after_a_reconnect() -> None:
    box = Outbox()
    box.resumed(3)  # the server has 1..3: numbering continues after them
    assert (box.add(b"d"), box.add(b"e"), box.add(b"f")) == ((4, True), (5, True), (6, True))
    assert box.take(1) == b"4 d\n"  # at least one line, then stop at the limit
    assert box.take(1 << 20) == b"5 e\n6 f\n"
    assert box.take(1 << 20) == b""
    assert box.ack(4)
    assert not box.ack(4)
    assert [seq for seq, _ in box.unacked] == [5, 6]
    box.rewind()  # a new connection: what is not acked is due again, in order
    assert box.take(1 << 20) == b"5 e\n6 f\n"
    box.rewind()
    box.ack(5)
    assert box.take(1 << 20) == b"6 f\n"
    assert (box.acked, box.sent, box.skipped, box.resumed_at) == (5, 3, 0, 3)


def test_an_outbox_with_a_start_seq_skips_what_the_server_has() -> None:
    box = Outbox(start_seq=1)
    box.resumed(2)
    assert [box.add(b"x") for _ in range(4)] == [(1, False), (2, False), (3, True), (4, True)]
    assert (box.sent, box.skipped, box.next_seq) == (2, 2, 5)
    assert box.take(1 << 20) == b"3 x\n4 x\n"
