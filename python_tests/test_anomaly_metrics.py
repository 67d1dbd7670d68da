"""The detection metrics against known cases (hand-computed values, brute-force pair counts, scikit-learn
where it is installed) and the document bootstrap's coverage on a case with a known answer."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from mppm_ext.anomaly import metrics


def brute_auroc(s, y):
    pos = [a for a, l in zip(s, y) if l]
    neg = [a for a, l in zip(s, y) if not l]
    wins = sum((p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_auroc_known_values():
    assert metrics.auroc([0.1, 0.2, 0.3, 0.4], [0, 0, 1, 1]) == 1.0
    assert metrics.auroc([0.4, 0.3, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
    assert metrics.auroc([1, 1, 1, 1], [0, 1, 0, 1]) == 0.5
    # 3 positives, 2 negatives: pairs (p > n) = 4 of 6, one tie -> 4.5 / 6
    assert metrics.auroc([0.9, 0.5, 0.2, 0.5, 0.1], [1, 1, 1, 0, 0]) == pytest.approx(4.5 / 6, abs=0)
    assert np.isnan(metrics.auroc([1.0, 2.0], [1, 1]))


@pytest.mark.parametrize("seed", range(5))
def test_auroc_equals_pair_count_with_ties(seed):
    rng = np.random.default_rng(seed)
    s = rng.integers(0, 6, 40).astype(float)  # many ties
    y = rng.integers(0, 2, 40)
    assert metrics.auroc(s, y) == pytest.approx(brute_auroc(s, y), abs=1e-12)


def test_auprc_known_values():
    # Ranked: 1(+), 0.8(-), 0.6(+), 0.4(-): AP = ½·1 + ½·(2/3)
    assert metrics.auprc([1.0, 0.8, 0.6, 0.4], [1, 0, 1, 0]) == pytest.approx(0.5 + 1 / 3, abs=1e-12)
    assert metrics.auprc([0.1, 0.9], [0, 1]) == 1.0
    # All tied: precision is the positive rate at the one threshold.
    assert metrics.auprc([2, 2, 2, 2], [1, 0, 0, 0]) == pytest.approx(0.25, abs=1e-12)


def test_against_sklearn_when_installed():
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(7)
    for _ in range(5):
        y = rng.integers(0, 2, 300)
        s = rng.normal(size=300) + 0.7 * y
        s[::7] = np.round(s[::7])  # some ties
        assert metrics.auroc(s, y) == pytest.approx(sk.roc_auc_score(y, s), abs=1e-12)
        assert metrics.auprc(s, y) == pytest.approx(sk.average_precision_score(y, s), abs=1e-12)


def test_threshold_and_tpr():
    neg = np.arange(100, dtype=float)  # 0 .. 99
    t = metrics.threshold_at_fpr(neg, 0.01)
    assert t == 98.0  # only 99 lies above: FPR exactly 1%
    assert (neg > t).mean() == 0.01
    assert metrics.threshold_at_fpr(neg, 0.0) == 99.0
    tpr, fpr = metrics.tpr_at_threshold([97, 99, 100, 1, 99.5], [1, 1, 1, 0, 0], 98.0)
    assert (tpr, fpr) == (2 / 3, 0.5)
    with pytest.raises(ValueError, match="fpr"):
        metrics.threshold_at_fpr(neg, 1.5)


def test_bad_input_names_the_problem():
    with pytest.raises(ValueError, match="same length"):
        metrics.auroc([1, 2, 3], [0, 1])
    with pytest.raises(ValueError, match="NaN"):
        metrics.auroc([1, float("nan")], [0, 1])
    with pytest.raises(ValueError, match="0 or 1"):
        metrics.auroc([1, 2], [0, 2])


def test_bootstrap_known_case():
    """Scores that separate perfectly give AUROC 1 in every resample; pure noise gives an interval that
    covers 0.5 and whose width is that of the binomial-like spread of a 200-document AUROC (about ±0.08)."""
    groups = np.repeat(np.arange(100), 4)
    y = np.tile([0, 1, 0, 1], 100)
    perfect = y + 0.01 * np.arange(400) / 400
    iv = metrics.bootstrap(lambda i: metrics.auroc(perfect[i], y[i]), groups, reps=200)
    assert (iv.value, iv.low, iv.high) == (1.0, 1.0, 1.0)
    rng = np.random.default_rng(0)
    noise = rng.normal(size=400)
    iv = metrics.bootstrap(lambda i: metrics.auroc(noise[i], y[i]), groups, reps=500)
    assert iv.low < 0.5 < iv.high
    # Hanley-McNeil SE of AUROC 0.5 with 200 vs 200 items is 0.029: the 95% interval is about ±0.057.
    assert 0.07 < iv.high - iv.low < 0.17


def test_bootstrap_coverage():
    """A 95% interval of a mean covers the true mean in roughly 95% of 200 simulated data sets."""
    rng = np.random.default_rng(1)
    covered = 0
    for trial in range(200):
        x = rng.normal(size=60)
        iv = metrics.bootstrap(lambda i: float(x[i].mean()), np.arange(60), reps=300, seed=trial)
        covered += iv.low <= 0.0 <= iv.high
    assert 0.88 <= covered / 200 <= 0.99


def test_bootstrap_resamples_whole_documents():
    """Items of one document travel together: with one document per class, every resample that draws both
    documents has the same AUROC."""
    groups = np.array([0, 0, 0, 1, 1, 1])
    y = np.array([0, 0, 0, 1, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    iv = metrics.bootstrap(lambda i: metrics.auroc(s[i], y[i]), groups, reps=100)
    assert iv.low == iv.high == 1.0 and iv.reps < 100  # single-class resamples dropped


def test_logistic_against_sklearn_and_separation():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(400, 3)) * [1.0, 10.0, 0.1]
    y = (x @ [1.0, 0.1, 5.0] + rng.normal(size=400) > 0).astype(int)
    model = metrics.Logistic(lam=2.0).fit(x, y)
    lm = pytest.importorskip("sklearn.linear_model")
    z = (x - x.mean(0)) / x.std(0)
    ref = lm.LogisticRegression(C=1 / 2.0, tol=1e-12, max_iter=10000).fit(z, y)
    assert np.allclose(model.coef[1:], ref.coef_[0], atol=1e-6)
    assert model.coef[0] == pytest.approx(ref.intercept_[0], abs=1e-6)


def test_logistic_separable_data_stays_finite():
    x = np.r_[np.zeros((20, 1)), np.ones((20, 1))]
    y = np.r_[np.zeros(20), np.ones(20)]
    m = metrics.Logistic(lam=1.0).fit(x, y)
    d = m.decision(x)
    assert np.isfinite(d).all() and (d[20:] > d[:20]).all()
    assert m.iterations < 100


def test_logistic_optimum_has_zero_gradient():
    """Without scikit-learn: at the fitted weights the penalised log-likelihood's gradient is zero."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(200, 2))
    y = (x[:, 0] + rng.normal(size=200) > 0).astype(float)
    m = metrics.Logistic(lam=0.5).fit(x, y)
    a = np.c_[np.ones(200), (x - m.mean) / m.std]
    p = 1 / (1 + np.exp(-(a @ m.coef)))
    grad = a.T @ (p - y) + 0.5 * np.r_[0.0, m.coef[1:]]
    assert np.abs(grad).max() < 1e-8
    assert m.coef[1] > 1.0  # the informative input gets a large weight, the other a small one
    assert abs(m.coef[2]) < 0.5
