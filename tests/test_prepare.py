"""python -m data.prepare on a RAW tree holding every release in its published layout (tests/raw_releases.py):
what it finds, converts, filters and reports, the stage mixtures it writes (loaded by data.datasets), and a
re-run that converts nothing again."""
import json
import os

import pytest

from data import prepare
from data.datasets import caption_sample, conversation_sample, document_sample, load_dataset
from data.tokenizer import load_tokenizer

import report_fixtures
from raw_releases import make_raw


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    pytest.importorskip("pyarrow")
    root = tmp_path_factory.mktemp("prepare")
    make_raw(str(root / "RAW"))
    out = str(root / "OUT")
    code = prepare.main(["--raw", str(root / "RAW"), "--out", out])
    return root, out, code


def read(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_every_release_is_found_and_converted(prepared, capsys):
    root, out, code = prepared
    assert code == 0
    benchmarks = sorted(os.listdir(os.path.join(out, "eval")))
    assert benchmarks == sorted(["slake", "vqa_rad", "pathvqa", "pmc_vqa", "mmmu_med", "mmmu_pro_med_4",
                                 "mmmu_pro_med_10", "medxpertqa_mm", "medxpertqa_text", "medframeqa", "medqa",
                                 "medmcqa", "pubmedqa", "medbullets", "mimic_cxr_findings", "mimic_cxr_impression",
                                 "iu_xray_findings", "iu_xray_impression", "chexpert_plus_findings",
                                 "chexpert_plus_impression"])
    train = sorted(os.listdir(os.path.join(out, "train")))
    assert train == sorted(["slake_train", "vqa_rad_train", "pathvqa_train", "pmc_vqa_train", "medqa_train",
                            "medmcqa_train", "pubmedqa_train", "mimic_cxr_captions", "mimic_cxr_instruct",
                            "chexpert_plus_instruct", "llava-med-alignment",
                            "llava-med-instruct", "pmc-oa", "roco", "rocov2", "pmc-articles", "pubmed", "text-folder"])
    ten = read(os.path.join(out, "eval", "mmmu_pro_med_10", "test.jsonl"))
    assert [len(i["options"]) for i in ten] == [10]  # the config the benchmark names


def test_leaks_are_dropped_per_source_and_benchmark(prepared):
    _, out, _ = prepared
    leaks = {name: json.load(open(os.path.join(out, "train", name, "leakage.json")))
             for name in os.listdir(os.path.join(out, "train"))}
    assert leaks["slake_train"]["by_benchmark"] == {"slake": {"exact": 1}}          # JPEG of the same pixels
    assert leaks["vqa_rad_train"]["by_benchmark"] == {"vqa_rad": {"exact": 1}}      # shared image bytes
    assert leaks["pmc_vqa_train"]["by_benchmark"] == {"pmc_vqa": {"near": 1}}       # resized, re-encoded
    assert leaks["llava-med-alignment"]["by_benchmark"] == {"slake": {"near": 1}}   # PNG of SLAKE's JPEG
    kept = read(os.path.join(out, "train", "slake_train", "clean.jsonl"))
    assert [r["conversations"][0]["value"] for r in kept] == ["<image>\nWhich organ is abnormal?\n"
                                                               "Answer the question concisely."]
    assert all(info["dropped"] == 0 for name, info in leaks.items()
               if name not in ("slake_train", "vqa_rad_train", "pmc_vqa_train", "llava-med-alignment"))


def test_stage_mixtures_load(prepared):
    _, out, _ = prepared
    tok = load_tokenizer()
    readers = {1: caption_sample, 2: document_sample, 3: conversation_sample}  # as the stage scripts read them
    sizes = {}
    for stage in (1, 2, 3):
        ds = load_dataset(os.path.join(out, f"stage{stage}.json"), readers[stage], tok)
        assert not ds.report.skipped
        sizes[stage] = len(ds.samples)
    # stage 1: pmc-oa 2 + llava-med 1 (one leaked) + rocov2 2 + roco 2 + the MIMIC-CXR train images with findings;
    # stage 2: 1 article, 1 abstract, 2 texts
    mimic_captions = len(read(os.path.join(out, "train", "mimic_cxr_captions", "clean.jsonl")))
    assert mimic_captions > 0 and sizes[1] == 7 + mimic_captions and sizes[2] == 4
    assert sizes[3] == sum(len(read(os.path.join(out, e["path"])))
                           for e in json.load(open(os.path.join(out, "stage3.json")))["datasets"])


def test_report_and_rerun(prepared, capsys):
    root, out, _ = prepared
    assert prepare.main(["--raw", str(root / "RAW"), "--out", out, "--no-tokens"]) == 0
    captured = capsys.readouterr()
    n_jobs = sum(len(release.jobs) for release in prepare.RELEASES)  # every release is in the fixture RAW tree
    assert captured.err.count("done before") == n_jobs and "converted in" not in captured.err
    assert "hashing the eval images" not in captured.err  # leakage results reused
    report = captured.out
    assert "slake_train" in report and "leak exact slake: 1" in report and "q_lang != en: 1" in report
    assert "no abstract: 1" in report and "empty file: 1" in report
    assert "Not found" not in report


def test_missing_releases_are_listed(tmp_path, capsys):
    (tmp_path / "RAW").mkdir()
    from raw_releases import make_medqa
    make_medqa(str(tmp_path / "RAW"))
    assert prepare.main(["--raw", str(tmp_path / "RAW"), "--out", str(tmp_path / "OUT"), "--no-tokens"]) == 0
    report = capsys.readouterr().out
    assert "Not found under RAW" in report and "slake: Slake1.0" in report
    assert os.path.isfile(tmp_path / "OUT" / "stage3.json") and not os.path.exists(tmp_path / "OUT" / "stage1.json")
    assert json.load(open(tmp_path / "OUT" / "stage3.json"))["datasets"] == [
        {"path": "train/medqa_train/clean.jsonl", "weight": 1.0}]


def test_iu_xray_in_r2gen_layout(tmp_path, capsys):
    """R2Gen's IU-Xray (annotation.json, findings only) under RAW: the findings benchmark is written, no empty
    impression folder is left behind, and the run ends cleanly."""
    report_fixtures.write_iu_xray_r2gen(tmp_path / "RAW" / "iu_xray")
    out = tmp_path / "OUT"
    assert prepare.main(["--raw", str(tmp_path / "RAW"), "--out", str(out), "--no-tokens"]) == 0
    assert sorted(os.listdir(out / "eval")) == ["iu_xray_findings"]
    assert "error" not in capsys.readouterr().err
