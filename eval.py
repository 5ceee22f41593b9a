"""
Evaluation harness for MedGPT-oss nano: the paper's benchmarks, deterministic decoding, strict scoring.

    python eval.py --model out/final --bench slake,vqa_rad --data_dir data/eval --out_dir out/eval
    python eval.py --model out/final --bench mimic_cxr_impression --data_dir data/eval --out_dir out/eval \
        --prior --max_views 3 --shots 0,1 --shot_pool data/train/mimic_cxr_instruct/train.jsonl
    torchrun --nproc_per_node 8 eval.py --model ... --bench ... --data_dir ... --out_dir ...
    python eval.py --rescore out/eval/items.jsonl --out out/eval/rescored.jsonl [--lenient]

Design choices
- One item format for every benchmark (docs/internals.md): `<data_dir>/<bench>/test.jsonl`, written by the
  converters in data/. The harness never knows a benchmark's original layout, only its question types.
- One prompt per question type (multiple_choice, yes_no, closed, open, report), rendered as a harmony user
  turn; the assistant turn is opened on the final channel, so the final channel's text is the answer.
  Report items of a task (findings, impression) are prompted by data.mimic.report_prompt, which names the
  task, the views and whether a prior study is given: --max_views keeps a study's first N views (frontal
  first), --prior adds the linked prior study's images and report.
- In-context shots (--shots k): k exemplars from a named pool (a train-split file: eval items or stage-3
  conversations) go before the question as earlier user/assistant turns. Chosen per item by a stated rule
  (seeded random, or nearest by image thumbnail cosine), of the same task or question type, never sharing an
  image (sha256) with any test item. --shots 0,1 runs both and the tables put them side by side.
- Greedy decoding only, batched with the model's KV cache, prompts sorted by length. Batching must not change
  a prediction: the test suite checks batch 1 against batch 8.
- Strict scoring, by rules short enough to read below (`parse_choice`, `parse_yes_no`, `normalize`).
  A response that names two options, both yes and no, or nothing parseable is wrong. `--lenient` adds
  MedEvalKit's closest-option fallback (difflib similarity) for multiple choice, reported in its own column.
- Report metrics (report_metrics.py) on the paper's 0-1 scale: BLEU-1..4, ROUGE-L, BERTScore, s_emb,
  RadGraph-F1, RaTEScore, RadCliQ-v1 and 1/RadCliQ-v1; model-based ones read local models only, and one that
  cannot run is "not computed: <why>".
- Accuracy comes with a bootstrap 95% interval (1000 resamples of the items, fixed seed).
- Every finished batch is appended to `<out_dir>/progress/rank<R>.jsonl`; a rerun skips items already there,
  so an interrupted run resumes. Under torchrun items are dealt round-robin over ranks and gathered on rank 0
  as JSON bytes (no pickle).
- Nothing prints question or report text; progress lines carry counts only.
"""
import argparse
import difflib
import functools
import json
import os
import random
import re
import string
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

import model as modeling
import report_metrics
import vision
import zero
from data.leakage import file_sha256, load_hashes, text_sha256
from data.harmony import render_generation_prompt
from data.mimic import TASKS, TRAIN_MAX_VIEWS, report_prompt
from data.tokenizer import CALL, CHANNEL, END, ENDOFTEXT, MESSAGE, RETURN, START, decode, encode_ordinary
from data.tokenizer import load_tokenizer

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
    "mimic_cxr_findings": "MIMIC-CXR findings",
    "mimic_cxr_impression": "MIMIC-CXR impression",
    "iu_xray_findings": "IU-Xray findings",
    "iu_xray_impression": "IU-Xray impression",
    "chexpert_plus_findings": "CheXpert Plus findings",
    "chexpert_plus_impression": "CheXpert Plus impression",
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
# MIMIC-CXR report generation with multi-view and longitudinal inputs (0-1 scale); the paper's table gives these
# three for report generation, which this harness reports on the findings task
PAPER_REPORT = {"mimic_cxr_findings": {"radgraph_f1": 0.189, "ratescore": 0.522, "inv_radcliq_v1": 0.803}}
# in-context learning on impression generation, 0-shot and 1-shot (%, as the paper gives them)
PAPER_SHOTS = {"mimic_cxr_impression": {0: 47.22, 1: 55.60}}

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
    if qtype == "report" and item.get("task") is not None:
        check_report_fields(item, where)
    return item


def check_report_fields(item, where):
    """A report item of a task: `task`, `views` (one per image) and `prior` (null or the linked prior study)."""
    if item["task"] not in TASKS:
        raise ItemError(f"{where}: task {item['task']!r} is not one of {', '.join(TASKS)}")
    views = item.get("views")
    if not isinstance(views, list) or len(views) != len(item["images"]):
        raise ItemError(f"{where}: views must list one view per image ({len(item['images'])}), found {views!r}")
    prior = item.get("prior")
    if prior is not None:
        if not isinstance(prior, dict) or not all(k in prior for k in ("images", "views", "report")):
            raise ItemError(f"{where}: prior must be null or {{\"study\", \"images\", \"views\", \"report\"}}, "
                            f"found {prior!r:.80}")
        if len(prior["views"]) != len(prior["images"]):
            raise ItemError(f"{where}: the prior study's views and images differ in number")


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
        item["image_paths"] = resolve_images(item["images"], path.parent, where)
        if item.get("prior"):
            item["prior"]["image_paths"] = resolve_images(item["prior"]["images"], path.parent, where)
        items.append(item)
        if limit is not None and len(items) >= limit:
            break
    return items


def resolve_images(images, folder, where):
    """Absolute paths of images given relative to `folder`; a missing one raises naming `where`."""
    absolute = []
    for rel in images:
        image_path = (Path(folder) / rel).resolve()
        if not image_path.is_file():
            raise ItemError(f"{where}: image {rel!r} not found (looked for {image_path}); "
                            f"image paths are relative to {folder}")
        absolute.append(str(image_path))
    return absolute


def apply_report_context(item, max_views=TRAIN_MAX_VIEWS, with_prior=False):
    """A report item of a task, in place: its first `max_views` views, the linked prior study (its first
    `max_views` views and its report) when `with_prior`, and the task's prompt in `question`.
    Images go in prompt order: the prior study's, then the current study's. Other items are left as they are."""
    if item["question_type"] != "report" or item.get("task") is None:
        return item
    views, paths = item["views"][:max_views], item["image_paths"][:max_views]
    prior = item.get("prior") if with_prior else None
    prior_views = prior["views"][:max_views] if prior else []
    prior_images = prior["images"][:max_views] if prior else []
    prior_paths = prior["image_paths"][:max_views] if prior else []
    item["question"] = report_prompt(item["task"], views, prior_views or None, prior["report"] if prior else None)
    item["images"] = prior_images + item["images"][:max_views]
    item["image_paths"] = prior_paths + paths
    return item


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
    _, _, rouge_f = report_metrics.rouge_l(answer, prediction)
    return {"correct": None, "rouge_l": rouge_f}


# ----------------------------------------------------------------------------------------------------------
# In-context shots: exemplars from a named pool, chosen per item by a stated deterministic rule

SHOT_RULES = ("random", "nearest")
THUMBNAIL = 32   # 'nearest': cosine of the mean 32 x 32 grey thumbnail of an item's images (each mean-centred)


def pool_hashes(path):
    """{image path relative to the pool file: sha256} from a hashes.jsonl beside it (data/convert.py writes one)."""
    hashes_file = Path(path).parent / "hashes.jsonl"
    if not hashes_file.is_file():
        return {}
    return {row["ref"]: row["sha256"] for _, row in read_jsonl(hashes_file) if row.get("kind") == "image"}


def pool_exemplar(record, folder, where, max_views, with_prior):
    """One exemplar {id, prompt, answer, images, task, question_type} of an eval item or a stage-3 conversation."""
    if "conversations" in record:
        turns = record["conversations"] if isinstance(record["conversations"], list) else []
        prompt = next((t.get("value") for t in turns if t.get("from") in ("human", "user")), None)
        answer = next((t.get("value") for t in turns if t.get("from") in ("gpt", "assistant")), None)
        if not isinstance(prompt, str) or not isinstance(answer, str):
            raise ItemError(f"{where}: a pool conversation needs a human turn and a gpt turn (strings)")
        images = record.get("image") or []
        images = [images] if isinstance(images, str) else images
        task = record.get("task")
        return {"id": str(record.get("id", where)), "prompt": prompt, "answer": answer, "images": images,
                "image_paths": resolve_images(images, folder, where), "task": task,
                "question_type": "report" if task else None}
    item = check_item(dict(record), where)
    item["image_paths"] = resolve_images(item["images"], folder, where)
    if item.get("prior"):
        item["prior"]["image_paths"] = resolve_images(item["prior"]["images"], folder, where)
    apply_report_context(item, max_views, with_prior)
    exemplar = {key: item.get(key) for key in ("id", "answer", "images", "image_paths", "task", "question_type")}
    exemplar["prompt"], exemplar["id"] = build_prompt(item), str(item["id"])
    if item.get("image_sha256") and len(item["image_sha256"]) == len(item["images"]):
        exemplar["image_sha256"] = list(item["image_sha256"])
    return exemplar


def load_shot_pool(paths, max_views=TRAIN_MAX_VIEWS, with_prior=False):
    """Exemplars of the pool files (train-split eval items or stage-3 conversations); image paths relative to
    each file. Report exemplars in the eval format get the same --max_views / --prior context as the items."""
    pool = []
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"--shot_pool {path}: no such file (a train-split test.jsonl-format file, or "
                                    "a stage-3 train.jsonl such as data.convert mimic-cxr-instruct writes)")
        known = pool_hashes(path)
        for lineno, record in read_jsonl(path):
            exemplar = pool_exemplar(record, path.parent, f"{path}:{lineno}", max_views, with_prior)
            if "image_sha256" not in exemplar and all(rel in known for rel in exemplar["images"]):
                exemplar["image_sha256"] = [known[rel] for rel in exemplar["images"]]
            pool.append(exemplar)
    if not pool:
        raise ItemError(f"--shot_pool {', '.join(map(str, paths))}: no exemplars")
    return pool


def test_image_hashes(items):
    """sha256 of every image of the test items (the prior study's too): no exemplar may share one."""
    hashes = set()
    for item in items:
        hashes.update(item.get("image_sha256") or [file_sha256(p) for p in item["image_paths"]])
        if item.get("prior"):
            hashes.update(item["prior"].get("image_sha256") or [file_sha256(p) for p in item["prior"]["image_paths"]])
    return hashes


def shares_test_image(exemplar, test_hashes):
    if "image_sha256" not in exemplar:   # hashed when first considered, not the whole pool up front
        exemplar["image_sha256"] = [file_sha256(p) for p in exemplar["image_paths"]]
    return bool(set(exemplar["image_sha256"]) & test_hashes)


@functools.lru_cache(maxsize=None)
def thumbnail(path):
    """A (THUMBNAIL**2,) grey thumbnail, centred on its mean."""
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("L").resize((THUMBNAIL, THUMBNAIL), Image.BICUBIC), dtype=np.float64)
    pixels = pixels.reshape(-1)   # (THUMBNAIL * THUMBNAIL,)
    return pixels - pixels.mean()


def image_signature(paths):
    """The unit-length mean thumbnail of some images (zeros without images)."""
    if not paths:
        return np.zeros(THUMBNAIL * THUMBNAIL)
    mean = np.mean([thumbnail(p) for p in paths], axis=0)
    norm = np.linalg.norm(mean)
    return mean / norm if norm > 0 else mean


def pick_shots(item, pool, k, rule, seed, test_hashes):
    """k exemplars for `item`: of its task (report items) or question type, none sharing an image with the test
    set. 'random': a shuffle seeded by (seed, benchmark, id), so a run's choice depends on nothing else;
    'nearest': highest image_signature cosine, ties by id (text-only items fall back to 'random')."""
    if item.get("task"):
        candidates = [e for e in pool if e["task"] == item["task"]]
    else:
        candidates = [e for e in pool if e["question_type"] in (None, item["question_type"])]
    candidates.sort(key=lambda e: e["id"])
    if rule == "nearest" and item["image_paths"]:
        target = image_signature(item["image_paths"])
        candidates.sort(key=lambda e: -float(image_signature(e["image_paths"]) @ target))   # stable: ties by id
    else:
        random.Random(f"{seed}:{item['benchmark']}:{item['id']}").shuffle(candidates)
    chosen = []
    for exemplar in candidates:
        if len(chosen) == k:
            break
        if not shares_test_image(exemplar, test_hashes):
            chosen.append(exemplar)
    if len(chosen) < k:
        kind = f"task {item['task']!r}" if item.get("task") else f"question type {item['question_type']!r}"
        raise ItemError(f"item {item['id']!r}: the shot pool has only {len(chosen)} exemplar(s) of {kind} that "
                        f"share no image with the test set; {k} are needed")
    return chosen


def with_shots(items, shot_counts, pool, rule, seed):
    """One work unit per (item, shot count): a copy of the item with `n_shots` and its `shot_examples`."""
    test_hashes = test_image_hashes(items) if pool else set()
    units = []
    for k in shot_counts:
        for item in items:
            shots = pick_shots(item, pool, k, rule, seed, test_hashes) if k else []
            units.append({**item, "n_shots": k, "shot_examples": shots})
    return units


# ----------------------------------------------------------------------------------------------------------
# Summaries: accuracy with bootstrap intervals, report metrics, the markdown table


def bootstrap_ci(values, n_resamples=1000, seed=0, scale=100):
    """95% percentile interval of the mean of `values` (0/1 or scores) over resampled items, times `scale`."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return None
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(values), size=(n_resamples, len(values)))   # (resamples, items)
    means = values[picks].mean(axis=1) * scale
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def _percent(values):
    return float(np.mean(values) * 100) if len(values) else None


def result_key(bench, shots):
    """results.json's key: the benchmark's name for 0-shot, 'name/k-shot' otherwise."""
    return bench if not shots else f"{bench}/{shots}-shot"


def summarize(records, metric_paths=None):
    """results.json's content: per benchmark and shot count, accuracy (%) with its 95% interval, per question
    type, and report metrics (0-1); `lenient_accuracy` when the records were scored with --lenient."""
    groups = {}
    for record in records:
        groups.setdefault((record["benchmark"], record.get("shots", 0)), []).append(record)
    results = {}
    for (bench, shots), recs in groups.items():
        scored = [r for r in recs if r["question_type"] != "report"]
        correct = [float(r["correct"]) for r in scored]
        entry = {"name": BENCHMARKS.get(bench, bench), "benchmark": bench, "shots": shots, "n": len(recs),
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
            entry["report"] = report_metrics.report_metrics(hyps, refs, metric_paths)
            entry["report"]["rouge_l_ci95"] = bootstrap_ci([r["rouge_l"] for r in reports], scale=1)
        results[result_key(bench, shots)] = entry
    return results


def _fmt(value, digits=2):
    if isinstance(value, str):   # 'not computed: ...'
        return "n/c"
    return "-" if value is None else f"{value:.{digits}f}"


def _row(cells):
    return "| " + " | ".join(cells) + " |"


def markdown_table(results, model_name="this model"):
    """Our numbers beside the paper's MedGPT-oss-20B, one row per benchmark and shot count (reports show ROUGE-L
    and BLEU-4 here), then the report metrics table and the 0-shot / k-shot table when there are any."""
    lenient = any("lenient_accuracy" in e for e in results.values())
    header = ["benchmark", "shots", "n", f"{model_name} (strict)", "95% CI"] + (["lenient"] if lenient else [])
    header.append("MedGPT-oss-20B (paper)")
    lines = [_row(header), "|" + "---|" * len(header)]
    for entry in results.values():
        if entry["accuracy"] is not None:
            ours = _fmt(entry["accuracy"])
            ci = "-" if entry["ci95"] is None else f"{entry['ci95'][0]:.1f}–{entry['ci95'][1]:.1f}"
        else:
            report = entry["report"]
            ours = f"ROUGE-L {report['rouge_l']:.3f}, BLEU-4 {report['bleu4']:.3f}"
            lo, hi = report["rouge_l_ci95"]
            ci = f"{lo:.3f}–{hi:.3f}"
        row = [entry["name"], str(entry["shots"]), str(entry["n"]), ours, ci]
        if lenient:
            row.append(_fmt(entry.get("lenient_accuracy")))
        row.append(_fmt(PAPER_RESULTS.get(entry["benchmark"])) if not entry["shots"] else "-")
        lines.append(_row(row))
    text = "\n".join(lines) + "\n"
    if any("report" in e for e in results.values()):
        text += "\n" + report_table(results)
    if any(e["shots"] for e in results.values()):
        text += "\n" + shots_table(results)
    return text


REPORT_COLUMNS = [("BLEU-1", "bleu1"), ("BLEU-4", "bleu4"), ("ROUGE-L", "rouge_l"), ("BERTScore", "bertscore"),
                  ("s_emb", "semb"), ("RadGraph-F1", "radgraph_f1"), ("RaTEScore", "ratescore"),
                  ("RadCliQ-v1", "radcliq_v1"), ("1/RadCliQ-v1", "inv_radcliq_v1")]


def report_table(results):
    """Every report metric (0-1), one row per report benchmark and shot count, the paper's row beside; 'n/c' =
    not computed, with the reasons listed under the table."""
    header = ["benchmark", "shots", "n"] + [name for name, _ in REPORT_COLUMNS]
    lines, reasons = [_row(header), "|" + "---|" * len(header)], {}
    for entry in results.values():
        if "report" not in entry:
            continue
        report = entry["report"]
        lines.append(_row([entry["name"], str(entry["shots"]), str(entry["n"])]
                          + [_fmt(report.get(key), 3) for _, key in REPORT_COLUMNS]))
        reasons.update({name: report[key] for name, key in REPORT_COLUMNS if isinstance(report.get(key), str)})
        paper = PAPER_REPORT.get(entry["benchmark"])
        if paper and not entry["shots"]:
            lines.append(_row([f"{entry['name']} (MedGPT-oss-20B, paper)", "0", "-"]
                              + [_fmt(paper.get(key), 3) for _, key in REPORT_COLUMNS]))
    notes = "".join(f"\n- {name}: {reason}" for name, reason in reasons.items())
    return "\n".join(lines) + "\n" + (f"\nn/c:{notes}\n" if notes else "")


def shots_table(results):
    """0-shot and k-shot side by side per benchmark (accuracy %, or report metrics 0-1), the paper's in-context
    numbers beside them (impression generation: 0-shot 47.22% -> 1-shot 55.60%)."""
    by_bench = {}
    for entry in results.values():
        by_bench.setdefault(entry["benchmark"], {})[entry["shots"]] = entry
    counts = sorted({e["shots"] for e in results.values()})
    header = ["benchmark", "metric"] + [f"{k}-shot" for k in counts] + ["paper 0-shot", "paper 1-shot"]
    lines = [_row(header), "|" + "---|" * len(header)]
    for bench, entries in by_bench.items():
        first = next(iter(entries.values()))
        if "report" in first:
            metrics = [("ROUGE-L", "rouge_l"), ("RadGraph-F1", "radgraph_f1"), ("RaTEScore", "ratescore"),
                       ("1/RadCliQ-v1", "inv_radcliq_v1")]
            values = [[entries[k]["report"].get(key) if k in entries else None for k in counts]
                      for _, key in metrics]
        else:
            metrics = [("accuracy %", None)]
            values = [[entries[k]["accuracy"] if k in entries else None for k in counts]]
        paper = PAPER_SHOTS.get(bench, {})
        for i, ((name, _), row) in enumerate(zip(metrics, values)):
            papers = [_fmt(paper.get(0)), _fmt(paper.get(1))] if i == 0 else ["", ""]
            lines.append(_row([first["name"] if i == 0 else "", name] + [_fmt(v, 3) for v in row] + papers))
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------
# Contamination check against the training data's hash record


def load_training_hashes(paths):
    """(image hashes, question hashes) of the training data: hashes.jsonl files, or directories searched for them
    (lines `{"kind": "image" | "text", "sha256": ..., "ref": ...}`, written by data/convert.py and data/demo.py)."""
    for path in map(Path, paths):
        if not path.exists() or (path.is_dir() and not any(path.rglob("hashes.jsonl"))):
            raise FileNotFoundError(f"--train_hashes {path}: no hashes.jsonl there (data/convert.py writes one "
                                    "beside each training set's train.jsonl, data/demo.py one in its out dir)")
    hashes = load_hashes([str(p) for p in paths])
    return hashes["image"], hashes["text"]


def overlap_warnings(items, train_images, train_questions):
    """One line per benchmark whose items share an image or question hash with the training record
    (hashes the item lacks are computed as the converters compute them)."""
    counts = {}
    for item in items:
        image_hashes = item.get("image_sha256") or [file_sha256(p) for p in item["image_paths"]]
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
    """One line of items.jsonl: the item's fields, the prediction, its score, the shots it was given."""
    record = {key: item.get(key) for key in RECORD_FIELDS[:-1]}
    record["prediction"] = prediction
    record.update(score_item(item, prediction, lenient))
    if item.get("task"):
        record["task"] = item["task"]
    record["shots"] = item.get("n_shots", item.get("shots", 0))
    record["shot_ids"] = [e["id"] for e in item["shot_examples"]] if "shot_examples" in item else \
        item.get("shot_ids", [])
    return record


def record_key(record):
    """What identifies a prediction: benchmark, id and shot count."""
    return record["benchmark"], record["id"], record.get("shots", record.get("n_shots", 0))


def rescore_records(records, lenient=False):
    """Recompute `correct` (and the type's extras) for saved predictions, in order."""
    rescored = []
    for n, record in enumerate(records, 1):
        missing = [key for key in RECORD_FIELDS if key not in record]
        if missing:
            raise ItemError(f"record {n} (id {record.get('id')!r}): missing {missing}; "
                            f"--rescore needs the fields {', '.join(RECORD_FIELDS)}")
        item = check_item({k: v for k, v in record.items() if k != "task"}, f"record {n} (id {record['id']!r})")
        rescored.append(make_record(item, record["prediction"], lenient))
    return rescored


def write_jsonl(path, records):
    tmp = Path(f"{path}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)   # a crash never leaves half a file behind


def read_progress(out_dir):
    """{(benchmark, id, shots): record} from a previous run's items.jsonl and progress files (a torn last line,
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
                done[record_key(record)] = record
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


def write_outputs(out_dir, records, warnings=(), model_name="this model", metric_paths=None):
    """items.jsonl, results.json and results.md; returns (results, markdown table)."""
    out_dir = Path(out_dir)
    results = summarize(records, metric_paths)
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
    return load_tokenizer(path)


def prompt_image_paths(item):
    """Every image of an item's prompt, in order: the shots' images, then the item's own."""
    return [p for exemplar in item.get("shot_examples", ()) for p in exemplar["image_paths"]] + item["image_paths"]


class Encoder:
    """Turns items into prompt ids and image tiles for one model: harmony rendering, image-token runs."""

    def __init__(self, tok, model=None, is_multimodal=False, max_tiles=1, reasoning=False, system_prompt=None):
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
            self.preprocessing = model.config.preprocessing  # the vision tower's own (CLIP, SigLIP, open_clip)

    def image_token_counts(self, item):
        """Image tokens each image of the prompt gets (tiles x tokens per tile), read from the image headers."""
        counts = []
        for path in prompt_image_paths(item):
            with Image.open(path) as image:   # the header only: size without decoding pixels
                width, height = image.size
            counts.append(vision.num_tiles(width, height, self.max_tiles, self.image_size) * self.tokens_per_tile)
        return counts

    def messages(self, item):
        """The conversation: system message, each shot as an earlier user turn and assistant answer, the question."""
        shots = []
        for exemplar in item.get("shot_examples", ()):
            shots += [{"role": "user", "content": exemplar["prompt"]},
                      {"role": "assistant", "content": exemplar["answer"]}]
        return self.system + shots + [{"role": "user", "content": build_prompt(item)}]

    def prompt_ids(self, item):
        paths = prompt_image_paths(item)
        if paths and not self.is_multimodal:
            raise ValueError(f"item {item['id']!r} of {item['benchmark']}: has images but the model is text-only "
                             "(gpt_oss); evaluate a MedGPT (LLaVA-format) checkpoint, or a text-only benchmark")
        if not paths:
            return render_generation_prompt(self.tok, self.messages(item)).ids + self.final_header
        rendered = render_generation_prompt(self.tok, self.messages(item), self.image_token_counts(item),
                                            self.image_token_id)
        return rendered.ids + self.final_header

    def pixel_values(self, item):
        """(n_tiles, 3, S, S) for all images of the prompt, in prompt order; None without images."""
        paths = prompt_image_paths(item)
        if not paths:
            return None
        tiles = []
        for path in paths:
            with Image.open(path) as image:
                tiles.append(vision.image_to_tiles(image, self.max_tiles, self.image_size,
                                                   preprocessing=self.preprocessing))
        return torch.cat(tiles)   # (sum of tiles, 3, S, S)


def final_channel_text(tok, new_ids, reasoning=False):
    """The answer: the final channel's text among the generated ids.

    Without reasoning the prompt opened the final channel, so it is everything up to the first stop token.
    With reasoning the model writes `<|channel|>analysis<|message|>...<|end|><|start|>assistant<|channel|>final
    <|message|>...<|return|>`; the answer is the last final-channel message ("" if it never wrote one).
    """
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
    p.add_argument("--max_views", type=int, default=TRAIN_MAX_VIEWS,
                   help="report items of a task: the study's first N views (frontal first), the prior's too")
    p.add_argument("--prior", action="store_true",
                   help="report items of a task: give the linked prior study (its images and report) as context")
    p.add_argument("--shots", default="0",
                   help="in-context exemplars per item; a comma list (0,1) runs each and tables them side by side")
    p.add_argument("--shot_pool", default=None,
                   help="comma-separated pool files (train-split eval items, or stage-3 train.jsonl conversations)")
    p.add_argument("--shot_rule", choices=SHOT_RULES, default="random",
                   help="random: seeded per item; nearest: most similar images (mean thumbnail cosine)")
    p.add_argument("--shot_seed", type=int, default=0, help="seed of the 'random' shot rule")
    for metric, (env, holds) in report_metrics.MODEL_PATHS.items():
        p.add_argument(f"--{metric}_model", default=None, help=f"{holds} (default: ${env})")
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
        if args.max_views < 1:
            p.error("--max_views must be at least 1")
    try:
        args.shots = sorted({int(k) for k in args.shots.split(",")})
    except ValueError:
        p.error(f"--shots {args.shots!r}: expected whole numbers, e.g. 0 or 0,1")
    if any(k < 0 for k in args.shots):
        p.error("--shots must be 0 or more")
    if any(args.shots) and not args.shot_pool and not args.rescore:
        p.error("--shots above 0 needs --shot_pool (a train-split file to take the exemplars from)")
    args.metric_paths = {metric: getattr(args, f"{metric}_model") for metric in report_metrics.MODEL_PATHS}
    return args


def rescore_main(args):
    records = [record for _, record in read_jsonl(args.rescore)]
    rescored = rescore_records(records, args.lenient)
    write_jsonl(args.out, rescored)
    results = summarize(rescored, args.metric_paths)
    print(json.dumps(results, indent=2))
    print(markdown_table(results))
    return results


def log(message):
    print(f"[eval] {message}", file=sys.stderr, flush=True)


def main(argv=None):
    args = parse_args(argv)
    if args.rescore:
        return rescore_main(args)
    rank, _, world, device = zero.init_distributed()   # the process group (one process without torchrun)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda"
                                                           else torch.float32)
    out_dir = Path(args.out_dir)
    benches = [b.strip() for b in args.bench.split(",") if b.strip()]
    items = [item for bench in benches for item in load_items(args.data_dir, bench, args.limit)]
    for item in items:
        apply_report_context(item, args.max_views, args.prior)
    pool = load_shot_pool(args.shot_pool.split(","), args.max_views, args.prior) if any(args.shots) else []
    units = with_shots(items, args.shots, pool, args.shot_rule, args.shot_seed)
    has_reports = any(item["question_type"] == "report" for item in items)
    max_new_tokens = args.max_new_tokens or (1024 if args.reasoning else 512 if has_reports else 32)
    warnings = []
    if args.train_hashes:
        train_images, train_questions = load_training_hashes(args.train_hashes.split(","))
        warnings = overlap_warnings(items, train_images, train_questions)
    settings = {"model": str(Path(args.model).resolve()), "max_new_tokens": max_new_tokens,
                "max_tiles": args.max_tiles, "reasoning": args.reasoning,
                "system_prompt": args.system_prompt, "dtype": str(dtype).replace("torch.", ""),
                "max_views": args.max_views, "prior": args.prior,
                "shot_pool": [str(Path(p).resolve()) for p in args.shot_pool.split(",")] if pool else None,
                "shot_rule": args.shot_rule if pool else None, "shot_seed": args.shot_seed if pool else None}
    check_run_settings(out_dir, settings)   # every rank reads; rank 0 writes run.json after the gather below
    (out_dir / "progress").mkdir(parents=True, exist_ok=True)
    if rank == 0:
        for warning in warnings:
            log(warning)

    done = read_progress(out_dir) if rank == 0 else {}
    done_keys = {tuple(k) for k in all_gather_json(list(done), world, device)[0]}   # rank 0's view for all
    if rank == 0:
        (out_dir / "run.json").write_text(json.dumps(settings, indent=2) + "\n")
    todo = [unit for unit in units if record_key(unit) not in done_keys]
    mine = todo[rank::world]
    log(f"rank {rank}/{world}: {len(units)} items x shots in {len(benches)} benchmark(s), "
        f"{len(units) - len(todo)} done before, {len(mine)} to run here (batch {args.batch_size}, "
        f"max_new_tokens {max_new_tokens})")

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
        by_key.update({record_key(r): r for r in records})
    # rescore everything, old records included, so one run's file always follows one version of the rules
    ordered = [make_record(unit, by_key.pop(record_key(unit))["prediction"], args.lenient) for unit in units]
    ordered += [r for key, r in by_key.items() if key[0] not in benches]   # earlier runs' other benchmarks stay
    model_name = "/".join(Path(args.model).resolve().parts[-2:])   # "stage3/final", not just "final"
    results, table = write_outputs(out_dir, ordered, warnings, model_name, args.metric_paths)
    for file in (out_dir / "progress").glob("rank*.jsonl"):
        file.unlink()
    print(table)
    return results


if __name__ == "__main__":
    main()
