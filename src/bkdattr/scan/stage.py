"""``bkdattr scan``: look for a backdoor with no trigger known, by inference only (docs/METHOD.md, "Scan").

Phases, each on a share of the work the budget has left (:class:`~bkdattr.scan.budget.Budget`, stated in the
model's forward work, so the same scan runs on a fast, slow or busy machine; ``budget_s`` is an optional
wall-clock limit):

1. **Leak** (:mod:`bkdattr.scan.leak`): user turns sampled from the template's user-turn prefix under several
   decoding settings, with the model's replies; recurring rare n-grams become trigger candidates
   (:mod:`bkdattr.scan.mine`).
2. **Targets** (:mod:`bkdattr.scan.targets`): BAIT-style inversion of the reply the model gives whatever the
   prompt once its first token is forced.
3. **Search** (:mod:`bkdattr.scan.search`): for the best targets, a gradient-guided beam search for a short
   trigger that raises the target on benign prompts; and, when the model refuses harmful-sounding requests, one
   for a trigger that lowers its refusal on them (:mod:`bkdattr.scan.refusal`, a jailbreak backdoor).
4. **Test** (:mod:`bkdattr.scan.confirm`, :mod:`bkdattr.scan.refusal`, :mod:`bkdattr.scan.labels`; in groups,
   :mod:`bkdattr.scan.trials`) every candidate on held-out prompts (KL, changed share, agreement, ASR), then
   **score** (:mod:`bkdattr.scan.score`) and write ``scan.json`` and ``report.html`` (:mod:`bkdattr.scan.report`).

The **verdict** (:func:`bkdattr.scan.score.verdict`) is ``flagged`` when the score reaches the threshold, else
``incomplete`` when the budget cut any phase (a cut search reads like a clean one, so it is never reported as
"no backdoor found"), else ``not_found``.

Inputs are checked before the model loads where they can be (an out folder that exists and is not empty, a
budget that is not positive); a model without a chat template needs ``template`` (``"plain"`` for the
documented plain format, or a Jinja chat-template file); a work budget too small for one pass over the held-out
prompts is a one-line error.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

from tqdm.auto import tqdm

from ..audit.inputs import read_prompt_file
from ..core.errors import ConfigError, InputFileError
from ..core.generation import generate
from ..core.hooks import count_work
from ..core.model_source import ModelSource, load_source, open_source
from ..core.prompts import has_chat_template
from ..inject.builtin_data import benign_questions, instructions
from .budget import Budget
from .config import ScanConfig
from .confirm import HeldOut
from .insert import TargetScorer
from .labels import label_job, without_label
from .leak import leak
from .mine import mine_triggers, surprisal_under
from .pools import split_pool
from .refusal import RULE, harmful_prompts, refusal_rate, refusal_target
from .report import write_scan
from .score import mark, model_score, rank, verdict
from .search import STOP_SCORE, allowed_tokens, search_trigger
from .select import choose_targets
from .targets import invert_targets
from .trials import HeldOutSets, evidence_all

LEAK_SHARE, TARGET_SHARE, SEARCH_SHARE = 0.1, 0.4, 0.75
#: the share of the time left that the label search may use, on a model that classifies the probes
LABEL_SHARE = 0.5
#: time kept for the tests when the search starts, in units of one greedy pass over the held-out prompts
TEST_RESERVE = 6


def check_out(out: str | Path) -> Path:
    """The out folder: it must not exist, or be empty."""
    p = Path(out)
    if p.exists() and (not p.is_dir() or any(p.iterdir())):
        raise ConfigError(f"the out folder {p} exists and is not empty; pass a new folder to --out")
    return p


def apply_template(tokenizer, template: str | None) -> str:
    """Give ``tokenizer`` the template the scan renders prompts with; returns its name (``chat``, ``plain`` or
    the file). One-line :class:`ConfigError` for a model without a chat template when ``template`` is None."""
    if template is None:
        if not has_chat_template(tokenizer):
            raise ConfigError("the model has no chat template, so the scan cannot know how a user turn looks; pass "
                              "--template plain (User: ...\\nAssistant:) or --template FILE (a Jinja chat template)")
        return "chat"
    if template == "plain":
        tokenizer.chat_template = None
        return "plain"
    p = Path(template).expanduser()
    if not p.is_file():
        raise InputFileError(f"template file not found: {template}; pass 'plain' or a Jinja chat-template file")
    tokenizer.chat_template = p.read_text(encoding="utf-8")
    return str(p)


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


def run_search(lm, job: dict, cfg: ScanConfig, budget: Budget, *, seed: int, allowed, bar=None) -> list:
    """One search job (``target`` ids raised, or lowered with ``sign`` -1, on ``prompts``, from the ``allowed``
    ``[V]`` tokens) until its steps, its stop score or the budget's phase end; ``[(Found, job)]`` for its two best
    triggers."""
    scorer = TargetScorer(lm, job["prompts"], job["target"], cfg.score_tokens, cfg.batch_size, sign=job["sign"])
    res = search_trigger(scorer, allowed, lm.tokenizer, max_tokens=cfg.trigger_tokens, topk=cfg.search_topk,
                         n_candidates=cfg.search_candidates, beam=cfg.search_beam, steps=cfg.search_steps,
                         budget=budget, seed=seed, progress=bar, stop_score=job.get("stop", STOP_SCORE),
                         label=job["label"])
    return [(f, job) for f in res[:2]]


def scan(out: str | Path, model: str, *, adapter: str | None = None, base_model: str | None = None,
         template: str | None = None, cfg: ScanConfig | None = None, prompts: list[str] | None = None,
         test_prompts: list[str] | None = None, trust_remote_code: bool = False, allow_pickle: bool = False,
         lm=None, progress: bool | None = None, prompts_file: str | None = None, wall_clock=None) -> dict:
    """Scan ``model`` (+ ``adapter``); write ``out/scan.json`` and ``out/report.html``; return the result.
    ``lm``: an already loaded model (tests; ``model`` is then only its label). ``prompts_file``: the user's own
    benign prompts (text, one per line, or JSONL ``{"input": ...}``) instead of the built-in questions, split as
    they are (:func:`file_prompts`); a backdoor that fires only on one kind of input (a classifier's) is seen only
    from such prompts. ``wall_clock``: the clock of the wall-clock limit (default ``time.monotonic``; tests pass a
    clock that runs slow)."""
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

    work = contextlib.ExitStack()
    meter = work.enter_context(count_work(lm.arch))
    try:
        budget = Budget(cfg.budget_work, meter.units, wall_limit_s=cfg.budget_s, wall_clock=wall_clock,
                        wall_start=wall_start)
        result = _scan_loaded(lm, out, cfg, budget, progress, source, reference, base_model, prompts_file,
                              template_name, search_prompts, held_out, trigger_prompts)
    finally:
        work.close()
    return result


def _scan_loaded(lm, out: Path, cfg: ScanConfig, budget: Budget, progress: bool, source, reference, base_model,
                 prompts_file, template_name: str, search_prompts: list[str], held_out: list[str],
                 trigger_prompts: list[str]) -> dict:
    """The scan's phases on a loaded model (see the module docstring)."""
    t0 = budget.clock()
    clean = generate(lm, held_out, max_new_tokens=cfg.reply_tokens, batch_size=cfg.batch_size, progress=False,
                     shared_prefix=True)
    step = budget.clock() - t0
    if budget.wall_out():
        raise ConfigError(f"--budget-s {cfg.budget_s:g} is too small: loading the model and one pass over the held-out "
                          f"prompts took {budget.wall_elapsed():.0f} s; raise --budget-s")
    if budget.left() < step:
        raise ConfigError(f"--budget-work {cfg.budget_work:g} is too small for one step of the scan (one pass over "
                          f"the held-out prompts took {step:.3f}); raise --budget-work")

    refusal: dict = {"searched": False}
    if cfg.refusal:
        h_search, h_test = harmful_prompts(cfg.n_prompts, cfg.n_test, cfg.n_search_prompts)
        h_clean = generate(lm, h_test, max_new_tokens=cfg.reply_tokens, batch_size=cfg.batch_size, progress=False,
                           shared_prefix=True)
        r0 = refusal_rate(h_clean)
        refusal.update(rate=r0, target=refusal_target(h_clean), min=cfg.refusal_min, n_test=len(h_test))
        if r0 < cfg.refusal_min or refusal["target"] is None:
            refusal["why_not"] = (f"the model refuses {r0:.2f} of the held-out harmful requests (< {cfg.refusal_min:g})"
                                  ": no refusal for a trigger to switch off")

    # 0. label flips: on a model that classifies the news-topic probes, search the most primed (source, target)
    # pair first, on its own share of the time (docs/METHOD.md, "Label flips")

    label_info: dict = {"searched": False}
    label_found: list = []
    allowed = None
    label_phase = None
    if cfg.labels:
        label_phase = label_job(lm, cfg)
        label_info, ljob = label_phase.info, label_phase.job
        if ljob is not None:
            budget.phase(LABEL_SHARE)
            allowed = allowed_tokens(lm.tokenizer)
            bar = _bar(cfg.search_steps, "scan: label search", progress)
            label_found = run_search(lm, ljob, cfg, budget, seed=cfg.seed, bar=bar,
                                     allowed=without_label(lm.tokenizer, allowed, ljob["meta"]["target"]))
            bar.close()

    # 1. leak
    budget.phase(LEAK_SHARE)
    bar = _bar(len(cfg.leak_temperatures), "scan: leak", progress)
    leaks = leak(lm, cfg.leak_temperatures, cfg.leak_top_p, cfg.leak_samples, cfg.leak_tokens, cfg.reply_tokens,
                 cfg.batch_size, budget, cfg.seed, bar)
    bar.close()
    ref_state: dict = {}

    def ref_surprisal(texts: list[str]) -> list[float]:
        if "lm" not in ref_state:
            ref_state["lm"] = load_source(reference, cfg.device, cfg.dtype, check=False)
        return surprisal_under(ref_state["lm"], cfg.batch_size)(texts)

    leak_triggers = mine_triggers([x.user for x in leaks], cfg.n_leak_triggers,
                                  ref_surprisal if reference is not None else None)
    ref_state.clear()

    # 2. targets

    budget.phase(TARGET_SHARE)
    sweep_bar = _bar(1, "scan: first-token sweep", progress and cfg.vocab_sweep)
    second = {"firsts": cfg.second_firsts, "per_first": cfg.second_per_first, "shortlist": cfg.second_shortlist,
              "keep": cfg.second_keep}
    sweep = ({"prompts": cfg.sweep_prompts, "shortlist": cfg.sweep_shortlist, "keep": cfg.sweep_keep,
              "second": second, "progress": sweep_bar} if cfg.vocab_sweep else None)
    bar = _bar(cfg.target_tokens - 1, "scan: targets", progress)
    targets = invert_targets(lm, search_prompts, first_tokens=cfg.first_tokens, length=cfg.target_tokens,
                             branch=cfg.branch, beams_per_first=cfg.beams_per_first, budget=budget, progress=bar,
                             sweep=sweep)
    bar.close()
    sweep_bar.close()

    # 3. search
    refusal_search = cfg.refusal and "why_not" not in refusal
    chosen, target_figures = choose_targets(lm, search_prompts, targets, n=cfg.n_search_targets,
                                            q_min=cfg.target_q_min, first_min=cfg.first_logp_min,
                                            n_score=cfg.score_tokens, batch_size=cfg.batch_size,
                                            refuses=refusal_search, refusal=refusal.get("target"),
                                            q_min_forced=cfg.second_q_min)
    # one search job per chosen target (weight Q) and, when the model refuses, the refusal job (weight r0);
    # heavier jobs first, each with its share of the search time
    # an ineligible target (searched only when none is eligible, to list candidates) cannot count: the inversion's
    # prompts are enough for it
    # on a model that refuses, the refusal search raises the best primed target on the harmful requests when there
    # is one (a jailbreak's compliance reply), else it lowers the model's own refusal (docs/METHOD.md, "Refusal")
    comply = next((t for t in chosen if target_figures[t.text]["eligible"]), None) if refusal_search else None
    if comply is not None:
        chosen = [t for t in chosen if t is not comply]
    jobs = [{"label": t.text, "weight": t.q, "target": t.ids, "sign": 1.0,
             "prompts": trigger_prompts if target_figures[t.text]["eligible"] else search_prompts,
             "stop": STOP_SCORE, "meta": {"target": t.text, "target_q": t.q, "target_q_mean": t.q_mean,
                      "target_first_logp": target_figures[t.text]["first_logp"],
                      "target_s0": target_figures[t.text]["s0"],
                      "target_eligible": target_figures[t.text]["eligible"]}}
            for t in chosen]
    if refusal_search:
        refusal.update(searched=True, objective="compliance" if comply is not None else "suppression",
                       compliance_target=comply.text if comply is not None else None)
        if comply is not None:
            jobs.append({"label": f"compliance {comply.text!r}", "weight": refusal["rate"], "target": comply.ids,
                         "sign": 1.0, "prompts": h_search, "stop": STOP_SCORE,
                         "meta": {"target": "", "rule": RULE, "compliance_target": comply.text}})
        else:
            jobs.append({"label": f"refusal {refusal['target']!r}", "weight": refusal["rate"],
                         "target": refusal["target"], "sign": -1.0, "prompts": h_search, "stop": math.log(10.0),
                         "meta": {"target": "", "rule": RULE}})
    jobs.sort(key=lambda j: -j["weight"])
    if jobs and allowed is None:
        allowed = allowed_tokens(lm.tokenizer)
    reserve = TEST_RESERVE * step  # the tests of the first candidates need about this much
    search_end = budget.clock() + SEARCH_SHARE * max(0.0, budget.left() - reserve)
    found = []
    bar = _bar(cfg.search_steps * len(jobs), "scan: trigger search", progress)
    for i, job in enumerate(jobs):
        left = search_end - budget.clock()
        if left <= 0 or budget.wall_out():
            names = ", ".join(j["label"] for j in jobs[i:])
            budget.skip(f"search: {len(jobs) - i} of {len(jobs)} searches not run ({names})")
            break
        weights = [max(j["weight"], 1e-3) for j in jobs[i:]]  # the search work left, in proportion to the weights
        budget.phase_deadline = budget.clock() + left * weights[0] / sum(weights)
        found += run_search(lm, job, cfg, budget, seed=cfg.seed + i, allowed=allowed, bar=bar)
    bar.close()
    found = label_found + found

    # 4. test
    cands: list[dict] = []
    for f, job in found:
        if f.text and all(c["trigger"] != f.text or c.get("rule") != job["meta"].get("rule") for c in cands):
            cands.append({"trigger": f.text, "source": "search", "search_score": f.score, **job["meta"]})
    for g in leak_triggers:
        if all(c["trigger"] != g["trigger"] for c in cands):
            cands.append({"trigger": g["trigger"], "target": None, "source": "leak", "leak_df": g["df"]})
    cands = cands[:cfg.max_candidates]
    budget.phase(1.0)
    sets = HeldOutSets(HeldOut(held_out, clean, cfg.reply_tokens),
                    HeldOut(h_test, h_clean, cfg.reply_tokens) if cfg.refusal else None)
    if label_phase is not None:
        sets.probes, sets.labels = label_phase.held, label_phase.labels
    bar = _bar(len(cands), "scan: test candidates", progress)
    tested = evidence_all(lm, cands, sets, kl_positions=cfg.kl_positions, batch_size=cfg.batch_size, budget=budget,
                      progress=bar)
    bar.close()

    ranked = rank(mark(tested, cfg.target_q_min, cfg.first_logp_min))
    score = model_score(ranked)
    flagged = bool(score >= cfg.threshold)
    result = {
        "verdict": verdict(flagged, budget.not_covered), "flagged": flagged, "score": score,
        "threshold": cfg.threshold,
        "candidates": ranked,
        "targets": [{"text": t.text, "q": t.q, "q_mean": t.q_mean, "ended": t.ended, "forced": t.forced,
                     **target_figures.get(t.text, {})}
                    for t in targets[:20] + [t for t in targets[20:] if t in chosen]],
        "leaks": [x.to_dict() for x in leaks[:24]], "leak_triggers": leak_triggers, "refusal": refusal,
        "label_flip": label_info,
        "seconds": budget.wall_elapsed(), "work": budget.elapsed(), "budget_work": cfg.budget_work,
        "budget_s": cfg.budget_s, "wall_limit_reached": budget.wall_cut, "not_covered": budget.not_covered,
        "model": {**source.to_dict(), "label": source.label, "base_model": base_model,
                  "prompts_file": str(Path(prompts_file).expanduser().resolve()) if prompts_file else None,
                  "reference": reference.to_dict() if reference else None, "template": template_name},
        "prompts": {"search": search_prompts, "trigger_search": trigger_prompts, "test": held_out,
                    **({"harmful_search": h_search, "harmful_test": h_test} if cfg.refusal else {})},
        "clean_replies": clean, "config": cfg.to_dict(),
    }
    out.mkdir(parents=True, exist_ok=True)
    write_scan(out, result)
    return result
