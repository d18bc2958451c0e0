"""sd_notify over a real AF_UNIX datagram socket, as systemd's manager receives it."""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from daemon.systemd import Notifier, watchdog_interval


@pytest.fixture
def receiver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A datagram socket bound in tmp_path and named by $NOTIFY_SOCKET, as systemd sets it up."""
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield sock
    sock.close()


def received(sock: socket.socket) -> str:
    """Return the next datagram's text."""
    return sock.recv(65536).decode("utf-8")


def test_ready_arrives_as_one_datagram(receiver: socket.socket) -> None:
    """systemd sees READY=1 and the status line together, in one message."""
    notifier = Notifier.from_environment()
    assert notifier.enabled
    assert notifier.ready("watching 2 folders") is True
    assert received(receiver) == "READY=1\nSTATUS=watching 2 folders"


@pytest.mark.parametrize(("send", "text"), [
    (lambda n: n.ready(), "READY=1"),
    (lambda n: n.status("transcribing talk.mp4 · 42%"), "STATUS=transcribing talk.mp4 · 42%"),
    (lambda n: n.stopping(), "STOPPING=1"),
    (lambda n: n.stopping("finishing talk.mp4"), "STOPPING=1\nSTATUS=finishing talk.mp4"),
    (lambda n: n.watchdog(), "WATCHDOG=1"),
    (lambda n: n.extend_timeout(90), "EXTEND_TIMEOUT_USEC=90000000"),
    (lambda n: n.extend_timeout(1.5), "EXTEND_TIMEOUT_USEC=1500000"),
    (lambda n: n.notify(READY=1, STATUS="idle"), "READY=1\nSTATUS=idle"),
    (lambda n: n.send("STATUS=a", "STATUS=b"), "STATUS=a\nSTATUS=b"),
])  # fmt: skip
def test_each_message_has_the_exact_text(
    receiver: socket.socket, send: Callable[[Notifier], bool], text: str
) -> None:
    """Each helper sends exactly the fields sd_notify(3) defines, so `systemctl status` shows them."""
    assert send(Notifier.from_environment()) is True
    assert received(receiver) == text


def test_reloading_carries_the_monotonic_time(receiver: socket.socket) -> None:
    """A reload is announced with RELOADING=1 and the CLOCK_MONOTONIC time in microseconds."""
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert Notifier.from_environment().reloading() is True
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    first, second = received(receiver).split("\n")
    assert first == "RELOADING=1"
    key, _, usec = second.partition("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(usec) <= after


def test_a_newline_in_a_status_cannot_forge_a_field(receiver: socket.socket) -> None:
    """A file name or error with a newline in it stays one STATUS line, never a stray READY=1."""
    Notifier.from_environment().status("bad name\nREADY=1")
    assert received(receiver) == "STATUS=bad name READY=1"


def test_abstract_socket_names_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """NOTIFY_SOCKET=@name (an abstract socket, as systemd may pass) reaches that socket."""
    name = f"whisperd-test-{os.getpid()}-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert Notifier.from_environment().ready("up") is True
        assert received(sock) == "READY=1\nSTATUS=up"


def test_outside_systemd_every_call_is_a_quiet_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run from a terminal (no NOTIFY_SOCKET), the daemon's notifications do nothing and never fail."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = Notifier.from_environment()
    assert not notifier.enabled
    assert notifier.ready("x") is False
    assert notifier.reloading() is False
    assert notifier.watchdog() is False
    assert notifier.extend_timeout(10) is False
    assert notifier.stopping() is False
    notifier.close()


def test_a_socket_that_does_not_exist_does_not_raise(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stale NOTIFY_SOCKET (systemd gone, a copied environment) costs a False, never a crash."""
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    notifier = Notifier.from_environment()
    assert notifier.enabled
    assert notifier.ready() is False
    assert notifier.watchdog() is False
    notifier.close()


def test_an_unsupported_address_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    """A NOTIFY_SOCKET that is not a unix socket (vsock:…) disables notifications instead of failing."""
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    notifier = Notifier.from_environment()
    assert not notifier.enabled
    assert notifier.ready() is False


def test_the_socket_is_shared_safely_between_threads(receiver: socket.socket) -> None:
    """The main, worker and watchdog threads notifying at once each get every message through intact."""
    notifier = Notifier.from_environment()
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.extend(received(receiver) for _ in range(8 * 50)))
    reader.start()

    def ping(thread: int) -> None:
        for i in range(50):
            assert notifier.status(f"thread {thread} message {i}")

    senders = [threading.Thread(target=ping, args=(t,)) for t in range(8)]
    for t in senders:
        t.start()
    for t in senders:
        t.join()
    reader.join(timeout=10)
    notifier.close()
    assert sorted(got) == sorted(f"STATUS=thread {t} message {i}" for t in range(8) for i in range(50))


def test_watchdog_interval_is_half_of_watchdogsec(monkeypatch: pytest.MonkeyPatch) -> None:
    """With WatchdogSec=60 the daemon is told to ping every 30 s, systemd's recommended rate."""
    monkeypatch.setenv("WATCHDOG_USEC", "60000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert watchdog_interval() == 30.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval() == 30.0


def test_watchdog_meant_for_another_process_is_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    """A child that inherited WATCHDOG_USEC with its parent's WATCHDOG_PID does not ping."""
    monkeypatch.setenv("WATCHDOG_USEC", "60000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert watchdog_interval() is None


@pytest.mark.parametrize("usec", [None, "", "0", "sixty", "-5"])
def test_watchdog_off_or_garbled_means_no_pings(monkeypatch: pytest.MonkeyPatch, usec: str | None) -> None:
    """Without a usable WATCHDOG_USEC (no WatchdogSec=, or garbage) the daemon does not ping."""
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    if usec is None:
        monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    else:
        monkeypatch.setenv("WATCHDOG_USEC", usec)
    assert watchdog_interval() is None
