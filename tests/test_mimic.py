"""data/mimic.py: the official MIMIC-CXR section parser's behaviour, MIMIC-CXR studies (views, priors, tasks) as eval
items and stage-1/3 records, IU-Xray (OpenI, Kaggle, R2Gen layouts) and CheXpert Plus as eval items and stage-3
records, and eval.py's reading of what they write.

Fixtures are written in each release's layout by tests/report_fixtures.py; expected values come from the text the
fixture writes and from the official parser's rules (MIT-LCP/mimic-cxr txt/section_parser.py), not from our code.
"""
import csv
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
    with pytest.raises(mimic.LayoutError, match="wrote 0 items: no study of split 'nonexistent'"):
        convert.convert("mimic-cxr", str(tmp_path / "src2"), str(tmp_path / "out"), split="nonexistent")
    with pytest.raises(mimic.LayoutError, match="--split train: .*python -m data.convert mimic-cxr-instruct"):
        convert.convert("mimic-cxr", str(tmp_path / "src2"), str(tmp_path / "out"), split="train")

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


def test_iu_xray_openi_has_no_split(tmp_path):
    F.write_iu_xray(tmp_path / "src")
    items = convert.convert("iu-xray", str(tmp_path / "src"), str(tmp_path / "out"))
    assert [i["source_split"] for i in items] == ["all (IU-Xray's OpenI layout has no split)"] * 2
    assert all(v == "" for i in read_items(tmp_path / "out", "iu_xray_findings") for v in i["views"])
    for name, split in (("iu-xray", "test"), ("iu-xray", "train"), ("iu-xray-instruct", None)):
        with pytest.raises(mimic.LayoutError, match="OpenI layout .*ecgen-radiology.* has no split.*R2Gen"):
            convert.convert(name, str(tmp_path / "src"), str(tmp_path / "out2"), split=split)


def kaggle_order(want):
    """The stated order: Frontal before Lateral, ties by file name (indices into the CSV's rows)."""
    return sorted(range(len(want["filenames"])), key=lambda i: (want["projections"][i] != "Frontal",
                                                                want["filenames"][i]))


def test_iu_xray_kaggle_views_in_stated_order(tmp_path):
    expected = F.write_iu_xray_kaggle(tmp_path / "src")
    info = convert.convert("iu-xray", str(tmp_path / "src"), str(tmp_path / "out"))
    assert info[0]["skipped"] == {"no findings section": 2} and info[1]["skipped"] == {"no impression section": 1}
    words = {"Frontal": "frontal", "Lateral": "lateral"}
    for task in mimic.TASKS:
        items = ev.load_items(tmp_path / "out", f"iu_xray_{task}")
        keys = sorted((k for k in expected if expected[k][task]), key=lambda k: int(k[3:]))   # uid order
        assert [i["study"] for i in items] == keys
        for item in items:
            want, order = expected[item["study"]], kaggle_order(expected[item["study"]])
            assert item["answer"] == want[task] and item["prior"] is None   # one study per report: no prior
            assert item["views"] == [want["projections"][i].upper() for i in order]
            assert item["image_sha256"] == [F.file_sha(want["images"][i]) for i in order]
            one = dict(item)
            ev.apply_report_context(one, max_views=1)
            first = words[want["projections"][order[0]]]
            assert one["question"] == mimic.report_prompt(task, [item["views"][0]])
            assert f"Current study: 1 chest X-ray image ({first})." in one["question"]
            assert [os.path.basename(p) for p in one["image_paths"]] == [want["filenames"][order[0]]]
            ev.apply_report_context(item)   # the default, 3 views
            shown = ", ".join(words[want["projections"][i]] for i in order[:3])
            assert f"image{'s' if len(order) > 1 else ''} ({shown})." in item["question"]
            assert ev.build_prompt(item).count("<image>") == min(3, len(order))
    # uid 10: the frontal is 10_IM-0002-2001, after the lateral by name; frontal still comes first
    cxr10 = next(i for i in read_items(tmp_path / "out", "iu_xray_impression") if i["study"] == "CXR10")
    assert cxr10["views"] == ["FRONTAL", "LATERAL"] and cxr10["images"][0].endswith("10_IM-0002-2001.dcm.png")
    # the order comes from the projection column, not from the CSV's row order (the release lists frontal first)
    csv_path = tmp_path / "src" / "indiana_projections.csv"
    header, *rows = csv_path.read_text().splitlines()
    csv_path.write_text("\n".join([header] + rows[::-1]) + "\n")
    convert.convert("iu-xray", str(tmp_path / "src"), str(tmp_path / "reversed"))
    for task in mimic.TASKS:
        assert [(i["views"], i["image_sha256"]) for i in read_items(tmp_path / "reversed", f"iu_xray_{task}")] == \
            [(i["views"], i["image_sha256"]) for i in read_items(tmp_path / "out", f"iu_xray_{task}")]


def test_iu_xray_kaggle_errors(tmp_path):
    expected = F.write_iu_xray_kaggle(tmp_path / "src")
    src = tmp_path / "src"
    lines = (src / "indiana_projections.csv").read_text().splitlines()
    # a missing image: the row that names it, and what to do
    line = next(n for n, text in enumerate(lines, 1) if text.startswith("42,42_IM-2063-3001"))
    os.remove(expected["CXR42"]["images"][2])
    with pytest.raises(mimic.LayoutError, match=f"indiana_projections.csv: line {line}: image not found: .*"
                       "42_IM-2063-3001.dcm.png; unpack images/images_normalized/.*--skip-missing"):
        convert.convert("iu-xray", str(src), str(tmp_path / "out"))
    info = convert.convert("iu-xray", str(src), str(tmp_path / "out"), skip_missing=True)
    assert [i["skipped"].get("missing image") for i in info] == [1, 1]   # CXR42 has both sections
    # a missing column: file, line, column, what to do
    (src / "indiana_projections.csv").write_text("\n".join(t.rsplit(",", 1)[0] for t in lines) + "\n")
    with pytest.raises(mimic.LayoutError, match="indiana_projections.csv: line 2: missing column 'projection'.*"
                       "Point --src at the release"):
        convert.convert("iu-xray", str(src), str(tmp_path / "out"))
    # reports without a findings or impression section: 0 items is an error
    F.write_iu_xray_kaggle(tmp_path / "empty")
    with open(tmp_path / "empty" / "indiana_reports.csv", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    with open(tmp_path / "empty" / "indiana_reports.csv", "w", encoding="utf-8", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows([rows[0]] + [r[:6] + ["", ""] for r in rows[1:]])
    with pytest.raises(mimic.LayoutError, match="wrote 0 items: no study of split 'all'"):
        convert.convert("iu-xray", str(tmp_path / "empty"), str(tmp_path / "out3"))


@pytest.fixture(scope="module")
def r2gen_release(tmp_path_factory):
    root = tmp_path_factory.mktemp("r2gen")
    expected = F.write_iu_xray_r2gen(root / "data" / "iu_xray")   # R2Gen's run script reads data/iu_xray/
    return root, expected


def test_iu_xray_r2gen_split_findings_only(r2gen_release):
    root, expected = r2gen_release
    src = root / "data" / "iu_xray"
    info = convert.convert("iu-xray", str(src), str(root / "out"))
    assert [i["benchmark"] for i in info] == ["iu_xray_findings"] and info[0]["source_split"] == "test"
    assert not os.path.exists(root / "out" / "iu_xray_impression")   # R2Gen's reports are findings: no folder
    items = ev.load_items(root / "out", "iu_xray_findings")
    assert [i["study"] for i in items] == F.IU_R2GEN_SPLITS["test"]   # the release's order
    for item in items:
        want = expected[item["study"]]
        assert item["answer"] == want["findings"] and item["views"] == ["", ""] and item["prior"] is None
        assert item["image_sha256"] == [F.file_sha(p) for p in want["images"]]   # 0.png, 1.png
        ev.apply_report_context(item)
        assert "Current study: 2 chest X-ray images (view not recorded, view not recorded)." in item["question"]
    # --src above it finds iu_xray/annotation.json; --split val reads R2Gen's validation split
    convert.convert("iu-xray", str(root / "data"), str(root / "val"), split="val")
    assert [i["study"] for i in read_items(root / "val", "iu_xray_findings")] == F.IU_R2GEN_SPLITS["val"]
    with pytest.raises(mimic.LayoutError, match="--split train: .*python -m data.convert iu-xray-instruct"):
        convert.convert("iu-xray", str(src), str(root / "out2"), split="train")


def test_iu_xray_r2gen_training_records_in_eval_form(r2gen_release):
    root, expected = r2gen_release
    convert.convert("iu-xray-instruct", str(root / "data" / "iu_xray"), str(root / "train"))
    path = root / "train" / "iu_xray_instruct" / "train.jsonl"
    records = [json.loads(line) for line in path.open()]
    assert [r["id"] for r in records] == [f"{k}-findings" for k in F.IU_R2GEN_SPLITS["train"]]
    samples = load_jsonl(str(path), conversation_sample, load_tokenizer(), ImageTokens(tokens_per_tile=4))
    for record, sample in zip(records, samples):
        want = expected[record["id"].rsplit("-", 1)[0]]
        assert record["conversations"] == [{"from": "human", "value": mimic.report_prompt("findings", ["", ""])},
                                           {"from": "gpt", "value": want["findings"]}]
        assert [os.path.normpath(path.parent / p) for p in record["image"]] == [str(p) for p in want["images"]]
        assert len(sample.images) == 2
    # eval's prompt for a test item is the same text the training records were written in
    convert.convert("iu-xray", str(root / "data" / "iu_xray"), str(root / "eval"))
    item = ev.load_items(root / "eval", "iu_xray_findings")[0]
    ev.apply_report_context(item)
    assert item["question"] == records[0]["conversations"][0]["value"]


def test_iu_xray_r2gen_errors(tmp_path):
    expected = F.write_iu_xray_r2gen(tmp_path / "src")
    os.remove(expected["CXR3030_IM-1405"]["images"][1])
    with pytest.raises(mimic.LayoutError, match=r"annotation.json: test\[0\] \(CXR3030_IM-1405\): image not found: "
                       r".*CXR3030_IM-1405/1.png; unpack R2Gen's images/.*--skip-missing"):
        convert.convert("iu-xray", str(tmp_path / "src"), str(tmp_path / "out"))
    info = convert.convert("iu-xray", str(tmp_path / "src"), str(tmp_path / "out"), skip_missing=True)
    assert info[0]["items"] == 1 and info[0]["skipped"] == {"missing image": 1}
    annotation = json.loads((tmp_path / "src" / "annotation.json").read_text())
    del annotation["val"][0]["report"]
    (tmp_path / "src" / "annotation.json").write_text(json.dumps(annotation))
    with pytest.raises(mimic.LayoutError, match=r"annotation.json: val\[0\]: missing field 'report'"):
        convert.convert("iu-xray", str(tmp_path / "src"), str(tmp_path / "out"))


def test_chexpert_plus_training_records_in_eval_form(tmp_path):
    expected = F.write_chexpert_plus(tmp_path / "src")
    convert.convert("chexpert-plus-instruct", str(tmp_path / "src"), str(tmp_path / "train"))
    records = [json.loads(line) for line in (tmp_path / "train" / "chexpert_plus_instruct" / "train.jsonl").open()]
    assert [r["id"] for r in records] == [f"{k}-{t}" for k, v in expected.items() if v["split"] == "train"
                                          for t in mimic.TASKS if v[t]]
    # the valid split as training records (it holds a prior): each record's prompt is what eval asks with --prior
    info = convert.convert("chexpert-plus-instruct", str(tmp_path / "src"), str(tmp_path / "valid"), split="valid")
    path = tmp_path / "valid" / "chexpert_plus_instruct" / "train.jsonl"
    records = {r["id"]: r for r in map(json.loads, path.open())}
    assert info["skipped"] == {"no findings section": 1}
    convert.convert("chexpert-plus", str(tmp_path / "src"), str(tmp_path / "eval"))
    items = [i for task in mimic.TASKS for i in ev.load_items(tmp_path / "eval", f"chexpert_plus_{task}")]
    assert sorted(records) == sorted(f"{i['study']}-{i['task']}" for i in items)
    for item in items:
        record = records[f"{item['study']}-{item['task']}"]
        ev.apply_report_context(item, max_views=mimic.TRAIN_MAX_VIEWS, with_prior=True)
        assert record["conversations"] == [{"from": "human", "value": item["question"]},
                                           {"from": "gpt", "value": item["answer"]}]
        images = [record["image"]] if isinstance(record["image"], str) else record["image"]
        assert [F.file_sha(path.parent / p) for p in images] == [F.file_sha(p) for p in item["image_paths"]]
    assert any("Prior study: 1 chest X-ray image (AP)." in r["conversations"][0]["value"] for r in records.values())
    with pytest.raises(mimic.LayoutError, match="--split train: .*chexpert-plus-instruct"):
        convert.convert("chexpert-plus", str(tmp_path / "src"), str(tmp_path / "eval2"), split="train")
    with pytest.raises(mimic.LayoutError, match="wrote 0 records of split 'test'"):
        convert.convert("chexpert-plus-instruct", str(tmp_path / "src"), str(tmp_path / "t2"), split="test")
