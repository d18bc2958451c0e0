"""The hostile corpus: what anyone who can write to a share can drop, against a running daemon.

One daemon (real base model, real ffmpeg) watches two folders while the test plays the attacker:
playlists that name files elsewhere on the server, links to outside files and folders, links
planted in the outbox, archive, failed folder and processing area, a hard link, a FIFO, a socket,
and names made to break tools. Outside the roots lies audio of a marker phrase the model would
transcribe if it ever heard it. Each case asserts where its file ended and what the report says;
at the end the daemon is up and processes a normal file, no outside file was opened, moved or
changed (inodes and contents, the transcripts, and, as root, `strace` of the daemon and its
children: no system call names an outside path, and no `connect()` reaches the network).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import media
import pytest
from conftest import SUMMARY, Pretrained
from daemon_harness import Daemon, drop_file

from daemon.journal import Job, JobState

MARKER = "Purple elephants dance on the frozen lake at midnight."
MARKER_WORDS = ("purple", "elephant", "frozen", "midnight")
NORMAL = "Good morning, this recording arrived safely."
NAMES = {
    "dash": "-i.mp4",
    "newline": "new\nline.mp4",
    "quotes": "it's \"quoted\".mp4",
    "shell": "$(touch pwned); `id` | & > x.mp4",
    "concat": "concat:a|b.mp4",
    "http": "http:x.mp4",
    "latin1": os.fsdecode(b"caf\xe9.mp4"),
    "255 bytes": "a" * 251 + ".mp4",
}


@dataclass
class Listener:
    """A loopback TCP listener that counts the connections it receives (it must receive none)."""

    port: int = 0
    connections: int = 0
    server: socket.socket = field(default_factory=socket.socket)

    def start(self) -> Listener:
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(8)
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()


def snapshot(root: Path) -> dict[str, tuple[int, int, str]]:
    """Return every file below root with its inode, mtime and content hash (the attacker's hard link
    adds a name to one of them, so the link count is not compared)."""
    found = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            st = path.stat()
            found[str(path)] = (st.st_ino, st.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
    return found


def playlist(*segments: str) -> str:
    """Return an HLS playlist whose segments are the given paths or URLs."""
    lines = ["#EXTM3U", "#EXT-X-TARGETDURATION:10", "#EXT-X-VERSION:3"]
    for segment in segments:
        lines += ["#EXTINF:3.0,", segment]
    return "\n".join([*lines, "#EXT-X-ENDLIST", ""])


@dataclass
class Corpus:
    """The daemon, the outside world and what the test dropped."""

    daemon: Daemon
    root: Path
    outside: Path
    before: dict[str, tuple[int, int, str]]
    listener: Listener
    strace_log: Path | None
    jobs: dict[str, Job] = field(default_factory=dict)
    kinds: list[str] = field(default_factory=list)

    def job(self, folder: str, rel: str) -> Job:
        return next(j for j in self.daemon.jobs() if j.folder == folder and j.rel_path == rel)

    def error(self, folder: str, rel: str) -> str:
        failed = self.daemon.folder("failed", folder)
        return (failed / (rel + ".error.txt")).read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, pretrained: Pretrained) -> Iterator[Corpus]:
    """Run the attack once for the module: plant, start, trace, drop everything, wait, stop."""
    root = tmp_path_factory.mktemp("hostile")
    outside = root / "outside"
    secret = media.speech_wav(outside / "secret.wav", MARKER, voice="en-us", speed=150)
    for ext, codec in (("mp3", ["-c:a", "libmp3lame"]), ("aac", ["-c:a", "aac", "-f", "adts"]),
                       ("ts", ["-c:a", "mp2", "-f", "mpegts"]), ("m4a", ["-c:a", "aac"])):
        subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-i", str(secret), *codec,
                        str(outside / f"secret.{ext}")], check=True)
    shutil.copy(secret, outside / "hard-target.wav")
    (outside / "dir").mkdir()
    shutil.copy(secret, outside / "dir" / "inside-link.wav")
    for name in ("out-target", "arch-target", "fail-target"):
        (outside / name).mkdir()
    listener = Listener().start()

    folders = []
    for name, template in (("media", "{stem}.{ext}"), ("plex", "{stem}.{lang}.{ext}")):
        base = root / name
        folders.append({"name": name, "inbox": str(base / "inbox"), "outbox": str(base / "outbox"),
                        "archive": str(base / "archive"), "failed": str(base / "failed"),
                        "stability_delay": 0.5, "output_name": template})
        (base / "inbox").mkdir(parents=True)
    data: dict[str, Any] = {
        "state_dir": str(root / "state"), "model_dir": str(pretrained.model_dir), "device": "cpu",
        "log_format": "json", "rescan_interval": 3600, "shutdown_grace": 10,
        "defaults": {"model": str(pretrained.base), "temperature": 0, "beam_size": None, "best_of": None,
                     "output_formats": ["txt", "srt"], "max_attempts": 2, "retry_base_delay": 0.3,
                     "retry_max_delay": 1},
        "folders": folders,
    }
    daemon = Daemon(root, data)
    media_dir, plex_dir = root / "media", root / "plex"

    # Planted before the daemon starts: links in the outbox, archive, failed folder, and in the
    # processing area an older version kept inside the inbox.
    (media_dir / "outbox").mkdir()
    (media_dir / "outbox" / "out-sub").symlink_to(outside / "out-target")
    (media_dir / "archive").mkdir()
    (media_dir / "archive" / "arch-sub").symlink_to(outside / "arch-target")
    (media_dir / "failed").mkdir()
    (media_dir / "failed" / "fail-sub").symlink_to(outside / "fail-target")
    planted = media_dir / "inbox" / ".whisperd" / "processing" / "77"
    planted.mkdir(parents=True)
    (planted / "planted.mp4").symlink_to(secret)
    before = snapshot(outside)

    daemon.start()
    tracer = None
    strace_log = None
    if os.geteuid() == 0 and shutil.which("strace"):
        strace_log = root / "strace.log"
        tracer = subprocess.Popen(["strace", "-f", "-qq", "-e", "trace=%file,connect", "-o", str(strace_log),
                                   "-p", str(daemon.pid)], stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not (strace_log.exists() and strace_log.stat().st_size):
            time.sleep(0.1)
    corpus = Corpus(daemon, root, outside, before, listener, strace_log)
    try:
        expected = _drop_everything(corpus, media_dir / "inbox", plex_dir / "inbox")
        daemon.wait_done(expected, timeout=300)
        normal = media.speech_wav(root / "normal.wav", NORMAL)
        drop_file(normal, media_dir / "inbox" / "normal.wav")
        daemon.wait_done(expected + 1, timeout=120)
        yield corpus
    finally:
        if tracer is not None:
            tracer.send_signal(signal.SIGINT)
            tracer.wait(timeout=30)
        daemon.stop()


def _drop_long(source: Path, target: Path) -> None:
    """Drop a file under a name too long for drop_file's `.part` suffix: copy hidden, then rename."""
    hidden = target.with_name(".dropping")
    shutil.copyfile(source, hidden)
    os.rename(hidden, target)


def _drop_everything(corpus: Corpus, inbox: Path, plex_inbox: Path) -> int:
    """Drop the whole corpus; return how many jobs it makes."""
    outside = corpus.outside
    port = corpus.listener.port
    hostile = {
        "hls-mp3.mp4": playlist(str(outside / "secret.mp3")),
        "hls-aac.mp4": playlist(str(outside / "secret.aac")),
        "hls-ts.mp4": playlist(str(outside / "secret.ts")),
        "hls-m4a.mp4": playlist(str(outside / "secret.m4a")),
        "hls-wav.mp4": playlist(str(outside / "secret.wav")),
        "hls-http.mp4": playlist(f"http://127.0.0.1:{port}/secret.ts"),
        "concat.mp4": f"ffconcat version 1.0\nfile '{outside / 'secret.wav'}'\n",
        "subtitle.mkv": "1\n00:00:01,000 --> 00:00:02,000\nhello\n",
    }
    staging = corpus.root / "staging"
    for name, text in hostile.items():
        (staging / name).parent.mkdir(parents=True, exist_ok=True)
        (staging / name).write_text(text)
        drop_file(staging / name, inbox / name)
    # An image sequence pattern: ffmpeg's image2 would open slide-001.jpg, slide-002.jpg … beside it.
    jpeg = staging / "slide.jpg"
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i", "color=c=red:s=32x32",
                    "-frames:v", "1", str(jpeg)], check=True)
    drop_file(jpeg, inbox / "slide-%03d.jpg")
    drop_file(jpeg, inbox / "slide-001.jpg")
    corpus.kinds += ["hls playlist → local mp3/aac/ts/m4a/wav", "hls playlist → http", "ffconcat list",
                     "image sequence pattern", "subtitle file named .mkv"]

    (inbox / "link.mp4").symlink_to(outside / "secret.wav")
    os.link(outside / "hard-target.wav", inbox / "hard.mp4")
    (inbox / "linkdir").symlink_to(outside / "dir")
    os.mkfifo(inbox / "pipe.mp4")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(inbox / "sock.mp4"))
    sock.close()
    corpus.kinds += ["symlink file", "hard link", "symlinked subfolder", "FIFO", "socket"]

    speech = media.speech_wav(staging / "speech.wav", "Hello from the test.", voice="en-us", speed=170)
    drop_file(speech, inbox / "out-sub" / "clip.wav")
    drop_file(speech, inbox / "arch-sub" / "clip.wav")
    drop_file(media.text_as_media(staging / "notes.mp4"), inbox / "fail-sub" / "notes.mp4")
    corpus.kinds += ["symlink in the outbox", "symlink in the archive", "symlink in the failed folder",
                     "symlink in the processing area at start-up"]

    for name in NAMES.values():
        _drop_long(speech, inbox / name)
        _drop_long(speech, plex_inbox / name)
    corpus.kinds += [f"name: {kind}" for kind in NAMES]
    return len(hostile) + 2 + 5 + 3 + 2 * len(NAMES)


REFUSED = {
    "hls-mp3.mp4": "a hls file", "hls-aac.mp4": "a hls file", "hls-ts.mp4": "a hls file",
    "hls-m4a.mp4": "a hls file", "hls-wav.mp4": "a hls file", "hls-http.mp4": "a hls file",
    "concat.mp4": "a concat file", "subtitle.mkv": "a srt file", "slide-%03d.jpg": "a jpeg_pipe file",
    "slide-001.jpg": "a jpeg_pipe file",
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(REFUSED))
def test_playlists_lists_images_and_subtitles_are_refused(corpus: Corpus, name: str) -> None:
    """Formats that open other files are refused before any is opened: failed/ with the reason."""
    job = corpus.job("media", name)
    assert job.state == JobState.FAILED and job.attempts == 1, job
    report = corpus.error("media", name)
    assert f"refused: {REFUSED[name]}" in report and "only media containers" in report
    assert (corpus.daemon.folder("failed") / name).is_file()


LINKS = {"link.mp4": "a symbolic link", "linkdir": "a symbolic link", "pipe.mp4": "a FIFO (named pipe)",
         "sock.mp4": "a socket", "hard.mp4": "a hard link"}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(LINKS))
def test_links_fifos_and_sockets_are_refused_once_and_leave_the_inbox(corpus: Corpus, name: str) -> None:
    """Each is moved (the entry itself, never what it points to) to failed/, reported once, never read."""
    job = corpus.job("media", name)
    assert job.state == JobState.FAILED and job.attempts == 1, job
    assert f"refused: {LINKS[name]}" in corpus.error("media", name)
    assert not os.path.lexists(corpus.daemon.folder("inbox") / name)
    assert os.path.lexists(corpus.daemon.folder("failed") / name)
    assert len([e for e in corpus.daemon.events("job_failed") if e.get("file") == name]) == 1


@pytest.mark.slow
def test_links_planted_in_outbox_archive_and_failed_folder_are_not_followed(corpus: Corpus) -> None:
    """Outputs, archived and failed originals never land behind a planted link; each job ends with a reason."""
    for target in ("out-target", "arch-target", "fail-target"):
        assert list((corpus.outside / target).iterdir()) == [], target
    out = corpus.job("media", "out-sub/clip.wav")
    assert out.state == JobState.FAILED and "out-sub is a symbolic link" in (out.last_error or "")
    assert (corpus.daemon.folder("failed") / "out-sub" / "clip.wav").is_file()
    archived = corpus.job("media", "arch-sub/clip.wav")
    assert archived.state == JobState.FAILED and "arch-sub is a symbolic link" in (archived.last_error or "")
    assert (corpus.daemon.folder("failed") / "arch-sub" / "clip.wav").is_file()
    failed = corpus.job("media", "fail-sub/notes.mp4")
    assert failed.state == JobState.FAILED and failed.attempts == 2
    assert "could not be moved to the failed folder" in (failed.last_error or "")
    assert (corpus.daemon.folder("failed") / "fail-sub").is_symlink()


@pytest.mark.slow
def test_a_link_planted_in_the_processing_area_is_removed_unfollowed(corpus: Corpus) -> None:
    """At start-up a link found in a processing area is removed (the name only), its target untouched."""
    planted = corpus.daemon.folder("inbox") / ".whisperd" / "processing" / "77" / "planted.mp4"
    assert not os.path.lexists(planted)
    [event] = [e for e in corpus.daemon.events("processing_entry_removed", all_runs=True)]
    assert event["file"].endswith("77/planted.mp4")


@pytest.mark.slow
@pytest.mark.parametrize("folder", ["media", "plex"])
@pytest.mark.parametrize("kind", sorted(NAMES))
def test_hostile_names_are_processed_and_kept(corpus: Corpus, folder: str, kind: str) -> None:
    """Names made to break tools are transcribed; outputs fit in 255 bytes, originals keep their names."""
    name = NAMES[kind]
    from daemon import names

    job = corpus.job(folder, names.escape(name))
    assert job.state == JobState.DONE, job
    assert (corpus.daemon.folder("archive", folder) / name).is_file()
    outputs = [Path(names.unescape(p)) for p in job.outputs]
    assert sorted(p.suffix for p in outputs) == [".srt", ".txt"]
    for path in outputs:
        assert path.is_file() and len(os.fsencode(path.name)) <= 255
        assert path.parent == corpus.daemon.folder("outbox", folder)
    stem = os.fsencode(name)[: -len(".mp4")]
    for suffix in (b".txt", b".srt") if folder == "media" else (b".en.txt", b".en.srt"):
        natural = stem + suffix
        [written] = [os.fsencode(p.name) for p in outputs if os.fsencode(p.name).endswith(suffix)]
        if len(natural) <= 255:
            assert written == natural  # the original's own bytes: players match subtitles by name
        else:
            assert written.startswith(stem[:200]) and b"~" in written  # shortened, with a hash of the stem
    assert not list(corpus.root.rglob("pwned"))


@pytest.mark.slow
def test_nothing_outside_was_touched_and_the_daemon_is_up(corpus: Corpus) -> None:
    """No outside file was opened, moved, changed or transcribed; no connection was made; a normal file flows."""
    assert snapshot(corpus.outside) == corpus.before
    assert corpus.listener.connections == 0
    normal = corpus.job("media", "normal.wav")
    assert normal.state == JobState.DONE
    outboxes = [corpus.daemon.folder("outbox", folder) for folder in ("media", "plex")]
    outbox_text = " ".join(p.read_text(encoding="utf-8", errors="replace").lower()
                           for outbox in outboxes for p in outbox.rglob("*.txt"))
    assert "arrived safely" in outbox_text
    assert not [w for w in MARKER_WORDS if w in outbox_text], outbox_text
    assert corpus.daemon.proc is not None and corpus.daemon.proc.poll() is None
    touched: list[str] = []
    connections: list[str] = []
    if corpus.strace_log is not None:
        lines = corpus.strace_log.read_text(errors="replace").splitlines()
        assert len(lines) > 1000, "strace saw too little to mean anything"
        touched = [line for line in lines if str(corpus.outside) in line]
        connections = [line for line in lines if "connect(" in line and "AF_INET" in line]
    assert touched == [], touched[:5]
    assert connections == [], connections[:5]
    traced = "strace of the daemon and its children" if corpus.strace_log else "no strace (not root)"
    SUMMARY.append(f"hostile inputs: {len(corpus.kinds)} kinds, {len(touched)} outside files touched, "
                   f"{corpus.listener.connections + len(connections)} connections, daemon up ({traced})")
