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


def tiny_bert_dir(path, words, hidden=32, layers=2):
    """A randomly initialised BERT (bert-base-uncased's architecture, tiny sizes) with a WordPiece vocabulary of
    `words`, saved as a local model directory; returns the transformers modules used."""
    transformers = pytest.importorskip("transformers")
    import torch
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(set(words))
    os.makedirs(path, exist_ok=True)
    Path(path, "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = transformers.BertTokenizer(str(Path(path, "vocab.txt")), do_lower_case=True)
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers,
                                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=512)
    return transformers, config


def test_semb_through_the_code_path_equals_chexbert_cls_cosine(tmp_path, monkeypatch):
    """s_emb with a random CheXbert (BERT + 14 linear heads, saved the way CheXbert saves it: a DataParallel
    state dict under 'model_state_dict') from a local directory, against CheXbert's encoder computed here."""
    import torch
    reports = radlabels_reports(6)
    words = [w for r in reports for w in re.findall(r"[a-z]+|[^a-z\s]", r.lower())]
    transformers, config = tiny_bert_dir(tmp_path / "chexbert", words)
    bert = transformers.BertModel(config)
    config.save_pretrained(tmp_path / "chexbert")
    state = {f"module.bert.{k}": v for k, v in bert.state_dict().items()}
    state.update({f"module.linear_heads.{i}.weight": torch.randn(4 if i < 13 else 2, 32) for i in range(14)})
    torch.save({"epoch": 3, "model_state_dict": state}, tmp_path / "chexbert" / "chexbert.pth")
    monkeypatch.setenv("MEDGPT_CHEXBERT_MODEL", str(tmp_path / "chexbert"))
    hyps, refs = reports[:3], reports[3:]
    ours = rm.model_metrics(hyps, refs)["semb"]
    tokenizer = transformers.BertTokenizer.from_pretrained(tmp_path / "chexbert")
    bert.eval()
    with torch.no_grad():
        def cls(text):
            ids = [tokenizer.cls_token_id] + tokenizer.convert_tokens_to_ids(tokenizer.tokenize(" ".join(
                text.split()))) + [tokenizer.sep_token_id]
            return bert(torch.tensor([ids[:511] + [ids[-1]] if len(ids) > 512 else ids])).last_hidden_state[0, 0]
        expected = [float(torch.nn.functional.cosine_similarity(cls(h), cls(r), dim=0)) for h, r in zip(hyps, refs)]
    assert ours == pytest.approx(expected, abs=1e-5)
    monkeypatch.setenv("MEDGPT_CHEXBERT_MODEL", str(tmp_path / "nowhere"))
    assert "does not exist" in rm.model_metrics(hyps, refs)["semb"]


def test_bertscore_through_the_code_path(tmp_path, monkeypatch):
    """BERTScore (bert-score installed) with a random distilroberta-architecture model saved locally, against
    bert-score's own `score` with RadCliQ's settings."""
    bert_score = pytest.importorskip("bert_score")
    transformers = pytest.importorskip("transformers")
    from tokenizers import ByteLevelBPETokenizer
    import torch
    reports = radlabels_reports(8)
    model_dir = tmp_path / "distilroberta"
    model_dir.mkdir()
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(reports, vocab_size=400, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe.save_model(str(model_dir))
    tokenizer = transformers.RobertaTokenizer(str(model_dir / "vocab.json"), str(model_dir / "merges.txt"),
                                              model_max_length=512)   # as distilroberta-base's tokenizer
    tokenizer.save_pretrained(model_dir)
    torch.manual_seed(0)
    config = transformers.RobertaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=6,
                                        num_attention_heads=4, intermediate_size=64, max_position_embeddings=514,
                                        pad_token_id=1, bos_token_id=0, eos_token_id=2)
    transformers.RobertaModel(config).save_pretrained(model_dir)
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
    capfd.readouterr()
    ours = rm.model_metrics(hyps, refs)["ratescore"]
    printed = "".join(capfd.readouterr())
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
        seen = "".join(capfd.readouterr())
        assert [w for w in words if w in seen], seen[-500:]
    finally:
        logger.disable("PyRuSH")
    # a report with no sentence (empty, 2 characters) has no entities: 0.5, and the pairs after it keep their
    # references (the package raises on such a pair alone, and drops the report from a list)
    out = rm.model_metrics(["", hyps[0], "ok", hyps[1]], refs[:2] + [refs[0], refs[2]])["ratescore"]
    expected = scorer.compute_score(hyps[:2], refs[1:3])
    assert out == pytest.approx([0.5, expected[0], 0.5, expected[1]], abs=1e-12)
    monkeypatch.setenv("MEDGPT_RATESCORE_MODEL", str(root / "RaTE-NER-Deberta"))   # one model, not their folder
    message = rm.model_metrics(hyps, refs)["ratescore"]
    assert message.startswith("not computed: ") and "RaTE-NER-Deberta/RaTE-NER-Deberta/config.json does not" in message
