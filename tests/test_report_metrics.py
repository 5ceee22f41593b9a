"""report_metrics.py against the reference packages and formulas: sacrebleu (BLEU-1..4), rouge-score (ROUGE-L), nltk
(RadCliQ's BLEU-2), CXR-Report-Metric's RadCliQ-v1 composite and RadGraph F1s, CheXbert's s_emb (transformers), and
bert-score / radgraph / RaTEScore where installed; every model-based metric's "not computed" path; the bootstrap
interval."""
import importlib.util
import os
import random
import re
import socket
from pathlib import Path

import numpy as np
import pytest
import sacrebleu
from rouge_score import rouge_scorer

import eval as ev
import report_fixtures as F
import report_metrics as rm
from report_fixtures import report_words, tiny_bert, write_bertscore_model, write_chexbert_model, write_radgraph_model


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
    assert rm.corpus_bleu(hyps, refs, max_order=order, lowercase=lowercase) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("hyp,ref", HAND_PAIRS + [("a b c", "a b c d e f"), ("x y", "x y"), ("x", "y")])
@pytest.mark.parametrize("order", [1, 4])
def test_single_pair_bleu_equals_sacrebleu(hyp, ref, order):
    expected = sacrebleu_corpus([hyp], [ref], order)
    assert rm.corpus_bleu([hyp], [ref], max_order=order) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("text", [h for h, _ in HAND_PAIRS] + ["(see 4:45 p.m.) {x} [y] a-b 1-2 $3,000.5"])
def test_tokenize_13a_equals_sacrebleu(text):
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a
    assert rm.tokenize_13a(text) == Tokenizer13a()(text.rstrip()).split()


def test_rouge_l_equals_rouge_score():
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    for hyp, ref in report_pairs():
        expected = scorer.score(ref, hyp)["rougeL"]
        precision, recall, f = rm.rouge_l(ref, hyp)
        assert (precision, recall, f) == pytest.approx((expected.precision, expected.recall, expected.fmeasure))


def test_summary_report_metrics_equal_references(tmp_path):
    pairs = report_pairs()[:12]
    records = [ev.make_record({"id": f"r{i}", "benchmark": "mimic_cxr_findings", "question_type": "report",
                               "question": "", "options": None, "answer": ref}, hyp)
               for i, (hyp, ref) in enumerate(pairs)]
    report = ev.summarize(records)["mimic_cxr_findings"]["report"]
    hyps, refs = [h for h, _ in pairs], [r for _, r in pairs]
    for n in range(1, 5):   # the paper's 0-1 scale
        assert report[f"bleu{n}"] == pytest.approx(sacrebleu_corpus(hyps, refs, n) / 100)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    assert report["rouge_l"] == pytest.approx(np.mean([scorer.score(r, h)["rougeL"].fmeasure for h, r in pairs]))


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



# ---------------------------------------------------------------------------------------------------- RadCliQ-v1

# The float64 byte strings of CXR-Report-Metric's CXRMetric/radcliq-v1.pkl (commit 9c9ecad) as `pickletools.dis`
# lists them: StandardScaler mean_, scale_, and the CompositeMetric's coefs (intercept last).
PICKLE_BYTES = {
    "mean": b"\x14\x95=\x8e\xaa6\xe1?\x93\xf8\x05\x89'\xc3\xe3?ff&\xb61y\xe8?\xf5\xc6\x82\xca\xed\xa1\xdc?",
    "scale": b"\xc5~\x07\xa3\x7fa\xd3?\x91\xaa\x81\x7f+\xb6\xcc?%\x855\xf6\x9d@\xd0?!L\xa6i\x9f!\xd3?",
    "coefs": b"\xea\xad*\x99#\"\xd8\xbf\x84\x01\x870\xff\xb2\xd7\xbf\xe2W\x936\xdd*\xd0\xbfhe_\x06P\xfa\x92="
             b"\xc0\xee\x04\x854\xf3\xf0=",
}


def test_radcliq_constants_are_the_pickles_numbers():
    assert rm.RADCLIQ_V1_MEAN == tuple(np.frombuffer(PICKLE_BYTES["mean"], "<f8"))
    assert rm.RADCLIQ_V1_SCALE == tuple(np.frombuffer(PICKLE_BYTES["scale"], "<f8"))
    assert rm.RADCLIQ_V1_COEF + (rm.RADCLIQ_V1_INTERCEPT,) == tuple(np.frombuffer(PICKLE_BYTES["coefs"], "<f8"))


def reference_radcliq(x):
    """CXR-Report-Metric's CompositeMetric.predict: scaler.transform, a column of ones, @ coefs."""
    mean, scale = np.frombuffer(PICKLE_BYTES["mean"], "<f8"), np.frombuffer(PICKLE_BYTES["scale"], "<f8")
    norm_x = (np.asarray(x) - mean) / scale
    norm_x = np.concatenate((norm_x, np.ones((norm_x.shape[0], 1))), axis=1)
    return norm_x @ np.frombuffer(PICKLE_BYTES["coefs"], "<f8")


FIXED_COMPONENTS = np.array([   # radgraph_combined, bertscore, semb, bleu2 of four reports
    [0.5379231241355762, 0.6175725628125001, 0.7647942121140658, 0.44738335396242174],   # the scaler's mean
    [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.25, 0.41, 0.83, 0.12]])


def test_radcliq_v1_equals_the_reference_formula():
    ours = rm.radcliq_v1(FIXED_COMPONENTS)
    assert ours == pytest.approx(reference_radcliq(FIXED_COMPONENTS), abs=1e-12)
    assert ours[0] == pytest.approx(rm.RADCLIQ_V1_INTERCEPT)   # the mean report scores the intercept
    assert ours[2] < ours[3] < ours[1]                         # better parts, lower RadCliQ
    sklearn = pytest.importorskip("sklearn.preprocessing")    # the reference object itself, where installed
    scaler = sklearn.StandardScaler()
    scaler.mean_, scaler.scale_ = np.array(rm.RADCLIQ_V1_MEAN), np.array(rm.RADCLIQ_V1_SCALE)
    scaler.var_, scaler.n_features_in_, scaler.n_samples_seen_ = scaler.scale_ ** 2, 4, 160
    x = np.concatenate((scaler.transform(FIXED_COMPONENTS), np.ones((4, 1))), axis=1)
    assert ours == pytest.approx(x @ np.frombuffer(PICKLE_BYTES["coefs"], "<f8"), abs=1e-12)


@pytest.mark.parametrize("hyp,ref", HAND_PAIRS[:5] + [("a b c", "a b c d e f"), ("x y", "x y"), ("x", "y"),
                                                      ("no acute process .", "no acute process.")])
def test_radcliq_bleu2_equals_nltk(hyp, ref):
    from nltk.translate.bleu_score import sentence_bleu
    h, r = rm.radcliq_tokens(hyp), rm.radcliq_tokens(ref)
    expected = sentence_bleu([r], h, weights=(0.5, 0.5)) if h else 0.0
    assert rm.radcliq_bleu2(hyp, ref) == pytest.approx(expected, abs=1e-12)


def annotation(entities):
    """A RadGraph annotation {"entities": {id: {tokens, label, start_ix, end_ix, relations}}} from
    [(tokens, label, [(relation, target id)])]."""
    return {"text": "", "entities": {str(i): {"tokens": t, "label": l, "start_ix": i, "end_ix": i,
                                              "relations": [list(r) for r in rel]}
                                     for i, (t, l, rel) in enumerate(entities, 1)}}


def test_radgraph_combined_by_hand():
    ref = annotation([("effusion", "OBS-DP", [("located_at", "2")]), ("pleural", "ANAT-DP", []),
                      ("pneumothorax", "OBS-DA", [])])
    hyp = annotation([("effusion", "OBS-DP", [("located_at", "2")]), ("pleural", "ANAT-DP", []),
                      ("edema", "OBS-DP", [])])
    # entities: 2 of 3 match both ways -> F1 2/3; relations: the one relation matches -> F1 1
    assert rm.radgraph_combined(hyp, ref) == pytest.approx((2 / 3 + 1.0) / 2)
    none = annotation([("edema", "OBS-DP", [])])
    assert rm.radgraph_combined(none, ref) == 0.0
    rewards = pytest.importorskip("radgraph.rewards")   # the package's partial reward on the same annotations
    assert rewards.compute_reward(hyp, ref, "partial") == pytest.approx(2 / 3)

# ---------------------------------------------------------------------------------------------------- model metrics


def test_every_model_metric_says_why_it_is_not_computed(monkeypatch):
    for env, _ in rm.MODEL_PATHS.values():
        monkeypatch.delenv(env, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")   # restored afterwards: model_path sets it only when a model runs
    out = rm.report_metrics(["No effusion."], ["Small effusion."])
    for name, (module, pip_name) in [("bertscore", rm.PACKAGES["bertscore"]), ("ratescore", rm.PACKAGES["ratescore"]),
                                     ("radgraph_f1", rm.PACKAGES["radgraph"]), ("semb", rm.PACKAGES["semb"])]:
        assert isinstance(out[name], str) and out[name].startswith("not computed: ")
        if importlib.util.find_spec(module) is None:
            assert out[name] == f"not computed: package {pip_name!r} is not installed (pip install {pip_name})"
        else:
            assert "no model: set MEDGPT_" in out[name]
    assert out["radcliq_v1"] == out["inv_radcliq_v1"] == \
        "not computed: needs radgraph_combined, bertscore, semb, which were not computed"
    assert isinstance(out["bleu4"], float) and 0 <= out["rouge_l"] <= 1
    assert out["radgraph_combined"].startswith("not computed")


def test_semb_through_the_code_path_equals_chexbert_cls_cosine(tmp_path, monkeypatch):
    """s_emb with a random CheXbert (BERT + 14 linear heads, saved the way CheXbert saves it: a DataParallel
    state dict under 'model_state_dict') from a local directory, against CheXbert's own labeler and tokenisation
    as the f1chexbert package ships them (bert_labeler, tokenize: whitespace collapsed, 512 wordpieces, an
    empty report as [CLS] [SEP]); f1chexbert calls encode_plus, which transformers 5 removed, so it runs inside
    transformers4_tokenizer_api (tested above against the tokenizer's own special tokens)."""
    import pandas as pd
    import torch
    from f1chexbert.f1chexbert import bert_labeler, tokenize
    from transformers import BertTokenizer
    reports = radlabels_reports(40)
    state = write_chexbert_model(tmp_path / "chexbert", reports)
    monkeypatch.setenv("MEDGPT_CHEXBERT_MODEL", str(tmp_path / "chexbert"))
    long_report = " ".join(reports[10:40])   # over 512 wordpieces: truncated to 511 + [SEP]
    hyps, refs = reports[:3] + [long_report, ""], reports[3:6] + [reports[6], reports[7]]
    ours = rm.model_metrics(hyps, refs)["semb"]

    labeler = bert_labeler(pretrain_path=str(tmp_path / "chexbert"))
    labeler.load_state_dict({k[len("module."):]: v for k, v in state.items()})
    labeler.eval()
    tokenizer = BertTokenizer.from_pretrained(tmp_path / "chexbert")
    with rm.transformers4_tokenizer_api():
        hyp_ids, ref_ids = tokenize(pd.Series(hyps), tokenizer), tokenize(pd.Series(refs), tokenizer)
    assert len(hyp_ids[3]) == 512 and hyp_ids[4] == [tokenizer.cls_token_id, tokenizer.sep_token_id]
    with torch.no_grad():
        def cls(ids):   # CheXbert's encoder output: the last layer's [CLS] state
            return labeler.bert(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids)))[0][0, 0]
        expected_hyp = torch.stack([cls(ids) for ids in hyp_ids])   # (N, 32)
        expected = [float(torch.nn.functional.cosine_similarity(cls(h), cls(r), dim=0))
                    for h, r in zip(hyp_ids, ref_ids)]
    ours_hyp = rm.chexbert_embeddings(hyps, str(tmp_path / "chexbert"))   # (N, 32)
    assert np.abs(ours_hyp - expected_hyp.numpy()).max() < 1e-5 * np.abs(ours_hyp).max()
    assert ours == pytest.approx(expected, abs=1e-6)
    monkeypatch.setenv("MEDGPT_CHEXBERT_MODEL", str(tmp_path / "nowhere"))
    assert "does not exist" in rm.model_metrics(hyps, refs)["semb"]


def test_transformers4_tokenizer_api_equals_the_tokenizers_own_special_tokens(tmp_path):
    """The two methods radgraph needs, against transformers 5's own post-processing of the same text."""
    from transformers import BertTokenizer
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase
    tiny_bert(tmp_path / "bert", report_words(["no left pleural effusion", "heart size is normal"]))
    tokenizer = BertTokenizer.from_pretrained(tmp_path / "bert")
    a, b = "No left pleural effusion.", "Heart size is normal."
    with rm.transformers4_tokenizer_api():
        assert tokenizer.encode_plus(a, b, return_token_type_ids=True)["input_ids"] == tokenizer(a, b)["input_ids"]
        ids_a = tokenizer(a, add_special_tokens=False)["input_ids"]
        ids_b = tokenizer(b, add_special_tokens=False)["input_ids"]
        assert tokenizer.build_inputs_with_special_tokens(ids_a) == tokenizer(a)["input_ids"]
        assert tokenizer.build_inputs_with_special_tokens(ids_a, ids_b) == tokenizer(a, b)["input_ids"]
        pieces = tokenizer.tokenize(a)   # transformers 4: a list of strings is a list of wordpieces
        assert tokenizer.encode_plus(pieces)["input_ids"] == tokenizer(a)["input_ids"]
    assert not hasattr(PreTrainedTokenizerBase, "encode_plus")   # removed again on the way out


def test_radgraph_through_the_code_path_equals_f1radgraph(tmp_path, monkeypatch):
    """RadGraph-F1 with the radgraph package's annotator on a random DyGIE model saved in the package's layout
    (tests/report_fixtures.py): our per-report partial reward equals the package's F1RadGraph, empty reports
    included, and RadCliQ's entity/relation feature is computed from the same annotations."""
    pytest.importorskip("radgraph")
    from radgraph import F1RadGraph, RadGraph
    reports = radlabels_reports(8)
    write_radgraph_model(tmp_path, reports)
    monkeypatch.setenv("MEDGPT_RADGRAPH_MODEL", str(tmp_path))
    hyps, refs = reports[:4] + [""], reports[4:] + ["No pneumothorax."]
    ours = rm.model_metrics(hyps, refs)
    with rm.transformers4_tokenizer_api():
        _, rewards, hyp_annotations, ref_annotations = F1RadGraph(
            reward_level="partial", model_type="radgraph", model_cache_dir=str(tmp_path), cuda=-1)(refs=refs, hyps=hyps)
        annotations = RadGraph(model_type="radgraph", model_cache_dir=str(tmp_path), cuda=-1)(hyps[:4] + refs[:4])
    assert ours["radgraph_f1"] == pytest.approx(rewards, abs=1e-12)
    assert ours["radgraph_combined"][:4] == pytest.approx(
        [rm.radgraph_combined(hyp_annotations[i], ref_annotations[i]) for i in range(4)], abs=1e-12)
    assert ours["radgraph_f1"][4] == ours["radgraph_combined"][4] == 0.0
    entities = [len(a["entities"]) for a in annotations.values()]
    relations = sum(len(e["relations"]) for a in annotations.values() for e in a["entities"].values())
    assert min(entities) > 0 and relations > 0, (entities, relations)   # the random model does find structure
    assert all(0 < v < 1 for v in ours["radgraph_f1"][:4]), ours["radgraph_f1"]


def test_bertscore_through_the_code_path(tmp_path, monkeypatch):
    """BERTScore (bert-score installed) with a random distilroberta-architecture model saved locally, against
    bert-score's own `score` with RadCliQ's settings."""
    bert_score = pytest.importorskip("bert_score")
    reports = radlabels_reports(8)
    model_dir = write_bertscore_model(tmp_path / "distilroberta", reports)
    monkeypatch.setenv("MEDGPT_BERTSCORE_MODEL", str(model_dir))
    hyps, refs = reports[:4], reports[4:]
    ours = rm.model_metrics(hyps, refs)["bertscore"]
    baseline = Path(bert_score.__file__).parent / "rescale_baseline" / "en" / "distilroberta-base.tsv"
    _, _, f1 = bert_score.score(hyps, refs, model_type=str(model_dir), num_layers=5, lang="en",
                                rescale_with_baseline=True, baseline_path=str(baseline))
    assert ours == pytest.approx(f1.tolist(), abs=1e-6)


def test_ratescore_through_the_code_path(tmp_path, monkeypatch, capfd):
    """RaTEScore (the package) with random models of RaTE-NER-Deberta's and BioLORD-2023-C's architectures saved
    locally, against the package's own compute_score: no network, and no report text on stdout or stderr."""
    pytest.importorskip("RaTEScore")
    from loguru import logger
    from RaTEScore import RaTEScore
    from RaTEScore.utils import sentence_split
    reports = radlabels_reports(7)
    root = F.write_ratescore_models(tmp_path / "ratescore", reports)
    for env, _ in rm.MODEL_PATHS.values():
        monkeypatch.delenv(env, raising=False)
    monkeypatch.setenv("MEDGPT_RATESCORE_MODEL", str(root))

    def no_network(sock, address):
        raise AssertionError(f"RaTEScore tried to connect to {address}")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    hyps, refs = reports[:3] + [reports[6]], reports[3:6] + [reports[6]]   # three other studies, then itself
    logged = []   # every loguru record, whichever stream loguru's default handler was given when first imported
    sink = logger.add(logged.append, level="DEBUG")
    capfd.readouterr()
    ours = rm.model_metrics(hyps, refs)["ratescore"]
    printed = "".join(capfd.readouterr()) + "".join(logged)
    scorer = RaTEScore(bert_model=str(root / "RaTE-NER-Deberta"), eval_model=str(root / "BioLORD-2023-C"),
                       use_gpu=False)
    assert ours == pytest.approx(scorer.compute_score(hyps, refs), abs=1e-12)
    assert 0.5 not in ours                                   # every report had entities, and they were matched
    assert all(0 <= v <= 1 + 1e-6 for v in ours)             # float32 cosines: a perfect match may be 1 + 1e-8
    assert ours[3] > max(ours[:3])   # against itself every entity finds itself (cosine 1): fixed models, no chance
    words = {w for r in hyps + refs for w in re.findall(r"[A-Za-z]{6,}", r)}
    assert not [w for w in words if w in printed], "report text was printed"
    try:   # the check above can see text: PyRuSH's own log, switched back on, is caught
        logger.enable("PyRuSH")
        sentence_split(hyps[:1])
        seen = "".join(capfd.readouterr()) + "".join(logged)
        assert [w for w in words if w in seen], seen[-500:]
    finally:
        logger.disable("PyRuSH")
        logger.remove(sink)
    # a report with no sentence (empty, 2 characters) has no entities: 0.5, and the pairs after it keep their
    # references (the package raises on such a pair alone, and drops the report from a list)
    out = rm.model_metrics(["", hyps[0], "ok", hyps[1]], refs[:2] + [refs[0], refs[2]])["ratescore"]
    expected = scorer.compute_score(hyps[:2], refs[1:3])
    assert out == pytest.approx([0.5, expected[0], 0.5, expected[1]], abs=1e-12)
    monkeypatch.setenv("MEDGPT_RATESCORE_MODEL", str(root / "RaTE-NER-Deberta"))   # one model, not their folder
    message = rm.model_metrics(hyps, refs)["ratescore"]
    assert message.startswith("not computed: ") and "RaTE-NER-Deberta/RaTE-NER-Deberta/config.json does not" in message
