"""The benchmark's table (markdown), the data behind it (JSON) and the summary of ratios."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from bench.wer import Score, normalizer, score

if TYPE_CHECKING:
    from bench.compare import Run

_normalize: tuple[Callable[[str], str], str] | None = None


def _normalizer() -> tuple[Callable[[str], str], str]:
    global _normalize
    if _normalize is None:
        _normalize = normalizer()
    return _normalize


def wer(run: Run, origin: str | None = None) -> Score | None:
    """Return the run's word errors against the references (of one origin's files, or all), or None
    when it produced no texts."""
    if run.status != "ok" or len(run.texts) != len(run.items):
        return None
    pairs = [(item.reference, text) for item, text in zip(run.items, run.texts, strict=True)
             if origin is None or item.origin == origin]
    return score(pairs, _normalizer()[0])


def rtfx(run: Run) -> float | None:
    """Return audio seconds per transcribe second (model loaded)."""
    return run.audio_s / run.transcribe_s if run.status == "ok" and run.transcribe_s else None


def rtfx_cold(run: Run) -> float | None:
    """Return audio seconds per second of the whole process (start-up, imports and load included)."""
    return run.audio_s / run.wall_s if run.status == "ok" and run.wall_s else None


def _f(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def one_line(run: Run) -> str:
    """Return a progress line for the console."""
    if run.status != "ok":
        return f"{run.status}: {run.reason}"
    # No WER here: whisper's normaliser imports torch, and this process must stay small while it
    # starts the variants (a child's peak RSS starts from its parent's).
    return (f"load {_f(run.load_s, 2)} s, transcribe {_f(run.transcribe_s)} s, RTFx {_f(rtfx(run))}, "
            f"CPU {_f(run.cpu_s)} s, RSS {_f(run.peak_rss_mb, 0)} MB, "
            f"load avg {run.load_avg[0] if run.load_avg else 0:.1f}")


def _row(run: Run, trained: bool, cuda: bool) -> str:
    v = run.variant
    if run.status != "ok":
        cells = [f"`{v.name}`", f"{v.device} {v.dtype}", *["–"] * (8 + cuda), f"{run.status}: {run.reason}"]
        return "| " + " | ".join(cells) + " |"
    score_ = wer(run)
    quality = "n/a"
    if score_ and trained:
        quality = f"{100 * score_.wer:.1f} ({score_.errors}/{score_.words})"
        real = wer(run, origin="real")
        if real and real.words and real.words != score_.words:
            quality += f"; real recordings {real.errors}/{real.words}"
    cells = [f"`{v.name}`", f"{v.device} {v.dtype}", _f(run.load_s, 2), _f(run.transcribe_s), _f(rtfx(run)),
             _f(rtfx_cold(run)), _f(run.cpu_s), _f(run.peak_rss_mb, 0)]
    if cuda:
        device = _f(run.device_peak_mb, 0)
        if run.torch_peak_mb is not None:
            device += f" (torch {run.torch_peak_mb:,.0f})"
        cells.append(device)
    load = f"{run.load_avg[0]:.1f}→{run.load_avg[1]:.1f}" if run.load_avg else "–"
    cells += [quality, load, "; ".join(run.notes)]
    return "| " + " | ".join(cells) + " |"


def _find(runs: list[Run], name: str) -> Run | None:
    return next((r for r in runs if r.variant.name == name and r.status == "ok"), None)


def summary(runs: list[Run], trained: bool) -> list[str]:
    """Return the ratios that answer the issue's targets, for one set's runs."""
    lines = []
    ours = _find(runs, "whisperd-batched")
    if ours is None:
        batched = next((r for r in runs if r.variant.name == "whisperd-batched"), None)
        if batched is not None:
            lines.append(f"- whisperd-batched: {batched.status} ({batched.reason}); "
                         "ratios below use whisperd's sequential engine")
        ours = _find(runs, "whisperd")
    if ours is None:
        return lines
    peers = [r for r in runs if r.variant.kind.startswith("faster-whisper") and r.status == "ok"]
    best = max(peers, key=lambda r: rtfx(r) or 0.0, default=None)

    def wer_of(run: Run) -> str:
        s = wer(run)
        return f"{100 * s.wer:.1f} %" if s and trained else "n/a"

    name = f"`{ours.variant.name}`"
    ratio = (rtfx(ours) or 0.0) / (rtfx(best) or 1.0) if best else None
    if best is not None and ratio is not None:
        lines.append(f"- {name} vs the fastest faster-whisper here (`{best.variant.name}`): "
                     f"{ratio:.2f}× its speed (RTFx {_f(rtfx(ours))} vs {_f(rtfx(best))}), "
                     f"WER {wer_of(ours)} vs {wer_of(best)}, peak RSS {_f(ours.peak_rss_mb, 0)} vs "
                     f"{_f(best.peak_rss_mb, 0)} MB")
    cli = _find(runs, "whisper-cli")
    if cli is not None and cli.transcribe_s and ours.transcribe_s:
        lines.append(f"- {name} vs whisper's CLI, one process per file: {cli.transcribe_s / ours.transcribe_s:.1f}× "
                     f"its speed with the model loaded, {cli.transcribe_s / (ours.wall_s or 1):.1f}× counting "
                     f"{name}'s whole process (start-up, imports, load)")
    resident = _find(runs, "whisper")
    for other in (resident, _find(runs, "whisperd")):
        if other is not None and other is not ours and other.transcribe_s and ours.transcribe_s:
            speed = other.transcribe_s / ours.transcribe_s
            lines.append(f"- {name} vs `{other.variant.name}`: {speed:.2f}× its speed, "
                         f"WER {wer_of(ours)} vs {wer_of(other)}")
    return lines


def markdown(meta: dict[str, Any], runs: list[Run]) -> str:
    """Return the report as markdown: context, one table per set, ratios, notes."""
    env, model, d = meta["environment"], meta["model"], meta["decoding"]
    cuda = meta["device"] == "cuda"
    trained = bool(model["trained"])
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    decoding = (f"{'greedy' if d['beam_size'] is None else 'beam ' + str(d['beam_size'])}, temperature "
                f"{d['temperature']} (no fallback), language {d['language']}, condition_on_previous_text "
                f"{d['condition_on_previous_text']}, thresholds no_speech {d['no_speech_threshold']} / logprob "
                f"{d['logprob_threshold']} / compression {d['compression_ratio_threshold']}, timestamps "
                f"{'off' if d['without_timestamps'] else 'on'}, batch size {d['batch_size']} (batched variants)")
    if d["sample_len"]:
        decoding += f", {d['sample_len']} tokens per window (end-of-text suppressed)"
    lines = [
        f"# whisperd bench: `{model['name']}` on {meta['device']}, {meta['started']}",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"- Machine: {env['cpu']}, {env['cores']} cores, {_n(meta['threads'], 'thread')} per variant"
        + (f"; GPU {env['gpu']}" if env.get("gpu") else "")
        + f"; load average {env['load_avg_start'][0]:.1f} at the start, {env['load_avg_end'][0]:.1f} at the end",
        f"- Software: Python {env['python']}, {versions}",
        f"- Weights: {model['ct2']} (CTranslate2, read by faster-whisper) = {model['pt']} (whisperd's conversion, "
        "read by whisper and whisperd)",
        f"- Decoding, the same for every variant: {decoding}",
        f"- WER: {_normalizer()[1]} on both sides; errors summed over reference words summed",
    ]
    if not trained:
        lines += ["", "**Random weights**: these rows show speed and memory only. The text is noise, so they say "
                  "nothing about quality (no WER), nor about how long a real model's windows run (here every "
                  "window decodes exactly the token budget; real speech decodes as many tokens as are spoken)."]
    header = ["variant", "device dtype", "load s", "transcribe s", "RTFx", "cold RTFx", "CPU s", "peak RSS MB"]
    header += ["peak device MB"] if cuda else []
    header += ["WER % (errors/words)", "load avg", "notes"]
    for set_name, items in meta["inputs"].items():
        set_runs = [r for r in runs if r.set_name == set_name]
        audio = sum(i["duration_s"] for i in items)
        real = sum(1 for i in items if i["origin"] == "real")
        lines += ["", f"## {set_name}: {_n(len(items), 'file')}, {audio:.0f} s of audio "
                  f"({_n(real, 'real recording')}, {len(items) - real} espeak-ng)", "",
                  "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += [_row(r, trained, cuda) for r in set_runs]
        ratios = summary(set_runs, trained)
        if ratios:
            lines += ["", "Ratios:", *ratios]
    seen: dict[str, str] = {}
    for run in runs:
        seen.setdefault(run.variant.name, run.variant.what)
    lines += ["", "## What each row is", "", *[f"- `{name}`: {what}" for name, what in seen.items()]]
    lines += ["", "## How to read it", "",
              "- load s: the model from disk to ready (imports not counted). transcribe s: every file from its path "
              "to its text, the model loaded; for `whisper-cli` the sum of the per-file processes, each paying "
              "start-up and load. RTFx: audio seconds per transcribe second. cold RTFx: audio seconds per second "
              "of the whole process (interpreter, imports, load included).",
              "- CPU s: user + system time of the variant's processes; other work on the machine inflates wall "
              "times more than this. load avg: the 1-minute load average before → after the variant.",
              "- peak RSS: the largest single process of the variant's tree (wait4's ru_maxrss), not a sum. Linux "
              "starts a child's figure from its parent's peak: this harness stayed at "
              f"{meta['harness_rss_mb']:.0f} MB while it started the variants, so no figure above is below that.",
              "- `whisperd` decodes around silences of 3 s and more (its `skip_silence` default); the others "
              "decode through them. faster-whisper's batched pipeline cuts each file with its silero VAD and "
              "batches the pieces of one file, so a file shorter than 30 s is a batch of one.",
              "- `whisperd-cli`: load s from its `model_loaded` log event; transcribe s from then to the last "
              "file's `transcribed` event."]
    return "\n".join(lines) + "\n"


def as_json(meta: dict[str, Any], runs: list[Run]) -> dict[str, Any]:
    """Return the report's data: context, and every run with its per-file texts and errors."""
    normalize = _normalizer()[0]
    rows = []
    for run in runs:
        score_ = wer(run)
        files = []
        for i, item in enumerate(run.items):
            entry: dict[str, Any] = {"file": str(item.path), "audio_s": item.duration_s}
            if i < len(run.texts):
                one = score([(item.reference, run.texts[i])], normalize)
                entry |= {"text": run.texts[i], "errors": one.errors, "words": one.words}
            if i < len(run.per_file_s):
                entry["seconds"] = run.per_file_s[i]
            files.append(entry)
        rows.append({
            "variant": run.variant.name, "kind": run.variant.kind, "device": run.variant.device,
            "dtype": run.variant.dtype, "set": run.set_name, "status": run.status, "reason": run.reason,
            "audio_s": run.audio_s, "load_s": run.load_s, "import_s": run.import_s,
            "transcribe_s": run.transcribe_s, "wall_s": run.wall_s, "cpu_s": run.cpu_s, "rtfx": rtfx(run),
            "rtfx_cold": rtfx_cold(run), "peak_rss_mb": run.peak_rss_mb, "device_peak_mb": run.device_peak_mb,
            "torch_peak_mb": run.torch_peak_mb, "wer": score_.wer if score_ else None,
            "errors": score_.errors if score_ else None, "words": score_.words if score_ else None,
            "load_avg": run.load_avg, "notes": run.notes, "files": files,
        })  # fmt: skip
    return {**meta, "wer_normalizer": _normalizer()[1], "runs": rows}
