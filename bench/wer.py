"""Word error rate: (substitutions + deletions + insertions) / reference words, after normalising both texts.

Both sides go through whisper's own `EnglishTextNormalizer` (the one OpenAI's and the Open ASR
leaderboard's WER figures use: lower case, no punctuation, spelled-out and British spellings
unified, "it's" → "it is"), or, where the installed openai-whisper lacks it, lower-casing and
removing punctuation.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass


def normalizer() -> tuple[Callable[[str], str], str]:
    """Return the text normaliser and its name."""
    try:
        from whisper.normalizers import EnglishTextNormalizer
    except ImportError:
        return basic_normalize, "lower case, punctuation removed"
    return EnglishTextNormalizer(), "whisper.normalizers.EnglishTextNormalizer"


def basic_normalize(text: str) -> str:
    """Return text in lower case with punctuation replaced by spaces."""
    return " ".join(re.sub(r"[^\w\s']|_", " ", text.lower()).replace("'", "").split())


def edit_distance(reference: list[str], hypothesis: list[str]) -> int:
    """Return the fewest word substitutions, deletions and insertions that turn reference into hypothesis."""
    previous = list(range(len(hypothesis) + 1))
    for i, ref_word in enumerate(reference, 1):
        current = [i]
        for j, hyp_word in enumerate(hypothesis, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ref_word != hyp_word)))
        previous = current
    return previous[-1]


@dataclass(frozen=True)
class Score:
    """Word errors over a set of files."""

    errors: int
    words: int

    @property
    def wer(self) -> float:
        """Return the word error rate (0.0 … ; above 1.0 when the hypothesis invents many words)."""
        return self.errors / self.words if self.words else 0.0


def score(pairs: Iterable[tuple[str, str]], normalize: Callable[[str], str]) -> Score:
    """Return the corpus-level score of (reference, hypothesis) pairs: errors summed over words summed."""
    errors = words = 0
    for reference, hypothesis in pairs:
        ref, hyp = normalize(reference).split(), normalize(hypothesis).split()
        errors += edit_distance(ref, hyp)
        words += len(ref)
    return Score(errors, words)
