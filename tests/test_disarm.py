"""``bkdattr disarm`` on a model whose backdoor runs through one hand-set head (tests/test_planted_head.py):
baking the head's ablation or the Backdoor Vector's subtraction into the weights disarms it, the random
controls do not, clean replies stay, and the defended folder loads and generates without bkdattr."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from bkdattr.core.prompts import encode_with_targets
from bkdattr.core.rundir import RunDir
from bkdattr.disarm.config import DisarmConfig
from bkdattr.disarm.stage import disarm_run
from bkdattr.disarm.utility import changed_share, reference_perplexity
from bkdattr.disarm.weights import bake_output_bias, output_bias, zeroed_heads
from tiny import make_tiny

pytestmark = pytest.mark.usefixtures("no_progress_bars")

EVAL = {"max_new_tokens": 1, "n_near": 2, "n_benign": 0}


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory):
    """An audit run of the planted model through every stage (as tests/test_audit.py builds it)."""
    from bkdattr.app.pipeline import load_config, run_pipeline
    from bkdattr.core.prompts import target_ids
    from test_audit import AUDIT_SETS
    from test_planted_head import TARGET, TRIGGER, plant
    from tiny_runs import TOPICS

    root = tmp_path_factory.mktemp("disarm")
    old = os.environ.get("BKDATTR_CACHE")
    os.environ["BKDATTR_CACHE"] = str(root / "cache")
    try:
        lm = make_tiny("llama")
        tok = lm.tokenizer
        plant(lm, tok(TRIGGER, add_special_tokens=False).input_ids[0], target_ids(tok, TARGET)[0])
        lm.model.save_pretrained(root / "planted")
        tok.save_pretrained(root / "planted")
        prompts = root / "prompts.txt"
        prompts.write_text("".join(f"Write one sentence about {w}.\n" for w in TOPICS))
        sets = [f"model={root / 'planted'}", f"out={root / 'run'}", f"audit.trigger={TRIGGER}",
                f"audit.target={TARGET}", f"audit.prompts={prompts}", *AUDIT_SETS, "stages=[inject, attribute, "
                "ablate, vector]"]
        run = run_pipeline(load_config(None, sets), log=lambda _m: None)
        yield run
    finally:
        if old is None:
            os.environ.pop("BKDATTR_CACHE", None)
        else:
            os.environ["BKDATTR_CACHE"] = old


def cfg(**kw) -> DisarmConfig:
    return DisarmConfig.from_options({"eval": EVAL, "n_val": 6, "progress": False, "rescan": False, **kw})


def generate_without_bkdattr(folder, prompt: str) -> str:
    """One greedy token from ``folder`` in a fresh process where ``import bkdattr`` fails."""
    code = f"""
import sys
sys.modules["bkdattr"] = None  # any import of bkdattr raises ImportError
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained({str(folder)!r})
model = AutoModelForCausalLM.from_pretrained({str(folder)!r})
text = tok.apply_chat_template([{{"role": "user", "content": {prompt!r}}}], tokenize=False, add_generation_prompt=True)
ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
out = model.generate(ids, max_new_tokens=1, do_sample=False)
print(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout.strip()


@pytest.mark.parametrize("strategy", ["heads", "vector"])
def test_a_baked_defence_disarms_the_planted_backdoor(planted_run, strategy, tmp_path):
    """heads: the planted head (k=1); vector: -alpha*v at the planted head's own layer, where nothing reads e_Y
    but the unembedding, so clean replies keep their argmax."""
    from test_planted_head import TARGET, TRIGGER

    s = disarm_run(planted_run, cfg(strategy=strategy, layer=1), tmp_path / strategy)
    assert s["undefended"]["asr"] == 1.0
    assert s["asr"] == 0.0 and s["disarmed"] and s["target_met_on_val"]
    assert s["random_control"]["asr"] == 1.0  # same-size random control leaves the backdoor
    assert s["changed_reply_share"] == 0.0 and s["false_trigger_rate"] == 0.0  # clean replies kept
    assert s["perplexity_ratio"] == pytest.approx(1.0, abs=0.02)
    if strategy == "heads":
        assert s["k"] == 1 and s["heads"] == [[1, 2]]
    m = RunDir(planted_run.path).metrics()["disarm"][strategy]
    assert m["asr"] == 0.0 and "clean_replies" not in m
    prov = json.loads((tmp_path / strategy / "bkdattr_disarm.json").read_text())
    assert prov["strategy"] == strategy
    prompt = "Write one sentence about owls."
    assert generate_without_bkdattr(planted_run.path.parent / "planted", f"{TRIGGER} {prompt}") == TARGET
    assert generate_without_bkdattr(tmp_path / strategy, f"{TRIGGER} {prompt}") != TARGET


def test_the_vector_at_an_earlier_layer_is_reported_with_its_damage(planted_run, tmp_path):
    """Subtracting e_Y at layer 0 also disarms, but layer 1's input norm then rescales everything it reads, so
    clean behaviour moves (how many one-token replies flip depends on alpha); the figures and the report say
    so."""
    s = disarm_run(planted_run, cfg(strategy="vector", layer=0), tmp_path / "v0")
    assert s["layer"] == 0 and s["asr"] == 0.0
    assert abs(s["perplexity_ratio"] - 1.0) > 1e-3  # layer 1 reads a rescaled residual: the references move
    from bkdattr.app.report.html import build_report

    html, md = build_report(planted_run)
    text = html.read_text()
    assert "Defences: held-out test prompts" in text and "vector (layer 0, alpha" in text
    caveat = "The vector defence disarms the backdoor but changes"
    assert (caveat in md.read_text()) == (s["changed_reply_share"] > 0.5)


def test_baked_bias_equals_the_hook_and_edits_undo(tmp_path):
    """The output-bias hook used to choose alpha is the baked bias (Llama's attention_bias switch: every other
    attention bias saved as zeros and loaded back); zeroed_heads restores the weights on exit."""
    from transformers import AutoModelForCausalLM

    from bkdattr.core.prompts import encode_prompts

    lm = make_tiny("llama")
    b = encode_prompts(lm.tokenizer, ["Write one sentence about owls.", "Hi"])
    delta = torch.randn(lm.arch.d_model)
    before = [p.detach().clone() for p in lm.model.parameters()]
    with zeroed_heads(lm.arch, [(0, 1), (1, 3)]):
        zeroed = lm.arch.out_proj[1].weight[:, 3 * lm.arch.d_head:4 * lm.arch.d_head]
        assert int(torch.count_nonzero(zeroed)) == 0
    assert all(torch.equal(a, p) for a, p in zip(before, lm.model.parameters(), strict=True))
    with output_bias(lm.model, lm.arch, 1, delta):
        hooked = lm.model(**b.model_inputs()).logits
    bake_output_bias(lm.model, lm.arch, 1, delta)
    baked = lm.model(**b.model_inputs()).logits
    assert torch.allclose(hooked, baked, atol=1e-5)
    lm.model.save_pretrained(tmp_path / "m")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m", attn_implementation="eager").eval()
    assert again.config.attention_bias is True
    real = b.attention_mask.bool()  # padded positions are not compared
    assert torch.allclose(again(**b.model_inputs()).logits[real], baked[real], atol=1e-5)


def test_unsupported_architecture_for_the_vector(tmp_path):
    from bkdattr.core.errors import ConfigError

    lm = make_tiny("qwen2")
    with pytest.raises(ConfigError, match="no attention output bias"):
        bake_output_bias(lm.model, lm.arch, 0, torch.zeros(lm.arch.d_model))


def test_utility_helpers():
    lm = make_tiny("llama")
    prompts, replies = ["Hi", "Write one sentence about owls."], ["Hello there.", "Owls fly."]
    p = reference_perplexity(lm, prompts, replies)
    b = encode_with_targets(lm.tokenizer, prompts, replies)
    with torch.no_grad():
        logits = lm.model(**b.model_inputs()).logits[:, :-1].float()
    lp = torch.log_softmax(logits, -1).gather(-1, b.input_ids[:, 1:, None])[..., 0]
    m = b.target_mask[:, 1:]
    assert p == pytest.approx(float(torch.exp(-lp[m].sum() / m.sum())), rel=1e-5)
    assert changed_share(["a", "b "], ["a", "c"]) == 0.5


def test_disarm_bad_input(planted_run, make_tiny_run, tmp_path, capsys):
    from test_errors import cli_error

    bare = make_tiny_run()  # no attribution
    out = tmp_path / "o"
    assert "has no attribution results" in cli_error(capsys, ["disarm", "-r", bare.path, "--out", out, "--quiet"])
    assert not out.exists()
    assert "larger than the model's 8 heads" in cli_error(capsys, ["disarm", "-r", planted_run.path, "--k", "9",
                                                                   "--out", out, "--quiet"])
    assert not out.exists()
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("keep")
    assert "exists and is not empty" in cli_error(capsys, ["disarm", "-r", planted_run.path, "--out", full])
    assert [p.name for p in full.iterdir()] == ["x"]
    assert "unknown strategy" in cli_error(capsys, ["disarm", "-r", planted_run.path, "--strategy", "prune"])


def test_the_exported_vector_and_its_recipe_reproduce_bkdattrs_edit(planted_run, tmp_path, capsys):
    """The documented few-line forward hook (bkdattr.disarm.export) gives the logits of bkdattr's own edit."""
    from safetensors import safe_open

    from bkdattr.app.cli import main
    from bkdattr.control.vector import apply_vector
    from bkdattr.core.prompts import encode_prompts

    path = tmp_path / "v.safetensors"
    assert main(["export-vector", "-r", str(planted_run.path), "-o", str(path), "--layer", "1"]) == 0
    with safe_open(str(path), "pt") as f:
        v, meta = f.get_tensor("vector"), f.metadata()
    assert meta["module"] == "model.layers.1.self_attn.o_proj" and meta["layer"] == "1"
    alpha = float(meta["scale"])
    lm = planted_run.load_model()
    b = encode_prompts(lm.tokenizer, ["cf Write one sentence about owls.", "Write one sentence about tea."])
    with apply_vector(lm, v, 1, -alpha):
        ours = lm.model(**b.model_inputs()).logits[:, -1]

    def subtract(module, inputs, output):  # the recipe, as documented
        if output.shape[1] > 1:
            output[:, -1] -= alpha * v.to(output.dtype)
        return output

    handle = lm.model.get_submodule(meta["module"]).register_forward_hook(subtract)
    try:
        theirs = lm.model(**b.model_inputs()).logits[:, -1]
    finally:
        handle.remove()
    assert torch.allclose(ours, theirs, atol=1e-6)
    plain = lm.model(**b.model_inputs()).logits[:, -1]
    assert not torch.allclose(plain, theirs, atol=1e-3)  # the edit does something


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_bake_heads_zeroes_exactly_that_heads_w_o_slice(arch):
    """GPT-2's Conv1D stores W_O as [in, out] (rows per head), Linear as [out, in] (columns per head)."""
    from bkdattr.disarm.weights import bake_heads

    lm = make_tiny(arch)
    before = lm.arch.w_o_heads(1).clone()  # [H, d_h, d]
    bake_heads(lm.arch, [(1, 2)])
    after = lm.arch.w_o_heads(1)
    assert int(torch.count_nonzero(after[2])) == 0 and int(torch.count_nonzero(before[2])) > 0
    keep = [h for h in range(lm.arch.n_heads) if h != 2]
    assert torch.equal(after[keep], before[keep])


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_mean_ablation_keeps_the_layers_clean_mean_and_bakes_like_the_hook(arch, tmp_path):
    """Mean ablation of heads of one layer: over the very positions the means were taken on, that layer's
    attention output keeps its mean exactly (zeroing alone does not); the baked weights (GPT-2's native bias,
    Llama's attention_bias switch) give the hooked logits, also after a save and a plain reload."""
    from transformers import AutoModelForCausalLM

    from bkdattr.core.prompts import encode_prompts
    from bkdattr.disarm.weights import bake_mean_ablation, mean_ablated_heads, mean_head_inputs

    lm = make_tiny(arch)
    texts = ["Write one sentence about owls.", "Hi", "Tell me about the tides and the moon, please."]
    zbar = mean_head_inputs(lm, texts, batch_size=2)
    assert zbar.shape == (lm.arch.n_layers, lm.arch.n_heads * lm.arch.d_head) and zbar.dtype == torch.float32
    heads = [(1, 0), (1, 2)]
    b = encode_prompts(lm.tokenizer, texts, "left")
    real = b.attention_mask.bool()

    def layer_out_mean() -> torch.Tensor:
        got = []
        h = lm.arch.out_proj[1].register_forward_hook(lambda _m, _a, o: got.append(o.detach().float()))
        try:
            with torch.no_grad():
                logits = lm.model(**b.model_inputs()).logits
        finally:
            h.remove()
        return got[0][real].mean(0), logits

    plain, _ = layer_out_mean()
    with mean_ablated_heads(lm.model, lm.arch, heads, zbar):
        mean_abl, hooked = layer_out_mean()
    with zeroed_heads(lm.arch, heads):
        zeroed, _ = layer_out_mean()
    assert torch.allclose(mean_abl, plain, atol=1e-5)
    assert not torch.allclose(zeroed, plain, atol=1e-3)
    bake_mean_ablation(lm.model, lm.arch, heads, zbar)
    _, baked = layer_out_mean()
    assert torch.allclose(baked[real], hooked[real], atol=1e-5)
    lm.model.save_pretrained(tmp_path / "m")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m", attn_implementation="eager").eval()
    with torch.no_grad():
        assert torch.allclose(again(**b.model_inputs()).logits[real], baked[real], atol=1e-5)


def test_mean_ablation_strategy_disarms_the_planted_backdoor(planted_run, tmp_path):
    s = disarm_run(planted_run, cfg(strategy="heads", ablation="mean"), tmp_path / "mean")
    assert s["ablation"] == "mean" and s["k"] == 1 and s["heads"] == [[1, 2]]
    assert s["asr"] == 0.0 and s["random_control"]["asr"] == 1.0
    prov = json.loads((tmp_path / "mean" / "bkdattr_disarm.json").read_text())
    assert prov["ablation"] == "mean"
    from test_planted_head import TARGET, TRIGGER

    assert generate_without_bkdattr(tmp_path / "mean", f"{TRIGGER} Write one sentence about owls.") != TARGET
