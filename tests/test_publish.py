"""Subtitles a viewer accepts: whatever whisper returns, every cue has text, lies inside the audio,
follows the one before it, and lasts; the files load in a real subtitle parser (pysubs2)."""

from __future__ import annotations

import json
from pathlib import Path

import pysubs2
import pytest
from subtitles import subtitle_problems

from daemon.config import Rule
from daemon.pipeline.publish import publish
from daemon.pipeline.transcribe import Segment, Transcript, Word

AUDIO_END_S = 132.0  # the case: a 132 s file


def _segment(
    n: int, start: float, end: float, text: str, words: list[tuple[float, float, str]] | None = None
) -> Segment:
    return Segment(id=n, seek=0, start=start, end=end, text=text, tokens=(1, 2), temperature=0.0, avg_logprob=-0.2,
                   compression_ratio=1.2, no_speech_prob=0.1,
                   words=tuple(Word(s, e, w, 0.9) for s, e, w in words) if words is not None else None)  # fmt: skip


def _transcript(*segments: Segment) -> Transcript:
    return Transcript(text=" ".join(s.text.strip() for s in segments), language="en", segments=segments,
                      task="transcribe", model="base", audio_duration_s=AUDIO_END_S)  # fmt: skip


# What whisper really returns now and then: an empty segment, a segment overlapping the next, a
# zero-length one, two starting together, and one ending (or starting) past the end of the audio.
AWKWARD = _transcript(
    _segment(0, 0.0, 4.0, " Good morning."),
    _segment(1, 4.0, 6.5, ""),
    _segment(2, 6.0, 9.0, " Today we talk about rivers."),  # overlaps the next
    _segment(3, 8.5, 8.5, " Rivers."),  # zero-length, inside the previous one
    _segment(4, 20.0, 22.0, " First."),
    _segment(5, 20.0, 21.0, " Second."),  # starts with the one before
    _segment(6, 128.0, 143.04, " The end."),  # ends at 2:23.04 in a 132 s file
    _segment(7, 133.0, 135.0, " Thank you."),  # starts after the audio ended
)


def _cues(path: Path) -> list[tuple[float, float, str]]:
    subs = pysubs2.load(str(path), encoding="utf-8", format_=path.suffix.lstrip("."))
    return [(e.start / 1000, e.end / 1000, e.plaintext.strip()) for e in subs]


@pytest.mark.parametrize("fmt", ["srt", "vtt"])
def test_whispers_awkward_segments_become_cues_a_viewer_accepts(tmp_path: Path, fmt: str) -> None:
    """No empty cue, none past the end, none overlapping; every word heard inside the audio kept."""
    rule = Rule.model_validate({"output_formats": [fmt, "json", "tsv"]})
    [subtitles, whole, table] = publish(AWKWARD, rule, tmp_path, "talk", end_s=AUDIO_END_S)
    assert subtitle_problems(subtitles, end_s=AUDIO_END_S) == []
    assert _cues(subtitles) == [
        (0.0, 4.0, "Good morning."),
        (6.0, 8.5, "Today we talk about rivers."),
        (8.5, 9.0, "Rivers."),
        (20.0, 21.0, "First."),  # two cues at one instant share the time, in whisper's order
        (21.0, 22.0, "Second."),
        (128.0, 132.0, "The end."),  # cut at the end of the audio; "Thank you." after it is gone
    ]
    # whisper's json keeps whisper's result as it was returned; the tsv rows are timed like the cues
    assert [s["text"] for s in json.loads(whole.read_text())["segments"]][1] == ""
    rows = [line.split("\t") for line in table.read_text().splitlines()[1:]]
    assert [(int(a) / 1000, int(b) / 1000, text) for a, b, text in rows] == _cues(subtitles)


def test_word_level_cues_follow_the_same_rules(tmp_path: Path) -> None:
    """With word timings (layout and highlighted words), zero-length, overlapping, empty and late words
    still give ordered cues with text, inside the audio."""
    words = [(0.0, 0.4, " One"), (0.4, 0.4, " two"), (0.3, 0.9, " three"), (0.9, 1.0, " "),
             (1.0, 1.6, " four"), (2.95, 3.4, " five")]  # fmt: skip
    transcript = Transcript(text="One two three four five", language="en", task="transcribe", model="base",
                            segments=(_segment(0, 0.0, 1.6, " One two three four", words[:5]),
                                      _segment(1, 2.9, 3.4, " five", words[5:])),
                            audio_duration_s=3.0)  # fmt: skip
    for layout in ({"max_line_width": 12}, {"highlight_words": True}, {"max_words_per_line": 1}):
        rule = Rule.model_validate({"output_formats": ["srt", "vtt"], "word_timestamps": True, **layout})
        out = tmp_path / next(iter(layout))
        for path in publish(transcript, rule, out, "talk", end_s=3.0):
            assert subtitle_problems(path, end_s=3.0) == [], (layout, path.read_text())
            shown = " ".join(text for _, _, text in _cues(path))
            for word in ("One", "two", "three", "four", "five"):
                assert word in shown, (layout, shown)


def test_the_checker_itself_refuses_what_a_viewer_refuses(tmp_path: Path) -> None:
    """The suite's subtitle check finds an empty cue, a backwards one, an overlap and a cue past the end."""
    bad = tmp_path / "bad.sample"  # not .srt: the suite-wide check would refuse it, rightly
    bad.write_text(
        "1\n00:00:00,000 --> 00:00:02,000\nHello\n\n"
        "2\n00:00:01,500 --> 00:00:03,000\n \n\n"
        "3\n00:00:04,000 --> 00:00:03,500\nBackwards\n\n"
        "4\n00:00:05,000 --> 00:00:09,000\nLate\n\n",
        encoding="utf-8",
    )
    problems = subtitle_problems(bad, end_s=8.0, fmt="srt")
    assert [p.split(": ", 1)[1] for p in problems] == [
        "no text",
        "starts before the cue before it ended (2.000)",
        "ends before it starts, or lasts no time",
        "ends past the end of the audio (8.000)",
    ]


