"""`whisperd transcribe`'s options: whisper's own CLI spellings, whisperd's additions, and the rule
overrides they make.

A whisper user's command line works as typed: `--output_format srt`, `-f srt -f vtt` and
`-f srt vtt`; `--best_of 3` and `--best-of 3`; `--language None` to detect; `--temperature 0`
with whisper's fallback steps. Each rule option's help is the config field's own description,
so the two never disagree.
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Sequence
from typing import Any

from daemon.config import OUTPUT_FORMATS, RULE_FIELDS, Rule, parse_duration

FORMAT_CHOICES = (*OUTPUT_FORMATS, "all")
FORMAT_FLAGS = ("-f", "--output-format", "--output_format")
ENGINES = ("auto", "batched", "sequential")
DEFAULT_TEMPERATURE_INCREMENT = 0.2  # whisper's --temperature_increment_on_fallback

# whisper CLI options whisperd does not take, with the reason a user gets instead of "unrecognized".
WHISPER_ONLY = {
    "--fp16": "whisperd uses float16 on CUDA and float32 on a CPU by itself",
    "--verbose": "whisperd shows a progress bar on a terminal and logs one event per stage",
    "--patience": "whisperd uses whisper's default beam search",
    "--length_penalty": "whisperd uses whisper's default length normalisation",
    "--suppress_tokens": "whisperd suppresses whisper's default tokens",
    "--carry_initial_prompt": "whisperd's whisper primes the first window only",
    "--prepend_punctuations": "whisperd uses whisper's default punctuation merging",
    "--append_punctuations": "whisperd uses whisper's default punctuation merging",
}


def optional_float(value: str) -> float | None:
    """Return a float, or None for 'none'/'null' (whisper's way to turn a threshold off)."""
    return None if value.lower() in ("none", "null") else float(value)


def optional_int(value: str) -> int | None:
    """Return an int, or None for 'none'/'null'."""
    return None if value.lower() in ("none", "null") else int(value)


def boolean(value: str) -> bool:
    """Return True or False for whisper's spellings (True/False, 1/0, yes/no, on/off)."""
    if value.lower() in ("true", "1", "yes", "on"):
        return True
    if value.lower() in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, not {value!r}")


def formats(value: str) -> list[str]:
    """Return the formats in one -f value ('srt', or 'srt,vtt'); refuse unknown ones."""
    parts = [part.strip().lower() for part in value.split(",") if part.strip()]
    unknown = [part for part in parts if part not in FORMAT_CHOICES]
    if unknown or not parts:
        raise argparse.ArgumentTypeError(
            f"unknown output format {', '.join(unknown) or repr(value)}; choose from {', '.join(FORMAT_CHOICES)}"
        )
    return parts


def language(value: str) -> str:
    """Return the language as given; 'None' (whisper's word for detection) means 'auto'."""
    return "auto" if value.lower() in ("none", "null") else value


def duration(value: str) -> float:
    """Return seconds for '3', '3s' or '1m'."""
    try:
        return float(parse_duration(value))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def clip_timestamps(value: str) -> tuple[float, ...]:
    """Return whisper's clip list 'start,end,start,end,…' as numbers; '0' (whisper's default) is empty."""
    try:
        times = tuple(float(part) for part in value.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds like 10,20,40,50, not {value!r}") from None
    if times == (0.0,):
        return ()
    if any(t < 0 for t in times) or any(b <= a for a, b in itertools.pairwise(times)):
        raise argparse.ArgumentTypeError(f"clip times must be increasing and not negative: {value!r}")
    return times


def expand_output_formats(argv: Sequence[str]) -> list[str]:
    """Return argv with `-f srt vtt` written as `-f srt -f vtt`, so `-f srt FILE` still reads FILE.

    After -f's own value, further values are taken while they are format names: whisper takes
    one value, whisperd several. (A file named exactly like a format reads as one; whisper's
    own `-f srt` would have refused it anyway.)
    """
    out: list[str] = []
    pending = False  # the next argument is -f's own value
    taking = False  # arguments now are further values of the last -f
    for i, arg in enumerate(argv):
        if arg == "--":
            return out + list(argv[i:])
        if pending:
            out.append(arg)
            pending, taking = False, True
        elif taking and arg.lower() in FORMAT_CHOICES:
            out += ["-f", arg]
        else:
            flag, equals, _ = arg.partition("=")
            pending = arg in FORMAT_FLAGS
            taking = bool(equals) and flag in FORMAT_FLAGS
            out.append(arg)
    return out


def _rule_help(name: str, extra: str = "") -> str:
    info = Rule.model_fields[name]
    default = info.default
    shown = ",".join(str(v) for v in default) if isinstance(default, tuple) else default
    return f"{info.description or name}{extra} (default: {shown}, or the config's)"


def add_arguments(t: argparse.ArgumentParser) -> None:
    """Add every `whisperd transcribe` option to its parser; each rule option's dest is its field."""
    t.add_argument("files", nargs="+", metavar="FILE", help="audio or video files to transcribe")
    t.add_argument("--config", "-c", help="take settings and defaults from this config file")
    t.add_argument("--folder", help="use this configured folder's rules (needs --config); a file inside its inbox "
                   "is matched by its path relative to the inbox, any other by its name")
    t.add_argument("--output-dir", "--output_dir", "-o", default=".",
                   help="directory for the outputs (default: the current directory)")
    t.add_argument("--model-dir", "--model_dir", help="where named models download (default: the config's "
                   "model_dir, else ~/.cache/whisper)")
    t.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: the config's, else auto)")
    t.add_argument("--threads", type=optional_int, help="torch CPU threads; 0 keeps torch's default")
    t.add_argument("--engine", choices=ENGINES, default=argparse.SUPPRESS,
                   help="'batched': windows cut at pauses, decoded together (each window on its own, greedy or "
                   "beam search); 'sequential': whisper's transcribe(); 'auto' (the default) picks batched only "
                   "with --condition_on_previous_text False (whisper's default, True: sequential)")
    t.add_argument("--clip-timestamps", "--clip_timestamps", type=clip_timestamps, default=(),
                   help="only these stretches, as whisper takes them: start,end,start,end,… in seconds on the "
                   "file's timeline; a missing last end means the end of the file; 0 means all of it")
    t.add_argument("--log-format", "--log_format", choices=["auto", "json", "console"],
                   help="auto (default): console on a terminal, JSON lines otherwise")

    # Rule options: absent unless given (SUPPRESS), so only what the user typed overrides the
    # config's defaults; each dest is the rule field's name.
    rule = t.add_argument_group("rule options (each overrides the config's defaults and the folder's rules)")
    opt: dict[str, Any] = {"default": argparse.SUPPRESS}

    def add(name: str, *spellings: str, extra: str = "", **kw: Any) -> None:
        if not spellings:  # the config's name, dashed as whisperd's other options and as whisper writes it
            dashed = "--" + name.replace("_", "-")
            spellings = (dashed, "--" + name) if "_" in name else (dashed,)
        rule.add_argument(*spellings, dest=name, help=_rule_help(name, extra), **opt, **kw)

    add("model")
    add("task", choices=["transcribe", "translate"])
    add("language", type=language, extra="; None also detects")
    add("output_formats", "--output-format", "--output_format", "-f", type=formats, action="append",
        metavar="FORMAT", extra="; -f srt, -f srt -f vtt, -f srt vtt and -f srt,vtt all work")
    add("output_name")
    add("audio_track")
    add("skip_silence", type=duration)
    add("word_timestamps", type=boolean, metavar="BOOL")
    add("max_line_width", type=optional_int)
    add("max_line_count", type=optional_int)
    add("max_words_per_line", type=optional_int)
    add("highlight_words", type=boolean, metavar="BOOL")
    add("initial_prompt")
    rule.add_argument("--temperature", type=float, **opt,
                      help="sampling temperature, as whisper takes it: with the fallback, the first of the steps "
                      "tried up to 1.0 when a window fails the thresholds (default: 0, or the config's)")
    rule.add_argument("--temperature-increment-on-fallback", "--temperature_increment_on_fallback",
                      type=optional_float, **opt, help="the fallback's step from --temperature up to 1.0; "
                      f"None turns the fallback off (default: {DEFAULT_TEMPERATURE_INCREMENT})")
    add("beam_size", type=optional_int)
    add("best_of", type=optional_int)
    add("condition_on_previous_text", type=boolean, metavar="BOOL")
    add("no_speech_threshold", type=optional_float)
    add("compression_ratio_threshold", type=optional_float)
    add("logprob_threshold", type=optional_float)
    add("hallucination_silence_threshold", type=optional_float)
    add("sample_len", type=optional_int)


def temperatures(start: float, increment: float | None) -> tuple[float, ...]:
    """Return whisper's temperature fallback: start, start + increment, … up to 1.0."""
    if increment is None or increment <= 0 or start >= 1:
        return (start,)  # above 1, the rule's own check says the value is out of range
    steps = int((1.0 - start) / increment + 1e-6)
    return tuple(round(start + i * increment, 6) for i in range(steps + 1))


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Return the rule fields the command line sets, in the config's terms."""
    found = {name: getattr(args, name) for name in RULE_FIELDS if hasattr(args, name)}
    if "output_formats" in found:
        chosen = [fmt for group in found["output_formats"] for fmt in group]
        found["output_formats"] = list(OUTPUT_FORMATS) if "all" in chosen else list(dict.fromkeys(chosen))
    if hasattr(args, "temperature") or hasattr(args, "temperature_increment_on_fallback"):
        found["temperature"] = temperatures(
            getattr(args, "temperature", 0.0),
            getattr(args, "temperature_increment_on_fallback", DEFAULT_TEMPERATURE_INCREMENT),
        )
    return found


def option_for(field: str) -> str:
    """Return the option that sets a rule field, as `--help` shows it first."""
    return "--output-format" if field == "output_formats" else "--" + field.replace("_", "-")
