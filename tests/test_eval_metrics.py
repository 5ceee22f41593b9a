"""Report metrics of eval.py against the reference packages: sacrebleu (BLEU-1..4) and rouge-score (ROUGE-L),
and the bootstrap interval against a plain re-computation."""
import importlib.util
import os
import random
from pathlib import Path

import numpy as np
import pytest
import sacrebleu
from rouge_score import rouge_scorer

import eval as ev


def sacrebleu_corpus(hyps, refs, order, lowercase=False):
    """The reference: sacrebleu's corpus BLEU with its defaults (13a, exp smoothing) and max order `order`."""
    return sacrebleu.BLEU(max_ngram_order=order, lowercase=lowercase).corpus_score(hyps, [refs]).score


def radlabels_reports(n):
    """Real-style chest X-ray reports shipped by radlabels (read as files: importing radlabels calls nltk)."""
    spec = importlib.util.find_spec("radlabels")
    if spec is None:
        pytest.fail("radlabels is not installed: run `make setup` (it installs radlabels --no-deps)")
    folder = Path(spec.submodule_search_locations[0]) / "samples" / "synthetic_reports"
    files = sorted(folder.glob("synth_*.txt"))[:n]
    return [" ".join(f.read_text().split()) for f in files]


HAND_PAIRS = [   # (hypothesis, reference): tokenizer and smoothing corner cases
    ("Findings: No acute cardiopulmonary process. Impression: Normal chest.",
     "Findings: No acute cardiopulmonary process. Impression: Normal chest radiograph."),
    ("Small left pleural effusion.", "Small left pleural effusion, unchanged since 12/03."),
    ("The ET tube is 3.5 cm above the carina.", "ET tube terminates 3.5cm above the carina; NG tube in stomach."),
    ("Compression deformity of T-12 vertebra.", "Mild compression deformity of the T12 vertebral body."),
    ("Heart size normal &amp; lungs clear.", "Heart size is normal and the lungs are clear."),
    ("", "No pneumothorax."),
    ("cardiomegaly", "Cardiomegaly with pulmonary edema."),
    ("Lines and tubes\nas above -\nunchanged.", "Lines and tubes as above, unchanged."),
    ("Right lower lobe opacity, likely pneumonia (see prior 1,200 mL).", "RLL pneumonia."),
]


def report_pairs():
    reports = radlabels_reports(40)
    random.Random(0).shuffle(shuffled := list(reports))
    # a model's report vs another study's: partial overlap, different lengths; plus truncated copies
    pairs = list(zip(shuffled[:20], reports[:20]))
    pairs += [(r[: len(r) // 3], r) for r in reports[20:30]]
    return pairs + HAND_PAIRS


@pytest.mark.parametrize("lowercase", [False, True])
@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_corpus_bleu_equals_sacrebleu(order, lowercase):
    pairs = report_pairs()
    hyps, refs = [h for h, _ in pairs], [r for _, r in pairs]
    expected = sacrebleu_corpus(hyps, refs, order, lowercase)
    assert ev.corpus_bleu(hyps, refs, max_order=order, lowercase=lowercase) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("hyp,ref", HAND_PAIRS + [("a b c", "a b c d e f"), ("x y", "x y"), ("x", "y")])
@pytest.mark.parametrize("order", [1, 4])
def test_single_pair_bleu_equals_sacrebleu(hyp, ref, order):
    expected = sacrebleu_corpus([hyp], [ref], order)
    assert ev.corpus_bleu([hyp], [ref], max_order=order) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("text", [h for h, _ in HAND_PAIRS] + ["(see 4:45 p.m.) {x} [y] a-b 1-2 $3,000.5"])
def test_tokenize_13a_equals_sacrebleu(text):
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a
    assert ev.tokenize_13a(text) == Tokenizer13a()(text.rstrip()).split()


def test_rouge_l_equals_rouge_score():
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    for hyp, ref in report_pairs():
        expected = scorer.score(ref, hyp)["rougeL"]
        precision, recall, f = ev.rouge_l(ref, hyp)
        assert (precision, recall, f) == pytest.approx((expected.precision, expected.recall, expected.fmeasure))


def test_summary_report_metrics_equal_references(tmp_path):
    pairs = report_pairs()[:12]
    records = [ev.make_record({"id": f"r{i}", "benchmark": "mimic_cxr", "question_type": "report", "question": "",
                               "options": None, "answer": ref}, hyp) for i, (hyp, ref) in enumerate(pairs)]
    report = ev.summarize(records)["mimic_cxr"]["report"]
    hyps, refs = [h for h, _ in pairs], [r for _, r in pairs]
    for n in range(1, 5):
        assert report[f"bleu{n}"] == pytest.approx(sacrebleu_corpus(hyps, refs, n))
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    mean_f = np.mean([scorer.score(r, h)["rougeL"].fmeasure for h, r in pairs]) * 100
    assert report["rouge_l"] == pytest.approx(mean_f)
    for name in ("radgraph_f1", "ratescore", "green"):   # not installed here: a clear note, not a number
        assert isinstance(report[name], str) and report[name].startswith("skipped:")


def test_bootstrap_interval():
    correct = np.array([1] * 70 + [0] * 30, dtype=float)
    lo, hi = ev.bootstrap_ci(correct, n_resamples=1000, seed=0)
    rng = np.random.default_rng(0)
    means = [correct[rng.integers(0, 100, 100)].mean() * 100 for _ in range(1000)]
    assert (lo, hi) == pytest.approx((np.percentile(means, 2.5), np.percentile(means, 97.5)))
    assert lo < 70 < hi
    # the normal approximation, sqrt(p(1-p)/n) = 4.58 points, is close to a 95% bootstrap's half width
    assert (hi - lo) / 2 == pytest.approx(1.96 * np.sqrt(0.7 * 0.3 / 100) * 100, rel=0.15)
    assert ev.bootstrap_ci([1.0] * 5) == [100.0, 100.0]
    assert ev.bootstrap_ci([]) is None


def test_clinical_metrics_are_skipped_with_a_reason(monkeypatch, tmp_path):
    import importlib.util
    real_find_spec = importlib.util.find_spec
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "MEDGPT_GREEN_MODEL", "MEDGPT_RATESCORE_HF_HOME"):
        monkeypatch.setenv(key, "recorded")   # so that monkeypatch restores what the metrics code sets
        monkeypatch.delenv(key)
    notes = ev.clinical_metrics(["a"], ["b"])   # none of the packages is installed here
    assert notes == {"radgraph_f1": "skipped: package 'radgraph' is not installed",
                     "ratescore": "skipped: package 'RaTEScore' is not installed",
                     "green": "skipped: package 'green_score' is not installed"}
    # "installed" (a stand-in spec) but no weights: says which variable to set
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name in ("green_score", "RaTEScore") else real_find_spec(name, *a))
    monkeypatch.setenv("MEDGPT_GREEN_MODEL", str(tmp_path))
    notes = ev.clinical_metrics(["a"], ["b"])
    assert notes["ratescore"] == "skipped: set MEDGPT_RATESCORE_HF_HOME to a local directory holding its weights"
    # weights given but the package breaks: the run survives, offline mode was on
    assert notes["green"].startswith("skipped: green failed (ModuleNotFoundError")
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["TRANSFORMERS_OFFLINE"] == "1"
