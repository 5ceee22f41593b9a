"""
The recipe's data from the public releases, in one command: eval sets, the three stage mixtures, a report.

    python -m data.prepare --raw RAW --out OUT [--only slake,pmc-oa] [--limit N] [--skip-missing]
                           [--match image|image+question] [--no-tokens]

Design choices
- RAW holds the releases as downloaded and unpacked, each in the folder its download makes (`Slake1.0`,
  `PMC-VQA`, `MMMU_Pro`, `LLaVA-Med`, ...; RELEASES lists the names, matched ignoring case, `-` and `_`).
  Nothing is downloaded. A release that is not there is listed at the end, not an error.
- Each release runs through its converter (data/convert.py, by name from CONVERTERS, so a converter that
  moves to another module keeps working): benchmarks' test splits to `OUT/eval/<benchmark>/test.jsonl`
  (what `eval.py --data_dir OUT/eval` reads), training data to `OUT/train/<name>/train.jsonl`.
- Leakage: every training source is filtered against the images of every eval set present (data/leakage.py:
  exact pixel hash and pHash) into `OUT/train/<name>/clean.jsonl`, with counts in `leakage.json`.
- The stage mixtures are the recipe files `data/recipes/medgpt-20b/stage{1,2,3}.json` (paths relative to OUT)
  written to `OUT/stage{1,2,3}.json` with the sources that were prepared; the ones missing are listed there.
- Re-running skips a conversion whose convert_info.json names the same source and --limit, a leakage filter
  whose eval sets and settings are unchanged, and token counts of an unchanged clean.jsonl.
- The report: one row per output (records, images, tokens = text tokens + 576 per image, skipped with
  reasons, leaked records dropped), then the dropped records per source and benchmark, then what was not found.
  No record text is printed (MIMIC-CXR reports are patient data).
"""
import argparse
import glob
import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass

from . import convert, leakage
from .tokenizer import encode_ordinary, load_tokenizer

RECIPE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "recipes", "medgpt-20b")
TOKENS_PER_IMAGE = 576   # one 336 px tile of CLIP ViT-L/14


@dataclass
class Job:
    converter: str       # a name in convert.CONVERTERS
    split: str = None    # None: the converter's default (a benchmark's test split)
    output: str = None   # output folder name; None: the converter's
    role: str = "eval"   # eval | stage1 | stage2 | stage3


@dataclass
class Release:
    name: str
    folders: tuple       # folder names under RAW, as the release's download names them
    jobs: tuple


RELEASES = (
    Release("slake", ("Slake1.0", "SLAKE", "BoKelvin/SLAKE"), (Job("slake"), Job("slake", "train", role="stage3"))),
    Release("vqa-rad", ("vqa-rad", "VQA_RAD", "osfstorage-archive"),
            (Job("vqa-rad"), Job("vqa-rad", "train", role="stage3"))),
    Release("pathvqa", ("path-vqa", "PathVQA", "pvqa"), (Job("pathvqa"), Job("pathvqa", "train", role="stage3"))),
    Release("pmc-vqa", ("PMC-VQA",), (Job("pmc-vqa"), Job("pmc-vqa", "train_2", role="stage3"))),
    Release("mmmu", ("MMMU",), (Job("mmmu"),)),
    Release("mmmu-pro", ("MMMU_Pro", "MMMU-Pro"),
            (Job("mmmu", output="mmmu_pro_med_4"), Job("mmmu", output="mmmu_pro_med_10"))),
    Release("medxpertqa", ("MedXpertQA",), (Job("medxpertqa"),)),
    Release("medframeqa", ("MedFrameQA",), (Job("medframeqa"),)),
    Release("medqa", ("MedQA", "data_clean"), (Job("medqa"), Job("medqa", "train", role="stage3"))),
    Release("medmcqa", ("medmcqa", "MedMCQA"), (Job("medmcqa"), Job("medmcqa", "train", role="stage3"))),
    Release("pubmedqa", ("pubmedqa", "PubMedQA"), (Job("pubmedqa"), Job("pubmedqa", "train", role="stage3"))),
    Release("medbullets", ("ChallengeClinicalQA", "medbullets"), (Job("medbullets"),)),
    Release("mimic-cxr", ("mimic-cxr-jpg", "mimic-cxr", "MIMIC-CXR"),
            (Job("mimic-cxr"), Job("mimic-cxr-captions", role="stage1"), Job("mimic-cxr-instruct", role="stage3"))),
    Release("iu-xray", ("iu-xray", "IU_XRay", "openi", "NLMCXR", "chest-xrays-indiana-university"), (Job("iu-xray"),)),
    Release("chexpert-plus", ("chexpert-plus", "CheXpert-Plus", "chexpertplus"),
            (Job("chexpert-plus"), Job("chexpert-plus-instruct", role="stage3"))),
    Release("llava-med", ("LLaVA-Med", "llava_med"),
            (Job("llava-med-alignment", role="stage1"), Job("llava-med-instruct", role="stage3"))),
    Release("pmc-oa", ("pmc_oa", "PMC-OA"), (Job("pmc-oa", role="stage1"),)),
    Release("roco", ("roco-dataset", "ROCO"), (Job("roco", role="stage1"),)),
    Release("rocov2", ("ROCOv2", "ROCOv2-radiology"), (Job("rocov2", role="stage1"),)),
    Release("pmc-articles", ("oa_package", "pmc_oa_articles"), (Job("pmc-articles", role="stage2"),)),
    Release("pubmed", ("pubmed", "baseline"), (Job("pubmed", role="stage2"),)),
    Release("text", ("text", "guidelines"), (Job("text-folder", role="stage2"),)),
)


def folder_key(name):
    return name.lower().replace("-", "").replace("_", "").replace(" ", "")


def find_release(raw, release):
    """The release's folder under RAW (first folder name that is there, any case, '-' and '_' ignored)."""
    children = {folder_key(n): os.path.join(raw, n) for n in os.listdir(raw) if os.path.isdir(os.path.join(raw, n))}
    for name in release.folders:
        path = os.path.join(raw, name)
        if os.path.isdir(path):
            return path
        if folder_key(name) in children:
            return children[folder_key(name)]
    return None


def output_names(job):
    function, outputs, kind = convert.CONVERTERS[job.converter]
    names = [job.output] if job.output else list(outputs) if isinstance(outputs, tuple) else [outputs]
    if kind == "eval" and convert.is_training_split(job.split):
        names = [f"{n}_train" for n in names]
    return names


def job_dir(out, job):
    return os.path.join(out, "eval" if job.role == "eval" else "train")


def already_done(out, job, src, limit):
    """Converted before from the same source with the same --limit."""
    infos = [os.path.join(job_dir(out, job), n, "convert_info.json") for n in output_names(job)]
    found = [i for i in infos if os.path.isfile(i)]
    for path in found:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
        if info.get("source") != os.path.abspath(src) or info.get("limit") != limit:
            return False
    return bool(found)


def run_job(out, job, src, args):
    """Convert one job; returns (status, [output folders])."""
    folders = [os.path.join(job_dir(out, job), n) for n in output_names(job)]
    if already_done(out, job, src, args.limit):
        return "done before", folders
    started = time.time()
    convert.convert(job.converter, src, job_dir(out, job), job.split, args.skip_missing, job.output, args.limit)
    return f"converted in {time.time() - started:.1f} s", folders


# -----------------------------------------------------------------------------
# Leakage and counts

def eval_fingerprint(out):
    """What the eval index depends on: each benchmark's test.jsonl (size, mtime)."""
    files = sorted(glob.glob(os.path.join(out, "eval", "*", "test.jsonl")))
    return [[os.path.basename(os.path.dirname(f)), os.path.getsize(f), os.path.getmtime(f)] for f in files]


def build_index(out, threshold):
    index = leakage.EvalIndex(threshold)
    for test in sorted(glob.glob(os.path.join(out, "eval", "*", "test.jsonl"))):
        index.add_benchmark(os.path.dirname(test), os.path.basename(os.path.dirname(test)))
    return index


def question_hashes(folder):
    """{record id: {question sha256}} from a training source's hashes.jsonl (for --match image+question)."""
    asked = {}
    path = os.path.join(folder, "hashes.jsonl")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                if row["kind"] == "text":
                    asked.setdefault(row["ref"], set()).add(row["sha256"])
    return asked


def filter_source(folder, out, index_fn, args):
    """clean.jsonl of one training source; returns its leakage.json contents (cached when nothing changed)."""
    settings = {"eval": eval_fingerprint(out), "match": args.match, "threshold": args.threshold,
                "train_mtime": os.path.getmtime(os.path.join(folder, "train.jsonl"))}
    info_path, clean = os.path.join(folder, "leakage.json"), os.path.join(folder, "clean.jsonl")
    if os.path.isfile(info_path) and os.path.isfile(clean):
        with open(info_path, encoding="utf-8") as f:
            info = json.load(f)
        if info.get("settings") == settings:
            return info
    counts = leakage.filter_records(os.path.join(folder, "train.jsonl"), clean, index_fn(), args.match,
                                    question_hashes(folder) if args.match == "image+question" else None)
    info = dict(counts, settings=settings)
    with open(info_path, "w", encoding="utf-8") as f:
        json.dump(info, f, indent=1)
    return info


def record_texts(record):
    texts = [record.get("caption"), record.get("text"), record.get("question"), record.get("answer")]
    texts += list((record.get("options") or {}).values())
    texts += [t.get("value") for t in record.get("conversations") or []]
    texts += [t.get("thinking") for t in record.get("conversations") or []]
    texts += [p.get("text") for p in record.get("content") or [] if p.get("type") == "text"]
    return [t for t in texts if isinstance(t, str)]


def count_file(path, tok):
    """(records, distinct images, tokens) of a stage or eval JSONL; tokens None without a tokenizer."""
    records, images, tokens = 0, set(), 0
    base_dir = os.path.dirname(os.path.abspath(path))
    with open(path, encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            records += 1
            paths = leakage.record_images(record, base_dir) if "images" not in record else record["images"]
            images.update(paths)
            if tok is not None:
                tokens += sum(len(encode_ordinary(tok, t)) for t in record_texts(record))
                tokens += TOKENS_PER_IMAGE * len(paths)
    return records, len(images), tokens if tok is not None else None


def cached_counts(path, tok):
    stats_path = os.path.join(os.path.dirname(path), f"stats-{os.path.basename(path)}.json")
    key = [os.path.getsize(path), os.path.getmtime(path), tok is not None]
    if os.path.isfile(stats_path):
        with open(stats_path, encoding="utf-8") as f:
            stats = json.load(f)
        if stats.get("key") == key:
            return stats["counts"]
    counts = count_file(path, tok)
    with open(stats_path, "w", encoding="utf-8") as f:
        json.dump({"key": key, "counts": counts}, f)
    return counts


# -----------------------------------------------------------------------------
# Mixtures

def write_mixtures(out, recipe_dir=RECIPE_DIR):
    """OUT/stage{1,2,3}.json from the recipe, keeping the sources prepared; {stage: (kept, missing)}."""
    result = {}
    for stage in (1, 2, 3):
        with open(os.path.join(recipe_dir, f"stage{stage}.json"), encoding="utf-8") as f:
            recipe = json.load(f)
        kept = [e for e in recipe["datasets"] if os.path.isfile(os.path.join(out, e["path"]))]
        missing = [e["path"] for e in recipe["datasets"] if e not in kept]
        mixture = dict(recipe, datasets=kept, missing=missing)
        if kept:
            with open(os.path.join(out, f"stage{stage}.json"), "w", encoding="utf-8") as f:
                json.dump(mixture, f, indent=1)
        result[stage] = (kept, missing)
    return result


# -----------------------------------------------------------------------------
# Report

def skipped_text(skipped):
    return "; ".join(f"{reason}: {n}" for reason, n in sorted(skipped.items())) or "-"


def print_table(rows):
    header = ("source", "role", "records", "images", "tokens", "skipped (reason: count)")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(5)]
    for row in [header] + rows:
        cells = [str(c).ljust(w) if i < 2 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row[:5], widths))]
        print("  ".join(cells + [str(row[5])]))


def main(argv=None):
    parser = argparse.ArgumentParser(description="Prepare the recipe's eval sets and stage mixtures from RAW.")
    parser.add_argument("--raw", required=True, help="folder holding the downloaded, unpacked releases")
    parser.add_argument("--out", required=True, help="output folder (eval/, train/, stage{1,2,3}.json)")
    parser.add_argument("--only", default=None, help="comma-separated release names (default: all found)")
    parser.add_argument("--limit", type=int, default=None, help="at most N items per output (a quick trial)")
    parser.add_argument("--skip-missing", action="store_true", help="skip (and count) items whose image is missing")
    parser.add_argument("--match", default="image", choices=("image", "image+question"),
                        help="leakage: drop training records sharing an eval image (default), or only when the "
                             "question is the same too")
    parser.add_argument("--threshold", type=int, default=leakage.NEAR_THRESHOLD, help="pHash Hamming threshold")
    parser.add_argument("--no-tokens", action="store_true", help="skip counting tokens (faster)")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.raw):
        print(f"error: --raw {args.raw} is not a folder", file=sys.stderr)
        return 2
    only = set(args.only.split(",")) if args.only else None
    releases = [r for r in RELEASES if only is None or r.name in only]
    unknown = (only or set()) - {r.name for r in RELEASES}
    if unknown:
        print(f"error: --only {sorted(unknown)}: known releases are {[r.name for r in RELEASES]}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)

    # 1. convert every release found
    found, not_found, errors, outputs = [], [], [], []
    jobs = [(r, job) for r in releases for job in r.jobs]
    for step, (release, job) in enumerate(jobs, 1):
        src = find_release(args.raw, release)
        if src is None:
            if release not in not_found:
                not_found.append(release)
            continue
        label = f"{release.name} {job.converter} {job.split or ''}".strip()
        print(f"[{step}/{len(jobs)}] {label}: {src}", file=sys.stderr, flush=True)
        try:
            status, folders = run_job(args.out, job, src, args)
        except convert.LayoutError as e:
            errors.append((label, str(e)))
            print(f"  error: {e}", file=sys.stderr)
            continue
        print(f"  {status}", file=sys.stderr)
        found.append(release)
        # a writer that wrote nothing (R2Gen's IU-Xray has no impression) leaves an empty folder: not an output
        outputs += [(job.role, folder) for folder in folders
                    if os.path.isfile(os.path.join(folder, "convert_info.json"))]

    # 2. leakage filter of every training source against every eval set present
    index_cache = []
    def index_fn():  # built once, and only when some source needs filtering
        if not index_cache:
            print("hashing the eval images ...", file=sys.stderr, flush=True)
            index_cache.append(build_index(args.out, args.threshold))
        return index_cache[0]
    leaks = {}
    for role, folder in outputs:
        if role != "eval" and os.path.isfile(os.path.join(folder, "train.jsonl")):
            print(f"leakage filter: {os.path.basename(folder)}", file=sys.stderr, flush=True)
            leaks[folder] = filter_source(folder, args.out, index_fn, args)

    # 3. counts and the report
    tok = None if args.no_tokens else load_tokenizer()
    rows = []
    for role, folder in outputs:
        name = os.path.basename(folder)
        info_path = os.path.join(folder, "convert_info.json")
        with open(info_path, encoding="utf-8") as f:
            skipped = Counter(json.load(f).get("skipped", {}))
        if role == "eval":
            records, images, tokens = cached_counts(os.path.join(folder, "test.jsonl"), tok)
        else:
            records, images, tokens = cached_counts(os.path.join(folder, "clean.jsonl"), tok)
            for benchmark, kinds in leaks[folder]["by_benchmark"].items():
                for kind, n in kinds.items():
                    skipped[f"leak {kind} {benchmark}"] += n
        rows.append((name, role, records, images, "-" if tokens is None else tokens, skipped_text(skipped)))
    mixtures = write_mixtures(args.out)

    print(f"\nPrepared under {args.out} (eval sets: {args.out}/eval, stage mixtures: {args.out}/stage{{1,2,3}}.json)")
    print_table(rows)
    print("\nLeaked training records dropped (source: benchmark exact/near):")
    for folder, info in leaks.items():
        per = ", ".join(f"{b} {k.get('exact', 0)}/{k.get('near', 0)}" for b, k in info["by_benchmark"].items())
        print(f"  {os.path.basename(folder)}: {info['dropped']} of {info['dropped'] + info['kept']}"
              + (f" ({per})" if per else ""))
    for stage, (kept, missing) in mixtures.items():
        print(f"stage {stage}: {len(kept)} sources" + (f"; not prepared: {', '.join(missing)}" if missing else ""))
    if not_found:
        print("\nNot found under RAW (expected folder names):")
        for release in not_found:
            print(f"  {release.name}: {', '.join(release.folders)}")
    for label, message in errors:
        print(f"\nerror in {label}: {message}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
