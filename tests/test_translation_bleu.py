"""The batched sentence-BLEU reward equals sacrebleu's sentence_bleu to 1e-9, its fast 13a
tokenizer equals sacrebleu's exactly, chrF equals sentence_chrf, and corpus BLEU carries
sacrebleu's signature."""

import math
import random

import numpy as np
import pytest
import sacrebleu
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

from tasks.translation.bleu import SentenceBLEU, SentenceCHRF, bleu_from_stats, corpus_bleu, corpus_contributions, tokenize_13a
from tasks.translation.data import MULTI30K_ENV, load_split, resolve_data_dir

# Hand-made cases for every branch of the formula: exact match, no match, too short for
# 4-grams (effective order), zero-match orders (exp smoothing), brevity penalty, longer than
# the reference, repeated n-grams (clipping), empty strings, punctuation and digits (13a).
EDGE = [
    ("Ein Hund rennt über die Wiese.", "Ein Hund rennt über die Wiese."),
    ("Katze", "Ein Hund rennt."),
    ("Ein Hund", "Ein Hund rennt über die Wiese."),
    ("Hund Ein rennt die über Wiese", "Ein Hund rennt über die Wiese."),
    ("der der der der der der", "der Mann und der Hund"),
    ("Ein Hund rennt über die große grüne Wiese im Park am Abend.", "Ein Hund rennt."),
    ("", "Ein Hund rennt."),
    ("Ein Hund rennt.", ""),
    ("", ""),
    ("Zwei (2) Männer, 3-4 Frauen & \"Kinder\" ... 1,5 km.", "Zwei Männer, 3-4 Frauen & Kinder gehen 1,5 km."),
    ("a", "a"),
    ("a b", "a b c d e"),
]


def multi30k_dir():
    d = resolve_data_dir(None)
    if not (d / "val.de.gz").is_file():
        pytest.skip(f"Multi30k not found in {d} (set {MULTI30K_ENV}); see docs/translation.md")
    return d


def perturbed(refs, seed):
    """Real hypotheses: references with words dropped, repeated and swapped, or other sentences."""
    rng = random.Random(seed)
    out = []
    for r in refs:
        w = r.split()
        if rng.random() < 0.2:
            out.append(refs[rng.randrange(len(refs))])
            continue
        for _ in range(rng.randint(0, 5)):
            if w and rng.random() < 0.4:
                del w[rng.randrange(len(w))]
            elif w:
                w.insert(rng.randrange(len(w) + 1), rng.choice(w))
        out.append(" ".join(w))
    return out


def expected(hyps, refs):
    return np.array([sacrebleu.sentence_bleu(h, [r]).score for h, r in zip(hyps, refs)])


def test_edge_cases_equal_sacrebleu():
    hyps, refs = zip(*EDGE)
    got = SentenceBLEU().scores(hyps, refs)
    want = expected(hyps, refs)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)
    assert want[0] == pytest.approx(100.0) and want[1] == 0.0 and 0 < want[2] < want[0]  # the cases exercise the range
    np.testing.assert_allclose(SentenceBLEU().rewards(hyps, refs), want / 100, rtol=0, atol=1e-11)


def test_multi30k_pairs_equal_sacrebleu_and_cache_is_transparent():
    pairs, _ = load_split(multi30k_dir(), "val", "text", "en", "de")
    refs = [p.tgt for p in pairs]
    hyps = perturbed(refs, 0)
    metric = SentenceBLEU()
    metric.prepare(refs[:500])  # half the references cached beforehand, half computed on the fly
    got = metric.scores(hyps, refs)
    want = expected(hyps, refs)
    assert np.abs(got - want).max() <= 1e-9
    assert 0 < np.median(want) < 100 and (want == 0).any()
    again = metric.scores(hyps, refs)  # every reference now cached: same scores
    assert np.array_equal(again, got)


def test_stats_formula_matches_sacrebleu_compute_bleu_on_random_statistics():
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(2000):
        c = int(rng.integers(0, 30))
        total = [max(c - n, 0) for n in range(4)]
        correct = [int(rng.integers(0, t + 1)) if t else 0 for t in total]
        rows.append([c, int(rng.integers(0, 30)), *correct, *total])
    got = bleu_from_stats(np.array(rows))
    want = [sacrebleu.BLEU.compute_bleu(r[2:6], r[6:], r[0], r[1], smooth_method="exp", effective_order=True).score for r in rows]
    assert np.abs(got - np.array(want)).max() <= 1e-9


def test_fast_13a_tokenizer_equals_sacrebleu():
    rng = random.Random(0)
    alphabet = "ab1209 .,-&;<>/'\"\n\t{}[]~`@:äß€quotamplgskipped  "
    lines = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30))) for _ in range(15_000)]
    lines += ["&quot;a&amp;b&lt;&gt;", "<skipped>x", "1-2", "a-\nb", "3.5,6 .7 8, x.y", "..,,--", ""]
    ref = Tokenizer13a()
    assert [tokenize_13a(x) for x in lines] == [ref(x) for x in lines]


def test_fast_13a_tokenizer_equals_sacrebleu_on_multi30k():
    d = multi30k_dir()
    ref = Tokenizer13a()
    pairs, _ = load_split(d, "train", "text", "en", "de")
    text = [p.tgt for p in pairs[:15_000]] + [p.src for p in pairs[15_000:]]
    assert [tokenize_13a(x) for x in text] == [ref(x) for x in text]


def test_chrf_and_corpus_bleu_match_sacrebleu():
    hyps, refs = zip(*EDGE[:6])
    want = [sacrebleu.sentence_chrf(h, [r]).score for h, r in zip(hyps, refs)]
    np.testing.assert_allclose(SentenceCHRF().scores(hyps, refs), want, rtol=0, atol=1e-9)
    res = corpus_bleu(hyps, refs)
    direct = sacrebleu.corpus_bleu(list(hyps), [list(refs)])
    assert res.score == pytest.approx(direct.score, abs=1e-9)
    assert res.ratio == pytest.approx(direct.sys_len / direct.ref_len)
    # the brevity penalty (Papineni et al. 2002): 1 when the output is as long as the references, else exp(1 − r/c)
    assert res.bp == pytest.approx(1.0 if res.ratio >= 1 else math.exp(1 - 1 / res.ratio))
    short = corpus_bleu(["a man rides"], ["a man rides a red bike"])
    assert short.bp == pytest.approx(math.exp(1 - 6 / 3))
    assert res.signature.startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:")


def test_corpus_contributions_equal_a_loop_of_sacrebleu_corpus_scores():
    """R_i = B·(BLEU(all) − BLEU(all but i))/100, each BLEU from sacrebleu's corpus_score."""
    refs = [r for _, r in EDGE if r] * 2 + ["Ein Mann fährt Fahrrad auf der Straße.", "Zwei Kinder spielen im Sand am Strand."]
    hyps = perturbed(refs, seed=3)
    got = corpus_contributions(SentenceBLEU().stats(hyps, refs))
    full = sacrebleu.corpus_bleu(hyps, [refs]).score
    want = [len(hyps) * (full - sacrebleu.corpus_bleu(hyps[:i] + hyps[i + 1:], [refs[:i] + refs[i + 1:]]).score) / 100 for i in range(len(hyps))]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)
    assert got.min() < 0 < got.max()  # a hypothesis below the batch's precision pulls corpus BLEU down


def test_corpus_contributions_reward_length_when_the_batch_is_short():
    """The other translations of the batch are much shorter than their references, so the
    corpus brevity penalty is active: each further correct word of the last translation (its
    reference's prefixes) raises its share of the corpus BLEU."""
    ref = "Ein kleiner Junge in einem roten Hemd spielt mit einem Ball im Garten ."
    others = ["Ein Hund läuft .", "Eine Frau liest ein Buch ."]  # short outputs of long references
    other_refs = ["Ein brauner Hund läuft schnell über eine große Wiese im Park .", "Eine junge Frau liest ein dickes Buch auf einer Bank im Park ."]
    words = ref.split()
    shares = [corpus_contributions(SentenceBLEU().stats(others + [" ".join(words[:n])], other_refs + [ref]))[-1] for n in range(6, len(words) + 1)]
    assert all(b > a for a, b in zip(shares, shares[1:]))


def test_mismatched_lengths_are_refused():
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        SentenceBLEU().scores(["a", "b"], ["a"])
