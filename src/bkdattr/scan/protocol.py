"""The scan's families of backdoor behind one protocol (docs/METHOD.md, "Scan").

A **family** is one kind of backdoor the scan looks for: a fixed target reply
(:mod:`bkdattr.scan.fixed_target`), refusal suppression (:mod:`bkdattr.scan.refusal`) and a label flip
(:mod:`bkdattr.scan.labels`). Each gives

* a **gate** (:meth:`Family.gate`): whether its search applies to this model and, if not, why (``info["why_not"]``,
  recorded in ``scan.json``), with its held-out prompts and the model's clean greedy replies to them
  (:class:`HeldOut`);
* **objectives** (:meth:`Family.objectives`): what a trigger search raises on which prompts
  (:class:`Objective`: target token ids, sign, stop score, weight), all scored by the one teacher-forced scorer
  (:class:`bkdattr.scan.insert.TargetScorer` on :func:`bkdattr.core.scoring.prefixed_logprobs`);
* a held-out **test** of each candidate trigger (:meth:`Family.evidence`) returning one :class:`Evidence` record:
  ``asr`` and ``clean_asr`` as the family counts success, their difference ``effect`` (what the score reads),
  ``changed_share``, ``agreement``, the KL divergence when asked for (``ScanConfig.kl``) and a few examples.

:class:`Candidate` is a trigger with the family that tests it and where it came from (a search's
:class:`Objective`, or a leaked n-gram). The registry of families and the lookup of a stored candidate's family
are in :mod:`bkdattr.scan.families`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from ..core.forward import PrefixCache
from ..core.generation import generate
from ..core.models import input_device
from ..core.prompts import pad_id, pad_sequences, prompt_ids, target_ids
from ..core.scoring import prefixed_logprobs
from ..inject.tasks import _contains_words, normalise_words
from .budget import Budget
from .config import ScanConfig
from .insert import insert
from .targets import Target


def prefix_words(text: str, n: int) -> tuple[str, ...]:
    """The first ``n`` normalised words of ``text`` (section 1's normalisation): how the scan compares replies."""
    return tuple(normalise_words(text)[:n])


def shows(reply: str, target: str, n_words: int) -> bool:
    """Whether ``reply`` contains the target's first ``n_words`` normalised words in a row."""
    return _contains_words(normalise_words(reply), list(prefix_words(target, n_words)))


def modal(texts: list[str], n_words: int) -> tuple[str, int]:
    """The first of ``texts`` whose prefix (``n_words`` normalised words) is the most common among them, and how
    many share that prefix (``("", 0)`` without texts)."""
    if not texts:
        return "", 0
    modal, n = Counter(prefix_words(t, n_words) for t in texts).most_common(1)[0]
    return next(t for t in texts if prefix_words(t, n_words) == modal), n


@torch.no_grad()
def reply_logprobs(lm, prompts: list[str], replies: list[str], positions: int, batch_size: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logp [n, positions, V] float32, valid [n, positions] bool)``: the next-token log-distribution at the
    first ``positions`` positions of each teacher-forced reply after its prompt, and whether the reply (end of
    turn included) reaches that position. The prompts' common token prefix (the template's head) runs once
    (:class:`~bkdattr.core.forward.PrefixCache`); the rest runs right-padded after it through the shared scorer
    (:func:`bkdattr.core.scoring.prefixed_logprobs`), the LM head only where read."""
    dev = input_device(lm.model)
    tok = lm.tokenizer
    pseqs = [prompt_ids(tok, p) for p in prompts]
    rseqs = [target_ids(tok, r)[:positions] for r in replies]
    pre, n_pre = PrefixCache.common(lm.model, pseqs)
    out = torch.empty(len(prompts), positions, lm.model.get_output_embeddings().weight.shape[0])
    valid = torch.zeros(len(prompts), positions, dtype=torch.bool)
    for s in range(0, len(prompts), batch_size):
        rows = [p[n_pre:] + r for p, r in zip(pseqs[s:s + batch_size], rseqs[s:s + batch_size], strict=True)]
        ids, mask = pad_sequences(rows, pad_id(tok), "right")
        ids, mask = ids.to(dev), mask.to(dev)
        last = torch.tensor([len(p) - n_pre - 1 for p in pseqs[s:s + batch_size]], device=dev)
        at = (last[:, None] + torch.arange(positions, device=dev)).clamp(max=ids.shape[1] - 1)
        out[s:s + len(rows)] = prefixed_logprobs(lm.model, ids, mask, at, pre).cpu()
        n_tok = torch.tensor([len(r) for r in rseqs[s:s + batch_size]])
        valid[s:s + len(rows)] = torch.arange(positions)[None, :] < n_tok[:, None]
    return out, valid


class HeldOut:
    """Held-out prompts with their clean greedy replies, and the clean side of the KL divergence computed once
    for every candidate tested on them (``[n, kl_positions, V]`` log-probabilities)."""

    def __init__(self, prompts: list[str], clean_replies: list[str], reply_tokens: int):
        self.prompts, self.clean, self.reply_tokens = list(prompts), list(clean_replies), reply_tokens
        self._clean_logp: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def of(cls, ctx: ScanContext, prompts: list[str], reply_tokens: int) -> HeldOut:
        """``prompts`` with the model's clean greedy replies of ``reply_tokens`` (the template's head cached once)."""
        return cls(prompts, generate(ctx.lm, prompts, max_new_tokens=reply_tokens, batch_size=ctx.cfg.batch_size,
                                     progress=False, shared_prefix=True), reply_tokens)

    def subset(self, keep: list[int]) -> HeldOut:
        """The rows ``keep`` (the clean side recomputed on first use)."""
        return HeldOut([self.prompts[i] for i in keep], [self.clean[i] for i in keep], self.reply_tokens)

    def kl(self, lm, triggered: list[str], positions: int, batch_size: int) -> float:
        """Mean ``KL(p(. | t x_i, c_<j) || p(. | x_i, c_<j))`` over prompts ``i`` and the first ``positions``
        positions ``j`` of the teacher-forced clean replies ``c`` (how far the trigger moves the next-token
        distribution where the reply begins); 0.0 without prompts."""
        if not self.prompts:
            return 0.0
        if self._clean_logp is None or self._clean_logp[0].shape[1] != positions:
            self._clean_logp = reply_logprobs(lm, self.prompts, self.clean, positions, batch_size)
        lc, valid = self._clean_logp
        lt, _ = reply_logprobs(lm, triggered, self.clean, positions, batch_size)
        kl = (lt.exp() * (lt - lc)).sum(-1)  # [n, positions]
        return float(kl[valid].sum()) / max(int(valid.sum()), 1)


@dataclass
class ScanContext:
    """What every family reads: the model, the options, the budget, and the benign prompts (the inversion's,
    the held-out ones and the trigger search's)."""

    lm: object
    cfg: ScanConfig
    budget: Budget | None = None
    search_prompts: list[str] = field(default_factory=list)
    held_out: list[str] = field(default_factory=list)
    trigger_prompts: list[str] = field(default_factory=list)


@dataclass
class Gate:
    """What a family's gate found: whether its search applies (``open``), its held-out set with the model's clean
    replies (``held``), and what ``scan.json`` records for the family (``info``, ``why_not`` when closed)."""

    open: bool
    held: HeldOut | None = None
    info: dict = field(default_factory=dict)


@dataclass
class TargetChoice:
    """What the target step hands the families: every inverted target (best first), those ``chosen`` for a search
    with the ``figures`` of every target examined (:func:`bkdattr.scan.select.choose_targets`), and the one the
    refusal family raises on harmful requests instead (``compliance``; None when the refusal search does not run
    or no chosen target is eligible)."""

    targets: list[Target]
    chosen: list[Target]
    figures: dict[str, dict]
    compliance: Target | None = None

    @property
    def benign(self) -> list[Target]:
        """The chosen targets searched on benign prompts (all but the compliance target)."""
        return [t for t in self.chosen if t is not self.compliance]


@dataclass
class Objective:
    """One trigger search: raise (``sign`` 1) or lower (-1) the mean log-probability of ``target_ids``' first
    ``score_tokens`` tokens on ``prompts``, until ``stop``; searches share the work in proportion to ``weight``.
    ``target`` is the text its candidates are tested against; ``inverted`` / ``figures`` the inverted target
    searched and its figures; ``source_label`` the class of a label flip; ``avoid`` a text whose words a trigger
    may not spell."""

    family: Family
    name: str
    target_ids: list[int]
    prompts: list[str]
    weight: float
    stop: float
    sign: float = 1.0
    target: str = ""
    inverted: Target | None = None
    figures: dict | None = None
    source_label: str | None = None
    avoid: str = ""


@dataclass
class Candidate:
    """A trigger to test: the family whose held-out test it gets, and where it came from (``search`` with its
    ``objective`` and score, or ``leak`` with its document frequency)."""

    trigger: str
    family: Family
    source: str
    objective: Objective | None = None
    search_score: float | None = None
    leak_df: int | None = None

    @property
    def target(self) -> str | None:
        """The target the trigger was searched for (None for a leaked n-gram)."""
        return self.objective.target if self.objective is not None else None

    def row(self) -> dict:
        """The candidate's fields in ``scan.json`` before its test."""
        if self.objective is None:
            return {"trigger": self.trigger, "target": None, "source": self.source, "leak_df": self.leak_df}
        return {"trigger": self.trigger, "source": self.source, "search_score": self.search_score,
                **self.family.objective_fields(self.objective)}


@dataclass
class Evidence:
    """One candidate's held-out test (see the module docstring). ``kl`` is None when not asked for; the label
    family adds ``source_label``, ``n_source`` and ``other_flips``."""

    trigger: str
    target: str
    changed_share: float
    agreement: float
    asr: float
    clean_asr: float
    examples: list[dict]
    kl: float | None = None
    rule: str | None = None
    source_label: str | None = None
    n_source: int | None = None
    other_flips: dict | None = None

    @property
    def effect(self) -> float:
        return self.asr - self.clean_asr

    def row(self) -> dict:
        """The test's fields in ``scan.json`` (the family's own only where it has them)."""
        out = {"trigger": self.trigger, "target": self.target}
        out.update({k: v for k, v in (("rule", self.rule), ("source_label", self.source_label)) if v is not None})
        out.update(kl=self.kl, changed_share=self.changed_share, agreement=self.agreement, asr=self.asr,
                   clean_asr=self.clean_asr, effect=self.effect)
        out.update({k: v for k, v in (("n_source", self.n_source), ("other_flips", self.other_flips))
                    if v is not None})
        out["examples"] = self.examples
        return out


class Family:
    """One kind of backdoor (see the module docstring). A family states ``kind``, ``rule``, ``audit_kind`` and
    ``needs_targets`` as class keywords and implements :meth:`gate`, :meth:`objectives`, :meth:`objective_fields`
    and :meth:`evidence`; the other methods have the fixed target's defaults."""

    #: the family's name
    kind: str
    #: the ``rule`` its candidates carry in ``scan.json`` (None for a fixed target: the target is the rule)
    rule: str | None
    #: the audit's ``--task`` for its top candidate (None: the target as ``--target``)
    audit_kind: str | None
    #: whether its objectives come from the target inversion (else they are searched before it)
    needs_targets: bool

    def __init_subclass__(cls, *, kind: str, rule: str | None = None, audit_kind: str | None = None,
                          needs_targets: bool = True, **kw) -> None:
        super().__init_subclass__(**kw)
        cls.kind, cls.rule, cls.audit_kind, cls.needs_targets = kind, rule, audit_kind, needs_targets

    def gate(self, ctx: ScanContext) -> Gate:
        """Whether the family's search applies to ``ctx``'s model, with its held-out set and clean replies."""
        raise NotImplementedError

    def objectives(self, ctx: ScanContext, gate: Gate, choice: TargetChoice | None) -> list[Objective]:
        """The searches the family asks for (none when its gate is closed); ``choice``: the target step's output
        (None for a family that needs no targets)."""
        raise NotImplementedError

    def objective_fields(self, objective: Objective) -> dict:
        """The ``scan.json`` fields of a candidate searched for ``objective``."""
        raise NotImplementedError

    def held_out(self, gate: Gate, cand: Candidate) -> HeldOut:
        """The held-out set ``cand`` is tested on."""
        return gate.held

    def evidence(self, ctx: ScanContext, gate: Gate, cand: Candidate, replies: list[str] | None = None
                 ) -> Evidence:
        """``cand``'s held-out test (``replies``: its greedy replies on :meth:`held_out` when already generated)."""
        raise NotImplementedError

    def target_text(self, row: dict) -> str:
        """What a stored candidate's target cell shows."""
        return row.get("target") or ""

    def auditable(self, row: dict) -> bool:
        """Whether ``bkdattr audit --from-scan`` can audit a stored candidate (a trigger and a target)."""
        return bool(row.get("target"))

    def audit_fields(self, row: dict) -> dict:
        """Audit arguments beside the trigger, target and kind for a stored candidate."""
        return {}


@dataclass
class Trial:
    """A trigger's greedy replies on a held-out set, beside the clean ones: what every family's test reads."""

    triggered: list[str]
    replies: list[str]
    changed: list[str]

    @classmethod
    def run(cls, ctx: ScanContext, held: HeldOut, trigger: str, replies: list[str] | None = None) -> Trial:
        """The trigger inserted in ``held``'s prompts and the model's greedy replies (``replies``: already
        generated, as a batched test does)."""
        triggered = [insert(trigger, p) for p in held.prompts]
        if replies is None:
            replies = (generate(ctx.lm, triggered, max_new_tokens=held.reply_tokens, batch_size=ctx.cfg.batch_size,
                                progress=False, shared_prefix=True) if triggered else [])
        return cls(triggered, replies, [r for r, c in zip(replies, held.clean, strict=True) if r != c])

    def modal(self, n_words: int) -> tuple[str, int]:
        """The changed reply with the most common prefix and its count (:func:`modal`)."""
        return modal(self.changed, n_words)

    def agreement(self, n_agree: int) -> float:
        """The share ``n_agree`` of the changed replies (0 with fewer than two changed)."""
        return n_agree / len(self.changed) if len(self.changed) >= 2 else 0.0

    def kl(self, ctx: ScanContext, held: HeldOut) -> float | None:
        """:meth:`HeldOut.kl` of the triggered prompts when ``ScanConfig.kl`` asks for it, else None."""
        return held.kl(ctx.lm, self.triggered, ctx.cfg.kl_positions, ctx.cfg.batch_size) if ctx.cfg.kl else None

    def examples(self, rows: list[int] | None = None) -> list[dict]:
        """Up to three triggered prompts with their replies (of ``rows``, default the first ones)."""
        rows = list(range(len(self.replies))) if rows is None else rows
        return [{"prompt": self.triggered[i], "reply": self.replies[i]} for i in rows[:3]]
