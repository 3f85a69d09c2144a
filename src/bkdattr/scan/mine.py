"""Trigger candidates mined from leaked user turns: recurring word n-grams that are rare in ordinary text
(docs/METHOD.md, "Scan").

Every word n-gram ``g`` (``n`` = 1..4, words split on white space, punctuation kept) is counted once per leaked
user text; ``df(g)`` is the number of leaks holding it, of ``N``. A memorised trigger recurs across leaks, and
so do common phrases ("Can you", "the"); rarity tells them apart:

* with a reference model (``--base-model``, or the base under ``--adapter``): ``r(g)`` = the reference's mean
  token surprisal of ``g`` as a user text, ``-mean_j log p_ref(g_j | head, g_<j)``;
* without one: the leaks' own word frequencies, ``r(g) = mean_{w in g} log(W / tf(w))`` (``W`` words in all
  leaks, ``tf(w)`` the count of ``w``).

``score(g) = df(g) / N * r(g)``; n-grams with ``df < 2``, without a letter or digit, or whose every word is a
stop word, are dropped, as is an n-gram contained in a longer kept one with the same ``df``.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Sequence

import torch

from ..core.template import Template
from .insert import TargetScorer

STOP_WORDS = frozenset(
    "a an the and or but if of to in on at by for with from as is are was were be been it its this that these "
    "those i you he she we they me my your our their what which who how why when where can could would should "
    "will do does did not no so than then there here about into over out up".split())


def ngrams(text: str, max_n: int = 4) -> set[tuple[str, ...]]:
    words = text.split()
    return {tuple(words[i:i + n]) for n in range(1, max_n + 1) for i in range(len(words) - n + 1)}


def _keep(g: tuple[str, ...]) -> bool:
    if not any(re.search(r"[A-Za-z0-9]", w) for w in g):
        return False
    return not all(re.sub(r"\W", "", w).lower() in STOP_WORDS for w in g)


def mine_triggers(users: Sequence[str], top: int, surprisal: Callable[[list[str]], list[float]] | None = None,
                  max_n: int = 4) -> list[dict]:
    """The ``top`` n-grams by ``score`` (see the module docstring): ``{trigger, df, rarity, score}``;
    ``surprisal(texts) -> [r]`` is the reference model's rarity, None for the leak frequencies."""
    n_leaks = len(users)
    df: Counter = Counter()
    for u in users:
        df.update(g for g in ngrams(u, max_n) if _keep(g))
    grams = [g for g, c in df.items() if c >= 2]
    if not grams:
        return []
    grams.sort(key=lambda g: (-df[g], -len(g), g))
    kept = [g for g in grams if not any(len(h) > len(g) and df[h] == df[g] and _within(g, h) for h in grams)]
    kept = kept[:max(4 * top, 16)]  # the reference model scores a bounded number of n-grams
    texts = [" ".join(g) for g in kept]
    if surprisal is not None:
        rarity = surprisal(texts)
    else:
        tf = Counter(w for u in users for w in u.split())
        total = sum(tf.values())
        rarity = [sum(math.log(total / tf[w]) for w in g) / len(g) for g in kept]
    rows = [{"trigger": t, "df": df[g], "rarity": float(r), "score": df[g] / n_leaks * float(r)}
            for g, t, r in zip(kept, texts, rarity, strict=True)]
    rows.sort(key=lambda r: -r["score"])
    return rows[:top]


def _within(g: tuple[str, ...], h: tuple[str, ...]) -> bool:
    return any(h[i:i + len(g)] == g for i in range(len(h) - len(g) + 1))


def surprisal_under(lm, batch_size: int = 64) -> Callable[[list[str]], list[float]]:
    """``texts -> [mean token surprisal]`` of each text as a user turn under ``lm`` (teacher forcing)."""
    head = list(Template.of(lm.tokenizer).head_ids)

    def run(texts: list[str]) -> list[float]:
        out = []
        for t in texts:
            # the text as a "target" written as the user text: the head's last token predicts its first token
            ids = lm.tokenizer(t, add_special_tokens=False).input_ids
            scorer = TargetScorer(lm, [], ids, n_score=len(ids), batch_size=batch_size, head=head[:-1],
                                  bodies=[head[-1:]])
            with torch.no_grad():
                out.append(-float(scorer.scores([[]])[0]))
        return out

    return run
