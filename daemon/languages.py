"""Language names and codes: whisper's own table, plus the ISO 639-2 tags containers carry.

The table is a copy of `whisper.tokenizer.LANGUAGES` (whisper 20250625), kept here so that reading a
config does not import whisper, which imports torch (two seconds before `--help` could print);
`tests/test_languages.py` checks the copy against the installed whisper.
"""

from __future__ import annotations

import difflib

# whisper's codes and English names, in whisper's order (its language tokens follow this order).
LANGUAGES: dict[str, str] = {
    "en": "english", "zh": "chinese", "de": "german", "es": "spanish", "ru": "russian", "ko": "korean",
    "fr": "french", "ja": "japanese", "pt": "portuguese", "tr": "turkish", "pl": "polish", "ca": "catalan",
    "nl": "dutch", "ar": "arabic", "sv": "swedish", "it": "italian", "id": "indonesian", "hi": "hindi",
    "fi": "finnish", "vi": "vietnamese", "he": "hebrew", "uk": "ukrainian", "el": "greek", "ms": "malay",
    "cs": "czech", "ro": "romanian", "da": "danish", "hu": "hungarian", "ta": "tamil", "no": "norwegian",
    "th": "thai", "ur": "urdu", "hr": "croatian", "bg": "bulgarian", "lt": "lithuanian", "la": "latin",
    "mi": "maori", "ml": "malayalam", "cy": "welsh", "sk": "slovak", "te": "telugu", "fa": "persian",
    "lv": "latvian", "bn": "bengali", "sr": "serbian", "az": "azerbaijani", "sl": "slovenian", "kn": "kannada",
    "et": "estonian", "mk": "macedonian", "br": "breton", "eu": "basque", "is": "icelandic", "hy": "armenian",
    "ne": "nepali", "mn": "mongolian", "bs": "bosnian", "kk": "kazakh", "sq": "albanian", "sw": "swahili",
    "gl": "galician", "mr": "marathi", "pa": "punjabi", "si": "sinhala", "km": "khmer", "sn": "shona",
    "yo": "yoruba", "so": "somali", "af": "afrikaans", "oc": "occitan", "ka": "georgian", "be": "belarusian",
    "tg": "tajik", "sd": "sindhi", "gu": "gujarati", "am": "amharic", "yi": "yiddish", "lo": "lao", "uz": "uzbek",
    "fo": "faroese", "ht": "haitian creole", "ps": "pashto", "tk": "turkmen", "nn": "nynorsk", "mt": "maltese",
    "sa": "sanskrit", "lb": "luxembourgish", "my": "myanmar", "bo": "tibetan", "tl": "tagalog", "mg": "malagasy",
    "as": "assamese", "tt": "tatar", "haw": "hawaiian", "ln": "lingala", "ha": "hausa", "ba": "bashkir",
    "jw": "javanese", "su": "sundanese", "yue": "cantonese",
}  # fmt: skip

# Other English names whisper accepts (its TO_LANGUAGE_CODE beyond the table above).
_ALIASES: dict[str, str] = {
    "burmese": "my", "valencian": "ca", "flemish": "nl", "haitian": "ht", "letzeburgesch": "lb", "pushto": "ps",
    "panjabi": "pa", "moldavian": "ro", "moldovan": "ro", "sinhalese": "si", "castilian": "es", "mandarin": "zh",
}  # fmt: skip

TO_LANGUAGE_CODE: dict[str, str] = {**{name: code for code, name in LANGUAGES.items()}, **_ALIASES}

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
    closest = difflib.get_close_matches(key, TO_LANGUAGE_CODE, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(closest)}? " if closest else ""
    raise ValueError(
        f"unknown language {value!r}; {hint}use 'auto', 'track', a code like 'en' or 'fr', "
        "or one of whisper's language names like 'english'"
    )


def language_from_tag(tag: str | None) -> str | None:
    """Return whisper's code for a container's language tag ('fra', 'en'), or None if unknown."""
    if not tag:
        return None
    try:
        return normalize_language(tag)
    except ValueError:
        return None  # 'und', 'mis' and private tags: fall back to detection
