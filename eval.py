"""
Evaluation harness for MedGPT-oss nano: the paper's benchmarks, deterministic decoding, strict scoring.

    python eval.py --model out/final --bench slake,vqa_rad --data_dir data/eval --out_dir out/eval
    torchrun --nproc_per_node 8 eval.py --model ... --bench ... --data_dir ... --out_dir ...
    python eval.py --rescore out/eval/items.jsonl --out out/eval/rescored.jsonl [--lenient]

Design choices
- One item format for every benchmark (docs/internals.md): `<data_dir>/<bench>/test.jsonl`, written by the
  converters in data/. The harness never knows a benchmark's original layout, only its question types.
- One prompt per question type (multiple_choice, yes_no, closed, open, report), rendered as a harmony user
  turn; the assistant turn is opened on the final channel, so the final channel's text is the answer.
- Greedy decoding only, batched with the model's KV cache, prompts sorted by length. Batching must not change
  a prediction: the test suite checks batch 1 against batch 8.
- Strict scoring, by rules short enough to read below (`parse_choice`, `parse_yes_no`, `normalize`).
  A response that names two options, both yes and no, or nothing parseable is wrong. `--lenient` adds
  MedEvalKit's closest-option fallback (difflib similarity) for multiple choice, reported in its own column.
- Report metrics written here (BLEU-1..4 as sacrebleu's corpus BLEU, ROUGE-L as rouge-score's F-measure) and
  tested equal to those packages; clinical metrics (RadGraph-F1, RaTEScore, GREEN) run only when their package
  and local weights exist, otherwise results.json says why they were skipped.
- Accuracy comes with a bootstrap 95% interval (1000 resamples of the items, fixed seed).
- Every finished batch is appended to `<out_dir>/progress/rank<R>.jsonl`; a rerun skips items already there,
  so an interrupted run resumes. Under torchrun items are dealt round-robin over ranks and gathered on rank 0
  as JSON bytes (no pickle).
- Nothing prints question or report text; progress lines carry counts only.
"""
import argparse
import difflib
import functools
import hashlib
import json
import math
import os
import re
import string
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

# ----------------------------------------------------------------------------------------------------------
# Benchmarks and the paper's numbers

QUESTION_TYPES = ("multiple_choice", "yes_no", "closed", "open", "report")

# name -> display name; names are the converters' directory names under --data_dir
BENCHMARKS = {
    "slake": "SLAKE",
    "vqa_rad": "VQA-RAD",
    "pathvqa": "PathVQA",
    "pmc_vqa": "PMC-VQA",
    "mmmu_med": "MMMU-Med (dev)",
    "mmmu_pro_med_4": "MMMU-Med-Pro (4 options)",
    "mmmu_pro_med_10": "MMMU-Med-Pro (10 options)",
    "medxpertqa_mm": "MedXpertQA (multimodal)",
    "medxpertqa_text": "MedXpertQA (text)",
    "medframeqa": "MedFrameQA",
    "medqa": "MedQA",
    "medmcqa": "MedMCQA",
    "pubmedqa": "PubMedQA",
    "medbullets": "Medbullets",
    "mimic_cxr": "MIMIC-CXR (report)",
}

# MedGPT-oss-20B in the paper (accuracy %); benchmarks without a number there show "-"
PAPER_RESULTS = {
    "slake": 71.53,
    "medframeqa": 63.01,
    "mmmu_med": 61.49,
    "mmmu_pro_med_4": 52.34,
    "mmmu_pro_med_10": 39.94,
    "medxpertqa_mm": 49.23,
    "medxpertqa_text": 25.38,
    "medbullets": 68.71,
}

# ----------------------------------------------------------------------------------------------------------
# Reading evaluation items


class ItemError(ValueError):
    """A malformed evaluation item: the message names the file and line."""


def read_jsonl(path):
    """Yield (line_number, dict) for each non-empty line; a bad line raises with its position."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ItemError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise ItemError(f"{path}:{lineno}: expected a JSON object, found {type(record).__name__}")
            yield lineno, record


def check_item(item, where):
    """Validate one item in place (letters upper-cased, images made a list); raise ItemError naming `where`."""
    for key in ("id", "question_type", "question", "answer"):
        if key not in item:
            raise ItemError(f"{where}: missing field {key!r}; an item needs id, question_type, question, answer "
                            "(see docs/internals.md, 'Evaluation items')")
    qtype = item["question_type"]
    if qtype not in QUESTION_TYPES:
        raise ItemError(f"{where}: question_type {qtype!r} is not one of {', '.join(QUESTION_TYPES)}")
    if not isinstance(item["question"], str) or not isinstance(item["answer"], str):
        raise ItemError(f"{where}: question and answer must be strings, found "
                        f"{type(item['question']).__name__} and {type(item['answer']).__name__}")
    options = item.get("options")
    if qtype == "multiple_choice":
        if not isinstance(options, dict) or len(options) < 2:
            raise ItemError(f"{where}: a multiple_choice item needs options as an object of two or more "
                            f"letters, e.g. {{\"A\": \"...\", \"B\": \"...\"}}; found {options!r}")
        bad = [k for k in options if not (len(k) == 1 and k.isascii() and k.isalpha())]
        if bad:
            raise ItemError(f"{where}: option keys must be single letters, found {bad}")
        item["options"] = {k.upper(): str(v) for k, v in options.items()}
        item["answer"] = item["answer"].strip().upper()
        if item["answer"] not in item["options"]:
            raise ItemError(f"{where}: answer {item['answer']!r} is not one of the option letters "
                            f"{list(item['options'])}")
    elif options is not None:
        raise ItemError(f"{where}: options must be null for question_type {qtype!r}, found {options!r}")
    if qtype == "yes_no":
        item["answer"] = normalize(item["answer"])
        if item["answer"] not in ("yes", "no"):
            raise ItemError(f"{where}: a yes_no item's answer must be 'yes' or 'no', found {item['answer']!r}")
    images = item.get("images") or []
    if isinstance(images, str):
        images = [images]
    if not all(isinstance(p, str) for p in images):
        raise ItemError(f"{where}: images must be a list of paths (strings), found {images!r}")
    item["images"] = images
    return item


def load_items(data_dir, bench, limit=None):
    """Items of `<data_dir>/<bench>/test.jsonl`, validated, with image paths made absolute (checked to exist)."""
    path = Path(data_dir) / bench / "test.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"benchmark {bench!r}: no {path}; convert it first with the converters in data/ "
                                f"(docs/internals.md: '<data_dir>/<benchmark>/test.jsonl')")
    items, seen = [], set()
    for lineno, item in read_jsonl(path):
        where = f"{path}:{lineno}"
        check_item(item, where)
        item["benchmark"] = item.get("benchmark") or bench
        if item["id"] in seen:
            raise ItemError(f"{where}: duplicate id {item['id']!r}; ids must be unique within a benchmark")
        seen.add(item["id"])
        absolute = []
        for rel in item["images"]:
            image_path = (path.parent / rel).resolve()
            if not image_path.is_file():
                raise ItemError(f"{where}: image {rel!r} not found (looked for {image_path}); "
                                "image paths are relative to the test.jsonl file")
            absolute.append(str(image_path))
        item["image_paths"] = absolute
        items.append(item)
        if limit is not None and len(items) >= limit:
            break
    return items


# ----------------------------------------------------------------------------------------------------------
# Prompts: one per question type

MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."
YES_NO_INSTRUCTION = "Answer yes or no."   # the demo data (data/demo.py) trains with this wording
CLOSED_INSTRUCTION = "Answer the question using a single word or phrase."
OPEN_INSTRUCTION = "Answer the question concisely."
REPORT_INSTRUCTION = ("Write the radiology report for the given image(s) with a findings section and an "
                      "impression section, in the form: Findings: ... Impression: ...")
IMAGE_MARKER = "<image>"


def build_prompt(item):
    """The user turn's text: image markers, the question (with lettered options), the type's instruction.

    Images go first, one `<image>` line each (LLaVA's layout), unless the question already holds exactly one
    `<image>` marker per image, in which case they stay where the converter put them (interleaved MMMU).
    """
    qtype, question = item["question_type"], item["question"].strip()
    if qtype == "multiple_choice":
        lines = [question] + [f"{letter}. {text}" for letter, text in item["options"].items()] + [MC_INSTRUCTION]
    elif qtype == "yes_no":
        lines = [question, YES_NO_INSTRUCTION]
    elif qtype == "closed":
        lines = [question, CLOSED_INSTRUCTION]
    elif qtype == "open":
        lines = [question, OPEN_INSTRUCTION]
    else:  # report: the converter may carry its own instruction in `question`
        lines = [question or REPORT_INSTRUCTION]
    text = "\n".join(lines)
    n_images = len(item["images"])
    if text.count(IMAGE_MARKER) != n_images:   # stray markers go; the images go first
        text = f"{IMAGE_MARKER}\n" * n_images + text.replace(IMAGE_MARKER, "")
    return text


# ----------------------------------------------------------------------------------------------------------
# Strict scoring

_TRAILING_PUNCT = string.punctuation + " "


def normalize(text):
    """Lower case, trimmed, whitespace collapsed, trailing punctuation removed."""
    text = " ".join(text.lower().split())
    return text.rstrip(_TRAILING_PUNCT)


def _strip_markup(text):
    """Drop markdown emphasis around a short answer ('**B.**' -> 'B.'), then trim."""
    return text.replace("**", "").replace("__", "").strip()


# A letter token: "B", "(B)", "[B]", "B.", "B)", "B:"; a response may say "option B" or "choice B" first.
_LETTER_TOKEN = re.compile(r"(?P<open>[(\[])?(?P<letter>[A-Za-z])(?![A-Za-z0-9])(?P<close>[)\]])?")
_OPTION_WORD = re.compile(r"(?:option|choice)\s+", re.IGNORECASE)
# What joins a second letter to the first: "B or C", "B, C", "B/C", "B and C", "B & C".
_LETTER_JOIN = re.compile(r"\s*(?:,|/|&|;|\bor\b|\band\b)\s*", re.IGNORECASE)
# One-letter English words: "A large mass", "I think", "a mass" read as words, not as options A or I.
_ONE_LETTER_WORDS = {"A", "a", "I"}
_LETTER_VERBS = {"is", "was", "seems", "appears", "fits", "or", "and"}   # "A is correct" still names A


def _letter_token(text):
    """(upper-case letter, rest of text) when `text` begins with a letter token, else None."""
    m = _LETTER_TOKEN.match(text)
    if not m:
        return None
    letter, rest = m.group("letter"), text[m.end():]
    if not (m.group("open") or m.group("close")):
        if rest[:1].isalnum():   # a longer word ("É" and other non-ASCII letters included)
            return None
        next_word = re.match(r"\s+([a-z]+)\b", rest)
        if letter in _ONE_LETTER_WORDS and next_word and next_word.group(1) not in _LETTER_VERBS:
            return None
    return letter.upper(), rest


def _leading_letters(text):
    """Letters named by a text that begins with a letter token, [] when it does not.

    Returns every letter of a joined group ("B or C" -> ["B", "C"]) so that the caller can refuse it.
    """
    option_word = _OPTION_WORD.match(text)
    token = _letter_token(text[option_word.end():] if option_word else text)
    letters = []
    while token is not None:
        letter, rest = token
        letters.append(letter)
        join = _LETTER_JOIN.match(rest)
        token = _letter_token(rest[join.end():]) if join else None
    return letters


def _option_text_letters(text, options):
    """Letters of the options whose normalised text equals the normalised text."""
    target = normalize(text)
    return [letter for letter, option in options.items() if target and normalize(option) == target]


def _answer_letters(text, options):
    """Letters in a short answer span: a leading letter token, else an option's exact text."""
    text = _strip_markup(text)
    return _leading_letters(text) or _option_text_letters(text, options)


_BOXED = re.compile(r"\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}")
_TEXT_MACRO = re.compile(r"\\(?:text|textbf|mathrm)\{([^{}]*)\}")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.IGNORECASE | re.DOTALL)
_ANSWER_IS = re.compile(r"\banswer\b\s*(?:\*\*)?\s*(?:is\b\s*:?|:)\s*", re.IGNORECASE)


def parse_choice(response, options):
    """The option letters a response chooses, sorted; exactly one means a choice was made.

    Read from, all together: `\\boxed{X}`, `<answer>X</answer>`, "answer is X" / "answer: X", and a response
    that begins with a letter token ("B", "(B)", "B.", "B)", "B:", then anything). Only when none of these
    names a letter: a response whose normalised text is exactly one option's normalised text.
    Letters outside the options are kept (so they score wrong), never dropped.
    """
    letters = []
    for box in _BOXED.findall(response):
        letters += _answer_letters(_TEXT_MACRO.sub(r"\1", box), options)
    for tagged in _ANSWER_TAG.findall(response):
        letters += _answer_letters(tagged, options)
    for m in _ANSWER_IS.finditer(response):
        span = response[m.end():].split("\n", 1)[0]   # the rest of that line
        letters += _answer_letters(span, options)
    letters += _leading_letters(_strip_markup(response))
    if not letters:
        letters = _option_text_letters(response, options)
    return sorted(set(letters))


def closest_option(response, options):
    """MedEvalKit's fallback: the option whose lower-cased text is most similar (difflib ratio) to the
    lower-cased response; the first one on ties. None for an empty response (MedEvalKit would say A)."""
    response = response.strip().lower()
    if not response:
        return None
    best_letter, best_ratio = None, -1.0
    for letter, text in options.items():
        ratio = difflib.SequenceMatcher(None, text.lower(), response).ratio()
        if ratio > best_ratio:
            best_letter, best_ratio = letter, ratio
    return best_letter


_YES_NO_START = re.compile(r"(yes|no)(?=$|[\s" + re.escape(string.punctuation) + "])")
_YES_AND_NO = re.compile(r"(yes|no)\s*(?:[,/;&.]|\bor\b|\band\b)?\s*(yes|no)(?=$|[.,;:!?/)])")


def parse_yes_no(response):
    """'yes' or 'no' when the normalised response is that word or begins with it (then a space or
    punctuation); None when it gives neither, or both ("yes or no", "yes/no", "no, yes")."""
    text = normalize(_strip_markup(response))
    start = _YES_NO_START.match(text)
    if not start:
        return None
    both = _YES_AND_NO.match(text)
    if both and both.group(1) != both.group(2):
        return None
    return start.group(1)


def _words(text):
    return re.findall(r"\w+", normalize(text))


def token_recall_f1(prediction, answer):
    """(recall, F1) of the answer's word tokens in the prediction's, counted with multiplicity (SQuAD-style)."""
    pred, gold = Counter(_words(prediction)), Counter(_words(answer))
    overlap = sum((pred & gold).values())
    if overlap == 0:
        return 0.0, 0.0
    precision, recall = overlap / sum(pred.values()), overlap / sum(gold.values())
    return recall, 2 * precision * recall / (precision + recall)


def score_item(item, prediction, lenient=False):
    """Fields to store beside a prediction: `correct` (None for reports) and the type's extra numbers."""
    qtype, answer = item["question_type"], item["answer"]
    if qtype == "multiple_choice":
        chosen = parse_choice(prediction, item["options"])
        fields = {"chosen": chosen, "correct": chosen == [answer]}
        if lenient:
            fallback = closest_option(prediction, item["options"]) if not chosen else None
            fields["lenient_correct"] = fields["correct"] or fallback == answer
        return fields
    if qtype == "yes_no":
        said = parse_yes_no(prediction)
        return {"chosen": said, "correct": said == answer}
    if qtype in ("closed", "open"):
        fields = {"correct": bool(normalize(prediction)) and normalize(prediction) == normalize(answer)}
        if qtype == "open":
            fields["token_recall"], fields["token_f1"] = token_recall_f1(prediction, answer)
        return fields
    _, _, rouge_f = rouge_l(answer, prediction)
    return {"correct": None, "rouge_l": rouge_f}


# ----------------------------------------------------------------------------------------------------------
# Report metrics: BLEU as sacrebleu computes corpus BLEU (13a tokens, exp smoothing), ROUGE-L as rouge-score

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


# Clinical report metrics need their own packages and model weights; run them only when both are present,
# and offline: the environment variable names a local directory, nothing is downloaded.
CLINICAL_METRICS = {   # name -> (python package, environment variable naming the local weights)
    "radgraph_f1": ("radgraph", "MEDGPT_RADGRAPH_HF_HOME"),      # a Hugging Face cache holding RadGraph's model
    "ratescore": ("RaTEScore", "MEDGPT_RATESCORE_HF_HOME"),      # a Hugging Face cache holding RaTEScore's models
    "green": ("green_score", "MEDGPT_GREEN_MODEL"),              # a GREEN model directory (GREEN-radllama2-7b)
}


def clinical_metrics(hypotheses, references):
    """{name: value or 'skipped: why'} for RadGraph-F1, RaTEScore and GREEN."""
    import importlib.util
    results = {}
    for name, (package, weights_env) in CLINICAL_METRICS.items():
        weights = os.environ.get(weights_env)
        if importlib.util.find_spec(package) is None:
            results[name] = f"skipped: package {package!r} is not installed"
        elif not weights or not Path(weights).is_dir():
            results[name] = f"skipped: set {weights_env} to a local directory holding its weights"
        else:
            results[name] = _run_clinical_metric(name, hypotheses, references, weights)
    return results


def _run_clinical_metric(name, hypotheses, references, weights):
    """Call an installed clinical metric on local weights, offline; a failure becomes a 'skipped' note.
    (These packages are not installed where this harness is tested: the calls follow their READMEs.)"""
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")   # never download a model
    try:
        if name == "radgraph_f1":
            os.environ["HF_HOME"] = weights
            from radgraph import F1RadGraph
            return float(F1RadGraph(reward_level="partial")(hyps=hypotheses, refs=references)[0]) * 100
        if name == "ratescore":
            os.environ["HF_HOME"] = weights
            from RaTEScore import RaTEScore
            return float(np.mean(RaTEScore().compute_score(hypotheses, references))) * 100
        import tempfile
        from green_score import GREEN
        with tempfile.TemporaryDirectory() as scratch:
            mean, *_ = GREEN(weights, output_dir=scratch)(references, hypotheses)
        return float(mean) * 100
    except Exception as e:  # a third-party metric must not lose a finished run
        return f"skipped: {name} failed ({type(e).__name__}: {e})"


# ----------------------------------------------------------------------------------------------------------
# Summaries: accuracy with bootstrap intervals, report metrics, the markdown table


def bootstrap_ci(values, n_resamples=1000, seed=0):
    """95% percentile interval of the mean of `values` (0/1 or scores) over resampled items, in %."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return None
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(values), size=(n_resamples, len(values)))   # (resamples, items)
    means = values[picks].mean(axis=1) * 100
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def _percent(values):
    return float(np.mean(values) * 100) if len(values) else None


def summarize(records, with_clinical=True):
    """results.json's content: per benchmark, accuracy (%) with its 95% interval, per question type, and
    report metrics; `lenient_accuracy` when the records were scored with --lenient."""
    by_bench = {}
    for record in records:
        by_bench.setdefault(record["benchmark"], []).append(record)
    results = {}
    for bench, recs in by_bench.items():
        scored = [r for r in recs if r["question_type"] != "report"]
        correct = [float(r["correct"]) for r in scored]
        entry = {"name": BENCHMARKS.get(bench, bench), "n": len(recs),
                 "accuracy": _percent(correct), "ci95": bootstrap_ci(correct), "by_type": {}}
        for qtype in QUESTION_TYPES[:4]:
            typed = [float(r["correct"]) for r in scored if r["question_type"] == qtype]
            if typed:
                entry["by_type"][qtype] = {"n": len(typed), "accuracy": _percent(typed)}
        lenient = [float(r["lenient_correct"]) if "lenient_correct" in r else float(r["correct"])
                   for r in scored]
        if any("lenient_correct" in r for r in scored):
            entry["lenient_accuracy"], entry["lenient_ci95"] = _percent(lenient), bootstrap_ci(lenient)
        opens = [r for r in scored if r["question_type"] == "open"]
        if opens:
            entry["open_token_recall"] = _percent([r["token_recall"] for r in opens])
            entry["open_token_f1"] = _percent([r["token_f1"] for r in opens])
        reports = [r for r in recs if r["question_type"] == "report"]
        if reports:
            hyps, refs = [r["prediction"] for r in reports], [r["answer"] for r in reports]
            rouge = [r["rouge_l"] for r in reports]
            entry["report"] = {f"bleu{n}": corpus_bleu(hyps, refs, max_order=n) for n in range(1, 5)}
            entry["report"]["rouge_l"], entry["report"]["rouge_l_ci95"] = _percent(rouge), bootstrap_ci(rouge)
            if with_clinical:
                entry["report"].update(clinical_metrics(hyps, refs))
        results[bench] = entry
    return results


def _fmt(value, digits=2):
    return "-" if value is None else f"{value:.{digits}f}"


def markdown_table(results, model_name="this model"):
    """Our numbers beside the paper's MedGPT-oss-20B, one row per benchmark (reports show ROUGE-L / BLEU-4)."""
    lenient = any("lenient_accuracy" in e for e in results.values())
    header = ["benchmark", "n", f"{model_name} (strict)", "95% CI"] + (["lenient"] if lenient else [])
    header.append("MedGPT-oss-20B (paper)")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for bench, entry in results.items():
        if entry["accuracy"] is not None:
            ours = _fmt(entry["accuracy"])
            ci = "-" if entry["ci95"] is None else f"{entry['ci95'][0]:.1f}–{entry['ci95'][1]:.1f}"
        else:
            report = entry["report"]
            ours = f"ROUGE-L {report['rouge_l']:.2f}, BLEU-4 {report['bleu4']:.2f}"
            lo, hi = report["rouge_l_ci95"]
            ci = f"{lo:.1f}–{hi:.1f}"
        row = [entry["name"], str(entry["n"]), ours, ci]
        if lenient:
            row.append(_fmt(entry.get("lenient_accuracy")))
        row.append(_fmt(PAPER_RESULTS.get(bench)))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------
# Contamination check against the training data's hash record


def sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_training_hashes(paths):
    """(image hashes, question hashes) of the training data: hashes.jsonl files, or directories searched for them
    (lines `{"kind": "image" | "text", "sha256": ..., "ref": ...}`, written by data/convert.py and data/demo.py)."""
    from data.convert import load_hashes
    for path in map(Path, paths):
        if not path.exists() or (path.is_dir() and not any(path.rglob("hashes.jsonl"))):
            raise FileNotFoundError(f"--train_hashes {path}: no hashes.jsonl there (data/convert.py writes one "
                                    "beside each training set's train.jsonl, data/demo.py one in its out dir)")
    hashes = load_hashes([str(p) for p in paths])
    return hashes["image"], hashes["text"]


def overlap_warnings(items, train_images, train_questions):
    """One line per benchmark whose items share an image or question hash with the training record
    (hashes the item lacks are computed as the converters compute them)."""
    from data.convert import text_sha256
    counts = {}
    for item in items:
        image_hashes = item.get("image_sha256") or [sha256_file(p) for p in item["image_paths"]]
        hit_image = any(h in train_images for h in image_hashes)
        hit_question = (item.get("question_sha256") or text_sha256(item["question"])) in train_questions
        if hit_image or hit_question:
            bench = counts.setdefault(item["benchmark"], {"images": 0, "questions": 0, "ids": []})
            bench["images"] += hit_image
            bench["questions"] += hit_question
            bench["ids"].append(item["id"])
    return [f"WARNING: {bench}: {c['images']} item(s) share an image and {c['questions']} a question with the "
            f"training data (e.g. ids {', '.join(map(str, c['ids'][:5]))}); a shared image means the item may "
            "have been seen in training (a shared question alone can be a template)"
            for bench, c in counts.items()]


# ----------------------------------------------------------------------------------------------------------
# Output files, resume


RECORD_FIELDS = ("id", "benchmark", "question_type", "question", "options", "answer", "prediction")


def make_record(item, prediction, lenient=False):
    """One line of items.jsonl: the item's fields, the prediction, and its score."""
    record = {key: item.get(key) for key in RECORD_FIELDS[:-1]}
    record["prediction"] = prediction
    record.update(score_item(item, prediction, lenient))
    return record


def rescore_records(records, lenient=False):
    """Recompute `correct` (and the type's extras) for saved predictions, in order."""
    rescored = []
    for n, record in enumerate(records, 1):
        missing = [key for key in RECORD_FIELDS if key not in record]
        if missing:
            raise ItemError(f"record {n} (id {record.get('id')!r}): missing {missing}; "
                            f"--rescore needs the fields {', '.join(RECORD_FIELDS)}")
        item = check_item(dict(record), f"record {n} (id {record['id']!r})")
        rescored.append(make_record(item, record["prediction"], lenient))
    return rescored


def write_jsonl(path, records):
    tmp = Path(f"{path}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)   # a crash never leaves half a file behind


def read_progress(out_dir):
    """{(benchmark, id): record} from a previous run's items.jsonl and progress files (a torn last line,
    from a run killed mid-write, is dropped)."""
    out_dir = Path(out_dir)
    files = [out_dir / "items.jsonl"] + sorted((out_dir / "progress").glob("rank*.jsonl"))
    done = {}
    for file in files:
        if not file.is_file():
            continue
        with open(file, encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                done[(record["benchmark"], record["id"])] = record
    return done


def check_run_settings(out_dir, settings):
    """Refuse to resume into an out_dir written with other decoding settings (it would mix predictions)."""
    path = Path(out_dir) / "run.json"
    if path.is_file():
        previous = json.loads(path.read_text())
        changed = {k: (previous.get(k), v) for k, v in settings.items() if previous.get(k) != v}
        if changed:
            raise SystemExit(f"{path}: this out_dir holds a run with other settings {changed} (before, now); "
                             "use a new --out_dir, or delete it to start over")


def write_outputs(out_dir, records, warnings=(), model_name="this model"):
    """items.jsonl, results.json and results.md; returns (results, markdown table)."""
    out_dir = Path(out_dir)
    results = summarize(records)
    write_jsonl(out_dir / "items.jsonl", records)
    (out_dir / "results.json").write_text(json.dumps({"benchmarks": results, "warnings": list(warnings)},
                                                     indent=2) + "\n")
    table = markdown_table(results, model_name)
    notes = "".join(f"\n{w}\n" for w in warnings)
    (out_dir / "results.md").write_text(table + notes)
    return results, table


# ----------------------------------------------------------------------------------------------------------
# Decoding: harmony prompts, images as tiles, batched greedy generation


def load_model(path, dtype, device):
    """(model, is_multimodal): MedGPT for a LLaVA-format directory, GPT for a gpt-oss one."""
    import torch
    import model as modeling
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"--model {path}: no config.json; expected a LLaVA-format MedGPT directory "
                                "(train_stage*.py's <out_dir>/final) or a gpt-oss directory")
    model_type = json.loads(config_path.read_text()).get("model_type")
    if model_type == "llava":
        model = modeling.MedGPT.from_pretrained(path, dtype=dtype, device=device)
    elif model_type == "gpt_oss":
        model = modeling.GPT.from_pretrained(path, dtype=dtype, device=device)
    else:
        raise ValueError(f"{config_path}: model_type {model_type!r}; expected 'llava' (MedGPT) or 'gpt_oss' (GPT)")
    torch.manual_seed(0)   # nothing is sampled, but keep any stray randomness fixed
    return model.eval(), model_type == "llava"


def load_tokenizer_for(model_dir):
    """The checkpoint's tokenizer.json when it has one, else o200k_harmony built offline."""
    has_own = (Path(model_dir) / "tokenizer.json").is_file()
    return _load_tokenizer(str(Path(model_dir).resolve() / "tokenizer.json") if has_own else None)


@functools.lru_cache(maxsize=4)
def _load_tokenizer(path):
    """Loaded once per process (seconds for o200k's 200k-token vocabulary)."""
    from data.tokenizer import load_tokenizer
    return load_tokenizer(path)


class Encoder:
    """Turns items into prompt ids and image tiles for one model: harmony rendering, image-token runs."""

    def __init__(self, tok, model=None, is_multimodal=False, max_tiles=1, reasoning=False, system_prompt=None):
        from data.tokenizer import CHANNEL, MESSAGE, encode_ordinary
        self.tok, self.is_multimodal, self.max_tiles, self.reasoning = tok, is_multimodal, max_tiles, reasoning
        # the same optional system message the stage-3 data was rendered with (data.datasets' system_prompt)
        self.system = [{"role": "system", "content": system_prompt}] if system_prompt else []
        # without reasoning the prompt opens the final channel: the model answers at once, and stops at
        # <|return|> or <|end|> with nothing to strip
        self.final_header = [] if reasoning else [CHANNEL] + encode_ordinary(tok, "final") + [MESSAGE]
        if is_multimodal:
            self.image_token_id = model.image_token_id
            self.tokens_per_tile = model.tokens_per_tile
            self.image_size = model.vision_tower.config.image_size

    def image_token_counts(self, item):
        """Image tokens each of the item's images gets (tiles x tokens per tile), read from the image headers."""
        from PIL import Image
        import vision
        counts = []
        for path in item["image_paths"]:
            with Image.open(path) as image:   # the header only: size without decoding pixels
                width, height = image.size
            counts.append(vision.num_tiles(width, height, self.max_tiles, self.image_size) * self.tokens_per_tile)
        return counts

    def prompt_ids(self, item):
        from data.harmony import render_generation_prompt
        if item["images"] and not self.is_multimodal:
            raise ValueError(f"item {item['id']!r} of {item['benchmark']}: has images but the model is text-only "
                             "(gpt_oss); evaluate a MedGPT (LLaVA-format) checkpoint, or a text-only benchmark")
        messages = self.system + [{"role": "user", "content": build_prompt(item)}]
        if not item["images"]:
            return render_generation_prompt(self.tok, messages).ids + self.final_header
        rendered = render_generation_prompt(self.tok, messages, self.image_token_counts(item), self.image_token_id)
        return rendered.ids + self.final_header

    def pixel_values(self, item):
        """(n_tiles, 3, S, S) for all of the item's images, in prompt order; None without images."""
        import torch
        from PIL import Image
        import vision
        if not item["images"]:
            return None
        tiles = []
        for path in item["image_paths"]:
            with Image.open(path) as image:
                tiles.append(vision.image_to_tiles(image, self.max_tiles, self.image_size))
        return torch.cat(tiles)   # (sum of tiles, 3, S, S)


def final_channel_text(tok, new_ids, reasoning=False):
    """The answer: the final channel's text among the generated ids.

    Without reasoning the prompt opened the final channel, so it is everything up to the first stop token.
    With reasoning the model writes `<|channel|>analysis<|message|>...<|end|><|start|>assistant<|channel|>final
    <|message|>...<|return|>`; the answer is the last final-channel message ("" if it never wrote one).
    """
    from data.tokenizer import CALL, CHANNEL, END, MESSAGE, RETURN, START, decode
    ids = list(new_ids)
    if not reasoning:
        cut = next((i for i, t in enumerate(ids) if t in (RETURN, END, CALL)), len(ids))
        return decode(tok, ids[:cut]).strip()
    answer, header, body, in_body = "", [], [], False
    for t in ids + [END]:
        if t in (END, RETURN, CALL, START):
            if in_body and decode(tok, header).strip() == "final":
                answer = decode(tok, body).strip()
            header, body, in_body = [], [], False
            if t in (RETURN, CALL):
                break
        elif t == CHANNEL:
            header, in_body = [], False
        elif t == MESSAGE:
            in_body = True
        elif in_body:
            body.append(t)
        else:
            header.append(t)
    return answer


def generate_batch(model, is_multimodal, prompts, pixel_values, max_new_tokens, reasoning=False):
    """Greedy continuations of left-padded prompts -> list of generated id lists (stop tokens included)."""
    import torch
    from data.tokenizer import CALL, END, ENDOFTEXT, RETURN
    device = next(model.parameters()).device
    lens = [len(p) for p in prompts]
    T = max(lens)
    input_ids = torch.full((len(prompts), T), ENDOFTEXT, dtype=torch.long)   # (B, T), left-padded
    for b, p in enumerate(prompts):
        input_ids[b, T - len(p):] = torch.tensor(p, dtype=torch.long)
    # with reasoning, <|end|> closes the analysis message and decoding goes on to the final one
    stop_tokens = [RETURN, CALL] if reasoning else [RETURN, END, CALL]
    kwargs = dict(max_new_tokens=max_new_tokens, temperature=0.0, stop_tokens=stop_tokens, prompt_lens=lens)
    input_ids = input_ids.to(device)
    with torch.no_grad():
        if is_multimodal:
            pixels = [p for p in pixel_values if p is not None]
            pixels = torch.cat(pixels).to(device, next(model.parameters()).dtype) if pixels else None
            out = model.generate(input_ids, pixel_values=pixels, **kwargs)
        else:
            out = model.generate(input_ids, **kwargs)
    return [row.tolist() for row in out[:, T:].cpu()]


def predict(model, is_multimodal, encoder, items, batch_size, max_new_tokens, on_batch=None):
    """Predictions for `items` (same order). Prompts are sorted by length (longest first) so a batch holds
    similar lengths; `on_batch(items, predictions)` is called after each batch (progress, resume file)."""
    prompts = [encoder.prompt_ids(item) for item in items]
    order = sorted(range(len(items)), key=lambda i: -len(prompts[i]))
    predictions = [None] * len(items)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        pixels = [encoder.pixel_values(items[i]) for i in chunk] if is_multimodal else None
        generated = generate_batch(model, is_multimodal, [prompts[i] for i in chunk], pixels, max_new_tokens,
                                   encoder.reasoning)
        for i, ids in zip(chunk, generated):
            predictions[i] = final_channel_text(encoder.tok, ids, encoder.reasoning)
        if on_batch is not None:
            on_batch([items[i] for i in chunk], [predictions[i] for i in chunk])
    return predictions


# ----------------------------------------------------------------------------------------------------------
# torchrun: items dealt over ranks, records gathered on rank 0 as JSON bytes


def all_gather_json(obj, world, device="cpu"):
    """Every rank's JSON-serialisable `obj`, in rank order (bytes through all_gather: no pickle)."""
    if world == 1:
        return [obj]
    import torch
    import torch.distributed as dist
    payload = torch.tensor(list(json.dumps(obj).encode("utf-8")), dtype=torch.uint8, device=device)
    size = torch.tensor([payload.numel()], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[:payload.numel()] = payload
    gathered = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return [json.loads(bytes(g[:int(s.item())].cpu().tolist()).decode("utf-8")) for g, s in zip(gathered, sizes)]


# ----------------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Evaluate a MedGPT-oss checkpoint on the paper's benchmarks "
                                            "(greedy decoding, strict scoring).")
    p.add_argument("--model", help="checkpoint directory (LLaVA-format MedGPT, or gpt-oss for text-only)")
    p.add_argument("--bench", help=f"comma-separated benchmark names ({', '.join(BENCHMARKS)}, or any "
                                   "directory under --data_dir)")
    p.add_argument("--data_dir", help="root of the converted benchmarks: <data_dir>/<bench>/test.jsonl")
    p.add_argument("--out_dir", help="where items.jsonl, results.json, results.md and progress/ go")
    p.add_argument("--batch_size", type=int, default=8,
                   help="prompts decoded together (predictions do not depend on it)")
    p.add_argument("--max_new_tokens", type=int, default=None,
                   help="default: 32; 512 with report items; 1024 with --reasoning")
    p.add_argument("--max_tiles", type=int, default=1, help="image tiles per image (1 = plain LLaVA-1.5)")
    p.add_argument("--reasoning", action="store_true",
                   help="let the model write an analysis message first; the answer is its final-channel message")
    p.add_argument("--system_prompt", default=None,
                   help="system message text, if the model was trained with one (stage 3's system_prompt)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--limit", type=int, default=None, help="first N items of each benchmark")
    p.add_argument("--lenient", action="store_true",
                   help="also score multiple choice with MedEvalKit's closest-option fallback (reported apart)")
    p.add_argument("--train_hashes", default=None,
                   help="comma-separated hashes.jsonl files or directories of the training data: warn on overlap")
    p.add_argument("--rescore", metavar="IN.jsonl", help="recompute `correct` for saved predictions")
    p.add_argument("--out", metavar="OUT.jsonl", help="with --rescore: where the rescored items go")
    args = p.parse_args(argv)
    if args.rescore:
        if not args.out:
            p.error("--rescore needs --out OUT.jsonl")
    else:
        missing = [f"--{k}" for k in ("model", "bench", "data_dir", "out_dir") if not getattr(args, k)]
        if missing:
            p.error(f"missing {', '.join(missing)}")
        if args.batch_size < 1:
            p.error("--batch_size must be at least 1")
    return args


def rescore_main(args):
    records = [record for _, record in read_jsonl(args.rescore)]
    rescored = rescore_records(records, args.lenient)
    write_jsonl(args.out, rescored)
    results = summarize(rescored)
    print(json.dumps(results, indent=2))
    print(markdown_table(results))
    return results


def log(message):
    print(f"[eval] {message}", file=sys.stderr, flush=True)


def main(argv=None):
    args = parse_args(argv)
    if args.rescore:
        return rescore_main(args)
    import torch
    import zero  # the process group (one process without torchrun)
    rank, _, world, device = zero.init_distributed()
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda"
                                                           else torch.float32)
    out_dir = Path(args.out_dir)
    benches = [b.strip() for b in args.bench.split(",") if b.strip()]
    items = [item for bench in benches for item in load_items(args.data_dir, bench, args.limit)]
    has_reports = any(item["question_type"] == "report" for item in items)
    max_new_tokens = args.max_new_tokens or (1024 if args.reasoning else 512 if has_reports else 32)
    warnings = []
    if args.train_hashes:
        train_images, train_questions = load_training_hashes(args.train_hashes.split(","))
        warnings = overlap_warnings(items, train_images, train_questions)
    settings = {"model": str(Path(args.model).resolve()), "max_new_tokens": max_new_tokens,
                "max_tiles": args.max_tiles, "reasoning": args.reasoning,
                "system_prompt": args.system_prompt, "dtype": str(dtype).replace("torch.", "")}
    check_run_settings(out_dir, settings)   # every rank reads; rank 0 writes run.json after the gather below
    (out_dir / "progress").mkdir(parents=True, exist_ok=True)
    if rank == 0:
        for warning in warnings:
            log(warning)

    done = read_progress(out_dir) if rank == 0 else {}
    done_keys = {tuple(k) for k in all_gather_json(list(done), world, device)[0]}   # rank 0's view for all
    if rank == 0:
        (out_dir / "run.json").write_text(json.dumps(settings, indent=2) + "\n")
    todo = [item for item in items if (item["benchmark"], item["id"]) not in done_keys]
    mine = todo[rank::world]
    log(f"rank {rank}/{world}: {len(items)} items in {len(benches)} benchmark(s), {len(items) - len(todo)} done "
        f"before, {len(mine)} to run here (batch {args.batch_size}, max_new_tokens {max_new_tokens})")

    new_records = []
    if mine:
        model, is_multimodal = load_model(args.model, dtype, device)
        encoder = Encoder(load_tokenizer_for(args.model), model, is_multimodal, args.max_tiles, args.reasoning,
                          args.system_prompt)
        started = time.time()
        with open(out_dir / "progress" / f"rank{rank}.jsonl", "a", encoding="utf-8") as progress_file:

            def on_batch(batch_items, predictions):   # each finished batch is on disk before the next starts
                for item, prediction in zip(batch_items, predictions):
                    record = make_record(item, prediction, args.lenient)
                    new_records.append(record)
                    progress_file.write(json.dumps(record, ensure_ascii=False) + "\n")
                progress_file.flush()
                rate = len(new_records) / (time.time() - started)
                log(f"rank {rank}: {len(new_records)}/{len(mine)} items, {rate:.2f} items/s")

            predict(model, is_multimodal, encoder, mine, args.batch_size, max_new_tokens, on_batch)

    gathered = all_gather_json(new_records, world, device)
    if rank != 0:
        return None
    by_key = dict(done)
    for records in gathered:
        by_key.update({(r["benchmark"], r["id"]): r for r in records})
    # rescore everything, old records included, so one run's file always follows one version of the rules
    ordered = [make_record(item, by_key.pop((item["benchmark"], item["id"]))["prediction"], args.lenient)
               for item in items]
    ordered += [r for key, r in by_key.items() if key[0] not in benches]   # earlier runs' other benchmarks stay
    model_name = "/".join(Path(args.model).resolve().parts[-2:])   # "stage3/final", not just "final"
    results, table = write_outputs(out_dir, ordered, warnings, model_name=model_name)
    for file in (out_dir / "progress").glob("rank*.jsonl"):
        file.unlink()
    print(table)
    return results


if __name__ == "__main__":
    main()
