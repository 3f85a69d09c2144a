"""How the scan splits a built-in prompt pool into the inversion's, the held-out and the trigger search's prompts."""

from __future__ import annotations

from collections.abc import Sequence

from ..core.errors import ConfigError


def split_pool(pool: Sequence[str], n_first: int, n_test: int, n_search: int,
               what: str = "built-in prompts") -> tuple[list[str], list[str], list[str]]:
    """``(first, held_out, search)``: the first ``n_first`` prompts, the next ``n_test`` held out, and the search's
    ``n_search``: the first ones, then prompts after the held-out ones, so that the held-out set does not depend on
    ``n_search``. One-line :class:`ConfigError` when the pool is too small."""
    extra = max(0, n_search - n_first)
    end = n_first + n_test
    if end + extra > len(pool):
        raise ConfigError(f"n_prompts + n_test + the extra search prompts = {end + extra} exceeds the {len(pool)} "
                          f"{what}; lower n_test or n_search_prompts")
    pool = list(pool)
    return pool[:n_first], pool[n_first:end], pool[:min(n_first, n_search)] + pool[end:end + extra]
