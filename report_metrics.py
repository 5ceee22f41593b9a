"""
Report-generation metrics on the paper's 0-1 scale: BLEU-1..4, ROUGE-L, BERTScore, CheXbert embedding similarity
(s_emb), RadGraph-F1, RaTEScore, and the RadCliQ-v1 composite with 1/RadCliQ-v1.

Design choices
- BLEU-1..4 are sacrebleu's corpus BLEU (13a tokens, exp smoothing) and ROUGE-L is rouge-score's rougeL
  F-measure (no stemming), written here and tested equal to those packages; both are reported in 0..1.
- Model-based metrics read their model from a local path (eval.py's flag, or the environment variable of
  MODEL_PATHS) and run offline (HF_HUB_OFFLINE=1). A missing package, an unset or missing path, or a failure
  is reported as the string "not computed: <why>", never as 0. They run on the GPU when there is one.
- BERTScore: bert-score's F1, distilroberta-base at layer 5, rescaled with bert-score's shipped baseline
  for that model, no idf: the configuration RadCliQ-v1 was fitted with (CXRMetric/run_eval.py, USE_IDF False).
- s_emb: cosine of CheXbert's [CLS] embeddings (bert-base-uncased with CheXbert's weights, chexbert.pth read
  with torch.load(weights_only=True)), tokenised as CheXbert does (whitespace collapsed, 512 tokens).
- RadGraph: the radgraph package's annotator, model "radgraph" (the one RadCliQ used), from a local
  directory. The package's vendored AllenNLP calls two tokenizer methods transformers 5 removed (`encode_plus`,
  `build_inputs_with_special_tokens`); they are put back, as transformers 4 defined them, while it runs.
  Reported: `radgraph_f1` = the package's `partial` reward (RG_ER: entities matched by text and label, and
  whether they have a relation), the level report-generation tables call RadGraph-F1; and
  `radgraph_combined` = mean of entity F1 and relation F1 as CXR-Report-Metric computes them, RadCliQ's input.
- RaTEScore: the RaTEScore package's score, one pair per call (over a list it drops a report without a sentence
  and shifts the pairs after it; such a pair scores its no-entity 0.5), with PyRuSH's token-by-token DEBUG log
  (report text) switched off.
- RadCliQ-v1 (Yu et al., Patterns 2023; rajpurkarlab/CXR-Report-Metric): per report x = [radgraph_combined,
  BERTScore, s_emb, BLEU-2], z = (x - mean) / scale, RadCliQ = z . coef + intercept; the corpus value is the
  mean over reports and 1/RadCliQ-v1 its inverse. BLEU-2 here is CXR-Report-Metric's: per report, its own
  tokens (lower case, '.' split off, split on spaces), uniform weights over 1- and 2-grams, no smoothing.
  Computed only when all four parts are.
"""
import contextlib
import importlib.util
import math
import os
import re
from collections import Counter
from pathlib import Path

import numpy as np
import torch

# ----------------------------------------------------------------------------------------------------------
# RadCliQ-v1's constants, transcribed from rajpurkarlab/CXR-Report-Metric commit 9c9ecad, CXRMetric/radcliq-v1.pkl
# (a CompositeMetric: an sklearn StandardScaler fitted on 160 reports, then coefficients with the intercept
# last). The pickle was read with `pickletools.dis`, which only lists its opcodes (nothing is unpickled); the
# float64 arrays are its little-endian byte strings. Feature order: RadGraph combined, BERTScore, s_emb, BLEU-2.
RADCLIQ_V1_FEATURES = ("radgraph_combined", "bertscore", "semb", "bleu2")
RADCLIQ_V1_MEAN = (0.5379231241355762, 0.6175725628125001, 0.7647942121140658, 0.44738335396242174)
RADCLIQ_V1_SCALE = (0.3028258411486429, 0.22430938459304575, 0.2539439110169773, 0.2989271671041838)
RADCLIQ_V1_COEF = (-0.37708368261038905, -0.37030009974480316, -0.25261621789593225, 4.315048405024756e-12)
RADCLIQ_V1_INTERCEPT = 2.466552561323256e-10

# metric -> (environment variable naming its local model, what the path holds)
MODEL_PATHS = {
    "bertscore": ("MEDGPT_BERTSCORE_MODEL", "a distilroberta-base directory (config, weights, tokenizer)"),
    "semb": ("MEDGPT_CHEXBERT_MODEL", "a directory with chexbert.pth and bert-base-uncased's config and vocab"),
    "radgraph": ("MEDGPT_RADGRAPH_MODEL", "the radgraph package's model directory (radgraph/: config.json, "
                                          "vocabulary/, weights.th)"),
    "ratescore": ("MEDGPT_RATESCORE_MODEL", "a directory with RaTE-NER-Deberta/ and BioLORD-2023-C/"),
}
PACKAGES = {"bertscore": ("bert_score", "bert-score"), "semb": ("transformers", "transformers"),
            "radgraph": ("radgraph", "radgraph"), "ratescore": ("RaTEScore", "RaTEScore")}

# ----------------------------------------------------------------------------------------------------------
# BLEU (sacrebleu's corpus BLEU) and ROUGE-L (rouge-score)

_BLEU_13A_RULES = [
    (re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),   # punctuation and symbols become tokens
    (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),                 # period and comma, unless after a digit
    (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),                 # ... or unless before a digit
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),                      # dash after a digit
]


def tokenize_13a(line):
    """mteval-v13a tokenization (sacrebleu's default): what BLEU counts n-grams over."""
    line = line.rstrip().replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    if "&" in line:
        line = line.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    line = f" {line} "
    for pattern, replacement in _BLEU_13A_RULES:
        line = pattern.sub(replacement, line)
    return line.split()


def _ngrams(tokens, n):
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def corpus_bleu(hypotheses, references, max_order=4, lowercase=False):
    """Corpus BLEU-`max_order` in 0..100 over (hypothesis, single reference) pairs, equal to sacrebleu's
    `BLEU(max_ngram_order=max_order, lowercase=lowercase).corpus_score(hyps, [refs]).score`."""
    matches, totals = [0] * max_order, [0] * max_order
    hyp_len = ref_len = 0
    for hyp, ref in zip(hypotheses, references, strict=True):
        if lowercase:
            hyp, ref = hyp.lower(), ref.lower()
        hyp_tokens, ref_tokens = tokenize_13a(hyp), tokenize_13a(ref)
        hyp_len, ref_len = hyp_len + len(hyp_tokens), ref_len + len(ref_tokens)
        for n in range(1, max_order + 1):
            hyp_ngrams, ref_ngrams = _ngrams(hyp_tokens, n), _ngrams(ref_tokens, n)
            matches[n - 1] += sum((hyp_ngrams & ref_ngrams).values())   # clipped counts
            totals[n - 1] += max(len(hyp_tokens) - n + 1, 0)
    if not any(matches):
        return 0.0
    brevity = 1.0 if hyp_len >= ref_len else (math.exp(1 - ref_len / hyp_len) if hyp_len else 0.0)
    log_precisions, zero_match_smoothing = [], 1.0
    for n in range(max_order):
        if totals[n] == 0:   # no n-grams this long at all: sacrebleu stops and leaves the rest at zero
            log_precisions += [-9999999999.0] * (max_order - n)
            break
        if matches[n] == 0:  # 'exp' smoothing (mteval-v13a): 1 / (2^k * total) for the k-th empty order
            zero_match_smoothing *= 2
            log_precisions.append(math.log(100.0 / (zero_match_smoothing * totals[n])))
        else:
            log_precisions.append(math.log(100.0 * matches[n] / totals[n]))
    return brevity * math.exp(sum(log_precisions) / max_order)


def rouge_tokens(text):
    """rouge-score's default tokenizer: lower case, runs of [a-z0-9] (no stemming)."""
    return re.findall(r"[a-z0-9]+", text.lower())


def rouge_l(reference, prediction):
    """(precision, recall, F) of the longest common token subsequence, as rouge_score's 'rougeL'."""
    ref, pred = rouge_tokens(reference), rouge_tokens(prediction)
    if not ref or not pred:
        return 0.0, 0.0, 0.0
    previous = [0] * (len(pred) + 1)   # one row of the LCS table at a time
    for ref_token in ref:
        current = [0]
        for j, pred_token in enumerate(pred, 1):
            current.append(previous[j - 1] + 1 if ref_token == pred_token else max(previous[j], current[j - 1]))
        previous = current
    lcs = previous[-1]
    precision, recall = lcs / len(pred), lcs / len(ref)
    f = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    return precision, recall, f

# ----------------------------------------------------------------------------------------------------------
# RadCliQ-v1: its BLEU-2, RadGraph's entity and relation F1, the composite


def radcliq_tokens(report):
    """CXR-Report-Metric's prep_reports: lower case, ' .' for '.', split on single spaces, empty pieces dropped."""
    return [t for t in str(report).lower().replace(".", " .").split(" ") if t != ""]


def radcliq_bleu2(hypothesis, reference):
    """Sentence BLEU-2 (weights 1/2, 1/2; clipped counts; brevity penalty; no smoothing: 0 when a precision is 0)."""
    hyp, ref = radcliq_tokens(hypothesis), radcliq_tokens(reference)
    log_precision = 0.0
    for n in (1, 2):
        total = max(len(hyp) - n + 1, 0)
        matched = sum((_ngrams(hyp, n) & _ngrams(ref, n)).values())
        if total == 0 or matched == 0:
            return 0.0
        log_precision += 0.5 * math.log(matched / total)
    brevity = 1.0 if len(hyp) > len(ref) else math.exp(1 - len(ref) / len(hyp))
    return brevity * math.exp(log_precision)


def set_f1(reference, hypothesis):
    """CXR-Report-Metric's compute_f1 over two sets (0 when either precision or recall has nothing to count)."""
    hits = len(reference & hypothesis)
    precision = hits / len(hypothesis) if hypothesis else 0.0
    recall = hits / len(reference) if reference else 0.0
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def radgraph_sets(annotation):
    """(entities, relations) of one RadGraph annotation {"entities": {id: {tokens, label, relations}}}, as
    CXR-Report-Metric's parse_entity_relation builds them."""
    entities = annotation["entities"]
    entity_set = {(e["tokens"], e["label"]) for e in entities.values()}
    relation_set = {((e["tokens"], e["label"]), (entities[target]["tokens"], entities[target]["label"]), kind)
                    for e in entities.values() for kind, target in e["relations"]}
    return entity_set, relation_set


def radgraph_combined(hypothesis_annotation, reference_annotation):
    """RadCliQ's RadGraph feature: mean of the entity F1 and the relation F1."""
    hyp_entities, hyp_relations = radgraph_sets(hypothesis_annotation)
    ref_entities, ref_relations = radgraph_sets(reference_annotation)
    return (set_f1(ref_entities, hyp_entities) + set_f1(ref_relations, hyp_relations)) / 2


def radcliq_v1(features):
    """Per-report RadCliQ-v1 (lower is better) from an (N, 4) array of [radgraph_combined, BERTScore, s_emb,
    BLEU-2]; the published normalisation and coefficients."""
    x = np.asarray(features, dtype=np.float64).reshape(-1, 4)   # (N, 4)
    z = (x - np.array(RADCLIQ_V1_MEAN)) / np.array(RADCLIQ_V1_SCALE)
    return z @ np.array(RADCLIQ_V1_COEF) + RADCLIQ_V1_INTERCEPT   # (N,)

# ----------------------------------------------------------------------------------------------------------
# Model-based metrics: each returns per-report scores (a list) or raises NotComputed


class NotComputed(Exception):
    """A metric that cannot run here; the message says why (reported as 'not computed: <message>')."""


def model_path(metric, paths):
    """The local model path of `metric`: eval.py's flag (paths[metric]) or its environment variable."""
    env, holds = MODEL_PATHS[metric]
    module, pip_name = PACKAGES[metric]
    if importlib.util.find_spec(module) is None:
        raise NotComputed(f"package {pip_name!r} is not installed (pip install {pip_name})")
    path = (paths or {}).get(metric) or os.environ.get(env)
    if not path:
        raise NotComputed(f"no model: set {env} (or eval.py's --{metric}_model) to {holds}")
    if not Path(path).exists():
        raise NotComputed(f"{env}={path} does not exist; it should be {holds}")
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")   # never download anything
    return str(path)


def bertscore(hypotheses, references, path):
    """bert-score's F1 per report, RadCliQ's configuration (distilroberta-base layer 5, baseline rescaled)."""
    import bert_score
    baseline = Path(bert_score.__file__).parent / "rescale_baseline" / "en" / "distilroberta-base.tsv"
    scorer = bert_score.BERTScorer(model_type=path, num_layers=5, lang="en", rescale_with_baseline=True,
                                   baseline_path=str(baseline), idf=False, batch_size=64)
    collapse = [re.sub(r" +", " ", text) for text in hypotheses], [re.sub(r" +", " ", t) for t in references]
    _, _, f1 = scorer.score(*collapse)
    return [float(v) for v in f1]


def chexbert_embeddings(texts, path):
    """CheXbert's [CLS] embedding of each text, (N, 768): bert-base-uncased with chexbert.pth's weights."""
    from transformers import BertConfig, BertModel, BertTokenizer
    tokenizer = BertTokenizer.from_pretrained(path)
    bert = BertModel(BertConfig.from_pretrained(path), add_pooling_layer=True)
    checkpoint = torch.load(Path(path) / "chexbert.pth", map_location="cpu", weights_only=True)
    prefix = "module.bert."   # the checkpoint is the DataParallel-wrapped labeler: keep its BERT
    state = {k[len(prefix):]: v for k, v in checkpoint["model_state_dict"].items() if k.startswith(prefix)}
    missing, _ = bert.load_state_dict(state, strict=False)
    if [k for k in missing if "position_ids" not in k]:
        raise NotComputed(f"{path}/chexbert.pth does not hold a CheXbert BERT: missing {missing[:3]}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    bert.to(device).eval()
    out = []
    with torch.no_grad():
        for text in texts:
            tokens = tokenizer.tokenize(" ".join(text.split()))
            # [CLS] tokens [SEP], what CheXbert's encode_plus(tokens) gives (transformers 5 has no encode_plus)
            ids = [tokenizer.cls_token_id] + tokenizer.convert_tokens_to_ids(tokens) + [tokenizer.sep_token_id]
            ids = ids[:511] + [tokenizer.sep_token_id] if len(ids) > 512 else ids
            hidden = bert(torch.tensor([ids], device=device)).last_hidden_state   # (1, T, 768)
            out.append(hidden[0, 0].cpu())
    return torch.stack(out).numpy()


def semb(hypotheses, references, path):
    """Cosine similarity of CheXbert embeddings, per report."""
    hyp, ref = chexbert_embeddings(hypotheses, path), chexbert_embeddings(references, path)
    return [float(v) for v in (hyp * ref).sum(1) / (np.linalg.norm(hyp, axis=1) * np.linalg.norm(ref, axis=1))]


def _encode_plus(tokenizer, text, text_pair=None, add_special_tokens=True, **kwargs):
    """transformers 4's encode_plus for one example: a string (or pair) is tokenised as __call__ does; a list of
    strings is a list of wordpieces, looked up as they are, with the special tokens around them."""
    if isinstance(text, str):
        return tokenizer(text, text_pair, add_special_tokens=add_special_tokens, **kwargs)
    ids = tokenizer.convert_tokens_to_ids(list(text))
    return {"input_ids": _bert_special_tokens(tokenizer, ids) if add_special_tokens else ids}


def _bert_special_tokens(tokenizer, ids, pair_ids=None):
    """transformers 4's build_inputs_with_special_tokens of the BERT family (every RadGraph and CheXbert
    tokenizer): [CLS] A [SEP], or [CLS] A [SEP] B [SEP]."""
    out = [tokenizer.cls_token_id] + list(ids) + [tokenizer.sep_token_id]
    return out if pair_ids is None else out + list(pair_ids) + [tokenizer.sep_token_id]


@contextlib.contextmanager
def transformers4_tokenizer_api():
    """While inside, tokenizers have transformers 4's `encode_plus` and `build_inputs_with_special_tokens` again
    (radgraph's AllenNLP code calls both); nothing is changed where they still exist."""
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase
    added = []
    for name, method in [("encode_plus", _encode_plus), ("build_inputs_with_special_tokens", _bert_special_tokens)]:
        if not hasattr(PreTrainedTokenizerBase, name):
            setattr(PreTrainedTokenizerBase, name, method)
            added.append(name)
    try:
        yield
    finally:
        for name in added:
            delattr(PreTrainedTokenizerBase, name)


def radgraph_scores(hypotheses, references, path):
    """{'radgraph_f1': partial reward per report, 'radgraph_combined': RadCliQ's feature per report}."""
    from radgraph import RadGraph
    from radgraph.rewards import compute_reward
    with transformers4_tokenizer_api():
        annotator = RadGraph(model_type="radgraph", model_cache_dir=path, cuda=0 if torch.cuda.is_available() else -1)
        annotations = annotator(list(hypotheses) + list(references))   # {"0": {...}, ...}
    n = len(hypotheses)
    partial, combined = [], []
    for i in range(n):
        hyp, ref = annotations[str(i)], annotations[str(i + n)]
        empty = not hypotheses[i] or not references[i]   # as F1RadGraph: an empty report scores 0
        partial.append(0.0 if empty else float(compute_reward(hyp, ref, "partial")))
        combined.append(0.0 if empty else radgraph_combined(hyp, ref))
    return {"radgraph_f1": partial, "radgraph_combined": combined}


def ratescore(hypotheses, references, path):
    """RaTEScore per report: the RaTEScore package as released, its NER model (RaTE-NER-Deberta) and synonym
    encoder (BioLORD-2023-C) read from the directories under `path`. The package cannot take a report in which
    its medspacy splitter finds no sentence (empty, or under 3 characters): on transformers 5 its tokenizer call
    on no sentences raises, and over a list such a report is dropped, which shifts every later pair onto the wrong
    reference. So each pair gets its own compute_score call, and a pair with a sentence-less report, which has no
    entities, gets the package's no-entity value, 0.5."""
    env, holds = MODEL_PATHS["ratescore"]
    ner, synonyms = Path(path) / "RaTE-NER-Deberta", Path(path) / "BioLORD-2023-C"
    for folder in (ner, synonyms):   # else transformers would take the path for a model hub name
        if not (folder / "config.json").is_file():
            raise NotComputed(f"{folder / 'config.json'} does not exist; {env} should be {holds}")
    from loguru import logger
    # PyRuSH, medspacy's sentence splitter, logs every token of the text it splits at DEBUG through loguru, whose
    # default handler prints to stderr: report text would fill every eval log. Only PyRuSH's loggers are switched
    # off, and for the rest of the process, since any later sentence split would print the same text.
    logger.disable("PyRuSH")
    from RaTEScore import RaTEScore
    from RaTEScore.utils import sentence_split
    scorer = RaTEScore(bert_model=str(ner), eval_model=str(synonyms), use_gpu=torch.cuda.is_available())
    scores = []
    for hyp, ref in zip(hypotheses, references, strict=True):
        has_sentences = all(sentence_split([text])[0] for text in (hyp, ref))
        scores.append(float(scorer.compute_score([hyp], [ref])[0]) if has_sentences else 0.5)
    return scores


def _not_computed(e):
    return f"not computed: {e}"


def model_metrics(hypotheses, references, paths=None):
    """Per-report scores of the model-based metrics: {name: list of floats, or 'not computed: why'}."""
    results = {}
    runners = {"bertscore": bertscore, "semb": semb, "radgraph": radgraph_scores, "ratescore": ratescore}
    for metric, run in runners.items():
        names = ("radgraph_f1", "radgraph_combined") if metric == "radgraph" else (metric,)
        try:
            path = model_path(metric, paths)
            scores = run(hypotheses, references, path)
            results.update(scores if isinstance(scores, dict) else {metric: scores})
        except NotComputed as e:
            results.update({name: _not_computed(e) for name in names})
        except Exception as e:   # a third-party metric must not lose a finished run
            results.update({name: _not_computed(f"{metric} failed ({type(e).__name__}: {e})") for name in names})
    return results


def report_metrics(hypotheses, references, paths=None):
    """Corpus values on the 0-1 scale: bleu1..4, rouge_l, bertscore, semb, radgraph_f1, radgraph_combined,
    ratescore, radcliq_v1, inv_radcliq_v1; a metric that could not run is 'not computed: <why>'."""
    out = {f"bleu{n}": corpus_bleu(hypotheses, references, max_order=n) / 100 for n in range(1, 5)}
    out["rouge_l"] = float(np.mean([rouge_l(r, h)[2] for h, r in zip(hypotheses, references)]))
    per_report = model_metrics(hypotheses, references, paths)
    per_report["bleu2"] = [radcliq_bleu2(h, r) for h, r in zip(hypotheses, references)]
    for name, scores in per_report.items():
        if name != "bleu2":
            out[name] = scores if isinstance(scores, str) else float(np.mean(scores))
    missing = [name for name in RADCLIQ_V1_FEATURES if isinstance(per_report[name], str)]
    if missing:
        reason = _not_computed(f"needs {', '.join(missing)}, which were not computed")
        out["radcliq_v1"] = out["inv_radcliq_v1"] = reason
    else:
        features = np.array([per_report[name] for name in RADCLIQ_V1_FEATURES]).T   # (N, 4)
        out["radcliq_v1"] = float(np.mean(radcliq_v1(features)))
        out["inv_radcliq_v1"] = 1.0 / out["radcliq_v1"]
    return out
