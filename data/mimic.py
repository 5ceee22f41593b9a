"""
Chest X-ray report generation data: the MIMIC-CXR section parser, MIMIC-CXR studies (every view, the prior
study, a findings task and an impression task), IU-Xray (OpenI XML, Kaggle CSVs, R2Gen's split) and CheXpert Plus,
written as eval items and as stage-1 / stage-3 training records.

    python -m data.convert mimic-cxr --src MIMIC_CXR_JPG --out data/eval           # mimic_cxr_{findings,impression}
    python -m data.convert mimic-cxr-instruct --src MIMIC_CXR_JPG --out data/train # stage 3, train split
    python -m data.convert mimic-cxr-captions --src MIMIC_CXR_JPG --out data/train # stage 1, train split
    python -m data.convert iu-xray --src IU_XRAY --out data/eval                   # iu_xray_{findings,impression}
    python -m data.convert iu-xray-instruct --src iu_xray --out data/train         # stage 3, R2Gen's train split
    python -m data.convert chexpert-plus --src CHEXPERT_PLUS --out data/eval       # chexpert_plus_{...}
    python -m data.convert chexpert-plus-instruct --src CHEXPERT_PLUS --out data/train   # stage 3, train split

Design choices
- Sections are cut as the official MIMIC-CXR parser cuts them (MIT-LCP/mimic-cxr, txt/section_parser.py and
  txt/create_section_files.py, MIT licence; behaviour re-implemented, its name table and per-study rules
  transcribed): a header is `NAME:` at the start of a line that begins with a space; names are normalised by
  its table (CONCLUSION, FINDINGS AND IMPRESSION, FINDINGS/IMPRESSION -> impression, misspellings, view
  titles such as 'PA AND LATERAL CHEST' -> findings); empty findings/impression sections are dropped; a
  report with neither gets 'last_paragraph' (the last section after its first paragraph break); the last
  section of a name wins; 55 badly formatted studies follow its per-study rules.
- The two tasks' references: findings = the 'findings' section; impression = the 'impression' section, else
  the 'last_paragraph' (reports without headings), or the text the per-study rules give. Whitespace runs are
  collapsed to one space. A study without the section has no item for that task (counted, never printed).
- Views in a stated order: PA, AP, FRONTAL (a frontal view whose projection is not recorded: IU-Xray's Kaggle
  CSV), LATERAL, LL, then every other ViewPosition (AP AXIAL, PA LLD, ..., unrecorded); ties by image name
  (dicom_id). Eval items keep every view; eval.py's --max_views keeps the first N.
- The prior study: the same subject's latest study with an earlier (StudyDate, StudyTime) whose report has a
  findings or impression section; an item links it (its images in view order, its report as
  'Findings: ...\\nImpression: ...'), and eval.py's --prior puts it into the prompt.
- One prompt per task (`report_prompt`): it names the task, the views and whether a prior study is given.
  A train split becomes stage-3 conversations in the same prompt form (`train_records`: with the prior when the
  study has one, at most TRAIN_MAX_VIEWS views per study), written by the `-instruct` converters (MIMIC-CXR,
  CheXpert Plus, IU-Xray's R2Gen split); the eval converters refuse a train split and name them. MIMIC-CXR's
  train split also becomes stage-1 (image, findings) caption pairs, one per image.
- IU-Xray ships one report per study and no patient id or study date: no prior is ever linked. Its layouts:
  OpenI XML (no view recorded, the XML's image order), Kaggle CSVs (Frontal / Lateral per image: frontal
  first), R2Gen's annotation.json (train/val/test; its reports are the findings section; 0.png, 1.png, no view).
  OpenI and Kaggle have no split: every report is an item, keyed `CXR<uid>` in both.
- Converters take the writers data/convert.py hands them (`emit`, `image`, `skip`) and import nothing from it
  (data/convert.py imports this module for its CONVERTERS table).
"""
import csv
import glob
import gzip
import json
import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field


class LayoutError(ValueError):
    """The source folder does not look like the released data set."""


TASKS = ("findings", "impression")
TRAIN_MAX_VIEWS = 3   # views per study in the training records (and the default of eval.py --max_views)

# ----------------------------------------------------------------------------------------------------------
# The official MIMIC-CXR section parser's behaviour

# A header: newline, one space, upper-case words, a colon, whitespace (the reports indent every line by one space)
SECTION_HEADER = re.compile(r"\n ([A-Z ()/,-]+):\s", re.DOTALL)

# section_parser.normalize_section_names: exact names first (counts in MIMIC-CXR in the original's comments)
SECTION_NAMES = {
    "preamble": "preamble", "impression": "impression", "comparison": "comparison",
    "indication": "indication", "findings": "findings", "examination": "examination",
    "technique": "technique", "history": "history", "comparisons": "comparison",
    "clinical history": "history", "reason for examination": "indication", "notification": "notification",
    "reason for exam": "indication", "clinical information": "history", "exam": "examination",
    "clinical indication": "indication", "conclusion": "impression", "chest, two views": "findings",
    "recommendation(s)": "recommendations", "type of examination": "examination",
    "reference exam": "comparison", "patient history": "history", "addendum": "addendum",
    "comparison exam": "comparison", "date": "date", "comment": "comment",
    "findings and impression": "impression", "wet read": "wet read", "comparison film": "comparison",
    "recommendations": "recommendations", "findings/impression": "impression", "pfi": "history",
    "recommendation": "recommendations", "wetread": "wet read",
    "ndication": "impression",   # sic: the original maps this one-off typo to impression
    "impresson": "impression", "imprression": "impression", "imoression": "impression",
    "impressoin": "impression", "imprssion": "impression", "impresion": "impression",
    "imperssion": "impression", "mpression": "impression", "impession": "impression",
    "findings/ impression": "impression", "finding": "findings", "findins": "findings",
    "findindgs": "findings", "findgings": "findings", "findngs": "findings", "findnings": "findings",
    "finidngs": "findings", "idication": "indication", "reference findings": "findings",
    "comparision": "comparison", "comparsion": "comparison", "comparrison": "comparison",
    "comparisions": "comparison",
}
# then: a name containing one of these words becomes that word (first match in this order)
MAIN_SECTIONS = ("impression", "findings", "history", "comparison", "addendum")
# then: a name that describes the whole study (a view title) is findings
FINDINGS_TITLES = re.compile("(" + "|".join([
    "chest", "portable", "pa and lateral", "lateral and pa", "ap and lateral", "lateral and ap", "frontal and",
    "two views", "frontal view", "pa view", "ap view", "one view", "lateral view", "bone window",
    "frontal upright", "frontal semi-upright", "ribs", "pa and lat"]) + ")")

# create_section_files.py's per-study rules (section_parser.custom_mimic_cxr_rules): the section that holds the
# conclusion, and character spans of the conclusion ([0, 0]: the report has none)
CUSTOM_SECTION_NAMES = {
    "s50913680": "recommendations", "s59363654": "examination", "s59279892": "technique",
    "s59768032": "recommendations", "s57936451": "indication", "s50058765": "indication",
    "s53356173": "examination", "s53202765": "technique", "s50808053": "technique", "s51966317": "indication",
    "s50743547": "examination", "s56451190": "note", "s59067458": "recommendations", "s59215320": "examination",
    "s55124749": "indication", "s54365831": "indication", "s59087630": "recommendations",
    "s58157373": "recommendations", "s56482935": "recommendations", "s58375018": "recommendations",
    "s54654948": "indication", "s55157853": "examination", "s51491012": "history",
}
CUSTOM_SPANS = {
    "s50525523": (201, 349), "s57564132": (233, 554), "s59982525": (313, 717), "s53488209": (149, 475),
    "s54875119": (234, 988), "s50196495": (59, 399), "s56579911": (59, 218), "s52648681": (292, 631),
    "s59889364": (172, 453), "s53514462": (73, 377), "s59505494": (59, 450), "s53182247": (59, 412),
    "s51410602": (47, 320), "s56412866": (522, 822), "s54986978": (59, 306), "s59003148": (262, 505),
    "s57150433": (61, 394), "s56760320": (219, 457), "s59562049": (158, 348), "s52674888": (145, 296),
    "s55258338": (192, 568), "s59330497": (140, 655), "s52119491": (179, 454),
    "s58235663": (0, 0), "s50798377": (0, 0), "s54168089": (0, 0), "s53071062": (0, 0), "s56724958": (0, 0),
    "s54231141": (0, 0), "s53607029": (0, 0), "s52035334": (0, 0),
}


def normalize_section_name(name):
    """A header's normalised name: the exact table, else a main section word it contains, else 'findings' for
    a view title, else the lower-cased name itself."""
    name = name.lower().strip()
    if name in SECTION_NAMES:
        return SECTION_NAMES[name]
    for main in MAIN_SECTIONS:
        if main in name:
            return main
    return "findings" if FINDINGS_TITLES.search(name) else name


def section_text(text):
    """[(normalised name, section text, start offset)] of a report, as section_parser.section_text cuts it."""
    sections = []
    header = SECTION_HEADER.search(text)
    if header is None:
        sections.append(["full report", text, 0])
    else:
        sections.append(["preamble", text[:header.start(1)], 0])
    while header is not None:
        start = header.end()
        # the next header is looked for after the end of this header's line (avoids some bad parses)
        line_end = text.find("\n", start)
        following = SECTION_HEADER.search(text, line_end if line_end != -1 else start)
        end = following.start() if following else len(text)
        sections.append([header.group(1), text[start:end], start])
        header = following
    for section in sections:
        section[0] = normalize_section_name(section[0])
    sections = [s for s in sections if not (s[0] in ("impression", "findings") and not s[1].strip())]
    names = {s[0] for s in sections}
    if "impression" not in names and "findings" not in names and "\n \n" in sections[-1][1]:
        # no findings or impression: what follows the last section's first paragraph becomes last_paragraph
        name, body, start = sections[-1]
        first, *rest = body.split("\n \n")
        sections[-1] = [name, first, start]
        sections.append(["last_paragraph", "\n \n".join(rest), start + len(first)])
    return [tuple(s) for s in sections]


def report_sections(text, study=None):
    """create_section_files.py's view of one report: {'impression', 'findings', 'last_paragraph', 'comparison':
    the last section of that name, stripped, or None; 'conclusion': the text it writes as the study's
    conclusion (impression > findings > last_paragraph > comparison, or the per-study rule for `study`)}."""
    out = {name: None for name in ("impression", "findings", "last_paragraph", "comparison")}
    if study in CUSTOM_SPANS:   # the original keeps this span as is, unstripped, and no other section
        begin, end = CUSTOM_SPANS[study]
        return {**out, "conclusion": text[begin:end]}
    sections = section_text(text)
    if study in CUSTOM_SECTION_NAMES:
        named = [body for name, body, _ in sections if name == CUSTOM_SECTION_NAMES[study]]
        return {**out, "conclusion": named[-1].strip()}
    for name, body, _ in sections:   # later sections overwrite earlier ones: the last one wins
        if name in out:
            out[name] = body.strip()
    out["conclusion"] = next((out[n] for n in ("impression", "findings", "last_paragraph", "comparison")
                              if out[n] is not None), "")
    return out


def collapse(text):
    return " ".join(text.replace("<image>", " ").split()) if text else ""


def task_references(text, study=None):
    """{'findings': str or None, 'impression': str or None}: the two tasks' reference texts of a MIMIC report."""
    sections = report_sections(text, study)
    if study in CUSTOM_SPANS or study in CUSTOM_SECTION_NAMES:
        findings, impression = None, sections["conclusion"]
    else:
        findings = sections["findings"]
        impression = sections["impression"] if sections["impression"] is not None else sections["last_paragraph"]
    return {"findings": collapse(findings) or None, "impression": collapse(impression) or None}


def prior_report_text(references):
    """A prior study's report as the prompt shows it: 'Findings: ...' and 'Impression: ...' lines."""
    return "\n".join(f"{task.capitalize()}: {references[task]}" for task in TASKS if references.get(task))

# ----------------------------------------------------------------------------------------------------------
# Views and the prompt (one wording per task)


VIEW_ORDER = ("PA", "AP", "FRONTAL", "LATERAL", "LL")   # frontal first, then lateral; any other view after these
VIEW_WORDS = {"PA": "PA", "AP": "AP", "FRONTAL": "frontal", "LATERAL": "lateral", "LL": "left lateral",
              "": "view not recorded"}


def view_rank(view):
    return VIEW_ORDER.index(view) if view in VIEW_ORDER else len(VIEW_ORDER)


def describe_views(views):
    """'2 chest X-ray images (PA, lateral)'."""
    words = ", ".join(VIEW_WORDS.get(v, v.lower()) for v in views)
    return f"{len(views)} chest X-ray image{'s' if len(views) != 1 else ''} ({words})"


def report_prompt(task, views, prior_views=None, prior_report=None):
    """The user turn of a report item: prior study (images, report) or the statement that there is none, the
    current study's images with their views, and the task. One `<image>` line per image, in this order."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    lines = []
    if prior_views:
        lines += [f"Prior study: {describe_views(prior_views)}."] + ["<image>"] * len(prior_views)
        lines += ["Prior report:", prior_report or "(no report)"]
    lines += [f"Current study: {describe_views(views)}."] + ["<image>"] * len(views)
    if not prior_views:
        lines.append("No prior study is given.")
    comparing = ", comparing it with the prior study" if prior_views else ""
    lines.append(f"Write the {task} section of the radiology report for the current study{comparing}.")
    return "\n".join(lines)

# ----------------------------------------------------------------------------------------------------------
# Reading released files


def open_text(path):
    return gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path, encoding="utf-8-sig")


def read_csv(path):
    """[(row dict, line number)] of a CSV file (header on line 1; .gz read as is)."""
    with open_text(path) as f:
        return [(row, i + 2) for i, row in enumerate(csv.DictReader(f))]


def find_one(src, patterns, what):
    """The first file matching one of `patterns` (globs under src), or a LayoutError naming what was looked for."""
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.join(src, pattern), recursive=True))
        if matches:
            return matches[0]
    raise LayoutError(f"{src}: no {what} found; looked for {', '.join(patterns)}. "
                      "Point --src at the unpacked release folder.")


def column(row, name, where):
    if name not in row or row[name] is None:
        raise LayoutError(f"{where}: missing column {name!r}; found columns {sorted(k for k in row if k)}. "
                          "Point --src at the release as downloaded (its files unchanged).")
    return row[name].strip()

# ----------------------------------------------------------------------------------------------------------
# Studies


@dataclass
class Study:
    key: str                      # "s50414267" (MIMIC), "CXR1" (IU-Xray), "patient1/study2" (CheXpert Plus)
    subject: str
    split: str
    when: tuple                   # sort key for priors: (StudyDate, StudyTime) or (report order,)
    images: list = field(default_factory=list)   # [(view, source path, name under imgs/)], in view order
    references: dict = field(default_factory=dict)
    prior: "Study" = None

    def sort_images(self):
        self.images.sort(key=lambda image: (view_rank(image[0]), image[2]))


def link_priors(studies):
    """Set each study's prior: the same subject's latest earlier study with a findings or impression text."""
    by_subject = {}
    for study in studies:
        by_subject.setdefault(study.subject, []).append(study)
    for group in by_subject.values():
        group.sort(key=lambda s: s.when)
        for study in group:
            earlier = [s for s in group if s.when < study.when and any(s.references.values()) and s.images]
            study.prior = earlier[-1] if earlier else None


def mimic_studies(src):
    """All MIMIC-CXR studies of the release at `src` (split, views, dates, reports), priors linked."""
    split_rows = read_csv(find_one(src, ["mimic-cxr-2.0.0-split.csv.gz", "mimic-cxr-2.0.0-split.csv",
                                         "**/mimic-cxr-2.0.0-split.csv*"], "mimic-cxr-2.0.0-split.csv"))
    meta_path = find_one(src, ["mimic-cxr-2.0.0-metadata.csv.gz", "mimic-cxr-2.0.0-metadata.csv",
                               "**/mimic-cxr-2.0.0-metadata.csv*"], "mimic-cxr-2.0.0-metadata.csv (views, dates)")
    metadata = {}
    for row, line in read_csv(meta_path):
        where = f"{meta_path}: line {line}"
        date, time = column(row, "StudyDate", where), column(row, "StudyTime", where)
        try:
            when = (int(date), float(time))
        except ValueError:
            raise LayoutError(f"{where}: StudyDate {date!r} / StudyTime {time!r}; expected YYYYMMDD and "
                              "HHMMSS.fff numbers") from None
        metadata[column(row, "dicom_id", where)] = (column(row, "ViewPosition", where), when)
    roots = [p for p in (os.path.join(src, "files"), os.path.join(src, "mimic-cxr-jpg", "files"),
                         os.path.join(src, "mimic-cxr-reports", "files")) if os.path.isdir(p)]
    if not roots:
        raise LayoutError(f"{src}: no files/ folder (reports files/pNN/pSUBJECT/sSTUDY.txt, images "
                          "files/pNN/pSUBJECT/sSTUDY/DICOM_ID.jpg)")
    studies = {}
    for row, line in split_rows:
        where = f"mimic-cxr-2.0.0-split.csv: line {line}"
        dicom, subject = column(row, "dicom_id", where), column(row, "subject_id", where)
        key = f"s{column(row, 'study_id', where)}"
        if dicom not in metadata:
            raise LayoutError(f"{where}: dicom_id {dicom} is not in {os.path.basename(meta_path)}")
        view, when = metadata[dicom]
        study = studies.setdefault(key, Study(key, subject, column(row, "split", where), when))
        study.when = min(study.when, when)
        jpg = os.path.join(f"p{subject[:2]}", f"p{subject}", key, f"{dicom}.jpg")
        path = next((os.path.join(r, jpg) for r in roots if os.path.isfile(os.path.join(r, jpg))),
                    os.path.join(roots[0], jpg))
        study.images.append((view, path, f"p{subject}/{key}/{dicom}.jpg"))
    for study in studies.values():
        study.sort_images()
        txt = os.path.join(f"p{study.subject[:2]}", f"p{study.subject}", f"{study.key}.txt")
        report = next((os.path.join(r, txt) for r in roots if os.path.isfile(os.path.join(r, txt))), None)
        if report is None:
            study.references = {"missing": "report file missing"}
            continue
        with open(report, encoding="utf-8") as f:
            study.references = task_references(f.read(), study.key)
    link_priors([s for s in studies.values() if "missing" not in s.references])
    return sorted(studies.values(), key=lambda s: s.key)


def references_of(study):
    return {t: study.references.get(t) for t in TASKS}


def check_eval_split(split, instruct):
    """The eval converters write eval items; a train split goes through the data set's -instruct converter."""
    if split and os.path.basename(split).lower().startswith("train"):
        raise LayoutError(f"--split {split}: a report benchmark's training records are written by `python -m "
                          f"data.convert {instruct}` (stage-3 conversations in eval's prompt form)")

# ----------------------------------------------------------------------------------------------------------
# Writing eval items and training records


def emit_report_item(w, study, task, where):
    """One report item: every view of the study, the prior linked; the default prompt in `question`."""
    if not w.skip_missing:
        missing = [p for _, p, _ in (study.prior.images if study.prior else []) if not os.path.isfile(p)]
        if missing:
            raise LayoutError(f"{where}: prior study image not found: {missing[0]} (use --skip-missing to "
                              "skip and count)")
    views = [view for view, _, _ in study.images]
    question = report_prompt(task, views[:TRAIN_MAX_VIEWS])
    if not w.emit(study.key, "report", question, study.references[task], [(p, n) for _, p, n in study.images],
                  where=where):
        return
    item = w.items[-1]
    item.update(task=task, study=study.key, views=views, prior=None)
    prior = study.prior
    if prior is not None and all(os.path.isfile(p) for _, p, _ in prior.images):
        copied = [w.image(path, name) for _, path, name in prior.images]
        item["prior"] = {"study": prior.key, "views": [view for view, _, _ in prior.images],
                         "images": [rel for rel, _ in copied], "image_sha256": [digest for _, digest in copied],
                         "report": prior_report_text(references_of(prior))}


def emit_task_items(studies, split, writers, source):
    """Report items of `split` for each task's writer; studies without that section are skipped and counted."""
    written = 0
    for study in studies:
        if study.split != split:
            continue
        for task, w in zip(TASKS, writers):
            if "missing" in study.references:
                w.skip(study.references["missing"])
            elif not study.references.get(task):
                w.skip(f"no {task} section")   # counted, never printed: report text is patient data
            else:
                emit_report_item(w, study, task, f"{source}: {study.key}")
                written += 1
    if not written:
        raise LayoutError(f"{source}: wrote 0 items: no study of split {split!r} has a findings or impression "
                          f"section; check --split (found splits {sorted({s.split for s in studies})})")
    return split


def convert_mimic_cxr(src, split, w_findings, w_impression):
    """MIMIC-CXR-JPG + MIMIC-CXR reports -> mimic_cxr_findings and mimic_cxr_impression (default: test split)."""
    check_eval_split(split, "mimic-cxr-instruct")
    return emit_task_items(mimic_studies(src), split or "test", (w_findings, w_impression), "MIMIC-CXR")


def train_records(study, task):
    """A stage-3 conversation for one study and task: (record, image paths in prompt order)."""
    current = study.images[:TRAIN_MAX_VIEWS]
    prior = study.prior.images[:TRAIN_MAX_VIEWS] if study.prior else []
    prompt = report_prompt(task, [v for v, _, _ in current], [v for v, _, _ in prior] or None,
                           prior_report_text(references_of(study.prior)) if prior else None)
    record = {"id": f"{study.key}-{task}", "task": task, "image": None,
              "conversations": [{"from": "human", "value": prompt},
                                {"from": "gpt", "value": study.references[task]}]}
    return record, [p for _, p, _ in prior + current]


def emit_train_records(studies, split, w, source, tasks=TASKS):
    """Stage-3 conversations of `split` (each task, eval's prompt form); studies without the section are skipped
    and counted; writing none is an error."""
    for study in studies:
        if study.split != split:
            continue
        for task in tasks:
            if not study.references.get(task):
                w.skip(study.references.get("missing", f"no {task} section"))
                continue
            record, paths = train_records(study, task)
            w.emit(record, paths, [study.references[task]], f"{source}: {study.key}")
    if not w.rows:
        raise LayoutError(f"{source}: wrote 0 records of split {split!r} (skipped: {dict(w.skipped) or 'none'}); "
                          f"check --split (found splits {sorted({s.split for s in studies})}) and the images")
    return split


def convert_mimic_cxr_instruct(src, split, w):
    """The train split as stage-3 conversations (both tasks), in eval's prompt form."""
    return emit_train_records(mimic_studies(src), split or "train", w, "MIMIC-CXR")


def convert_mimic_cxr_captions(src, split, w):
    """The train split as stage-1 (image, findings) pairs: every image of a study with its findings."""
    split = split or "train"
    for study in mimic_studies(src):
        if study.split != split:
            continue
        if not study.references.get("findings"):
            w.skip(study.references.get("missing", "no findings section"))
            continue
        for view, path, name in study.images:
            record = {"id": name.rsplit("/", 1)[-1].removesuffix(".jpg"), "image": None,
                      "caption": study.references["findings"]}
            w.emit(record, [path], [study.references["findings"]], f"MIMIC-CXR: {study.key}")
    if not w.rows:
        raise LayoutError(f"{src}: no {split} study with a findings section")
    return split

# ----------------------------------------------------------------------------------------------------------
# IU-Xray: OpenI XML, Kaggle CSVs, R2Gen's annotation.json

IU_LAYOUTS = {   # layout -> the file that marks it (globs under --src, first match wins)
    "R2Gen": ("annotation.json", "iu_xray/annotation.json"),
    "Kaggle": ("indiana_reports.csv", "**/indiana_reports.csv"),
    "OpenI": ("ecgen-radiology/*.xml", "**/ecgen-radiology/*.xml"),
}
IU_PROJECTIONS = {"Frontal": "FRONTAL", "Lateral": "LATERAL"}   # indiana_projections.csv's projection values


def iu_xray_layout(src):
    """(layout, the file that marks it): R2Gen's split first, then Kaggle's CSVs, then OpenI's XML."""
    for layout, patterns in IU_LAYOUTS.items():
        for pattern in patterns:
            matches = sorted(glob.glob(os.path.join(src, pattern), recursive=True))
            if matches:
                return layout, matches[0]
    raise LayoutError(f"{src}: no IU-Xray release found; looked for annotation.json + images/ (R2Gen), "
                      "indiana_reports.csv + indiana_projections.csv + images/images_normalized/ (Kaggle), "
                      "ecgen-radiology/*.xml + NLMCXR_png (OpenI). Point --src at the unpacked download.")


def require_image(path, where, what_to_do, w):
    """Stop at a missing image with the row that names it, unless --skip-missing (then the writer counts it)."""
    if not w.skip_missing and not os.path.isfile(path):
        raise LayoutError(f"{where}: image not found: {path}; {what_to_do} (or use --skip-missing to skip and count)")


def iu_xray_openi(src, w):
    """OpenI: `ecgen-radiology/*.xml` (NLMCXR_reports.tgz), each report's <AbstractText Label="FINDINGS" /
    "IMPRESSION"> and its <parentImage id="CXR1_1_IM-0001-3001"> images, found as `<id>.png` anywhere under --src
    (NLMCXR_png.tgz). The XML records no view: images keep their XML order."""
    reports = sorted(glob.glob(os.path.join(src, "**", "ecgen-radiology", "*.xml"), recursive=True),
                     key=lambda p: (len(os.path.basename(p)), os.path.basename(p)))
    pngs = {os.path.splitext(os.path.basename(p))[0]: p
            for p in glob.glob(os.path.join(src, "**", "*.png"), recursive=True)}
    studies = []
    for path in reports:
        try:
            root = ET.parse(path).getroot()
        except ET.ParseError as e:
            raise LayoutError(f"{path}: not valid XML ({e})") from None
        uid = root.find("uId")
        key = uid.get("id") if uid is not None else os.path.splitext(os.path.basename(path))[0]
        texts = {(node.get("Label") or "").upper(): collapse(node.text or "") for node in root.iter("AbstractText")}
        study = Study(key, key, "all", (0,), references={t: texts.get(t.upper()) or None for t in TASKS})
        for image in root.iter("parentImage"):
            image_id = image.get("id")
            if image_id not in pngs and not w.skip_missing:
                raise LayoutError(f"{path}: parentImage {image_id}: no {image_id}.png under {src}; unpack "
                                  "NLMCXR_png.tgz there (or use --skip-missing to skip and count)")
            study.images.append(("", pngs.get(image_id, os.path.join(src, f"{image_id}.png")), f"{image_id}.png"))
        studies.append(study)
    return studies


def iu_xray_kaggle(reports_path, w):
    """Kaggle's "Chest X-rays (Indiana University)": `indiana_reports.csv` (uid, MeSH, Problems, image, indication,
    comparison, findings, impression), `indiana_projections.csv` (uid, filename, projection = Frontal / Lateral),
    images `images/images_normalized/<filename>`. uid N is OpenI's report N: the study key is `CXR<uid>`."""
    folder = os.path.dirname(reports_path)
    projections_path = os.path.join(folder, "indiana_projections.csv")
    if not os.path.isfile(projections_path):
        raise LayoutError(f"{folder}: indiana_reports.csv without indiana_projections.csv (uid, filename, "
                          "projection); unpack the whole Kaggle download there")
    images = w.images_dir or os.path.join(folder, "images", "images_normalized")
    studies = {}
    for row, line in read_csv(reports_path):
        where = f"{reports_path}: line {line}"
        uid = column(row, "uid", where)
        references = {task: collapse(column(row, task, where)) or None for task in TASKS}
        studies[uid] = Study(f"CXR{uid}", f"CXR{uid}", "all", (0,), references=references)
    for row, line in read_csv(projections_path):
        where = f"{projections_path}: line {line}"
        uid, filename = column(row, "uid", where), column(row, "filename", where)
        projection = column(row, "projection", where)
        if uid not in studies:
            raise LayoutError(f"{where}: uid {uid} has no row in indiana_reports.csv; use the two files of one "
                              "download")
        path = os.path.join(images, filename)
        require_image(path, where, "unpack images/images_normalized/ beside the CSVs (or pass --images DIR)", w)
        studies[uid].images.append((IU_PROJECTIONS.get(projection, projection.upper()), path, filename))
    for study in studies.values():
        study.sort_images()
    return sorted(studies.values(), key=lambda s: (len(s.key), s.key))


def iu_xray_r2gen(annotation_path, w):
    """R2Gen's split (Chen et al. 2020, github.com/zhjohnchan/R2Gen): `annotation.json` = {"train" / "val" /
    "test": [{"id": "CXR2384_IM-0942", "report", "image_path": ["CXR2384_IM-0942/0.png", ".../1.png"], "split"}]}
    with `images/` beside it. The report is the findings section; the images record no view (release order)."""
    images = w.images_dir or os.path.join(os.path.dirname(annotation_path), "images")
    try:
        with open(annotation_path, encoding="utf-8") as f:
            splits = json.load(f)
    except json.JSONDecodeError as e:
        raise LayoutError(f"{annotation_path}: not valid JSON ({e})") from None
    if not isinstance(splits, dict) or not all(isinstance(v, list) for v in splits.values()):
        raise LayoutError(f"{annotation_path}: expected {{\"train\": [...], \"val\": [...], \"test\": [...]}}")
    studies = []
    for split, entries in splits.items():
        for n, entry in enumerate(entries):
            where = f"{annotation_path}: {split}[{n}]"
            missing = [k for k in ("id", "report", "image_path") if k not in entry]
            if missing:
                raise LayoutError(f"{where}: missing field {missing[0]!r}; found {sorted(entry)}. Point --src at "
                                  "R2Gen's iu_xray folder as downloaded")
            if not isinstance(entry["image_path"], list) or not isinstance(entry["report"], str):
                raise LayoutError(f"{where}: expected \"report\" text and an \"image_path\" list, found "
                                  f"{type(entry['report']).__name__} and {type(entry['image_path']).__name__}")
            study = Study(entry["id"], entry["id"], split, (0,),
                          references={"findings": collapse(entry["report"]) or None, "impression": None})
            for rel in entry["image_path"]:
                require_image(os.path.join(images, rel), f"{where} ({entry['id']})",
                              "unpack R2Gen's images/ beside annotation.json (or pass --images DIR)", w)
                study.images.append(("", os.path.join(images, rel), rel))
            studies.append(study)
    return studies


def iu_xray_studies(src, w):
    """(layout, marker file, studies) of the IU-Xray release at `src`; studies without images are counted."""
    layout, marker = iu_xray_layout(src)
    if layout == "R2Gen":
        studies = iu_xray_r2gen(marker, w)
    elif layout == "Kaggle":
        studies = iu_xray_kaggle(marker, w)
    else:
        studies = iu_xray_openi(src, w)
    for study in studies:
        if not study.images:
            w.skip("report without images")
    return layout, marker, [s for s in studies if s.images]


def no_split(layout, marker, split):
    return LayoutError(f"--split {split}: IU-Xray's {layout} layout ({marker}) has no split: every report is an eval "
                       "item. R2Gen's annotation.json has train/val/test; point --src at it for a split.")


def convert_iu_xray(src, split, w_findings, w_impression):
    """IU-Xray -> iu_xray_findings, iu_xray_impression (R2Gen: findings only, default split test; OpenI and
    Kaggle: every report, no split)."""
    layout, marker, studies = iu_xray_studies(src, w_findings)
    if layout == "R2Gen":
        check_eval_split(split, "iu-xray-instruct")
        return emit_task_items(studies, split or "test", (w_findings,), "IU-Xray (R2Gen)")
    if split:
        raise no_split(layout, marker, split)
    emit_task_items(studies, "all", (w_findings, w_impression), f"IU-Xray ({layout})")
    return f"all (IU-Xray's {layout} layout has no split)"


def convert_iu_xray_instruct(src, split, w):
    """R2Gen's train split of IU-Xray as stage-3 conversations (findings), in eval's prompt form."""
    layout, marker, studies = iu_xray_studies(src, w)
    if layout != "R2Gen":
        raise no_split(layout, marker, split or "train")
    return emit_train_records(studies, split or "train", w, "IU-Xray (R2Gen)", tasks=("findings",))

# ----------------------------------------------------------------------------------------------------------
# CheXpert Plus


CHEXPERT_VIEWS = {("frontal", "pa"): "PA", ("frontal", "ap"): "AP", ("lateral", "ll"): "LL"}


def chexpert_image(src, rel):
    """The image a path_to_image names: as written (JPG release) or as .png under PNG/ (PNG release)."""
    png = os.path.splitext(rel)[0] + ".png"
    for candidate in (rel, png, os.path.join("PNG", png), os.path.join("PNG", "PNG", png)):
        if os.path.isfile(os.path.join(src, candidate)):
            return os.path.join(src, candidate)
    return os.path.join(src, rel)


def chexpert_studies(src):
    """CheXpert Plus: `df_chexpert_plus_240401.csv` (path_to_image, frontal_lateral, ap_pa, deid_patient_id,
    patient_report_date_order, section_findings, section_impression, split = train/valid); one study per image
    folder (train/patientN/studyM/), views in the stated order, priors by patient_report_date_order."""
    path = find_one(src, ["df_chexpert_plus_240401.csv", "**/df_chexpert_plus_*.csv"], "df_chexpert_plus_240401.csv")
    studies = {}
    for row, line in read_csv(path):
        where = f"{path}: line {line}"
        rel = column(row, "path_to_image", where)
        side, projection = column(row, "frontal_lateral", where).lower(), column(row, "ap_pa", where).lower()
        view = CHEXPERT_VIEWS.get((side, projection), "LATERAL" if side == "lateral" else projection.upper())
        key = os.path.dirname(rel)
        try:
            order = int(float(column(row, "patient_report_date_order", where)))
        except ValueError:
            raise LayoutError(f"{where}: patient_report_date_order is not a number") from None
        study = studies.setdefault(key, Study(key, column(row, "deid_patient_id", where),
                                              column(row, "split", where), (order,)))
        study.references = {t: collapse(row.get(f"section_{t}") or "") or None for t in TASKS}
        image = chexpert_image(src, rel)
        study.images.append((view, image, os.path.relpath(image, src)))   # the file's own name (.png or .jpg)
    for study in studies.values():
        study.sort_images()
    link_priors(list(studies.values()))
    return sorted(studies.values(), key=lambda s: s.key)


def convert_chexpert_plus(src, split, w_findings, w_impression):
    """CheXpert Plus -> chexpert_plus_findings, chexpert_plus_impression (default split: valid)."""
    check_eval_split(split, "chexpert-plus-instruct")
    return emit_task_items(chexpert_studies(src), split or "valid", (w_findings, w_impression), "CheXpert Plus")


def convert_chexpert_plus_instruct(src, split, w):
    """CheXpert Plus's train split as stage-3 conversations (both tasks, priors linked), in eval's prompt form."""
    return emit_train_records(chexpert_studies(src), split or "train", w, "CheXpert Plus")
