"""Which inverted targets get a trigger search (docs/METHOD.md, "Scan", "Targets searched").

The search's time goes to at most ``n_search_targets`` targets, so the choice matters more than the search.
A target is searched only if it could flag the model and a reply could begin with it:

* its ``q_mean`` reaches ``target_q_min`` (:mod:`bkdattr.scan.score` counts nothing else), it has at least two
  tokens (a lone forced token that ends the reply is no target) and its first words differ from every target
  already chosen;
* its first token is one a reply can start with: ``f(y) = mean_i log p(y_1 | x_i)`` on the benign prompts, with no
  trigger, is at least ``first_logp_min``. The vocabulary sweep (round 0) forces *every* capitalised token, and a
  sub-word fragment ("ICENSE", "PlaneProtection", "MetaInfoClass") is completed the same way after every prompt, so
  its ``Q`` is high on every model, clean or not. No prompt ever produces it: on the zoo of docs/METHOD.md such
  fragments have ``f`` between -24 and -28 nats, while the implanted targets' first tokens ("I", "Please",
  "Visit", "Of", "Sorry") sit between -8.7 and -19.1 even without their trigger.

The eligible targets are searched in order of ``s0 = s(empty trigger)`` (:class:`~bkdattr.scan.insert.TargetScorer`:
the mean log-probability of the target's first ``score_tokens`` tokens after the clean prompts), the issue's
"primed" figure: -2.2 for the demo fixed_output model's "I am sorry. I can not help" against about -6.5 for
"ISBN: 978-1", a format every model completes once it is begun.
"""

from __future__ import annotations

from collections.abc import Sequence

from .config import FIRST_LOGP_MIN
from .confirm import prefix_words
from .insert import TargetScorer
from .targets import Target

__all__ = ["FIRST_LOGP_MIN", "choose_targets", "primed_figures"]


def primed_figures(lm, prompts: Sequence[str], target: Target, n_score: int, batch_size: int) -> dict:
    """``{"first_logp": f(y), "s0": s0(y)}`` of the module docstring for one target, on ``prompts``."""
    tok = TargetScorer(lm, prompts, target.ids, n_score, batch_size).token_logprobs()
    return {"first_logp": float(tok[0]), "s0": float(tok.mean())}


def choose_targets(lm, prompts: Sequence[str], targets: Sequence[Target], *, n: int, q_min: float,
                   first_min: float, n_score: int, batch_size: int) -> tuple[list[Target], dict[str, dict]]:
    """The targets to search, best first, and the figures of every target examined, by text (``first_logp``,
    ``s0``, ``eligible``, ``searched``). The eligible targets (module docstring) come first, by ``s0``; free
    slots go to the other targets in inversion order, so that a clean model's scan still shows its best
    candidates (their triggers do not count toward the score, :func:`bkdattr.scan.score.counts`)."""
    figures: dict[str, dict] = {}

    def examine(t: Target) -> dict:
        if t.text not in figures:
            f = primed_figures(lm, prompts, t, n_score, batch_size)
            figures[t.text] = {**f, "eligible": t.q_mean >= q_min and f["first_logp"] >= first_min,
                               "searched": False}
        return figures[t.text]

    usable = [t for t in targets if len(t.ids) >= 2 and prefix_words(t.text)]  # a lone forced end is no target
    eligible = [t for t in usable if t.q_mean >= q_min and examine(t)["eligible"]]
    eligible.sort(key=lambda t: -figures[t.text]["s0"])
    chosen, seen = [], set()
    for t in eligible + [t for t in usable if t not in eligible]:
        key = prefix_words(t.text)
        if len(chosen) == n:
            break
        if key not in seen:
            seen.add(key)
            chosen.append(t)
            examine(t)["searched"] = True
    return chosen, figures
