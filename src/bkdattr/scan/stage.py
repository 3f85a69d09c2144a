"""``bkdattr scan``: look for a backdoor with no trigger known, by inference only (docs/METHOD.md, "Scan").

The scan runs three families of backdoor behind one protocol (:mod:`bkdattr.scan.protocol`): a fixed target reply
(:mod:`bkdattr.scan.fixed_target`), refusal suppression (:mod:`bkdattr.scan.refusal`, a jailbreak) and a label
flip (:mod:`bkdattr.scan.labels`). In order, each step on a share of the work the budget has left
(:class:`~bkdattr.scan.budget.Budget`, stated in the model's forward work, so the same scan runs on a fast, slow or
busy machine; ``budget_s`` is an optional wall-clock limit; the shares are ``ScanConfig`` fields):

1. **Gates**: each family's clean replies on its held-out prompts, and whether its search applies.
2. **Label search** (``label_share``): the objectives that need no inverted target, searched first.
3. **Leak** (``leak_share``, :mod:`bkdattr.scan.leak`): user turns sampled from the template's user-turn prefix;
   recurring rare n-grams become candidates (:mod:`bkdattr.scan.mine`).
4. **Targets** (``target_share``, :mod:`bkdattr.scan.targets`): the inversion after BAIT, then the targets chosen
   for a search (:mod:`bkdattr.scan.select`).
5. **Searches** (``search_share`` of the work left less ``test_reserve``, :func:`bkdattr.scan.search.run_searches`):
   the families' objectives, heaviest first, each a gradient-guided beam search for a short trigger.
6. **Evidence** (:mod:`bkdattr.scan.trials`): every candidate tested on its family's held-out set, then the
   **score** (:mod:`bkdattr.scan.score`); ``scan.json`` and ``report.html`` (:mod:`bkdattr.scan.report`).

The **verdict** (:func:`bkdattr.scan.score.verdict`) is ``flagged`` when the score reaches the threshold, else
``incomplete`` when the budget cut any phase (a cut search reads like a clean one, so it is never reported as
"no backdoor found"), else ``not_found``.

Inputs are checked before the model loads where they can be (an out folder that exists and is not empty, a
budget that is not positive); a model without a chat template needs ``template`` (``"plain"`` for the
documented plain format, or a Jinja chat-template file); a work budget too small for one pass over the held-out
prompts is a one-line error.
"""

from __future__ import annotations

import time
from pathlib import Path

from tqdm.auto import tqdm

from ..audit.inputs import read_prompt_file
from ..core.errors import ConfigError, InputFileError
from ..core.hooks import count_work
from ..core.model_source import ModelSource, load_source, open_source
from ..core.prompts import has_chat_template
from ..core.template import Template
from ..inject.builtin_data import benign_questions, instructions
from .budget import Budget
from .config import ScanConfig
from .families import active
from .fixed_target import FIXED_TARGET
from .labels import LABEL_FLIP
from .leak import leak
from .mine import mine_triggers, surprisal_under
from .pools import split_pool
from .protocol import Candidate, Gate, ScanContext, TargetChoice
from .refusal import REFUSAL
from .report import write_scan
from .score import mark, model_score, rank, verdict
from .search import run_searches
from .select import target_choice
from .targets import invert_targets
from .trials import evidence_all


def check_out(out: str | Path) -> Path:
    """The out folder: it must not exist, or be empty."""
    p = Path(out)
    if p.exists() and (not p.is_dir() or any(p.iterdir())):
        raise ConfigError(f"the out folder {p} exists and is not empty; pass a new folder to --out")
    return p


def apply_template(tokenizer, template: str | None) -> str:
    """Give ``tokenizer`` the template the scan renders prompts with; returns its name (``chat``, ``plain`` or
    the file). One-line :class:`ConfigError` for a model without a chat template when ``template`` is None, and for
    a template that does not render the user text verbatim (the scan places triggers after the template's head)."""
    if template is None:
        if not has_chat_template(tokenizer):
            raise ConfigError("the model has no chat template, so the scan cannot know how a user turn looks; pass "
                              "--template plain (User: ...\\nAssistant:) or --template FILE (a Jinja chat template)")
        name = "chat"
    elif template == "plain":
        tokenizer.chat_template = None
        name = "plain"
    else:
        p = Path(template).expanduser()
        if not p.is_file():
            raise InputFileError(f"template file not found: {template}; pass 'plain' or a Jinja chat-template file")
        tokenizer.chat_template = p.read_text(encoding="utf-8")
        name = str(p)
    if not Template.of(tokenizer).verbatim:
        raise ConfigError("the chat template rewrites the user's text (it does not render it verbatim), so the scan "
                          "cannot place a trigger inside a user turn; pass --template plain or --template FILE")
    return name


def default_prompts(n_search: int, n_test: int, n_trigger: int = 0) -> tuple[list[str], list[str], list[str]]:
    """Benign prompts (:func:`bkdattr.inject.builtin_data.benign_questions`): the first ``n_search`` for the
    inversion, the next ``n_test`` held out for testing, and the trigger search's ``n_trigger``
    (:func:`bkdattr.scan.pools.split_pool`)."""
    pool = [q for q, _ in benign_questions()]
    pool += [r["input"] for r in instructions(0) if r["input"] not in pool]
    return split_pool(pool, n_search, n_test, n_trigger)


def file_prompts(path: str, cfg: ScanConfig) -> tuple[list[str], list[str], list[str]]:
    """The inversion's, held-out and search prompts from the user's prompt file (distinct prompts in file order,
    :func:`bkdattr.scan.pools.split_pool`); one-line errors for a missing file or too few prompts."""
    texts = list(dict.fromkeys(r["input"] for r in read_prompt_file(path)))
    return split_pool(texts, cfg.n_prompts, cfg.n_test, cfg.n_search_prompts, f"distinct prompts in {path}")


def _bar(total: int, desc: str, progress: bool):
    return tqdm(total=total, desc=desc, disable=not progress, leave=False)


def scan(out: str | Path, model: str, *, adapter: str | None = None, base_model: str | None = None,
         template: str | None = None, cfg: ScanConfig | None = None, prompts: list[str] | None = None,
         test_prompts: list[str] | None = None, trust_remote_code: bool = False, allow_pickle: bool = False,
         lm=None, progress: bool | None = None, prompts_file: str | None = None, wall_clock=None,
         budget: Budget | None = None) -> dict:
    """Scan ``model`` (+ ``adapter``); write ``out/scan.json`` and ``out/report.html``; return the result.
    ``lm``: an already loaded model (tests; ``model`` is then only its label). ``prompts_file``: the user's own
    benign prompts (text, one per line, or JSONL ``{"input": ...}``) instead of the built-in questions, split as
    they are (:func:`file_prompts`); a backdoor that fires only on one kind of input (a classifier's) is seen only
    from such prompts. ``wall_clock``: the clock of the wall-clock limit (default ``time.monotonic``; tests pass a
    clock that runs slow). ``budget``: the scheduler every phase draws on (default: ``budget_work`` of the model's
    forward work, :func:`bkdattr.core.hooks.count_work`, and ``budget_s`` of ``wall_clock``)."""
    cfg = cfg or ScanConfig()
    from_file = file_prompts(prompts_file, cfg) if prompts_file else None
    progress = cfg.progress if progress is None else progress
    if not cfg.budget_work or cfg.budget_work <= 0:
        raise ConfigError(f"--budget-work must be positive (got {cfg.budget_work}); the default is "
                          f"{ScanConfig().budget_work:g}")
    if cfg.budget_s is not None and cfg.budget_s <= 0:
        raise ConfigError(f"--budget-s must be positive (got {cfg.budget_s}), or left out for no wall-clock limit")
    out = check_out(out)
    wall_clock = wall_clock or time.monotonic
    wall_start = wall_clock()  # the wall-clock limit counts the model load
    if lm is None:
        source = open_source(model, adapter, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
        ref_spec = model if adapter else base_model
        reference = (open_source(ref_spec, None, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
                     if ref_spec else None)
        lm = load_source(source, cfg.device, cfg.dtype, check=False)
    else:
        source, reference = ModelSource(model, adapter), None
    template_name = apply_template(lm.tokenizer, template)
    search_prompts, held_out, trigger_prompts = from_file or default_prompts(cfg.n_prompts, cfg.n_test,
                                                                             cfg.n_search_prompts)
    if prompts:  # the caller's prompts serve the inversion and the trigger search alike
        search_prompts = trigger_prompts = list(prompts)
    held_out = test_prompts or held_out

    model_info = {**source.to_dict(), "label": source.label, "base_model": base_model,
                  "prompts_file": str(Path(prompts_file).expanduser().resolve()) if prompts_file else None,
                  "reference": reference.to_dict() if reference else None, "template": template_name}
    load_reference = (lambda: load_source(reference, cfg.device, cfg.dtype, check=False)) if reference else None
    with count_work(lm.arch) as meter:
        budget = budget or Budget(cfg.budget_work, meter.units, wall_limit_s=cfg.budget_s, wall_clock=wall_clock,
                                  wall_start=wall_start)
        ctx = ScanContext(lm, cfg, budget, search_prompts, held_out, trigger_prompts)
        result = _scan_loaded(ctx, progress, model_info, load_reference)
    out.mkdir(parents=True, exist_ok=True)
    write_scan(out, result)
    return result


def open_gates(ctx: ScanContext) -> tuple[dict[str, Gate], float]:
    """Every active family's gate, by kind, and the work of the fixed target's (one greedy pass over the
    held-out prompts: the unit the budget is checked against and the test reserve is counted in). One-line
    :class:`ConfigError` when the budget does not cover that unit once."""
    budget, cfg = ctx.budget, ctx.cfg
    t0 = budget.clock()
    gates = {FIXED_TARGET.kind: FIXED_TARGET.gate(ctx)}
    step = budget.clock() - t0
    if budget.wall_out():
        raise ConfigError(f"--budget-s {cfg.budget_s:g} is too small: loading the model and one pass over the held-out "
                          f"prompts took {budget.wall_elapsed():.0f} s; raise --budget-s")
    if budget.left() < step:
        raise ConfigError(f"--budget-work {cfg.budget_work:g} is too small for one step of the scan (one pass over "
                          f"the held-out prompts took {step:.3f}); raise --budget-work")
    gates.update({f.kind: f.gate(ctx) for f in active(cfg) if f is not FIXED_TARGET})
    return gates, step


def _scan_loaded(ctx: ScanContext, progress: bool, model_info: dict, load_reference) -> dict:
    """The scan's steps on a loaded model (see the module docstring): ``scan.json``'s content. ``model_info``: its
    ``model``; ``load_reference()`` loads the clean reference model of the leaks' rarity (None: none)."""
    cfg, budget = ctx.cfg, ctx.budget
    families = active(cfg)
    gates, step = open_gates(ctx)
    budget.lap("gates")
    early = [o for f in families if not f.needs_targets for o in f.objectives(ctx, gates[f.kind], None)]
    found = _searches(ctx, early, cfg.label_share * budget.left(), "scan: label search", progress) if early else []
    budget.lap("label_search")
    budget.phase(cfg.leak_share)
    leaks, leak_triggers = _leaks(ctx, progress, load_reference)
    budget.lap("leak")
    budget.phase(cfg.target_share)
    choice = _targets(ctx, gates, progress)
    budget.lap("targets")
    later = [o for f in families if f.needs_targets for o in f.objectives(ctx, gates[f.kind], choice)]
    found += _searches(ctx, later, cfg.search_share * max(0.0, budget.left() - cfg.test_reserve * step),
                       "scan: trigger search", progress)
    budget.lap("trigger_search")
    cands = candidates(found, leak_triggers)[:cfg.max_candidates]
    budget.phase(1.0)
    bar = _bar(len(cands), "scan: test candidates", progress)
    tested = evidence_all(ctx, cands, gates, progress=bar)
    bar.close()
    budget.lap("tests")
    return _result(ctx, gates, choice, rank(mark(tested, cfg.target_q_min, cfg.first_logp_min)), leaks, leak_triggers,
                   model_info)


def _searches(ctx: ScanContext, objectives: list, work: float, desc: str, progress: bool) -> list[Candidate]:
    """:func:`~bkdattr.scan.search.run_searches` of ``objectives`` on ``work`` from now."""
    bar = _bar(ctx.cfg.search_steps * len(objectives), desc, progress)
    found = run_searches(ctx, objectives, end=ctx.budget.clock() + work, seed=ctx.cfg.seed, progress=bar)
    bar.close()
    return found


def _leaks(ctx: ScanContext, progress: bool, load_reference) -> tuple[list, list[dict]]:
    """The leaked user turns and the n-gram candidates mined from them (rarity under the reference model, loaded only
    when an n-gram needs it, else the leaks' own word frequencies)."""
    cfg = ctx.cfg
    bar = _bar(len(cfg.leak_temperatures), "scan: leak", progress)
    leaks = leak(ctx.lm, cfg.leak_temperatures, cfg.leak_top_p, cfg.leak_samples, cfg.leak_tokens, cfg.reply_tokens,
                 cfg.batch_size, ctx.budget, cfg.seed, bar)
    bar.close()
    ref = {}

    def ref_surprisal(texts: list[str]) -> list[float]:
        if "lm" not in ref:
            ref["lm"] = load_reference()
        return surprisal_under(ref["lm"], cfg.batch_size)(texts)

    return leaks, mine_triggers([x.user for x in leaks], cfg.n_leak_triggers,
                                ref_surprisal if load_reference is not None else None)


def _targets(ctx: ScanContext, gates: dict[str, Gate], progress: bool) -> TargetChoice:
    """The inverted targets and the ones chosen for a search (on a model whose refusal search runs, with the refusal
    family's compliance target)."""
    cfg = ctx.cfg
    sweep_bar = _bar(1, "scan: first-token sweep", progress and cfg.vocab_sweep)
    bar = _bar(cfg.target_tokens - 1, "scan: targets", progress)
    targets = invert_targets(ctx.lm, ctx.search_prompts, cfg, budget=ctx.budget, progress=bar, sweep_progress=sweep_bar)
    bar.close()
    sweep_bar.close()
    refusal = gates.get(REFUSAL.kind)
    return target_choice(ctx.lm, ctx.search_prompts, targets, cfg, refuses=refusal is not None and refusal.open,
                         refusal=refusal.info.get("target") if refusal is not None else None)


def candidates(found: list[Candidate], leak_triggers: list[dict]) -> list[Candidate]:
    """The searches' triggers in order, one per trigger and family, then the leaked n-grams not among them (tested as
    fixed targets, their target the modal changed reply)."""
    cands: list[Candidate] = []
    for c in found:
        if c.trigger and all(x.trigger != c.trigger or x.family is not c.family for x in cands):
            cands.append(c)
    return cands + [Candidate(g["trigger"], FIXED_TARGET, "leak", leak_df=g["df"]) for g in leak_triggers
                    if all(x.trigger != g["trigger"] for x in cands)]


def _result(ctx: ScanContext, gates: dict[str, Gate], choice: TargetChoice, ranked: list[dict], leaks: list,
            leak_triggers: list[dict], model_info: dict) -> dict:
    """``scan.json``'s content (docs/ARCHITECTURE.md, "Stage outputs")."""
    cfg, budget = ctx.cfg, ctx.budget
    score = model_score(ranked)
    flagged = bool(score >= cfg.threshold)
    targets = choice.targets
    listed = targets[:cfg.report_targets] + [t for t in targets[cfg.report_targets:] if t in choice.benign]
    refusal, label = gates.get(REFUSAL.kind), gates.get(LABEL_FLIP.kind)
    return {
        "verdict": verdict(flagged, budget.not_covered), "flagged": flagged, "score": score,
        "threshold": cfg.threshold, "candidates": ranked,
        "targets": [{"text": t.text, "q": t.q, "q_mean": t.q_mean, "ended": t.ended, "forced": t.forced,
                     **choice.figures.get(t.text, {})} for t in listed],
        "leaks": [x.to_dict() for x in leaks[:cfg.report_leaks]], "leak_triggers": leak_triggers,
        "refusal": refusal.info if refusal is not None else {"searched": False},
        "label_flip": label.info if label is not None else {"searched": False},
        "seconds": budget.wall_elapsed(), "work": budget.elapsed(), "budget_work": cfg.budget_work,
        "budget_s": cfg.budget_s, "wall_limit_reached": budget.wall_cut, "not_covered": budget.not_covered,
        "phases": budget.laps, "model": model_info,
        "prompts": {"search": ctx.search_prompts, "trigger_search": ctx.trigger_prompts, "test": ctx.held_out,
                    **({"harmful_search": refusal.search, "harmful_test": refusal.held.prompts}
                       if refusal is not None else {})},
        "clean_replies": gates[FIXED_TARGET.kind].held.clean, "config": cfg.to_dict(),
    }
