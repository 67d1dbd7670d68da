"""Task builders: labels and character spans are right, every split has its count, no host or donor
document is in both splits, the matched splice's own negatives are paired with its positives by nearest
surprisal scores (much nearer them than the shared negatives are to unmatched splices, also on a trained
model), bad corpora raise."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("transformers")

from mppm_ext.anomaly import features as F  # noqa: E402
from mppm_ext.anomaly import tasks as T  # noqa: E402
from mppm_ext.models.loading import installed_gguf  # noqa: E402
from mppm_ext.models.tokenizer import byte_tokenizer  # noqa: E402

LENGTH, SPAN, CONT = 48, 10, 20


WORDS = ["alpha", "beta", "gamma", "delta", "sea", "ship", "wind", "stone", "fire."]


def docs(prefix: str, n: int, size: int = 400, words=WORDS) -> list[str]:
    rng = np.random.default_rng(len(prefix) + n)
    return [f"{prefix}{d} " + " ".join(rng.choice(words, size // 5)) for d in range(n)]


#: Donor words: none a host word (a donor span is no piece of the host text), some upper-case, whose bytes
#: are less "surprising" under the fake model, so that splices shift the surprisal scores and the matching
#: has something to undo.
DONOR_WORDS = ["SHIP", "WIND", "SEA", "moon", "rock", "tide", "oar", "salt."]


def fake_surprisal(seqs):
    """Surprisal of token t+1 = its byte value / 10 (known, so the matched choice can be checked)."""
    return [np.r_[np.asarray(s[1:], dtype=float) / 10, np.nan] for s in seqs]


def fake_sampler(prompts, temperature):
    return [[ord("z")] * CONT if temperature > 1 else [ord("a")] * CONT for _ in prompts]


@pytest.fixture(scope="module")
def built():
    tok = byte_tokenizer()
    host = T.passages(tok, docs("host", 30), "host", LENGTH, seed=1)
    donor = T.passages(tok, docs("donor", 30, words=DONOR_WORDS), "donor", LENGTH, seed=2)
    b = T.Builder(tok, host, donor, length=LENGTH, span=SPAN, seed=0, surprisal=fake_surprisal,
                  sampler=fake_sampler, continuation=CONT)
    items = b.build(6, n_pilot=3, grid=(0.5, 1.5))
    return tok, b, host, donor, items


def test_counts_labels_and_splits(built):
    tok, b, host, donor, items = built
    for split in T.SPLITS:
        assert sum(it.task == "natural" and it.split == split for it in items) == 6
        for task in T.TASKS:
            group = [it for it in T.items_for(items, task) if it.split == split]
            pos, neg = [it for it in group if it.label == 1], [it for it in group if it.label == 0]
            assert len(pos) == len(neg) == 6 and all(it.task == task and it.span is not None for it in pos)
            assert {it.task for it in neg} == {task if task in T.OWN_NEGATIVES else "natural"}
    assert all(it.span is None for it in items if it.label == 0)
    host_split = {}
    for it in items:
        assert host_split.setdefault(it.doc, it.split) == it.split, f"{it.doc} in both splits"
    donor_split = {}
    for it in items:
        if it.source is not None:
            assert donor_split.setdefault(it.source, it.split) == it.split
    assert donor_split, "spliced items record their donor document"
    for split in T.SPLITS:  # the passages themselves respect the document split
        assert {p.split for p in host[split]} == {split}


def test_spans_point_at_the_anomaly(built):
    tok, b, host, donor, items = built
    by_task = {t: [it for it in items if it.task == t and it.label == 1] for t in T.TASKS}
    for it in by_task["splice"] + by_task["splice_matched"]:
        s, e = it.span
        assert e - s == SPAN  # byte tokens: one character per token
        donor_texts = [tok.decode(p.ids) for p in donor[it.split] if p.doc == it.source]
        assert any(it.text[s:e] in d for d in donor_texts), "the span is a piece of its donor document"
        assert it.text[s:e] not in it.text[:s] + it.text[e:]  # and not of the host passage around it
    for it in by_task["repetition"]:
        s, e = it.span
        loop = it.text[s:e]
        period = next(r for r in range(4, 9) if it.text[s - r:s] == loop[:r])
        assert loop == (it.text[s - period:s] * 9)[:SPAN]
    for it in by_task["injection"]:
        s, e = it.span
        inj = it.text[s:e].strip()
        templates = T.INJECTIONS[0::2] if it.split == "calibration" else T.INJECTIONS[1::2]
        assert any(inj.startswith(t.split("{act}")[0].strip()[:12]) for t in templates), inj
        assert len(tok.encode(it.text, add_special_tokens=False)) <= LENGTH + len(inj) + 1
    for it in by_task["shuffle"]:
        s, e = it.span
        assert e - s == SPAN
        original = next(p for split in T.SPLITS for p in host[split] if p.doc == it.doc
                        and tok.decode(p.ids)[:s] == it.text[:s] and tok.decode(p.ids)[e:] == it.text[e:])
        assert sorted(tok.decode(original.ids)[s:e]) == sorted(it.text[s:e])
    for it in by_task["sampled"]:
        s, e = it.span
        assert e == len(it.text) and it.text[s:e] == "a" * CONT  # temperature 0.5 matched the human text


def test_matched_splice_pairs_its_own_negatives(built):
    tok, b, host, donor, items = built

    def scores(group):
        return np.array([F.window_scores(fake_surprisal([tok.encode(it.text, add_special_tokens=False)])[0],
                                         b.window) for it in group])

    shared = [it for it in items if it.task == "natural"]
    for split in T.SPLITS:
        pos = [it for it in items if it.task == "splice_matched" and it.label == 1 and it.split == split]
        neg = [it for it in items if it.task == "splice_matched" and it.label == 0 and it.split == split]
        # The negatives are natural host passages verbatim, of this split, none of them a shared negative.
        texts = {tok.decode(p.ids) for p in host[split]}
        assert all(it.text in texts and it.source is None for it in neg)
        neg_texts = {it.text for it in neg}
        assert not neg_texts & {it.text for it in shared} and not neg_texts & {it.text for it in pos}
        # Under the fake model the splices lower the lowest window (upper-case donor bytes): the kept pairs'
        # classes are much nearer each other than unmatched splices are to the shared negatives.
        unmatched = scores([it for it in items if it.task == "splice" and it.split == split])
        natural = scores([it for it in shared if it.split == split])
        p, q = scores(pos), scores(neg)
        scale = np.asarray(b.match[split]["scale"])
        gap = np.abs(p.mean(0) - q.mean(0)) / scale
        unmatched_gap = np.abs(unmatched.mean(0) - natural.mean(0)) / scale
        assert unmatched_gap[1] > 0.5 and gap[1] < 0.25 * unmatched_gap[1], (gap, unmatched_gap)
        # The recorded means are those of the kept texts (scored here the same way).
        m = b.match[split]
        np.testing.assert_allclose(m["kept_positives"], p.mean(0), rtol=1e-12)
        np.testing.assert_allclose(m["kept_negatives"], q.mean(0), rtol=1e-12)
        assert m["pool"] == 4 * 6 and m["median_gap"] <= m["max_gap"]


def test_nearest_pairs_greedy_and_disjoint():
    pos = np.array([[0.0], [1.0], [5.0]])
    neg = np.array([[1.1], [0.2], [9.0], [4.0]])
    i, j = T.nearest_pairs(pos, neg, 3)
    # Nearest first: (1, 0) at 0.1, then (0, 1) at 0.2, then (2, 3) at 1.0; never a row twice.
    assert i.tolist() == [1, 0, 2] and j.tolist() == [0, 1, 3]
    i, j = T.nearest_pairs(np.array([[0.0], [0.1]]), np.array([[0.05], [3.0]]), 2)
    assert sorted(j.tolist()) == [0, 1] and len(set(i.tolist())) == 2
    with pytest.raises(ValueError, match="cannot pair 3 items"):
        T.nearest_pairs(pos, neg[:2], 3)


@pytest.mark.skipif(installed_gguf("smollm2-135m") is None, reason="SmolLM2-135M is not installed (mppm setup)")
def test_matched_splice_in_context_on_a_trained_model():
    """On SmolLM2-135M (small sizes), the matched splice's positives and its own negatives are much nearer
    each other in text surprisal (highest window, the bench's surprisal feature, and mean) than the unmatched
    splice's positives are to the shared negatives, when the bench's monitor scores the texts."""
    from mppm_ext import models
    from mppm_ext.anomaly.bench import QUICK, task_builder
    from mppm_ext.monitor import EnergyMonitor

    lm = models.load("smollm2-135m")
    b = task_builder(lm, QUICK)
    items = b.build(10, tasks=("splice", "splice_matched"))
    recs = EnergyMonitor(lm.model, window=QUICK.window).run([it.text for it in items], lm.tokenizer)
    stats = np.array([F.window_scores(r["surprisal"], QUICK.window) for r in recs])
    task, label = np.array([it.task for it in items]), np.array([it.label for it in items])
    natural, unmatched = stats[task == "natural"].mean(0), stats[task == "splice"].mean(0)
    matched_pos, matched_neg = (stats[(task == "splice_matched") & (label == y)].mean(0) for y in (1, 0))
    gap, unmatched_gap = np.abs(matched_pos - matched_neg), np.abs(unmatched - natural)
    assert gap[2] < 0.25 * unmatched_gap[2] and gap[0] < 0.25 * unmatched_gap[0], (gap, unmatched_gap)


def test_temperature_search_and_jsonl(built, tmp_path):
    tok, b, host, donor, items = built
    assert b.temperature == 0.5 and len(b.temperature_search) == 2
    path = tmp_path / "tasks.jsonl"
    T.write_jsonl(items, path, T.TASKS)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == len(T.TASKS) * 4 * 6
    assert set(rows[0]) >= {"task", "doc", "text", "label", "span"}
    assert {r["task"] for r in rows} == set(T.TASKS)
    shared = {it.text for it in items if it.task == "natural"}
    for task in T.TASKS:  # the shared negatives under every task but those with their own
        neg = {r["text"] for r in rows if r["task"] == task and r["label"] == 0}
        assert (neg == shared) == (task not in T.OWN_NEGATIVES) and len(neg) == 12


def test_bad_corpora():
    tok = byte_tokenizer()
    with pytest.raises(ValueError, match="is empty"):
        T.passages(tok, [], "empty", LENGTH, seed=0)
    with pytest.raises(ValueError, match="no passage of 48 tokens"):
        T.passages(tok, ["short text", "another short one"], "short", LENGTH, seed=0)
    host = T.passages(tok, docs("host", 4), "host", LENGTH, seed=1)
    b = T.Builder(tok, host, host, length=LENGTH, span=SPAN, seed=0, surprisal=fake_surprisal,
                  sampler=fake_sampler, continuation=CONT)
    with pytest.raises(ValueError, match="needs .* passages, the corpus gives"):
        b.build(100, tasks=("shuffle",))
    with pytest.raises(ValueError, match="unknown tasks"):
        b.build(1, tasks=("nope",))
    with pytest.raises(ValueError, match="span must be"):
        T.Builder(tok, host, host, length=LENGTH, span=40, seed=0, surprisal=fake_surprisal,
                  sampler=fake_sampler, continuation=CONT)


def test_interpolate_temperature():
    search = [dict(temperature=0.9, mean_surprisal=3.0), dict(temperature=1.1, mean_surprisal=4.0),
              dict(temperature=1.3, mean_surprisal=6.0)]
    assert T.interpolate_temperature(search, 3.5) == 1.0
    assert T.interpolate_temperature(search, 5.0) == 1.2
    assert T.interpolate_temperature(search, 9.0) == 1.3  # outside the grid: the nearest end
    assert T.interpolate_temperature(search, 1.0) == 0.9
