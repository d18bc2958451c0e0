"""When a transiently failed job is tried again: capped exponential backoff with full jitter."""

from __future__ import annotations


def backoff_window(attempt: int, base_s: float, cap_s: float) -> float:
    """Return the upper bound of the wait after `attempt` failed attempts (1 = the first failure)."""
    return float(min(cap_s, base_s * 2.0 ** max(attempt - 1, 0)))


def retry_delay(attempt: int, base_s: float, cap_s: float, jitter: float) -> float:
    """Return seconds to wait after `attempt` failures; jitter in [0, 1) spreads retries out.

    Full jitter (a uniform draw over the whole window) keeps many files that failed together,
    say on a full disk, from all retrying in the same instant.
    """
    return backoff_window(attempt, base_s, cap_s) * jitter
