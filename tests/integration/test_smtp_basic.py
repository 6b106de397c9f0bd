"""SMTP greeting and the basic commands of the sg_smtp protocol
(issue 2, item 6)."""

import shutil
import socket
import subprocess

import pytest

from sgtest import read_reply, smtp_dialog


def codes(replies):
    return [c for c, _ in replies]


def last(reply):
    return reply[1][-1]


def test_greeting(sg_module):
    (code, lines), = smtp_dialog(sg_module.smtp_port, [])
    assert code == 220
    assert lines[0].startswith("220 %s ESMTP" % sg_module.hostname)


def test_ehlo(sg_module):
    r = smtp_dialog(sg_module.smtp_port, ["EHLO client.example"])
    code, lines = r[1]
    assert code == 250
    assert len(lines) > 1
    assert all(l.startswith("250-") for l in lines[:-1])
    assert lines[-1].startswith("250 ")
    assert lines[0][4:].split()[0] == sg_module.hostname
    kw = {l[4:].split()[0].upper() for l in lines[1:]}
    assert {"PIPELINING", "ENHANCEDSTATUSCODES"} <= kw


def test_helo(sg_module):
    r = smtp_dialog(sg_module.smtp_port, ["HELO client.example"])
    assert r[1][0] == 250
    assert len(r[1][1]) == 1


@pytest.mark.parametrize("cmd,code,prefix", [
    ("NOOP", 250, "250 2.0.0"),
    ("noop", 250, "250 2.0.0"),
    ("RSET", 250, "250 2.0.0"),
    ("VRFY someone", 252, "252"),
    ("FOO", 500, "500 5.5.1"),
    ("EHLO", 501, "501 5.5.4"),
    ("HELO", 501, "501 5.5.4"),
    ("MAIL FROM:<a@b.example>", 503, "503 5.5.1"),
])
def test_single_command(sg_module, cmd, code, prefix):
    r = smtp_dialog(sg_module.smtp_port, [cmd, "QUIT"])
    assert r[1][0] == code, r
    assert last(r[1]).startswith(prefix), r
    assert r[2][0] == 221


def test_quit_closes(sg_module):
    with socket.create_connection(("127.0.0.1", sg_module.smtp_port),
                                  timeout=10) as s:
        f = s.makefile("rb")
        assert read_reply(f)[0] == 220
        s.sendall(b"QUIT\r\n")
        code, lines = read_reply(f)
        assert code == 221
        assert lines[-1].startswith("221 2.0.0")
        assert f.read() == b""          # closed by the server


def test_rset_and_noop_after_ehlo(sg_module):
    r = smtp_dialog(sg_module.smtp_port,
                    ["EHLO x", "NOOP", "RSET", "EHLO y", "QUIT"])
    assert codes(r) == [220, 250, 250, 250, 250, 221]


def test_too_long_line(sg_module):
    r = smtp_dialog(sg_module.smtp_port,
                    ["EHLO x", "NOOP " + "x" * 3000, "NOOP", "QUIT"])
    assert r[2][0] == 500 and last(r[2]).startswith("500 5.5.2"), r
    assert r[3][0] == 250       # the session goes on
    assert r[4][0] == 221


def test_bare_lf(sg_module):
    r = smtp_dialog(sg_module.smtp_port, ["EHLO x", b"NOOP\n", "NOOP", "QUIT"])
    assert r[2][0] == 500 and last(r[2]).startswith("500 5.5.2"), r
    assert r[3][0] == 250
    assert r[4][0] == 221


def test_pipelined_commands(sg_module):
    r = smtp_dialog(sg_module.smtp_port,
                    ["EHLO x", ["NOOP", "NOOP", "NOOP"], "QUIT"])
    assert codes(r) == [220, 250, 250, 250, 250, 221]
    for reply in r[2:5]:
        assert last(reply).startswith("250 2.0.0")


def test_pipelined_ehlo_before_greeting_read(sg_module):
    """Commands sent together with EHLO, in one write."""
    r = smtp_dialog(sg_module.smtp_port,
                    [["EHLO x", "NOOP", "RSET", "QUIT"]])
    assert codes(r) == [220, 250, 250, 250, 221]


def test_too_many_errors(sg_module):
    with socket.create_connection(("127.0.0.1", sg_module.smtp_port),
                                  timeout=10) as s:
        f = s.makefile("rb")
        assert read_reply(f)[0] == 220
        replies = []
        for _ in range(5):
            s.sendall(b"FOO\r\n")
            replies.append(read_reply(f))
        # then 421 and the server closes
        while replies[-1][0] != 421:
            replies.append(read_reply(f))
        assert [c for c, _ in replies[:4]] == [500] * 4
        assert replies[-1][1][-1].startswith("421 4.7.0")
        assert f.read() == b""


def test_swaks_quit_after_ehlo(sg_module):
    # make test installs swaks (tools/deps.sh): missing is a failure
    assert shutil.which("swaks"), "swaks is not installed: run tools/deps.sh"
    p = subprocess.run(["swaks", "--server", "127.0.0.1:%d" % sg_module.smtp_port,
                        "--quit-after", "EHLO", "--timeout", "10"],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "220 %s ESMTP" % sg_module.hostname in p.stdout
    assert "PIPELINING" in p.stdout


def test_smtplib(sg_module):
    import smtplib
    with smtplib.SMTP("127.0.0.1", sg_module.smtp_port, timeout=10) as c:
        code, _ = c.ehlo("client.example")
        assert code == 250
        assert c.has_extn("pipelining")
        assert c.has_extn("enhancedstatuscodes")
        assert c.noop()[0] == 250
        assert c.rset()[0] == 250
