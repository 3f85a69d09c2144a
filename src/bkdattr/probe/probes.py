"""Per-layer probes: an MLP and an RBF-SVM per layer, trained to tell triggered from clean prompts.

**MLP probe** (docs/METHOD.md section 2): ``d -> 100 -> 1`` with ReLU, dropout 0.2, a sigmoid output trained with binary
cross-entropy, Adam (lr 1e-3), 100 epochs, batch 16, keeping the epoch with the lowest validation loss.

All ``L`` layers' MLPs are trained *at once* as one batched model: the weights are stacked
(``W1 [L, d, h]``, ``b1 [L, h]``, ``w2 [L, h]``, ``b2 [L]``), a minibatch is the same rows of every layer's
features ``[L, B, d]``, and the loss is the **sum** of the per-layer mean BCE losses. Each layer's parameters
only enter its own loss, so the gradient of the sum w.r.t. them is that layer's own gradient, and Adam acts
element-wise: training the stack equals training each layer alone. To make it equal bit for bit in exact
arithmetic (and to float tolerance in practice) each layer draws its initialisation and dropout masks from its
own generator seeded by ``(seed, layer id)``, and the minibatch order comes from a generator seeded by ``seed``
alone. Early stopping is per layer: after every epoch each layer whose validation loss improved copies its
current parameters into its "best" slot.

**SVM probe**: RBF kernel, ``C=1``, ``gamma='scale'`` (``1 / (d * Var(Z))`` of the standardised training
features ``Z``) after standardisation (mean 0, variance 1 per feature, population std, zero-variance features
left unscaled). scikit-learn's ``SVC`` fits it; the probe then keeps only plain arrays -- support vectors,
dual coefficients, intercept, gamma and the scaler -- and computes the decision function itself:

    f(x) = sum_i alpha_i * exp(-gamma * ||z - sv_i||^2) + b,     z = (x - mean) / scale

(equal to ``SVC.decision_function`` to float64 rounding). A saved and reloaded probe therefore gives
bit-identical scores, and nothing is pickled (MLP: safetensors; SVM: npz loaded with ``allow_pickle=False``).

Both probe sets share one scoring interface (``scores > 0`` means "triggered"):

* ``scores(features [N, L, d]) -> [N, L]``: probe ``l`` on layer ``l``'s features (in-layer);
* ``cross_scores(features [N, Lf, d]) -> [L, Lf, N]``: probe ``i`` on layer ``k``'s features (ICLA).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..core.errors import ArtifactError, ConfigError, DataError
from ..core.io import load_npz, load_tensors, save_npz, save_tensors, tensor_metadata
from ..core.options import opt

# ---------------------------------------------------------------------------------------------------------
# configs


@dataclass
class MLPProbeConfig:
    """MLP probe hyper-parameters (defaults of docs/METHOD.md section 2). ``standardize`` z-scores features with
    training statistics before the MLP (off by default, as in the paper)."""

    hidden: int = 100
    dropout: float = 0.2
    lr: float = 1e-3
    epochs: int = opt(100, "MLP probe epochs")
    batch_size: int = 16
    seed: int = 0
    standardize: bool = False

    def __post_init__(self) -> None:
        if self.hidden < 1 or self.epochs < 1 or self.batch_size < 1:
            raise ConfigError("MLP probe hidden, epochs and batch_size must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"MLP probe dropout {self.dropout} must be in [0, 1)")
        if not self.lr > 0:
            raise ConfigError(f"MLP probe lr {self.lr} must be > 0")


@dataclass
class SVMProbeConfig:
    """RBF-SVM probe hyper-parameters (defaults of docs/METHOD.md section 2); ``gamma`` is ``'scale'`` or a
    positive number."""

    C: float = 1.0
    gamma: str | float = "scale"

    def __post_init__(self) -> None:
        if not self.C > 0:
            raise ConfigError(f"SVM probe C={self.C} must be > 0")
        if isinstance(self.gamma, str) and self.gamma != "scale":
            raise ConfigError(f"SVM probe gamma '{self.gamma}' must be 'scale' or a positive number")
        if not isinstance(self.gamma, str) and not float(self.gamma) > 0:
            raise ConfigError(f"SVM probe gamma {self.gamma} must be > 0")


def _check_xy(x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray, what: str) -> None:
    if x.ndim != 3:
        raise DataError(f"{what} features must be [N, L, d], got shape {tuple(x.shape)}")
    if len(y) != x.shape[0]:
        raise DataError(f"{what}: {x.shape[0]} feature rows but {len(y)} labels; pass one label per row")
    vals = set(np.unique(np.asarray(y)).tolist())
    if not vals <= {0, 1} or len(vals) < 2:
        raise DataError(f"{what} labels must contain both 0 (clean) and 1 (triggered); got {sorted(vals)}")


def _layer_seed(seed: int, layer_id: int) -> int:
    return (int(seed) * 1_000_003 + 7919 * (int(layer_id) + 1)) % (2**63 - 1)


class _Stack:
    """What both probe sets share (``layers``, ``n_probes`` and ``d_model`` come from each)."""

    layers: list[int]

    def _check_shape(self, f: Any, same_layers: bool) -> Any:
        """``f`` if it is ``[N, L, d_model]`` (``L == n_probes`` when ``same_layers``), else a one-line error."""
        if f.ndim != 3 or f.shape[2] != self.d_model:
            raise DataError(f"features must be [N, L, {self.d_model}], got {tuple(f.shape)}; use the probes' model")
        if same_layers and f.shape[1] != self.n_probes:
            raise DataError(f"features have {f.shape[1]} layers but there are {self.n_probes} probes")
        return f

    def position(self, layer: int) -> int:
        """Position in this stack of the probe trained on model layer ``layer``."""
        if layer not in self.layers:
            raise ConfigError(f"no probe for layer {layer}; available layers: {self.layers[0]}..{self.layers[-1]}")
        return self.layers.index(layer)


# ---------------------------------------------------------------------------------------------------------
# MLP probes


@dataclass
class MLPProbes(_Stack):
    """A stack of per-layer MLP probes. Tensors: ``w1 [L, d, h]``, ``b1 [L, h]``, ``w2 [L, h]``, ``b2 [L]``,
    ``mean``/``std [L, d]`` (the input scaler; used only when ``standardize``). ``layers[i]`` is the model layer
    probe ``i`` was trained on; ``best_epoch``/``best_val_loss`` record early stopping (epochs are 1-based)."""

    w1: torch.Tensor
    b1: torch.Tensor
    w2: torch.Tensor
    b2: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    standardize: bool
    layers: list[int]
    best_epoch: list[int]
    best_val_loss: list[float]
    config: MLPProbeConfig = field(default_factory=MLPProbeConfig)
    meta: dict[str, Any] = field(default_factory=dict)

    kind_name = "mlp"

    @property
    def n_probes(self) -> int:
        return int(self.w1.shape[0])

    @property
    def d_model(self) -> int:
        return int(self.w1.shape[1])

    def _logits_one(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Probe ``i`` on features ``x [..., d]`` -> logits ``[...]`` (float32, eval mode: no dropout)."""
        x = x.to(torch.float32)
        if self.standardize:
            x = (x - self.mean[i]) / self.std[i]
        h = torch.relu(torch.matmul(x, self.w1[i]) + self.b1[i])
        return torch.matmul(h, self.w2[i]) + self.b2[i]

    def _check(self, features: torch.Tensor, same_layers: bool) -> torch.Tensor:
        return self._check_shape(torch.as_tensor(features, dtype=torch.float32), same_layers)

    @torch.no_grad()
    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """In-layer logits: probe ``l`` on ``features[:, l]``. ``features [N, L, d]`` -> float32 ``[N, L]``."""
        f = self._check(features, True)
        return torch.stack([self._logits_one(i, f[:, i][None])[0] for i in range(self.n_probes)], dim=1)

    @torch.no_grad()
    def cross_logits(self, features: torch.Tensor) -> torch.Tensor:
        """Every probe on every layer: ``features [N, Lf, d]`` -> float32 ``[L, Lf, N]``."""
        f = self._check(features, False).permute(1, 0, 2)  # [Lf, N, d]
        return torch.stack([self._logits_one(i, f) for i in range(self.n_probes)], dim=0)

    def scores(self, features: torch.Tensor | np.ndarray) -> np.ndarray:
        """In-layer scores (logits; ``> 0`` means triggered): ``[N, L]`` numpy float32."""
        return self.logits(torch.as_tensor(features)).numpy()

    def cross_scores(self, features: torch.Tensor | np.ndarray) -> np.ndarray:
        """ICLA scores: ``[L, Lf, N]`` numpy float32."""
        return self.cross_logits(torch.as_tensor(features)).numpy()

    def predict_proba(self, features: torch.Tensor | np.ndarray) -> np.ndarray:
        """In-layer probability "triggered": ``[N, L]``."""
        return torch.sigmoid(self.logits(torch.as_tensor(features))).numpy()

    def select(self, index: Sequence[int]) -> MLPProbes:
        """The probes at positions ``index`` (positions in this stack, not model layer ids)."""
        idx = torch.as_tensor(list(index), dtype=torch.long)
        pick = [int(i) for i in idx]
        return dataclasses.replace(
            self, w1=self.w1[idx].clone(), b1=self.b1[idx].clone(), w2=self.w2[idx].clone(), b2=self.b2[idx].clone(),
            mean=self.mean[idx].clone(), std=self.std[idx].clone(), layers=[self.layers[i] for i in pick],
            best_epoch=[self.best_epoch[i] for i in pick], best_val_loss=[self.best_val_loss[i] for i in pick],
            meta=dict(self.meta),
        )

    # ---- persistence -------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the probes as safetensors (tensors + JSON metadata), atomically."""
        meta = {"format": "bkdattr.mlp_probes.v1", "layers": json.dumps(self.layers),
                "standardize": json.dumps(self.standardize), "config": json.dumps(dataclasses.asdict(self.config)),
                "best_val_loss": json.dumps(self.best_val_loss), "meta": json.dumps(self.meta, default=str)}
        save_tensors(path, {"w1": self.w1, "b1": self.b1, "w2": self.w2, "b2": self.b2, "mean": self.mean,
                            "std": self.std, "best_epoch": torch.tensor(self.best_epoch, dtype=torch.int64)}, meta)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> MLPProbes:
        """Read probes written by :meth:`save`."""
        t = load_tensors(path)
        meta = tensor_metadata(path)
        if meta.get("format") != "bkdattr.mlp_probes.v1" or any(k not in t for k in ("w1", "b1", "w2", "b2")):
            raise ArtifactError(f"{path} is not a bkdattr MLP probe file; rerun 'bkdattr probe'")
        return cls(t["w1"], t["b1"], t["w2"], t["b2"], t["mean"], t["std"], json.loads(meta["standardize"]),
                   json.loads(meta["layers"]), [int(v) for v in t["best_epoch"]], json.loads(meta["best_val_loss"]),
                   MLPProbeConfig(**json.loads(meta["config"])), json.loads(meta.get("meta", "{}")))


def _init_uniform(gen: torch.Generator, shape: tuple[int, ...], fan_in: int) -> torch.Tensor:
    bound = 1.0 / math.sqrt(fan_in)  # torch.nn.Linear's default initialisation
    return torch.empty(shape).uniform_(-bound, bound, generator=gen)


def _scaler(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer mean and population std of ``x [L, N, d]`` (std 1 where a feature is constant)."""
    x64 = x.double()
    mean = x64.mean(1)
    std = x64.std(1, unbiased=False)
    std = torch.where(std <= 1e-12 * mean.abs().clamp(min=1.0), torch.ones_like(std), std)
    return mean.float(), std.float()


def _adam(params: list[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    """Adam, fused when the build supports it (10x faster on CPU; the same element-wise update rule)."""
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, lr=lr)


def _bce_per_layer(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean BCE-with-logits per layer: ``logits [L, B]``, ``y [B]`` -> ``[L]``."""
    return F.binary_cross_entropy_with_logits(logits, y.expand_as(logits), reduction="none").mean(1)


def train_mlp_probes(x_train: torch.Tensor, y_train: torch.Tensor | np.ndarray, x_val: torch.Tensor,
                     y_val: torch.Tensor | np.ndarray, config: MLPProbeConfig | None = None,
                     layer_ids: Sequence[int] | None = None) -> MLPProbes:
    """Train one MLP probe per layer, all layers at once (see the module docstring).

    ``x_train [N, L, d]``, ``y_train [N]`` (0 clean / 1 triggered), ``x_val [M, L, d]``, ``y_val [M]``.
    ``layer_ids[l]`` names column ``l``'s model layer (default ``0..L-1``); it seeds that layer's
    initialisation and dropout, so training a single column with its layer id reproduces the batched result."""
    cfg = config or MLPProbeConfig()
    _check_xy(x_train, y_train, "training")
    _check_xy(x_val, y_val, "validation")
    xt = torch.as_tensor(x_train, dtype=torch.float32).permute(1, 0, 2).contiguous()  # [L, N, d]
    xv = torch.as_tensor(x_val, dtype=torch.float32).permute(1, 0, 2).contiguous()  # [L, M, d]
    if xt.shape[0] != xv.shape[0] or xt.shape[2] != xv.shape[2]:
        raise DataError(f"training features {tuple(x_train.shape)} and validation features "
                        f"{tuple(x_val.shape)} disagree in layers or width")
    n_layers, n, d = xt.shape
    ids = list(range(n_layers)) if layer_ids is None else [int(i) for i in layer_ids]
    if len(ids) != n_layers:
        raise ConfigError(f"{len(ids)} layer ids for {n_layers} feature layers")
    yt = torch.as_tensor(np.asarray(y_train), dtype=torch.float32)
    yv = torch.as_tensor(np.asarray(y_val), dtype=torch.float32)
    if cfg.standardize:
        mean, std = _scaler(xt)
        xt = (xt - mean[:, None]) / std[:, None]
        xv = (xv - mean[:, None]) / std[:, None]
    else:
        mean, std = torch.zeros(n_layers, d), torch.ones(n_layers, d)
    h = cfg.hidden
    gens = [torch.Generator().manual_seed(_layer_seed(cfg.seed, i)) for i in ids]
    inits = [(_init_uniform(g, (d, h), d), _init_uniform(g, (h,), d), _init_uniform(g, (h,), h),
              _init_uniform(g, (), h)) for g in gens]
    w1, b1, w2, b2 = (torch.stack([p[j] for p in inits]).requires_grad_(True) for j in range(4))
    params = [w1, b1, w2, b2]
    best = [p.detach().clone() for p in params]
    best_loss = torch.full((n_layers,), float("inf"))
    best_epoch = torch.zeros(n_layers, dtype=torch.long)
    opt = _adam(params, cfg.lr)
    order_gen = torch.Generator().manual_seed(int(cfg.seed))
    keep = 1.0 - cfg.dropout

    def forward(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:  # x [L, B, d] -> logits [L, B]
        hid = torch.relu(torch.baddbmm(b1[:, None, :], x, w1))
        if mask is not None:
            hid = hid * mask
        return torch.bmm(hid, w2[:, :, None])[..., 0] + b2[:, None]

    for epoch in range(1, cfg.epochs + 1):
        perm = torch.randperm(n, generator=order_gen)
        # dropout masks of the whole epoch, drawn per layer from that layer's own generator: [L, N, h]
        masks = (torch.stack([torch.rand(n, h, generator=g) < keep for g in gens]).float() / keep
                 if cfg.dropout > 0 else None)
        for start in range(0, n, cfg.batch_size):
            idx = perm[start: start + cfg.batch_size]
            mask = None if masks is None else masks[:, start: start + cfg.batch_size]
            loss = _bce_per_layer(forward(xt[:, idx], mask), yt[idx]).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            vloss = _bce_per_layer(forward(xv, None), yv)
            better = vloss < best_loss
            if bool(better.any()):
                for b, p in zip(best, params, strict=True):
                    b[better] = p.detach()[better]
                best_loss = torch.where(better, vloss, best_loss)
                best_epoch[better] = epoch
    return MLPProbes(best[0], best[1], best[2], best[3], mean, std, cfg.standardize, ids,
                     [int(e) for e in best_epoch], [float(v) for v in best_loss], cfg)


# ---------------------------------------------------------------------------------------------------------
# SVM probes


@dataclass
class SVMProbes(_Stack):
    """Per-layer RBF-SVM probes as plain arrays. For probe ``i``: ``support[i] [n_sv_i, d]`` (standardised
    space), ``dual_coef[i] [n_sv_i]``, ``intercept[i]``, ``gamma[i]``, scaler ``mean[i]``/``scale[i] [d]``; all
    float64. ``layers[i]`` is the model layer probe ``i`` was trained on."""

    support: list[np.ndarray]
    dual_coef: list[np.ndarray]
    intercept: np.ndarray
    gamma: np.ndarray
    mean: np.ndarray
    scale: np.ndarray
    layers: list[int]
    config: SVMProbeConfig = field(default_factory=SVMProbeConfig)
    meta: dict[str, Any] = field(default_factory=dict)

    kind_name = "svm"

    @property
    def n_probes(self) -> int:
        return len(self.support)

    @property
    def d_model(self) -> int:
        return int(self.mean.shape[1])

    @property
    def n_support(self) -> list[int]:
        return [int(s.shape[0]) for s in self.support]

    def _decision_one(self, i: int, x: np.ndarray) -> np.ndarray:
        """Probe ``i``'s decision function on ``x [M, d]`` -> float64 ``[M]``."""
        z = (np.asarray(x, dtype=np.float64) - self.mean[i]) / self.scale[i]
        sv = self.support[i]
        d2 = (z * z).sum(1)[:, None] + (sv * sv).sum(1)[None, :] - 2.0 * (z @ sv.T)
        k = np.exp(-self.gamma[i] * np.maximum(d2, 0.0))
        return k @ self.dual_coef[i] + self.intercept[i]

    def _check(self, features: Any, same_layers: bool) -> np.ndarray:
        return self._check_shape(features.numpy() if isinstance(features, torch.Tensor) else np.asarray(features),
                                 same_layers)

    def scores(self, features: torch.Tensor | np.ndarray) -> np.ndarray:
        """In-layer decision values (``> 0`` means triggered): ``features [N, L, d]`` -> float64 ``[N, L]``."""
        f = self._check(features, True)
        return np.stack([self._decision_one(i, f[:, i]) for i in range(self.n_probes)], axis=1)

    def cross_scores(self, features: torch.Tensor | np.ndarray) -> np.ndarray:
        """Every probe on every layer: ``features [N, Lf, d]`` -> float64 ``[L, Lf, N]``."""
        f = self._check(features, False)
        n, lf, d = f.shape
        flat = np.ascontiguousarray(f.transpose(1, 0, 2)).reshape(lf * n, d)
        return np.stack([self._decision_one(i, flat).reshape(lf, n) for i in range(self.n_probes)], axis=0)

    def predict_proba(self, features: torch.Tensor | np.ndarray) -> np.ndarray:
        """``sigmoid(decision)``: an *uncalibrated* score in (0, 1) whose 0.5 threshold is the SVM's boundary."""
        return 1.0 / (1.0 + np.exp(-self.scores(features)))

    def select(self, index: Sequence[int]) -> SVMProbes:
        """The probes at positions ``index`` (positions in this set, not model layer ids)."""
        idx = [int(i) for i in index]
        return dataclasses.replace(
            self, support=[self.support[i] for i in idx], dual_coef=[self.dual_coef[i] for i in idx],
            intercept=self.intercept[idx].copy(), gamma=self.gamma[idx].copy(), mean=self.mean[idx].copy(),
            scale=self.scale[idx].copy(), layers=[self.layers[i] for i in idx], meta=dict(self.meta),
        )

    # ---- persistence -------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the probes as npz (no object arrays), atomically."""
        save_npz(
            path, format=np.array("bkdattr.svm_probes.v1"), layers=np.asarray(self.layers, dtype=np.int64),
            n_support=np.asarray(self.n_support, dtype=np.int64),
            support=np.concatenate(self.support, axis=0) if self.support else np.zeros((0, 0)),
            dual_coef=np.concatenate(self.dual_coef) if self.dual_coef else np.zeros(0),
            intercept=self.intercept, gamma=self.gamma, mean=self.mean, scale=self.scale,
            config=np.array(json.dumps(dataclasses.asdict(self.config))),
            meta=np.array(json.dumps(self.meta, default=str)),
        )
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> SVMProbes:
        """Read probes written by :meth:`save`."""
        z = load_npz(path)
        if "format" not in z or str(z["format"]) != "bkdattr.svm_probes.v1":
            raise ArtifactError(f"{path} is not a bkdattr SVM probe file; rerun 'bkdattr probe'")
        cuts = np.cumsum(z["n_support"])[:-1]
        return cls(list(np.split(z["support"], cuts, axis=0)), list(np.split(z["dual_coef"], cuts)),
                   z["intercept"], z["gamma"], z["mean"], z["scale"], [int(v) for v in z["layers"]],
                   SVMProbeConfig(**json.loads(str(z["config"]))), json.loads(str(z["meta"])))


def standardise(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and population std of ``x [N, d]`` (float64; std 1 where a feature is constant), as scikit-learn's
    ``StandardScaler`` computes them."""
    x = np.asarray(x, dtype=np.float64)
    mean = x.mean(0)
    std = x.std(0)
    std = np.where(std <= 1e-12 * np.maximum(np.abs(mean), 1.0), 1.0, std)
    return mean, std


def train_svm_probes(x_train: torch.Tensor | np.ndarray, y_train: torch.Tensor | np.ndarray,
                     config: SVMProbeConfig | None = None, layer_ids: Sequence[int] | None = None) -> SVMProbes:
    """Fit one standardised RBF-SVM per layer. ``x_train [N, L, d]``, ``y_train [N]`` (0/1)."""
    from sklearn.svm import SVC  # lazy: scikit-learn takes over a second to import; only SVM probes need it

    cfg = config or SVMProbeConfig()
    _check_xy(x_train, y_train, "training")
    x = x_train.numpy() if isinstance(x_train, torch.Tensor) else np.asarray(x_train)
    y = np.asarray(y_train).astype(np.int64)
    n, n_layers, d = x.shape
    ids = list(range(n_layers)) if layer_ids is None else [int(i) for i in layer_ids]
    sup, coef, icpt, gam, means, scales = [], [], [], [], [], []
    for i in range(n_layers):
        mean, scale = standardise(x[:, i])
        z = (x[:, i].astype(np.float64) - mean) / scale
        if cfg.gamma == "scale":
            var = float(z.var())
            g = 1.0 / (d * var) if var > 0 else 1.0
        else:
            g = float(cfg.gamma)
        clf = SVC(C=cfg.C, kernel="rbf", gamma=g).fit(z, y)
        sup.append(np.ascontiguousarray(clf.support_vectors_, dtype=np.float64))
        coef.append(np.ascontiguousarray(clf.dual_coef_[0], dtype=np.float64))
        icpt.append(float(clf.intercept_[0]))
        gam.append(g)
        means.append(mean)
        scales.append(scale)
    return SVMProbes(sup, coef, np.asarray(icpt), np.asarray(gam), np.stack(means), np.stack(scales), ids, cfg)


Probes = MLPProbes | SVMProbes
