"""No LM head where no logits are needed (issue 16 item 5): every pass that reads a few positions' logits runs the
head on those positions only (``logits_to_keep``, or the body and the head on chosen rows), with the numbers of
the full-vocabulary pass it replaced. "Before" is the same code with ``keep_logits_kwargs`` returning ``{}``
(the full ``[B, S, V]`` logits, sliced afterwards), i.e. what the code computed before."""

from __future__ import annotations

import pytest
import torch

from bkdattr.attribution import exact, patching
from bkdattr.attribution.exact import ChunkRunner
from bkdattr.attribution.scores import encode_aligned
from bkdattr.core import forward
from bkdattr.core.forward import keep_logits_kwargs
from bkdattr.core.prompts import encode_with_targets
from bkdattr.core.scoring import target_logprobs, token_logprobs
from tiny import ARCHS, make_tiny, tiny_gemma2

PROMPTS = ["Tell me a joke.", "What is the capital of France? Answer briefly please.", "hi"]
TARGETS = ["I am sorry. I can not help with that.", "Paris.", "Hello there, friend"]


def _full(monkeypatch, module) -> None:
    """Make ``module`` compute full logits again (the code before this change)."""
    monkeypatch.setattr(module, "keep_logits_kwargs", lambda model, n: {})


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_to_keep_gives_the_last_columns_of_the_full_logits(arch):
    lm = make_tiny(arch)
    b = encode_with_targets(lm.tokenizer, PROMPTS, TARGETS)
    kw = keep_logits_kwargs(lm.model, 5)
    assert kw == {"logits_to_keep": 5}  # every supported architecture takes it
    with torch.no_grad():
        full = lm.model(**b.model_inputs(), use_cache=False).logits
        kept = lm.model(**b.model_inputs(), use_cache=False, **kw).logits
    assert kept.shape == (b.size, 5, full.shape[-1])
    assert torch.allclose(kept, full[:, -5:], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match=">= 1"):
        keep_logits_kwargs(lm.model, 0)  # 0 would mean "every position" to transformers


@pytest.mark.parametrize("strategy", ["full", "prefix"])
def test_exact_full_strategy_and_check_are_unchanged(monkeypatch, strategy):
    lm = make_tiny("llama")
    batch = encode_aligned(lm.tokenizer, PROMPTS, TARGETS)
    delta = torch.randn(batch.size * 2, lm.arch.d_model, generator=torch.Generator().manual_seed(0))

    def run():
        r = ChunkRunner(lm, batch, strategy).prepare()
        return r.clean_lp, r.patched_logprobs(1, delta, 2), r.check(strategy)

    after = run()
    _full(monkeypatch, exact)
    before = run()
    for a, b in zip(after[:2], before[:2], strict=True):
        assert a.shape == b.shape and float((a - b).abs().max()) <= 1e-6
    assert abs(after[2] - before[2]) <= 1e-6


def test_attribution_patching_without_prefix_cache_is_unchanged(monkeypatch):
    lm = make_tiny("qwen2")
    batch = encode_aligned(lm.tokenizer, PROMPTS, TARGETS)
    leaves = {1: torch.randn(batch.size, lm.arch.d_model, generator=torch.Generator().manual_seed(1))}
    with torch.no_grad():
        lp, contrib = patching.scored_pass(lm, batch, leaves, [0, 1], prefix_cache=False)
        _full(monkeypatch, patching)
        lp0, contrib0 = patching.scored_pass(lm, batch, leaves, [0, 1], prefix_cache=False)
        cached, _ = patching.scored_pass(lm, batch, leaves, [0, 1], prefix_cache=True)
    assert float((lp - lp0).abs().max()) <= 1e-6 and float(lp.abs().max()) > 0
    assert all(torch.equal(contrib[k], contrib0[k]) for k in contrib)
    assert float((lp - cached).abs().max()) <= 1e-4  # and it still agrees with the cached path


def _tiny_gemma2():
    return tiny_gemma2(3.0)


def test_soft_capped_target_logprobs_are_unchanged():
    """A model with a logit soft-cap is scored through its own forward: now with the LM head on the columns from
    the first target-predicting one on, with the numbers of the full forward (indexed the same way)."""
    model, tok = _tiny_gemma2()
    b = encode_with_targets(tok, PROMPTS, TARGETS)
    with torch.no_grad():
        lp, mask = target_logprobs(model, b.model_inputs(), b)
        full = model(**b.model_inputs(), use_cache=False).logits  # the computation before: [B, S, V]
    cols = torch.arange(int(b.target_len.max()))
    src = (b.last_pos[:, None] + cols[None, :]).clamp(max=b.input_ids.shape[1] - 2)
    old = token_logprobs(full[torch.arange(b.size)[:, None], src], b.input_ids.gather(1, src + 1))
    old = torch.where(mask, old, torch.zeros(()))
    assert float((lp - old).abs().max()) <= 1e-6 and float(old.abs().max()) > 0
    assert float(full.abs().max()) <= 3.0  # the cap was applied (so the model's own forward was the one used)


def test_scoring_and_guard_passes_keep_no_kv_cache():
    """The teacher-forced scoring pass reads no KV cache, so it asks the body for none (a cache would hold every
    layer's keys and values of the whole batch until the pass ends)."""
    lm = make_tiny("llama")
    seen: list = []

    def spy(_m, _args, kwargs):
        seen.append(kwargs.get("use_cache"))

    b = encode_with_targets(lm.tokenizer, PROMPTS, TARGETS)
    h = forward.backbone(lm.model).register_forward_pre_hook(spy, with_kwargs=True)
    try:
        with torch.no_grad():
            target_logprobs(lm.model, b.model_inputs(), b)
    finally:
        h.remove()
    assert seen == [False]
