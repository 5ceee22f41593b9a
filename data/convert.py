"""
Converters from the layouts in which public medical data sets are released to our formats (docs/internals.md).

    python -m data.convert NAME --src DIR --out DIR [--split S] [--skip-missing] [--limit N] [--benchmark B]

Design choices
- One function per data set, `convert_<name>(src, split, emit)`, reading the released layout (file names, field
  names, answer encodings as published) and calling `emit(...)` per item; `CONVERTERS` maps names to them.
  Nothing is downloaded: point --src at the folder you downloaded and unpacked.
- Evaluation benchmarks are written as `<out>/<benchmark>/test.jsonl` in the eval item format, their images
  copied under `<out>/<benchmark>/imgs/` (byte for byte, so image_sha256 is the hash of the released file) and a
  `convert_info.json` with the source split and counts. `question_type` is chosen per item: multiple_choice,
  yes_no (a closed question answered yes/no), closed, open, report.
- Training sets (LLaVA-Med alignment/instruct, PMC-OA) are written as `<out>/<name>/train.jsonl` in the stage
  formats; their images stay where they are (paths relative to the JSONL: 500k images are not copied) and
  `<out>/<name>/hashes.jsonl` records the sha256 of every image and question/caption, which eval uses to warn
  about overlap (`load_hashes`, `overlap`).
- Questions are hashed after normalisation (lower case, whitespace collapsed) so trivial variants still match.
- A source that does not match its layout stops with `LayoutError`: which file (and line or row), which field,
  what was expected, what was found. A missing image stops too, unless --skip-missing (then counted).
- PathVQA's original release is Python pickles: refused (loading a pickle runs arbitrary code); its parquet
  release is read instead. Parquet needs pyarrow (imported lazily). Report text (MIMIC-CXR) is never printed.
"""
import argparse
import ast
import csv
import glob
import gzip
import hashlib
import json
import os
import re
import shutil
import sys
from collections import Counter

from .mimic import (convert_chexpert_plus, convert_iu_xray, convert_mimic_cxr, convert_mimic_cxr_captions,
                    convert_mimic_cxr_instruct)


class LayoutError(ValueError):
    """The source folder does not look like the released data set."""


# -----------------------------------------------------------------------------
# Hashes (shared with eval.py: it checks eval items against training hashes)

def text_sha256(text):
    """sha256 of a question or caption after normalisation: lower case, whitespace runs collapsed."""
    return hashlib.sha256(" ".join(str(text).lower().split()).encode("utf-8")).hexdigest()


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_hashes(paths):
    """{"image": set, "text": set} from one or more hashes.jsonl files (or folders holding them)."""
    hashes = {"image": set(), "text": set()}
    for path in [paths] if isinstance(paths, str) else paths:
        files = glob.glob(os.path.join(path, "**", "hashes.jsonl"), recursive=True) if os.path.isdir(path) else [path]
        for file in files:
            for row, _ in read_jsonl(file):
                hashes[row["kind"]].add(row["sha256"])
    return hashes


def overlap(items, hashes):
    """Ids of eval items whose question or any image also occurs in the training hashes."""
    return [item["id"] for item in items
            if item.get("question_sha256") in hashes["text"] or set(item.get("image_sha256") or []) & hashes["image"]]


# -----------------------------------------------------------------------------
# Reading released files, with errors that name file, line and field

def find_file(src, candidates, what):
    """The first of `candidates` (paths or globs relative to src) that exists."""
    if os.path.isfile(src):
        return src
    for candidate in candidates:
        matches = sorted(glob.glob(os.path.join(src, candidate), recursive=True))
        if matches:
            return matches[0]
    raise LayoutError(f"{src}: no {what} found; looked for {', '.join(candidates)}. "
                      f"Point --src at the unpacked release folder (or at the file itself).")


def find_files(src, pattern, what):
    matches = sorted(glob.glob(os.path.join(src, pattern), recursive=True))
    if not matches:
        raise LayoutError(f"{src}: no {what} found (looked for {pattern}). Point --src at the unpacked release.")
    return matches


def open_text(path):
    return gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path, encoding="utf-8-sig")


def read_json(path):
    try:
        with open_text(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise LayoutError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None


def read_jsonl(path):
    """[(row, line number)] of a JSON Lines file (a file that is one JSON list is accepted too)."""
    with open_text(path) as f:
        text = f.read()
    if text.lstrip().startswith("["):
        return [(row, i + 1) for i, row in enumerate(read_json(path))]
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append((json.loads(line), number))
            except json.JSONDecodeError as e:
                raise LayoutError(f"{path}: line {number}: not valid JSON ({e.msg})") from None
    return rows


def read_csv(path):
    """[(row dict, line number)] of a CSV file (header on line 1)."""
    with open_text(path) as f:
        return [(row, i + 2) for i, row in enumerate(csv.DictReader(f))]


def read_parquet(paths):
    """[(row dict, row number)] of parquet files (images are {"bytes", "path"} structs)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise LayoutError("reading a parquet release needs pyarrow: pip install pyarrow==26.0.1") from None
    rows = []
    for path in paths:
        for i, row in enumerate(pq.read_table(path).to_pylist()):
            rows.append((row, f"{path}: row {i}"))
    return rows


def field(row, name, where, expected="a value"):
    """row[name], or a LayoutError that names the place, the field and the fields that are there."""
    if not isinstance(row, dict) or name not in row or row[name] is None:
        found = sorted(row) if isinstance(row, dict) else type(row).__name__
        raise LayoutError(f"{where}: missing field {name!r} (expected {expected}); found fields {found}")
    return row[name]


def letter_options(texts):
    """{"A": .., "B": ..} from a list of option texts (empty ones dropped)."""
    return {chr(ord("A") + i): str(t).strip() for i, t in enumerate(texts) if t is not None and str(t).strip()}


def check_letter(answer, options, where):
    answer = str(answer).strip().upper()
    if answer not in options:
        raise LayoutError(f"{where}: answer {answer!r} is not one of the option letters {sorted(options)}")
    return answer


def yes_no_or(answer, other):
    """yes_no when the answer is yes/no, else `other` (closed or open)."""
    return "yes_no" if str(answer).strip().lower() in ("yes", "no") else other


# -----------------------------------------------------------------------------
# Writers

class EvalWriter:
    """Collects eval items for one benchmark; copies images under imgs/ and hashes them."""

    def __init__(self, out_dir, benchmark, skip_missing=False):
        self.dir = os.path.join(out_dir, benchmark)
        self.benchmark, self.skip_missing = benchmark, skip_missing
        self.items, self.skipped = [], Counter()
        os.makedirs(os.path.join(self.dir, "imgs"), exist_ok=True)

    def image(self, source, name):
        """Copy an image (a path, or a parquet {"bytes", "path"} struct) to imgs/name; (relative path, sha256)."""
        rel = "imgs/" + re.sub(r"[^A-Za-z0-9._/-]", "_", name).lstrip("/")
        dest = os.path.join(self.dir, rel)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        if isinstance(source, dict):
            data = source.get("bytes")
            if not data:
                raise LayoutError(f"{self.benchmark}: image struct without bytes for {name}")
            with open(dest, "wb") as f:
                f.write(data)
            return rel, hashlib.sha256(data).hexdigest()
        shutil.copyfile(source, dest)
        return rel, file_sha256(dest)

    def emit(self, item_id, question_type, question, answer, images=(), options=None, where=""):
        """images: [(source path or struct, name under imgs/)]. Returns False when skipped."""
        missing = [src for src, _ in images if isinstance(src, str) and not os.path.isfile(src)]
        if missing:
            if not self.skip_missing:
                raise LayoutError(f"{where}: image file not found: {missing[0]} (use --skip-missing to skip and count)")
            self.skipped["missing image"] += 1
            return False
        assert question_type in ("multiple_choice", "yes_no", "closed", "open", "report"), question_type
        copied = [self.image(src, name) for src, name in images]
        answer = str(answer).strip()
        if question_type == "yes_no":
            answer = answer.lower()
        self.items.append({"id": f"{self.benchmark}-{item_id}", "benchmark": self.benchmark,
                           "question_type": question_type, "question": str(question).strip(), "options": options,
                           "answer": answer, "images": [rel for rel, _ in copied],
                           "image_sha256": [digest for _, digest in copied], "question_sha256": text_sha256(question)})
        return True

    def skip(self, reason):
        self.skipped[reason] += 1

    def close(self, source_split, src):
        ids = Counter(item["id"] for item in self.items)
        duplicates = [i for i, n in ids.items() if n > 1]
        if duplicates:
            raise LayoutError(f"{src}: duplicate item ids {duplicates[:5]} in {self.benchmark}")
        with open(os.path.join(self.dir, "test.jsonl"), "w", encoding="utf-8") as f:
            for item in self.items:
                f.write(json.dumps(item, ensure_ascii=False) + "\n")
        info = {"benchmark": self.benchmark, "source": os.path.abspath(src), "source_split": source_split,
                "items": len(self.items), "question_types": dict(Counter(i["question_type"] for i in self.items)),
                "skipped": dict(self.skipped)}
        with open(os.path.join(self.dir, "convert_info.json"), "w", encoding="utf-8") as f:
            json.dump(info, f, indent=1)
        return info


class TrainWriter:
    """Collects stage-1/stage-3 training rows; images stay in place, referenced relative to train.jsonl."""

    def __init__(self, out_dir, name, skip_missing=False):
        self.dir = os.path.join(out_dir, name)
        self.name, self.skip_missing = name, skip_missing
        self.rows, self.hashes, self.skipped = [], [], Counter()
        os.makedirs(self.dir, exist_ok=True)

    def emit(self, row, image_paths, texts, where=""):
        """row: a stage-format dict whose image paths will be set from image_paths (absolute source paths)."""
        missing = [p for p in image_paths if not os.path.isfile(p)]
        if missing:
            if not self.skip_missing:
                raise LayoutError(f"{where}: image file not found: {missing[0]} (use --skip-missing to skip and count)")
            self.skipped["missing image"] += 1
            return False
        rels = [os.path.relpath(p, self.dir) for p in image_paths]
        if "image" in row:
            row["image"] = rels[0] if len(rels) == 1 else rels
        for path, rel in zip(image_paths, rels):
            self.hashes.append({"kind": "image", "sha256": file_sha256(path), "ref": rel})
        self.hashes += [{"kind": "text", "sha256": text_sha256(t), "ref": row.get("id", rels[0] if rels else "")}
                        for t in texts if t.strip()]
        self.rows.append(row)
        return True

    def skip(self, reason):
        self.skipped[reason] += 1

    def close(self, source_split, src):
        for file, rows in (("train.jsonl", self.rows), ("hashes.jsonl", self.hashes)):
            with open(os.path.join(self.dir, file), "w", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
        info = {"name": self.name, "source": os.path.abspath(src), "source_split": source_split,
                "rows": len(self.rows), "hashes": len(self.hashes), "skipped": dict(self.skipped)}
        with open(os.path.join(self.dir, "convert_info.json"), "w", encoding="utf-8") as f:
            json.dump(info, f, indent=1)
        return info


# -----------------------------------------------------------------------------
# Training sets

def image_folder(src, candidates):
    """The folder holding a release's images: the first candidate that exists, else src itself."""
    for candidate in candidates:
        if os.path.isdir(os.path.join(src, candidate)):
            return os.path.join(src, candidate)
    return src


def strip_image_tag(text):
    return text.replace("<image>", "").strip()


def convert_llava_med_alignment(src, split, w):
    """LLaVA-Med `llava_med_alignment_500k.json`: a JSON list of {"id", "image", "conversations"} -> captions."""
    path = find_file(src, [split or "llava_med_alignment_500k.json", "*alignment*.json"], "LLaVA-Med alignment JSON")
    images = image_folder(os.path.dirname(path), ["images", "llava_med_image_urls", "pmc_images"])
    for row, line in read_jsonl(path):
        where = f"{path}: item {line}"
        turns = field(row, "conversations", where, "a list of {from, value} turns")
        gpt = [t for t in turns if t.get("from") == "gpt"]
        if not gpt:
            raise LayoutError(f"{where}: no 'gpt' turn holding the caption")
        image = field(row, "image", where, "an image file name")
        caption = gpt[0]["value"].strip()
        w.emit({"id": str(row.get("id", line)), "image": None, "caption": caption},
               [os.path.join(images, image)], [caption], where)
    return "alignment"


def convert_llava_med_instruct(src, split, w):
    """LLaVA-Med instruct (`llava_med_instruct_60k_inline_mention.json`, `_60k.json`, `_10k.json`): LLaVA layout kept."""
    path = find_file(src, [split] if split else ["llava_med_instruct_60k_inline_mention.json",
                     "llava_med_instruct_60k.json", "llava_med_instruct_10k.json", "*instruct*.json"],
                     "LLaVA-Med instruct JSON")
    images = image_folder(os.path.dirname(path), ["images", "pmc_images"])
    for row, line in read_jsonl(path):
        where = f"{path}: item {line}"
        turns = field(row, "conversations", where, "a list of {from, value} turns")
        for i, turn in enumerate(turns):
            if turn.get("from") not in ("human", "gpt", "system") or not isinstance(turn.get("value"), str):
                raise LayoutError(f"{where}: turn {i} has from={turn.get('from')!r}; expected human/gpt/system with a value")
        image = row.get("image")
        paths = [os.path.join(images, p) for p in ([image] if isinstance(image, str) else image or [])]
        out = {"id": str(row.get("id", line)), "conversations": turns}
        if paths:
            out["image"] = None
        w.emit(out, paths, [strip_image_tag(t["value"]) for t in turns if t["from"] == "human"], where)
    return os.path.basename(path)


def convert_pmc_oa(src, split, w):
    """PMC-OA (axiong/pmc_oa): `pmc_oa.jsonl` (or train/valid/test.jsonl) of {"image", "caption"}; images.zip."""
    names = [f"{split}.jsonl"] if split else ["pmc_oa.jsonl", "train.jsonl", "pmc_oa_beta.jsonl"]
    path = find_file(src, names, "PMC-OA JSONL")
    images = image_folder(os.path.dirname(path), ["images", "caption_T060_filtered_top4_sep_v0_subfigures"])
    for row, line in read_jsonl(path):
        where = f"{path}: line {line}"
        caption = str(field(row, "caption", where, "the figure caption")).strip()
        image = field(row, "image", where, "an image file name")
        w.emit({"id": str(row.get("pmcid", "")) + f":{line}", "image": None, "caption": caption},
               [os.path.join(images, image)], [caption], where)
    return os.path.basename(path)


# -----------------------------------------------------------------------------
# VQA benchmarks with images

def convert_slake(src, split, w, lang="en"):
    """SLAKE 1.0: `test.json` (list of {img_name, question, answer, answer_type, q_lang, qid}) and `imgs/`."""
    split = split or "test"
    path = find_file(src, [f"{split}.json", f"Slake1.0/{split}.json", f"**/{split}.json"], f"SLAKE {split}.json")
    images = image_folder(os.path.dirname(path), ["imgs"])
    for row, line in read_jsonl(path):
        where = f"{path}: item {line}"
        if field(row, "q_lang", where, "'en' or 'zh'") != lang:
            w.skip(f"q_lang != {lang}")
            continue
        answer_type = field(row, "answer_type", where, "'OPEN' or 'CLOSED'")
        if answer_type not in ("OPEN", "CLOSED"):
            raise LayoutError(f"{where}: answer_type is {answer_type!r}; expected 'OPEN' or 'CLOSED'")
        answer = str(field(row, "answer", where))
        qtype = "open" if answer_type == "OPEN" else yes_no_or(answer, "closed")
        image = field(row, "img_name", where, "e.g. 'xmlab102/source.jpg'")
        w.emit(str(row.get("qid", line)), qtype, field(row, "question", where), answer,
               [(os.path.join(images, image), image)], where=where)
    return split


def hf_parquet_files(src, split):
    return find_files(src, f"**/{split}-*.parquet", f"{split}-*.parquet files (Hugging Face release)")


def convert_vqa_rad(src, split, w):
    """VQA-RAD: the OSF release (`VQA_RAD Dataset Public.json` + `VQA_RAD Image Folder/`, test = phrase_type
    test_freeform/test_para) or the Hugging Face parquet release (flaviagiammarino/vqa-rad, data/test-*.parquet)."""
    split = split or "test"
    osf = glob.glob(os.path.join(src, "**", "VQA_RAD Dataset Public.json"), recursive=True)
    if osf:
        images = image_folder(os.path.dirname(osf[0]), ["VQA_RAD Image Folder"])
        for row, line in read_jsonl(osf[0]):
            where = f"{osf[0]}: item {line}"
            phrase_type = str(field(row, "phrase_type", where, "freeform/para/test_freeform/test_para"))
            if phrase_type.startswith("test") != (split == "test"):
                continue
            answer = str(field(row, "answer", where))
            answer_type = str(field(row, "answer_type", where, "'OPEN' or 'CLOSED'")).strip().upper()
            qtype = "open" if answer_type == "OPEN" else yes_no_or(answer, "closed")
            image = field(row, "image_name", where, "e.g. 'synpic54610.jpg'")
            w.emit(str(row.get("qid", line)), qtype, field(row, "question", where), answer,
                   [(os.path.join(images, image), image)], where=where)
        return f"{split} (OSF json)"
    for index, (row, where) in enumerate(read_parquet(hf_parquet_files(src, split))):
        answer = str(field(row, "answer", where))
        image = field(row, "image", where, "an image struct {bytes, path}")
        w.emit(f"{index:05d}", yes_no_or(answer, "open"), field(row, "question", where), answer,
               [(image, f"{index:05d}{image_suffix(image)}")], where=where)
    return f"{split} (parquet)"


def image_suffix(struct):
    """File extension for image bytes from a parquet struct: its path's, or sniffed from the magic bytes."""
    ext = os.path.splitext(struct.get("path") or "")[1].lower()
    if ext:
        return ext
    data = struct.get("bytes") or b""
    return ".png" if data[:8] == b"\x89PNG\r\n\x1a\n" else ".jpg" if data[:3] == b"\xff\xd8\xff" else ".img"


def convert_pathvqa(src, split, w):
    """PathVQA, Hugging Face parquet release (flaviagiammarino/path-vqa: data/test-*.parquet of image/question/answer)."""
    split = split or "test"
    if not glob.glob(os.path.join(src, "**", "*.parquet"), recursive=True) and \
            glob.glob(os.path.join(src, "**", "*.pkl"), recursive=True):
        raise LayoutError(f"{src}: this is PathVQA's original release (Python pickle files). Pickles can run arbitrary "
                          f"code when loaded, so they are never read here; use the parquet release "
                          f"(flaviagiammarino/path-vqa, data/{split}-*.parquet).")
    for index, (row, where) in enumerate(read_parquet(hf_parquet_files(src, split))):
        answer = str(field(row, "answer", where))
        image = field(row, "image", where, "an image struct {bytes, path}")
        w.emit(f"{index:05d}", yes_no_or(answer, "open"), field(row, "question", where), answer,
               [(image, f"{index:05d}{image_suffix(image)}")], where=where)
    return split


def strip_option_label(text, letter):
    """PMC-VQA choices are written 'A:text' (sometimes with spaces); drop that label."""
    return re.sub(rf"^\s*{letter}\s*[:.)]\s*", "", str(text)).strip()


def convert_pmc_vqa(src, split, w):
    """PMC-VQA (xmcmic/PMC-VQA): `test_2.csv` (Figure_path, Caption, Question, Choice A-D, Answer = letter, split)
    or `test.csv` (Figure_path, Question, Answer, Choice A-D, Answer_label = letter); images in `images/` or `figures/`."""
    split = split or "test_2"
    path = find_file(src, [f"{split}.csv", f"**/{split}.csv"], f"PMC-VQA {split}.csv")
    images = image_folder(os.path.dirname(path), ["images", "figures", "images_2"])
    for row, line in read_csv(path):
        where = f"{path}: line {line}"
        options = {letter: strip_option_label(field(row, f"Choice {letter}", where), letter) for letter in "ABCD"}
        answer = row.get("Answer_label") or field(row, "Answer", where, "the answer letter")
        figure = field(row, "Figure_path", where, "an image file name")
        w.emit(f"{line:06d}", "multiple_choice", field(row, "Question", where), check_letter(answer, options, where),
               [(os.path.join(images, figure), figure)], options=options, where=where)
    return split


def subject_is_medical(subject):
    return subject.replace(" ", "_") in MMMU_MEDICAL_SUBJECTS


MMMU_MEDICAL_SUBJECTS = ("Basic_Medical_Science", "Clinical_Medicine", "Diagnostics_and_Laboratory_Medicine",
                         "Pharmacy", "Public_Health")


def convert_mmmu(src, split, w):
    """MMMU (MMMU/MMMU: <Subject>/<split>-*.parquet; the five Health & Medicine subjects) and MMMU-Pro (a `subject`
    column). Fields: id, question (with <image k> tags), options (a Python list literal), answer, image_1..image_7,
    question_type ('multiple-choice' or 'open')."""
    split = split or "validation"
    files = find_files(src, f"**/{split}-*.parquet", f"MMMU {split}-*.parquet files")
    rows = [(row, where, path) for path in files for row, where in read_parquet([path])]
    for row, where, path in rows:
        subject = row.get("subject") or os.path.basename(os.path.dirname(path))  # MMMU: <Subject>/<split>-*.parquet
        if not subject_is_medical(subject):
            w.skip("not a medical subject")
            continue
        options_text = field(row, "options", where, "a Python list literal of option texts")
        try:
            options = letter_options(ast.literal_eval(options_text) if isinstance(options_text, str) else options_text)
        except (ValueError, SyntaxError):
            raise LayoutError(f"{where}: options {options_text[:80]!r} is not a list literal") from None
        present = [k for k in range(1, 8) if row.get(f"image_{k}")]
        question = field(row, "question", where)
        tags = [int(k) for k in re.findall(r"<image (\d+)>", question)]
        if sorted(tags) == present:  # each image named once in the question: keep them where they are
            present, question = tags, re.sub(r"<image \d+>", "<image>", question)
        images = [(row[f"image_{k}"], f"{row['id']}_{k}{image_suffix(row[f'image_{k}'])}") for k in present]
        answer = field(row, "answer", where)
        if row.get("question_type", "multiple-choice") == "open" or not options:
            w.emit(str(row["id"]), "open", question, answer, images, where=where)
        else:
            w.emit(str(field(row, "id", where)), "multiple_choice", question,
                   check_letter(answer, options, where), images, options=options, where=where)
    return split


def convert_medxpertqa(src, split, w_mm, w_text):
    """MedXpertQA (TsinghuaC3I/MedXpertQA): `MM/test.jsonl` and `Text/test.jsonl` of {id, question, options {A..},
    label, images [file names in images/]}; the question ends with 'Answer Choices: (A) ...', dropped (the options
    field holds them)."""
    split = split or "test"
    found = 0
    for sub, w in (("MM", w_mm), ("Text", w_text)):
        matches = glob.glob(os.path.join(src, "**", sub, f"{split}.jsonl"), recursive=True)
        if not matches:
            continue
        found += 1
        images = image_folder(os.path.dirname(os.path.dirname(matches[0])), ["images"])
        for row, line in read_jsonl(matches[0]):
            where = f"{matches[0]}: line {line}"
            options = {k: str(v).strip() for k, v in field(row, "options", where, "an object {A: .., B: ..}").items()}
            question = re.sub(r"\s*Answer Choices:.*$", "", field(row, "question", where), flags=re.S)
            pictures = [(os.path.join(images, p), p) for p in row.get("images") or []]
            w.emit(str(field(row, "id", where)), "multiple_choice", question,
                   check_letter(field(row, "label", where, "the answer letter"), options, where), pictures,
                   options=options, where=where)
    if not found:
        raise LayoutError(f"{src}: no MM/{split}.jsonl or Text/{split}.jsonl (MedXpertQA layout)")
    return split


def convert_medframeqa(src, split, w):
    """MedFrameQA (SuhaoYu1020/MedFrameQA): parquet with question_id, question, options (list), correct_answer
    (a letter), image_1..image_5; the re-upload with an `image` list and `answer` is read as well."""
    split = split or "test"
    for row, where in read_parquet(find_files(src, "**/*.parquet", "MedFrameQA parquet files")):
        options = letter_options(field(row, "options", where, "a list of option texts"))
        answer = row.get("correct_answer") or field(row, "answer", where, "the answer letter ('correct_answer')")
        qid = str(field(row, "question_id", where))
        structs = row["image"] if isinstance(row.get("image"), list) else \
            [row[f"image_{k}"] for k in range(1, 6) if row.get(f"image_{k}")]
        images = [(s, f"{qid}_{k}{image_suffix(s)}") for k, s in enumerate(structs, 1)]
        w.emit(qid, "multiple_choice", field(row, "question", where), check_letter(answer, options, where), images,
               options=options, where=where)
    return split


# -----------------------------------------------------------------------------
# Text benchmarks

def convert_medqa(src, split, w):
    """MedQA (US) (jind11/MedQA): `questions/US/4_options/phrases_no_exclude_test.jsonl` (4 options) or
    `questions/US/test.jsonl` (5 options): {question, options {A..}, answer_idx, answer, meta_info}."""
    split = split or "test"
    path = find_file(src, [f"**/US/4_options/phrases_no_exclude_{split}.jsonl", f"**/US/{split}.jsonl",
                           f"{split}.jsonl"], f"MedQA US {split} JSONL")
    for row, line in read_jsonl(path):
        where = f"{path}: line {line}"
        options = {k: str(v).strip() for k, v in field(row, "options", where, "an object {A: .., ...}").items()}
        w.emit(f"{line:05d}", "multiple_choice", field(row, "question", where),
               check_letter(field(row, "answer_idx", where, "the answer letter"), options, where), options=options,
               where=where)
    return os.path.relpath(path, src) if os.path.isdir(src) else split


def convert_medmcqa(src, split, w):
    """MedMCQA: the original `dev.json` (JSON Lines; cop = 1..4) or the Hugging Face parquet (cop = 0..3).
    The test split has no public answers: use dev (the default)."""
    split = split or "dev"
    jsonl = glob.glob(os.path.join(src, "**", f"{split}.json"), recursive=True) or \
        ([src] if os.path.isfile(src) and src.endswith(".json") else [])
    if jsonl:
        rows, base = [(r, f"{jsonl[0]}: line {n}") for r, n in read_jsonl(jsonl[0])], 1
    else:
        name = "validation" if split == "dev" else split
        rows, base = read_parquet(find_files(src, f"**/{name}-*.parquet", f"MedMCQA {split}.json or parquet")), 0
    for row, where in rows:
        options = letter_options([field(row, key, where) for key in ("opa", "opb", "opc", "opd")])
        cop = row.get("cop")
        if cop is None or int(cop) - base not in range(4):
            raise LayoutError(f"{where}: cop is {cop!r}; expected {base}..{base + 3} "
                              f"(MedMCQA's test split has no public answers: use --split dev)")
        w.emit(str(field(row, "id", where)), "multiple_choice", field(row, "question", where),
               "ABCD"[int(cop) - base], options=options, where=where)
    return split


def convert_pubmedqa(src, split, w):
    """PubMedQA (pubmedqa/pubmedqa): `data/ori_pqal.json` ({PMID: {QUESTION, CONTEXTS, final_decision, ...}}) and
    `data/test_ground_truth.json` ({PMID: yes/no/maybe}) for the 500-question test split. Scored as multiple
    choice over yes / no / maybe, the question given with its abstract."""
    data_path = find_file(src, ["ori_pqal.json", "data/ori_pqal.json", "**/ori_pqal.json"], "PubMedQA ori_pqal.json")
    data = read_json(data_path)
    truth_path = find_file(os.path.dirname(data_path), ["test_ground_truth.json", "**/test_ground_truth.json"],
                           "PubMedQA test_ground_truth.json")
    truth = read_json(truth_path)
    options = {"A": "yes", "B": "no", "C": "maybe"}
    for pmid, decision in truth.items():
        where = f"{data_path}: PMID {pmid}"
        if pmid not in data:
            raise LayoutError(f"{truth_path}: PMID {pmid} is not in {data_path}")
        row = data[pmid]
        context = " ".join(field(row, "CONTEXTS", where, "a list of abstract paragraphs"))
        question = f"Context: {context}\nQuestion: {field(row, 'QUESTION', where)}"
        letter = {v: k for k, v in options.items()}.get(str(decision).strip().lower())
        if letter is None:
            raise LayoutError(f"{truth_path}: PMID {pmid}: answer {decision!r}; expected yes, no or maybe")
        w.emit(pmid, "multiple_choice", question, letter, options=options, where=where)
    return "test (test_ground_truth.json)"


def convert_medbullets(src, split, w):
    """Medbullets (HanjieChen/ChallengeClinicalQA): `medbullets/medbullets_op4.csv` or `_op5.csv` with
    question, opa..ope, answer_idx (letter), answer, explanation. --split op4 (default) or op5."""
    split = split or "op4"
    path = find_file(src, [f"medbullets_{split}.csv", f"**/medbullets_{split}.csv"], f"medbullets_{split}.csv")
    for row, line in read_csv(path):
        where = f"{path}: line {line}"
        options = letter_options([row.get(key) for key in ("opa", "opb", "opc", "opd", "ope")])
        if len(options) < 2:
            raise LayoutError(f"{where}: fewer than two options in opa..ope; found columns {sorted(row)}")
        w.emit(f"{split}-{line:04d}", "multiple_choice", field(row, "question", where),
               check_letter(field(row, "answer_idx", where, "the answer letter"), options, where), options=options,
               where=where)
    return split


# -----------------------------------------------------------------------------
# Registry and command line

# name -> (function, output name(s), kind); medxpertqa writes two benchmarks
CONVERTERS = {
    "llava-med-alignment": (convert_llava_med_alignment, "llava-med-alignment", "train"),
    "llava-med-instruct": (convert_llava_med_instruct, "llava-med-instruct", "train"),
    "pmc-oa": (convert_pmc_oa, "pmc-oa", "train"),
    "slake": (convert_slake, "slake", "eval"),
    "vqa-rad": (convert_vqa_rad, "vqa_rad", "eval"),
    "pathvqa": (convert_pathvqa, "pathvqa", "eval"),
    "pmc-vqa": (convert_pmc_vqa, "pmc_vqa", "eval"),
    "mmmu": (convert_mmmu, "mmmu_med", "eval"),
    "medxpertqa": (convert_medxpertqa, ("medxpertqa_mm", "medxpertqa_text"), "eval"),
    "medframeqa": (convert_medframeqa, "medframeqa", "eval"),
    "medqa": (convert_medqa, "medqa", "eval"),
    "medmcqa": (convert_medmcqa, "medmcqa", "eval"),
    "pubmedqa": (convert_pubmedqa, "pubmedqa", "eval"),
    "medbullets": (convert_medbullets, "medbullets", "eval"),
    # chest X-ray reports (data/mimic.py): two benchmarks each, findings and impression
    "mimic-cxr": (convert_mimic_cxr, ("mimic_cxr_findings", "mimic_cxr_impression"), "eval"),
    "mimic-cxr-instruct": (convert_mimic_cxr_instruct, "mimic_cxr_instruct", "train"),
    "mimic-cxr-captions": (convert_mimic_cxr_captions, "mimic_cxr_captions", "train"),
    "iu-xray": (convert_iu_xray, ("iu_xray_findings", "iu_xray_impression"), "eval"),
    "chexpert-plus": (convert_chexpert_plus, ("chexpert_plus_findings", "chexpert_plus_impression"), "eval"),
}


def convert(name, src, out, split=None, skip_missing=False, benchmark=None):
    """Run one converter; returns the summary (a dict, or a list of dicts for medxpertqa)."""
    if name not in CONVERTERS:
        raise SystemExit(f"unknown data set {name!r}; known: {', '.join(CONVERTERS)}")
    if not os.path.exists(src):
        raise LayoutError(f"--src {src} does not exist")
    function, outputs, kind = CONVERTERS[name]
    if kind == "train":
        writer = TrainWriter(out, benchmark or outputs, skip_missing)
        return writer.close(function(src, split, writer), src)
    if isinstance(outputs, tuple):
        writers = [EvalWriter(out, o, skip_missing) for o in outputs]
        source_split = function(src, split, *writers)
        return [wr.close(source_split, src) for wr in writers if wr.items or wr.skipped]
    writer = EvalWriter(out, benchmark or outputs, skip_missing)
    return writer.close(function(src, split, writer), src)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Convert a released medical data set to MedGPT-oss nano's formats.")
    parser.add_argument("name", choices=sorted(CONVERTERS))
    parser.add_argument("--src", required=True, help="the unpacked release folder (or its main file)")
    parser.add_argument("--out", required=True, help="data folder; writes <out>/<benchmark>/...")
    parser.add_argument("--split", default=None, help="source split or file (default: the benchmark's test split)")
    parser.add_argument("--benchmark", default=None, help="output name (e.g. mmmu_pro_med_10 for an MMMU-Pro folder)")
    parser.add_argument("--skip-missing", action="store_true", help="skip (and count) items whose image is missing")
    args = parser.parse_args(argv)
    try:
        summary = convert(args.name, args.src, args.out, args.split, args.skip_missing, args.benchmark)
    except LayoutError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for info in summary if isinstance(summary, list) else [summary]:
        print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
