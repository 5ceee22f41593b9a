"""
Keeping evaluation data out of training data: the text and file hashes that converters write (hashes.jsonl) and
eval.py checks, and exact and near-duplicate image matching for data.prepare.

Design choices
- Text: sha256 of the lower-cased text with whitespace runs collapsed (`text_sha256`), the one normalisation every
  converter, the demo and eval.py use. Files: sha256 of the bytes (`file_sha256`).
- Exact: sha256 of the decoded pixels (size, then the RGB bytes), not of the file: the same picture saved as
  PNG or in another container still matches, and metadata edits do not hide it.
- Near: a 64-bit perceptual hash (pHash, computed as imagehash.phash does: grey, 32x32 Lanczos, 2-D DCT-II,
  the 8x8 lowest frequencies compared with their median) within NEAR_THRESHOLD bits of Hamming distance.
  It catches re-encoded JPEGs and resized copies (tests/test_leakage.py; distances in docs/data.md).
- Matching is on the image (default): a training record is dropped when any of its images matches an image
  of any eval benchmark. With match="image+question" it is dropped only when the record's question is also
  asked about that image in the benchmark (needed where a benchmark's train and test splits share images on
  purpose, as VQA-RAD's do). Never on the question alone: SLAKE reuses its template questions on new images.
- Hashing decodes every training image once; results are cached per source (image_hashes.jsonl, keyed by
  path, size and mtime), so a re-run only hashes new files. Near matches are found with one vectorised
  XOR + popcount of each query against all eval hashes (numpy), a few microseconds per 1,000 eval images.
"""
import glob
import hashlib
import json
import os
from collections import Counter, defaultdict

import numpy as np
from PIL import Image

NEAR_THRESHOLD = 8   # bits of 64: re-encoded / resized copies measure 0-4, unrelated scans 20+ (docs/data.md)
HASH_SIZE = 8        # pHash: 8x8 lowest DCT frequencies
HIGHFREQ_FACTOR = 4  # of a 32x32 grey image


# -----------------------------------------------------------------------------
# File and text hashes (the converters write them to hashes.jsonl; eval.py --train_hashes reads them back)


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
            with open(file, encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        row = json.loads(line)
                        hashes[row["kind"]].add(row["sha256"])
    return hashes


def overlap(items, hashes):
    """Ids of eval items whose question or any image also occurs in the training hashes."""
    return [item["id"] for item in items
            if item.get("question_sha256") in hashes["text"] or set(item.get("image_sha256") or []) & hashes["image"]]


# -----------------------------------------------------------------------------
# Image hashes


def dct_matrix(n):
    """DCT-II basis as scipy.fftpack.dct computes it (unnormalised): y[k] = 2 sum_n x[n] cos(pi k (2n+1) / 2n)."""
    k, i = np.arange(n)[:, None], np.arange(n)[None, :]
    return 2.0 * np.cos(np.pi * k * (2 * i + 1) / (2 * n))   # (n, n)


DCT_32 = dct_matrix(HASH_SIZE * HIGHFREQ_FACTOR)


def phash(image):
    """64-bit perceptual hash of a PIL image, as an int (bit 63 = the DC coefficient's bit, row-major)."""
    size = HASH_SIZE * HIGHFREQ_FACTOR
    pixels = np.asarray(image.convert("L").resize((size, size), Image.Resampling.LANCZOS), dtype=np.float64)
    low = (DCT_32 @ pixels @ DCT_32.T)[:HASH_SIZE, :HASH_SIZE]    # (8, 8): DCT along columns, then rows
    bits = (low > np.median(low)).flatten()
    return int("".join("1" if b else "0" for b in bits), 2)


def image_hashes(path):
    """(sha256 of the decoded pixels, pHash) of an image file."""
    with Image.open(path) as image:
        image.load()
        rgb = image.convert("RGB")
        digest = hashlib.sha256(f"{rgb.width}x{rgb.height}:".encode() + rgb.tobytes()).hexdigest()
        return digest, phash(image)


def hamming(a, b):
    return (a ^ b).bit_count()


# -----------------------------------------------------------------------------
# Evaluation images

class EvalIndex:
    """The images of the eval benchmarks: exact pixel hashes and pHashes, each with the questions asked on it."""

    def __init__(self, threshold=NEAR_THRESHOLD):
        self.threshold = threshold
        self.exact = defaultdict(set)       # pixel sha256 -> {(benchmark, question sha256)}
        self.near_hashes, self.near_keys = [], []
        self.images = Counter()             # benchmark -> images indexed

    def add(self, benchmark, path, question_sha=None):
        digest, perceptual = image_hashes(path)
        key = (benchmark, question_sha)
        if not self.exact[digest]:
            self.images[benchmark] += 1
        self.exact[digest].add(key)
        self.near_hashes.append(perceptual)
        self.near_keys.append(key)

    def add_benchmark(self, folder, benchmark):
        """Every image of `<folder>/test.jsonl` (eval items, images relative to it)."""
        with open(os.path.join(folder, "test.jsonl"), encoding="utf-8") as f:
            for line in f:
                item = json.loads(line)
                for rel in item.get("images") or []:
                    self.add(benchmark, os.path.join(folder, rel), item.get("question_sha256"))

    def match(self, digest, perceptual):
        """("exact" or "near", {(benchmark, question sha)}) of an image, or (None, set())."""
        if digest in self.exact:
            return "exact", self.exact[digest]
        if not self.near_hashes:
            return None, set()
        if not hasattr(self, "_array") or len(self._array) != len(self.near_hashes):
            self._array = np.array(self.near_hashes, dtype=np.uint64)
        distances = np.bitwise_count(self._array ^ np.uint64(perceptual))   # (M,)
        hits = np.nonzero(distances <= self.threshold)[0]
        return ("near", {self.near_keys[i] for i in hits}) if len(hits) else (None, set())


# -----------------------------------------------------------------------------
# Training records

def cached_hashes(paths, cache_path):
    """{path: (sha, phash)} for image files, reusing `cache_path` entries whose size and mtime still match."""
    cache = {}
    if os.path.isfile(cache_path):
        with open(cache_path, encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                cache[row["path"]] = row
    out, fresh = {}, []
    for path in paths:
        stat = os.stat(path)
        row = cache.get(path)
        if row is None or row["size"] != stat.st_size or row["mtime"] != stat.st_mtime:
            digest, perceptual = image_hashes(path)
            row = {"path": path, "size": stat.st_size, "mtime": stat.st_mtime, "sha256": digest, "phash": perceptual}
            fresh.append(row)
            cache[path] = row
        out[path] = (row["sha256"], row["phash"])
    if fresh:
        with open(cache_path, "w", encoding="utf-8") as f:
            for row in cache.values():
                f.write(json.dumps(row) + "\n")
    return out


def record_images(record, base_dir):
    """Absolute paths of a stage record's images (stage 1/3 "image", stage 2 image parts)."""
    value = record.get("image")
    paths = [] if value is None else [value] if isinstance(value, str) else list(value)
    paths += [part["image"] for part in record.get("content") or [] if part.get("type") == "image"]
    return [p if os.path.isabs(p) else os.path.normpath(os.path.join(base_dir, p)) for p in paths]


def filter_records(src_jsonl, out_jsonl, index, match="image", question_shas=None):
    """Copy `src_jsonl` to `out_jsonl` without the records whose images are eval images.

    question_shas: {record id: {question sha256}} for match="image+question" (from the source's hashes.jsonl).
    Returns {"kept": n, "dropped": n, "by_benchmark": {benchmark: {"exact": n, "near": n}}}."""
    if match not in ("image", "image+question"):
        raise ValueError(f"match must be 'image' or 'image+question', got {match!r}")
    base_dir = os.path.dirname(os.path.abspath(src_jsonl))
    with open(src_jsonl, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    paths = sorted({p for r in records for p in record_images(r, base_dir)})
    hashes = cached_hashes(paths, os.path.join(base_dir, "image_hashes.jsonl"))
    kept, by_benchmark = 0, defaultdict(Counter)
    with open(out_jsonl, "w", encoding="utf-8") as out:
        for record in records:
            hit = leaked(record, base_dir, hashes, index, match, question_shas or {})
            if hit:
                kind, benchmarks = hit
                for benchmark in benchmarks:
                    by_benchmark[benchmark][kind] += 1
                continue
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            kept += 1
    return {"kept": kept, "dropped": len(records) - kept,
            "by_benchmark": {b: dict(c) for b, c in sorted(by_benchmark.items())}}


def leaked(record, base_dir, hashes, index, match, question_shas):
    """(kind, {benchmarks}) when one of the record's images is an eval image (and, for image+question, is
    asked the same question there); None otherwise."""
    asked = question_shas.get(record.get("id"), set())
    for path in record_images(record, base_dir):
        kind, keys = index.match(*hashes[path])
        if match == "image+question":
            keys = {(b, q) for b, q in keys if q in asked}
        if kind and keys:
            return kind, {b for b, _ in keys}
    return None
