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

import eval as harness  # the prompt wording of stage-3 VQA conversations

from . import pmc
from .leakage import file_sha256, text_sha256
from . import mimic
from .mimic import (convert_chexpert_plus, convert_chexpert_plus_instruct, convert_iu_xray, convert_iu_xray_instruct,
                    convert_mimic_cxr, convert_mimic_cxr_captions, convert_mimic_cxr_instruct)


class LayoutError(ValueError):
    """The source folder does not look like the released data set."""


# -----------------------------------------------------------------------------
# Hashes (shared with eval.py: it checks eval items against training hashes)

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

class LimitReached(Exception):
    """Raised by a writer once it holds --limit items: the converter stops reading."""


def check_not_empty(count, what, src, skipped):
    """A converter that wrote nothing failed: say why (the skip counts) instead of exiting 0."""
    if count == 0:
        why = ", ".join(f"{n} x {reason}" for reason, n in skipped.items()) or "no rows matched the split"
        raise LayoutError(f"{src}: wrote 0 {what} ({why}); check --src, --split and the images folder")


def progress(name, count):
    if count % 10000 == 0:
        print(f"  {name}: {count} written", file=sys.stderr, flush=True)


def remove_empty_dirs(folder):
    """Remove `folder` and its imgs/ when a writer left them empty (a folder with files in it stays)."""
    for path in (os.path.join(folder, "imgs"), folder):
        try:
            os.rmdir(path)
        except OSError:
            return


class EvalWriter:
    """Collects eval items for one benchmark; copies images under imgs/ and hashes them."""

    def __init__(self, out_dir, benchmark, skip_missing=False, limit=None):
        self.dir = os.path.join(out_dir, benchmark)
        self.benchmark, self.skip_missing, self.limit = benchmark, skip_missing, limit
        self.items, self.skipped = [], Counter()
        self.images_dir = None
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

    def emit(self, item_id, question_type, question, answer, images=(), options=None, where="", explanation=None):
        """images: [(source path or struct, name under imgs/)]. Returns False when skipped. `explanation`
        (a release's rationale) is for training conversations only: eval items do not carry it."""
        if self.limit is not None and len(self.items) >= self.limit:
            raise LimitReached
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
        progress(self.benchmark, len(self.items))
        return True

    def skip(self, reason):
        self.skipped[reason] += 1

    def close(self, source_split, src):
        check_not_empty(len(self.items), f"{self.benchmark} items", src, self.skipped)
        ids = Counter(item["id"] for item in self.items)
        duplicates = [i for i, n in ids.items() if n > 1]
        if duplicates:
            raise LayoutError(f"{src}: duplicate item ids {duplicates[:5]} in {self.benchmark}")
        with open(os.path.join(self.dir, "test.jsonl"), "w", encoding="utf-8") as f:
            for item in self.items:
                f.write(json.dumps(item, ensure_ascii=False) + "\n")
        info = {"benchmark": self.benchmark, "source": os.path.abspath(src), "source_split": source_split,
                "limit": self.limit, "items": len(self.items),
                "question_types": dict(Counter(i["question_type"] for i in self.items)),
                "skipped": dict(self.skipped)}
        with open(os.path.join(self.dir, "convert_info.json"), "w", encoding="utf-8") as f:
            json.dump(info, f, indent=1)
        return info


class TrainWriter:
    """Collects stage-1/2/3 training rows. Image files stay in place, referenced relative to train.jsonl;
    images shipped inside parquet files are written once to imgs/."""

    def __init__(self, out_dir, name, skip_missing=False, limit=None):
        self.dir = os.path.join(out_dir, name)
        self.name, self.skip_missing, self.limit = name, skip_missing, limit
        self.rows, self.hashes, self.skipped = [], [], Counter()
        self.images_dir = None
        os.makedirs(self.dir, exist_ok=True)

    def save_struct(self, struct, name):
        """Write a parquet image struct {"bytes", "path"} to imgs/name; its absolute path."""
        data = struct.get("bytes") if isinstance(struct, dict) else None
        if not data:
            raise LayoutError(f"{self.name}: image struct without bytes for {name}")
        dest = os.path.join(self.dir, "imgs", re.sub(r"[^A-Za-z0-9._/-]", "_", name).lstrip("/"))
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        with open(dest, "wb") as f:
            f.write(data)
        return dest

    def check_room(self):
        if self.limit is not None and len(self.rows) >= self.limit:
            raise LimitReached

    def missing(self, image_paths, where):
        """True (and counted) when an image file is missing and --skip-missing; raises without it."""
        missing = [p for p in image_paths if not os.path.isfile(p)]
        if missing and not self.skip_missing:
            raise LayoutError(f"{where}: image file not found: {missing[0]} (use --skip-missing to skip and count)")
        if missing:
            self.skipped["missing image"] += 1
        return bool(missing)

    def emit(self, row, image_paths, texts, where=""):
        """row: a stage-format dict whose "image" is set from image_paths (absolute source paths)."""
        self.check_room()
        if self.missing(image_paths, where):
            return False
        rels = [os.path.relpath(p, self.dir) for p in image_paths]
        if "image" in row:
            row["image"] = rels[0] if len(rels) == 1 else rels
        self.add(row, image_paths, texts)
        return True

    def add(self, row, image_paths, texts):
        for path in image_paths:
            self.hashes.append({"kind": "image", "sha256": file_sha256(path), "ref": os.path.relpath(path, self.dir)})
        ref = row.get("id", "")
        self.hashes += [{"kind": "text", "sha256": text_sha256(t), "ref": ref} for t in texts if t.strip()]
        self.rows.append(row)
        progress(self.name, len(self.rows))

    def skip(self, reason):
        self.skipped[reason] += 1

    def close(self, source_split, src):
        check_not_empty(len(self.rows), f"{self.name} records", src, self.skipped)
        for file, rows in (("train.jsonl", self.rows), ("hashes.jsonl", self.hashes)):
            with open(os.path.join(self.dir, file), "w", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
        info = {"name": self.name, "source": os.path.abspath(src), "source_split": source_split, "limit": self.limit,
                "rows": len(self.rows), "hashes": len(self.hashes), "skipped": dict(self.skipped)}
        with open(os.path.join(self.dir, "convert_info.json"), "w", encoding="utf-8") as f:
            json.dump(info, f, indent=1)
        return info


class ConversationWriter(TrainWriter):
    """A benchmark's training split as stage-3 conversations: the same `emit` as EvalWriter, so one converter
    serves both; the user turn is the eval harness's prompt (harness.build_prompt), so training asks exactly as
    evaluation will. The answer is what the scorer expects (the option letter, yes/no, the answer text); a
    release's explanation becomes the assistant's reasoning (the harmony analysis channel)."""

    def emit(self, item_id, question_type, question, answer, images=(), options=None, where="", explanation=None):
        self.check_room()
        paths = [src if isinstance(src, str) else self.save_struct(src, name) for src, name in images]
        if self.missing(paths, where):
            return False
        answer = str(answer).strip()
        item = {"question_type": question_type, "question": str(question), "options": options, "images": paths}
        reply = {"from": "gpt", "value": answer.lower() if question_type == "yes_no" else answer}
        if explanation and str(explanation).strip():
            reply["thinking"] = str(explanation).strip()
        row = {"id": f"{self.name}-{item_id}", "conversations": [
            {"from": "human", "value": harness.build_prompt(item)}, reply]}
        if paths:
            rels = [os.path.relpath(p, self.dir) for p in paths]
            row = {"id": row["id"], "image": rels[0] if len(rels) == 1 else rels, "conversations": row["conversations"]}
        self.add(row, paths, [str(question)])
        return True


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


def llava_med_images(w, src, json_path):
    """LLaVA-Med's images: --images if given, else the official layout's `data/images/` (download_images.py
    writes `<pair_id>.jpg` there, beside `data/alignment/` and `data/instruct/`), else `images/` next to the JSON."""
    if w.images_dir:
        return w.images_dir
    folder = os.path.dirname(json_path)
    for candidate in (os.path.join(folder, "images"), os.path.join(os.path.dirname(folder), "images"),
                      os.path.join(src, "images"), os.path.join(src, "data", "images")):
        if os.path.isdir(candidate):
            return candidate
    raise LayoutError(f"{src}: no LLaVA-Med images folder (looked for data/images/ and images/ next to "
                      f"{os.path.basename(json_path)}); run LLaVA-Med's download_images.py or pass --images DIR")


def convert_llava_med_alignment(src, split, w):
    """LLaVA-Med `llava_med_alignment_500k.json`: a JSON list of {"id", "image", "conversations"} -> captions."""
    names = ["llava_med_alignment_500k.json", "alignment/llava_med_alignment_500k.json",
             "**/llava_med_alignment_500k.json", "**/*alignment*.json"]
    path = find_file(src, [split] if split else names, "LLaVA-Med alignment JSON")
    images = llava_med_images(w, src, path)
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
    names = ["llava_med_instruct_60k_inline_mention.json", "llava_med_instruct_60k.json", "llava_med_instruct_10k.json"]
    path = find_file(src, [split] if split else names + [f"**/{n}" for n in names], "LLaVA-Med instruct JSON")
    images = llava_med_images(w, src, path)
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


def convert_roco(src, split, w):
    """ROCO (razorx89/roco-dataset): `data/<split>/{radiology,non-radiology}/captions.txt` (tab-separated
    `ROCO_00020<TAB> caption`) with the images `scripts/fetch.py` downloads into `images/ROCO_00020.jpg` beside it."""
    split = split or "train"
    files = find_files(src, f"**/{split}/*radiology/captions.txt", f"ROCO {split}/radiology/captions.txt")
    for path in files:
        with open_text(path) as f:
            lines = f.read().splitlines()
        for line_no, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{path}: line {line_no}"
            if "\t" not in line:
                raise LayoutError(f"{where}: expected 'ROCO_ID<TAB>caption', found no tab")
            roco_id, caption = (part.strip() for part in line.split("\t", 1))
            if not caption:
                w.skip("empty caption")
                continue
            image = os.path.join(os.path.dirname(path), "images", f"{roco_id}.jpg")
            w.emit({"id": roco_id, "image": None, "caption": caption}, [image], [caption], where)
    return split


def convert_rocov2(src, split, w):
    """ROCOv2 (Zenodo 10821435): `train_captions.csv` (ID, Caption) with `train/<ID>.jpg` from train.zip; or the
    Hugging Face parquet re-upload (eltorio/ROCOv2-radiology: data/train-*.parquet of image, image_id, caption)."""
    split = split or "train"
    csvs = glob.glob(os.path.join(src, "**", f"{split}_captions.csv"), recursive=True)
    if csvs:
        images = image_folder(os.path.dirname(csvs[0]), [split, "images"])
        for row, line in read_csv(csvs[0]):
            where = f"{csvs[0]}: line {line}"
            image_id, caption = field(row, "ID", where), str(field(row, "Caption", where)).strip()
            w.emit({"id": image_id, "image": None, "caption": caption},
                   [os.path.join(images, f"{image_id}.jpg")], [caption], where)
        return f"{split} (Zenodo csv)"
    for row, where in read_parquet(hf_parquet_files(src, split)):
        image_id, caption = str(field(row, "image_id", where)), str(field(row, "caption", where)).strip()
        struct = field(row, "image", where, "an image struct {bytes, path}")
        w.check_room()
        path = w.save_struct(struct, f"{image_id}{image_suffix(struct)}")
        w.emit({"id": image_id, "image": None, "caption": caption}, [path], [caption], where)
    return f"{split} (parquet)"


# -----------------------------------------------------------------------------
# Stage-2 documents: PMC Open Access articles, PubMed abstracts, a folder of plain text

def convert_pmc_articles(src, split, w):
    """PMC Open Access articles: each `oa_package/xx/yy/PMCnnnn.tar.gz` unpacked to a folder holding the JATS
    `.nxml` and its figure files -> one interleaved document per article (data/pmc.py: reading order, each
    figure after the paragraph that first cites it). Kept whole: packing cuts at seq_len (up to 131072)."""
    files = sorted(glob.glob(os.path.join(src, "**", "*.nxml"), recursive=True))
    if not files and glob.glob(os.path.join(src, "**", "PMC*.tar.gz"), recursive=True):
        raise LayoutError(f"{src}: PMC packages are still packed; unpack each PMCnnnn.tar.gz (tar xzf) first")
    if not files:
        raise LayoutError(f"{src}: no .nxml files (PMC Open Access article packages, unpacked)")
    for path in files:
        w.check_room()
        try:
            blocks, figures = pmc.parse_article(path)
        except pmc.ParseError as e:
            raise LayoutError(str(e)) from None
        content, images = [], []
        for kind, value in blocks:
            if kind == "text":
                content.append({"type": "text", "text": value})
                continue
            figure = figures[value]
            if figure["file"] is None and not w.skip_missing:
                raise LayoutError(f"{path}: figure {value} ({figure['href']}): no file next to the .nxml "
                                  f"(use --skip-missing to keep the caption without the image, counted)")
            if figure["file"] is None:
                w.skip("figure file missing (caption kept)")
            else:
                images.append(figure["file"])
                content.append({"type": "image", "image": os.path.relpath(figure["file"], w.dir)})
            if figure["caption"]:
                content.append({"type": "text", "text": figure["caption"]})
        content = join_text_parts(content)
        if not any(part["type"] == "text" for part in content):
            w.skip("article without text")
            continue
        w.add({"id": os.path.splitext(os.path.basename(path))[0], "content": content}, images, [])
    return "all articles"


def join_text_parts(content):
    """Adjacent text parts merged, paragraphs separated by a blank line."""
    out = []
    for part in content:
        if part["type"] == "text" and out and out[-1]["type"] == "text":
            out[-1] = {"type": "text", "text": out[-1]["text"] + "\n\n" + part["text"]}
        else:
            out.append(dict(part))
    for i, part in enumerate(out):  # text around an image is separated from it by a line break
        if part["type"] == "text" and i + 1 < len(out):
            part["text"] += "\n"
        if part["type"] == "text" and i > 0:
            part["text"] = "\n" + part["text"]
    return out


def convert_pubmed(src, split, w):
    """PubMed baseline / update files (`pubmed25n0001.xml.gz`, PubmedArticleSet XML): one text document per
    article with an abstract, "title\n\nabstract"; articles without an abstract are skipped and counted."""
    files = find_files(src, "**/*.xml*", "PubMed XML files (pubmedNNnNNNN.xml.gz)")
    for path in [f for f in files if f.endswith((".xml", ".xml.gz"))]:
        try:
            for pmid, title, paragraphs in pmc.iter_pubmed(path):
                if not paragraphs:
                    w.skip("no abstract")
                    continue
                w.check_room()
                w.add({"id": f"pmid{pmid}", "text": "\n\n".join([title] + paragraphs if title else paragraphs)}, [], [])
        except pmc.ParseError as e:
            raise LayoutError(str(e)) from None
    return "all files"


def convert_text_folder(src, split, w):
    """A folder of plain-text documents (guidelines, textbooks: `*.txt`, `*.md`, any depth): one document per
    file, kept whole; empty files are skipped and counted."""
    files = [f for f in find_files(src, "**/*", "text files") if f.endswith((".txt", ".md")) and os.path.isfile(f)]
    if not files:
        raise LayoutError(f"{src}: no .txt or .md files")
    for path in files:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read().strip()
        except UnicodeDecodeError as e:
            raise LayoutError(f"{path}: not UTF-8 text (byte {e.start}); convert it (iconv) or move it out") from None
        if not text:
            w.skip("empty file")
            continue
        w.check_room()
        w.add({"id": os.path.relpath(path, src), "text": text}, [], [])
    return "all files"


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
    """A split's parquet files: `data/<split>-00000-of-00001.parquet` (as uploaded) or the hub's auto-converted
    layout `<config>/<split>/0000.parquet` (refs/convert/parquet)."""
    files = sorted(glob.glob(os.path.join(src, "**", f"{split}-*.parquet"), recursive=True))
    files = files or sorted(glob.glob(os.path.join(src, "**", split, "*.parquet"), recursive=True))
    if not files:
        raise LayoutError(f"{src}: no {split}-*.parquet or {split}/*.parquet files (Hugging Face release). "
                          f"Point --src at the downloaded dataset folder.")
    return files


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
            answer, question = str(field(row, "answer", where)), field(row, "question", where)
            image = field(row, "image_name", where, "e.g. 'synpic54610.jpg'")
            w.emit(str(row.get("qid", line)), vqa_rad_type(question, answer), question, answer,
                   [(os.path.join(images, image), image)], where=where)
        return f"{split} (OSF json)"
    for index, (row, where) in enumerate(read_parquet(hf_parquet_files(src, split))):
        answer, question = str(field(row, "answer", where)), field(row, "question", where)
        image = field(row, "image", where, "an image struct {bytes, path}")
        w.emit(f"{index:05d}", vqa_rad_type(question, answer), question, answer,
               [(image, f"{index:05d}{image_suffix(image)}")], where=where)
    return f"{split} (parquet)"


def vqa_rad_type(question, answer):
    """VQA-RAD's question type from the question and answer only, so both releases score alike (the parquet
    release dropped `answer_type`): yes/no answers -> yes_no; an answer that is one of the alternatives the
    question offers ('Is this an AP or PA film?' -> 'PA') -> closed; anything else -> open."""
    if yes_no_or(answer, "") == "yes_no":
        return "yes_no"
    words = lambda text: " ".join(re.findall(r"[a-z0-9]+", str(text).lower()))
    q, a = f" {words(question)} ", words(answer)
    return "closed" if a and " or " in q and f" {a} " in q else "open"


def image_suffix(struct):
    """File extension for image bytes from a parquet struct: its path's, or sniffed from the magic bytes."""
    ext = os.path.splitext(struct.get("path") or "")[1].lower()
    if ext:
        return ext
    data = struct.get("bytes") or b""
    return ".png" if data[:8] == b"\x89PNG\r\n\x1a\n" else ".jpg" if data[:3] == b"\xff\xd8\xff" else ".img"


def convert_pathvqa(src, split, w):
    """PathVQA, Hugging Face parquet release (flaviagiammarino/path-vqa: data/test-*.parquet of image, question,
    answer; or the hub's auto-converted default/test/0000.parquet)."""
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
    # images_2.zip unpacks to figures/ (the *_2.csv splits), images.zip to images/ (train.csv, test.csv)
    order = ["figures", "images_2", "images"] if split.endswith("_2") else ["images", "figures"]
    images = image_folder(os.path.dirname(path), order)
    for row, line in read_csv(path):
        where = f"{path}: line {line}"
        options = {letter: strip_option_label(field(row, f"Choice {letter}", where), letter) for letter in "ABCD"}
        answer = row.get("Answer_label") or field(row, "Answer", where, "the answer letter")
        figure = field(row, "Figure_path", where, "an image file name")
        index = row.get("index", row.get("", "")).strip() or f"{line:06d}"  # the *_2.csv files' unnamed index column
        w.emit(index, "multiple_choice", field(row, "Question", where), check_letter(answer, options, where),
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
    config = mmmu_pro_config(src, w.benchmark)
    split = split or ("test" if config else "validation")
    files = hf_parquet_files(os.path.join(src, config) if config else src, split)
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


MMMU_PRO_CONFIGS = {"mmmu_pro_med_4": "standard (4 options)", "mmmu_pro_med_10": "standard (10 options)"}


def mmmu_pro_config(src, benchmark):
    """The MMMU-Pro config folder a benchmark reads ('' for MMMU or a folder holding one config's files).
    The release root holds `standard (4 options)`, `standard (10 options)` and `vision`, all split `test`."""
    if os.path.basename(os.path.normpath(src)) == "vision" or (benchmark or "").endswith("vision"):
        raise LayoutError(f"{src}: MMMU-Pro's `vision` config is not converted: its question and options are "
                          f"only inside the screenshot, and the paper reports the standard configs "
                          f"(--benchmark mmmu_pro_med_4 or mmmu_pro_med_10 on the release root)")
    present = [c for c in MMMU_PRO_CONFIGS.values() if os.path.isdir(os.path.join(src, c))]
    if not present:
        return ""
    if benchmark not in MMMU_PRO_CONFIGS:
        raise LayoutError(f"{src}: an MMMU-Pro release root (configs {present}); choose one with "
                          f"--benchmark {' or --benchmark '.join(MMMU_PRO_CONFIGS)}")
    if MMMU_PRO_CONFIGS[benchmark] not in present:
        raise LayoutError(f"{src}: no '{MMMU_PRO_CONFIGS[benchmark]}' folder for --benchmark {benchmark}")
    return MMMU_PRO_CONFIGS[benchmark]


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
        try:
            for row, line in read_jsonl(matches[0]):
                where = f"{matches[0]}: line {line}"
                options = {k: str(v).strip() for k, v in field(row, "options", where, "an object {A: ..}").items()}
                question = re.sub(r"\s*Answer Choices:.*$", "", field(row, "question", where), flags=re.S)
                pictures = [(os.path.join(images, p), p) for p in row.get("images") or []]
                w.emit(str(field(row, "id", where)), "multiple_choice", question,
                       check_letter(field(row, "label", where, "the answer letter"), options, where), pictures,
                       options=options, where=where)
        except LimitReached:  # --limit counts per subset
            continue
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
               "ABCD"[int(cop) - base], options=options, where=where, explanation=row.get("exp"))
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
    if split == "train":  # the labelled PMIDs outside the 500 test ones, answered by their final_decision
        truth = {pmid: field(row, "final_decision", f"{data_path}: PMID {pmid}", "yes/no/maybe")
                 for pmid, row in data.items() if pmid not in truth}
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
        w.emit(pmid, "multiple_choice", question, letter, options=options, where=where,
               explanation=row.get("LONG_ANSWER"))
    return "train (ori_pqal.json minus the test PMIDs)" if split == "train" else "test (test_ground_truth.json)"


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

# name -> (function, output name(s), kind). "eval" converters write <out>/<benchmark>/test.jsonl, or with a
# training split (--split train...) stage-3 conversations in <out>/<benchmark>_train/; medxpertqa writes two.
CONVERTERS = {
    "llava-med-alignment": (convert_llava_med_alignment, "llava-med-alignment", "train"),
    "llava-med-instruct": (convert_llava_med_instruct, "llava-med-instruct", "train"),
    "pmc-oa": (convert_pmc_oa, "pmc-oa", "train"),
    "roco": (convert_roco, "roco", "train"),
    "rocov2": (convert_rocov2, "rocov2", "train"),
    "pmc-articles": (convert_pmc_articles, "pmc-articles", "train"),
    "pubmed": (convert_pubmed, "pubmed", "train"),
    "text-folder": (convert_text_folder, "text-folder", "train"),
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
    "iu-xray-instruct": (convert_iu_xray_instruct, "iu_xray_instruct", "train"),
    "chexpert-plus": (convert_chexpert_plus, ("chexpert_plus_findings", "chexpert_plus_impression"), "eval"),
    "chexpert-plus-instruct": (convert_chexpert_plus_instruct, "chexpert_plus_instruct", "train"),
}


def is_training_split(split):
    """train, train_2 (PMC-VQA), train.json ...: a split that becomes training data, never a test set."""
    return bool(split) and os.path.basename(split).lower().startswith("train")


def run(function, src, split, writers):
    """Call a converter; --limit stops it early (LimitReached), which is not an error."""
    try:
        return function(src, split, *writers)
    except LimitReached:
        return f"{split or 'default split'} (first {writers[0].limit}, --limit)"


def convert(name, src, out, split=None, skip_missing=False, benchmark=None, limit=None, images=None):
    """Run one converter; returns the summary (a dict, or a list of dicts for medxpertqa).

    A training split of a benchmark (`is_training_split`) is written as stage-3 conversations under
    `<out>/<benchmark>_train/`, so it can never replace the benchmark's test.jsonl."""
    if name not in CONVERTERS:
        raise SystemExit(f"unknown data set {name!r}; known: {', '.join(CONVERTERS)}")
    if not os.path.exists(src):
        raise LayoutError(f"--src {src} does not exist")
    if limit is not None and limit < 1:
        raise LayoutError(f"--limit {limit}: expected a positive number of items")
    function, outputs, kind = CONVERTERS[name]
    names = [benchmark] if benchmark else list(outputs) if isinstance(outputs, tuple) else [outputs]
    if kind == "train":
        writers = [TrainWriter(out, names[0], skip_missing, limit)]
    elif is_training_split(split):
        writers = [ConversationWriter(out, f"{n}_train", skip_missing, limit) for n in names]
        for writer in writers:
            writer.benchmark = writer.name[:-len("_train")]
    else:
        writers = [EvalWriter(out, n, skip_missing, limit) for n in names]
    for writer in writers:
        writer.images_dir = images
    source_split = run(function, src, split, writers)
    if len(writers) > 1:  # medxpertqa, R2Gen's IU-Xray: a subset that is absent is not written
        for wr in writers:
            if not (wr.items or wr.skipped):
                remove_empty_dirs(wr.dir)
        return [wr.close(source_split, src) for wr in writers if wr.items or wr.skipped]
    return writers[0].close(source_split, src)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Convert a released medical data set to MedGPT-oss nano's formats.")
    parser.add_argument("name", choices=sorted(CONVERTERS))
    parser.add_argument("--src", required=True, help="the unpacked release folder (or its main file)")
    parser.add_argument("--out", required=True, help="data folder; writes <out>/<benchmark>/...")
    parser.add_argument("--split", default=None, help="source split or file (default: the benchmark's test split); "
                        "a train split writes stage-3 conversations to <out>/<benchmark>_train/")
    parser.add_argument("--benchmark", default=None, help="output name; MMMU-Pro: mmmu_pro_med_4 or mmmu_pro_med_10")
    parser.add_argument("--skip-missing", action="store_true", help="skip (and count) items whose image is missing")
    parser.add_argument("--limit", type=int, default=None, help="stop after N items (a quick look at a release)")
    parser.add_argument("--images", default=None, help="the images folder, where it is not in the release layout")
    args = parser.parse_args(argv)
    try:
        summary = convert(args.name, args.src, args.out, args.split, args.skip_missing, args.benchmark, args.limit,
                          args.images)
    except (LayoutError, mimic.LayoutError) as e:  # data/mimic.py's readers raise their own (it imports no convert)
        print(f"error: {e}", file=sys.stderr)
        return 2
    for info in summary if isinstance(summary, list) else [summary]:
        print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
