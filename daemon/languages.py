"""Language names and codes: whisper's own table, plus the ISO 639-2 tags containers carry."""

from __future__ import annotations

from whisper.tokenizer import LANGUAGES, TO_LANGUAGE_CODE

# Containers tag audio tracks with ISO 639-2 codes ("fra", "ger"); whisper speaks ISO 639-1
# ("fr", "de"). Both the bibliographic and terminological forms appear in the wild.
_ISO639_2_TO_WHISPER = {
    "afr": "af", "alb": "sq", "sqi": "sq", "ara": "ar", "arm": "hy", "hye": "hy", "aze": "az",
    "baq": "eu", "eus": "eu", "bel": "be", "ben": "bn", "bos": "bs", "bul": "bg", "cat": "ca",
    "chi": "zh", "zho": "zh", "cze": "cs", "ces": "cs", "dan": "da", "dut": "nl", "nld": "nl",
    "eng": "en", "est": "et", "fin": "fi", "fre": "fr", "fra": "fr", "geo": "ka", "kat": "ka",
    "ger": "de", "deu": "de", "glg": "gl", "gre": "el", "ell": "el", "guj": "gu", "heb": "he",
    "hin": "hi", "hrv": "hr", "hun": "hu", "ice": "is", "isl": "is", "ind": "id", "ita": "it",
    "jpn": "ja", "kan": "kn", "kaz": "kk", "kor": "ko", "lat": "la", "lav": "lv", "lit": "lt",
    "mac": "mk", "mkd": "mk", "mal": "ml", "mar": "mr", "may": "ms", "msa": "ms", "mlt": "mt",
    "nep": "ne", "nor": "no", "nob": "no", "nno": "nn", "per": "fa", "fas": "fa", "pol": "pl",
    "por": "pt", "pan": "pa", "rum": "ro", "ron": "ro", "rus": "ru", "srp": "sr", "slo": "sk",
    "slk": "sk", "slv": "sl", "spa": "es", "swa": "sw", "swe": "sv", "tgl": "tl", "tam": "ta",
    "tel": "te", "tha": "th", "tur": "tr", "ukr": "uk", "urd": "ur", "uzb": "uz", "vie": "vi",
    "wel": "cy", "cym": "cy", "yid": "yi", "yue": "yue",
}  # fmt: skip


def normalize_language(value: str) -> str:
    """Return whisper's code for a language given as a code or an English name; raise ValueError."""
    key = value.strip().lower()
    if key in LANGUAGES:
        return key
    if key in TO_LANGUAGE_CODE:
        return str(TO_LANGUAGE_CODE[key])
    if key in _ISO639_2_TO_WHISPER:
        return _ISO639_2_TO_WHISPER[key]
    raise ValueError(
        f"unknown language {value!r}; use 'auto', 'track', a code like 'en' or 'fr', "
        "or a name like 'english'"
    )


def language_from_tag(tag: str | None) -> str | None:
    """Return whisper's code for a container's language tag ('fra', 'en'), or None if unknown."""
    if not tag:
        return None
    try:
        return normalize_language(tag)
    except ValueError:
        return None  # 'und', 'mis' and private tags: fall back to detection
