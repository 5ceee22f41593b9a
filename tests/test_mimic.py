"""data/mimic.py: the official MIMIC-CXR section parser's behaviour, MIMIC-CXR studies (views, priors, tasks) as eval
items and stage-1/3 records, IU-Xray and CheXpert Plus, and eval.py's reading of what they write.

Fixtures are written in each release's layout by tests/report_fixtures.py; expected values come from the text the
fixture writes and from the official parser's rules (MIT-LCP/mimic-cxr txt/section_parser.py), not from our code.
"""
import json
import os

import pytest

import eval as ev
import report_fixtures as F
from data import convert, mimic
from data.datasets import ImageTokens, caption_sample, conversation_sample, load_jsonl
from data.tokenizer import load_tokenizer

# ---------------------------------------------------------------------------------------------------- parser

HEAD = " EXAMINATION:  CHEST (PA AND LAT)\n \n INDICATION:  ___F with cough\n \n"


@pytest.mark.parametrize("header,name", [
    ("FINDINGS AND IMPRESSION", "impression"), ("CONCLUSION", "impression"), ("FINDINGS/IMPRESSION", "impression"),
    ("IMPRESSON", "impression"), ("PA AND LATERAL CHEST", "findings"), ("PORTABLE AP VIEW", "findings"),
    ("CLINICAL HISTORY", "history"), ("REASON FOR EXAM", "indication"), ("FINDINGS", "findings"),
    ("IMPRESSION AND RECOMMENDATIONS", "impression"),   # contains a main section word
    ("NOTE", "note"),                                   # unknown names stay, lower-cased
])
def test_header_names_are_normalised_as_the_official_parser(header, name):
    text = f"                                 FINAL REPORT\n{HEAD} {header}: \n Lungs are clear.\n"
    sections = mimic.section_text(text)
    assert [s[0] for s in sections] == ["preamble", "examination", "indication", name]
    assert sections[-1][1].strip() == "Lungs are clear."


def test_official_rules_on_report_styles():
    both = f" FINAL REPORT\n{HEAD} FINDINGS: \n \n Heart normal.\n \n IMPRESSION: \n \n No acute.\n"
    assert mimic.task_references(both) == {"findings": "Heart normal.", "impression": "No acute."}
    combined = f" FINAL REPORT\n{HEAD} FINDINGS AND IMPRESSION: \n Small effusion.\n"
    assert mimic.task_references(combined) == {"findings": None, "impression": "Small effusion."}
    conclusion = f" FINAL REPORT\n{HEAD} FINDINGS:\n Line in SVC.\n \n CONCLUSION:\n Line ok.\n"
    assert mimic.task_references(conclusion) == {"findings": "Line in SVC.", "impression": "Line ok."}
    # no headings: the text after the first paragraph break is 'last_paragraph', the impression's fallback
    bare = " FINAL REPORT\n PORTABLE CHEST OF ___\n \n Lungs clear.\n \n No change.\n"
    assert mimic.report_sections(bare)["last_paragraph"] == "Lungs clear.\n \n No change."
    assert mimic.task_references(bare) == {"findings": None, "impression": "Lungs clear. No change."}
    # an empty impression is dropped, the last of two findings sections wins, comparison is no fallback
    two = f" FINAL REPORT\n{HEAD} FINDINGS:\n \n FINDINGS: Second.\n \n IMPRESSION: \n \n"
    assert mimic.task_references(two) == {"findings": "Second.", "impression": None}
    only_comparison = " FINAL REPORT\n COMPARISON: Chest radiograph dated ___. Unchanged.\n"
    sections = mimic.report_sections(only_comparison)
    assert sections["comparison"] == "Chest radiograph dated ___. Unchanged." and sections["conclusion"] == \
        sections["comparison"]
    assert mimic.task_references(only_comparison) == {"findings": None, "impression": None}


def test_per_study_rules():
    text = "x" * 60 + "The conclusion text. " + "y" * 400
    # s50196495: characters 59..399 are the conclusion; s58235663: the report has none
    assert mimic.task_references(text, "s50196495") == {"findings": None, "impression": " ".join(text[59:399].split())}
    assert mimic.task_references(text, "s58235663") == {"findings": None, "impression": None}
    # s51491012: its conclusion sits in the (last) HISTORY section
    report = " FINAL REPORT\n HISTORY: first.\n \n IMPRESSION: not this.\n HISTORY: The finding.\n"
    assert mimic.task_references(report, "s51491012") == {"findings": None, "impression": "The finding."}


def test_prompt_names_task_views_and_prior():
    prompt = mimic.report_prompt("impression", ["PA", "LATERAL"])
    assert prompt == ("Current study: 2 chest X-ray images (PA, lateral).\n<image>\n<image>\nNo prior study is "
                      "given.\nWrite the impression section of the radiology report for the current study.")
    prompt = mimic.report_prompt("findings", ["AP"], ["PA", "LL", ""], "Findings: A.\nImpression: B.")
    assert prompt.startswith("Prior study: 3 chest X-ray images (PA, left lateral, view not recorded).\n<image>\n"
                             "<image>\n<image>\nPrior report:\nFindings: A.\nImpression: B.\nCurrent study: 1 chest")
    assert prompt.endswith("findings section of the radiology report for the current study, comparing it with "
                           "the prior study.") and prompt.count("<image>") == 4
    with pytest.raises(ValueError, match="task must be one of"):
        mimic.report_prompt("summary", ["PA"])

# ---------------------------------------------------------------------------------------------------- MIMIC-CXR


@pytest.fixture(scope="module")
def mimic_release(tmp_path_factory):
    root = tmp_path_factory.mktemp("mimic")
    studies = F.write_mimic_cxr(root / "src")
    return root, studies


def view_order(views):   # the stated order: PA, AP, LATERAL, LL, then any other view; ties by dicom_id
    rank = {"PA": 0, "AP": 1, "LATERAL": 2, "LL": 3}
    return sorted(range(len(views)), key=lambda i: rank.get(views[i], 4))


def expected_prior(key, studies):
    """The same subject's latest earlier (StudyDate, StudyTime) study that has findings or an impression."""
    me = studies[key]
    earlier = [k for k, s in studies.items() if s["subject"] == me["subject"] and s["when"] < me["when"]
               and (s["findings"] or s["impression"])]
    return max(earlier, key=lambda k: studies[k]["when"]) if earlier else None


def read_items(out, bench):
    with open(os.path.join(out, bench, "test.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_mimic_items_views_priors_and_tasks(mimic_release):
    root, studies = mimic_release
    convert.convert("mimic-cxr", str(root / "src"), str(root / "out"))
    for task in mimic.TASKS:
        items = read_items(root / "out", f"mimic_cxr_{task}")
        expected = {k: s for k, s in studies.items() if s["split"] == "test" and s[task]}
        assert [i["id"] for i in items] == [f"mimic_cxr_{task}-{k}" for k in sorted(expected)]
        for item in items:
            study = studies[item["study"]]
            order = view_order(study["views"])
            assert item["answer"] == study[task] and item["task"] == task
            assert item["views"] == [study["views"][i] for i in order]
            assert item["image_sha256"] == [F.file_sha(study["images"][i]) for i in order]   # byte copies
            prior_key = expected_prior(item["study"], studies)
            assert (item["prior"] or {}).get("study") == prior_key
            if prior_key:
                prior = studies[prior_key]
                assert item["prior"]["image_sha256"] == [F.file_sha(prior["images"][i])
                                                         for i in view_order(prior["views"])]
                assert item["prior"]["report"] == "\n".join(f"{t.capitalize()}: {prior[t]}" for t in mimic.TASKS
                                                            if prior[t])
    info = json.loads((root / "out" / "mimic_cxr_findings" / "convert_info.json").read_text())
    assert info["skipped"] == {"no findings section": sum(1 for s in studies.values()
                                                          if s["split"] == "test" and not s["findings"])}


def test_mimic_items_through_eval(mimic_release):
    root, studies = mimic_release
    out = root / "eval_read"
    convert.convert("mimic-cxr", str(root / "src"), str(out))
    items = ev.load_items(out, "mimic_cxr_impression")
    three_views = next(i for i in items if i["study"] == "s53911762")   # LATERAL, LL, PA as released
    prior = dict(three_views, prior=dict(three_views["prior"]))
    ev.apply_report_context(three_views, max_views=2)
    assert three_views["question"] == mimic.report_prompt("impression", ["PA", "LATERAL"])
    assert [os.path.basename(p) for p in three_views["image_paths"]] == [
        f"{studies['s53911762']['dicom_ids'][i]}.jpg" for i in (2, 0)]
    ev.apply_report_context(prior, max_views=3, with_prior=True)
    assert prior["question"].startswith("Prior study: 1 chest X-ray image (AP).\n<image>\nPrior report:\n")
    assert len(prior["image_paths"]) == 4 and ev.build_prompt(prior).count("<image>") == 4
    assert prior["image_paths"][0].endswith(f"{studies['s53189527']['dicom_ids'][0]}.jpg")   # the prior first
    record = ev.make_record(prior, studies["s53911762"]["impression"])
    assert record["rouge_l"] == 1.0 and record["task"] == "impression"


def test_mimic_training_records(mimic_release):
    root, studies = mimic_release
    convert.convert("mimic-cxr-instruct", str(root / "src"), str(root / "train"))
    convert.convert("mimic-cxr-captions", str(root / "src"), str(root / "train"))
    train = {k: s for k, s in studies.items() if s["split"] == "train"}
    tok = load_tokenizer()
    samples = load_jsonl(str(root / "train" / "mimic_cxr_instruct" / "train.jsonl"), conversation_sample, tok,
                         ImageTokens(tokens_per_tile=4))
    records = [json.loads(line) for line in (root / "train" / "mimic_cxr_instruct" / "train.jsonl").open()]
    assert len(samples) == len(records) == sum(bool(s[t]) for s in train.values() for t in mimic.TASKS)
    for record, sample in zip(records, samples):
        key, task = record["id"].rsplit("-", 1)
        study, prior_key = train[key], expected_prior(key, studies)
        views = [study["views"][i] for i in view_order(study["views"])][:mimic.TRAIN_MAX_VIEWS]
        prior = studies[prior_key] if prior_key else None
        prior_views = [prior["views"][i] for i in view_order(prior["views"])] if prior else None
        prior_text = "\n".join(f"{t.capitalize()}: {prior[t]}" for t in mimic.TASKS if prior[t]) if prior else None
        assert record["conversations"] == [
            {"from": "human", "value": mimic.report_prompt(task, views, prior_views, prior_text)},
            {"from": "gpt", "value": study[task]}]
        assert len(sample.images) == len(views) + len(prior_views or [])
    captions = [json.loads(line) for line in (root / "train" / "mimic_cxr_captions" / "train.jsonl").open()]
    assert sorted(c["id"] for c in captions) == sorted(d for s in train.values() if s["findings"]
                                                       for d in s["dicom_ids"])
    assert len(load_jsonl(str(root / "train" / "mimic_cxr_captions" / "train.jsonl"), caption_sample, tok,
                          ImageTokens(tokens_per_tile=4))) == len(captions)
    hashes = [json.loads(line) for line in (root / "train" / "mimic_cxr_instruct" / "hashes.jsonl").open()]
    assert {h["sha256"] for h in hashes if h["kind"] == "image"} == {F.file_sha(p) for s in train.values()
                                                                     for p in s["images"]}


def test_mimic_layout_errors(tmp_path):
    F.write_mimic_cxr(tmp_path / "src")
    os.remove(tmp_path / "src" / "mimic-cxr-2.0.0-metadata.csv.gz")
    with pytest.raises(mimic.LayoutError, match="mimic-cxr-2.0.0-metadata.csv"):
        convert.convert("mimic-cxr", str(tmp_path / "src"), str(tmp_path / "out"))
    F.write_mimic_cxr(tmp_path / "src2")
    with pytest.raises(mimic.LayoutError, match="no nonexistent study"):
        convert.convert("mimic-cxr", str(tmp_path / "src2"), str(tmp_path / "out"), split="nonexistent")

# ---------------------------------------------------------------------------------------------------- IU-Xray, CheXpert


def test_iu_xray(tmp_path):
    expected = F.write_iu_xray(tmp_path / "src")
    convert.convert("iu-xray", str(tmp_path / "src"), str(tmp_path / "out"))
    for task in mimic.TASKS:
        items = ev.load_items(tmp_path / "out", f"iu_xray_{task}")
        keys = [k for k in expected if expected[k][task]]
        assert [i["study"] for i in items] == keys
        for item in items:
            want = expected[item["study"]]
            assert item["answer"] == want[task] and item["prior"] is None
            assert item["image_sha256"] == [F.file_sha(p) for p in want["images"]]   # XML order
            ev.apply_report_context(item)
            assert "view not recorded" in item["question"] and ev.build_prompt(item).count("<image>") == \
                len(want["images"])


def test_chexpert_plus(tmp_path):
    expected = F.write_chexpert_plus(tmp_path / "src")
    convert.convert("chexpert-plus", str(tmp_path / "src"), str(tmp_path / "out"))
    for task in mimic.TASKS:
        items = read_items(tmp_path / "out", f"chexpert_plus_{task}")
        keys = [k for k, v in expected.items() if v["split"] == "valid" and v[task]]
        assert [i["study"] for i in items] == keys
        for item in items:
            want = expected[item["study"]]
            assert item["answer"] == want[task]
            frontal_first = sorted(range(len(want["views"])), key=lambda i: want["views"][i][0] != "Frontal")
            assert item["image_sha256"] == [F.file_sha(want["images"][i]) for i in frontal_first]
    later = next(i for i in read_items(tmp_path / "out", "chexpert_plus_impression") if i["study"].endswith("study2"))
    assert later["prior"]["study"] == "valid/patient00002/study1" and later["views"] == ["AP", "LATERAL"]
