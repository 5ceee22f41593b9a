"""Converters (data/convert.py) on small fixtures written in each data set's released layout (tests/fixtures/).

Expected values come from the fixtures themselves (the released answer text, the file bytes), never from
running our code: e.g. MedQA's letter must point at the option whose text is the release's `answer` field,
and image_sha256 must be hashlib's digest of the released image file.
"""
import hashlib
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from data import convert, leakage
from data.convert import LayoutError

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def norm_sha(text):  # the documented question hash: lower case, whitespace collapsed
    return hashlib.sha256(" ".join(text.lower().split()).encode("utf-8")).hexdigest()


def file_sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def image_bytes(seed, fmt="PNG"):
    pixels = np.random.default_rng(seed).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    out = __import__("io").BytesIO()
    Image.fromarray(pixels).save(out, format=fmt)
    return out.getvalue()


def make_images(root, rel_paths):
    for i, rel in enumerate(rel_paths):
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(image_bytes(i, "JPEG" if rel.lower().endswith((".jpg", ".jpeg")) else "PNG"))


def fixture(name, tmp_path, images=()):
    src = tmp_path / "src"
    shutil.copytree(os.path.join(FIXTURES, name), src)
    make_images(src, images)
    return str(src)


def read_items(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def write_parquet(path, rows):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def check_eval_items(out, benchmark):
    """The eval item contract of docs/internals.md, and hashes that match the copied files."""
    folder = os.path.join(out, benchmark)
    items = read_items(os.path.join(folder, "test.jsonl"))
    keys = {"id", "benchmark", "question_type", "question", "options", "answer", "images", "image_sha256",
            "question_sha256"}
    for item in items:
        assert set(item) == keys
        assert item["benchmark"] == benchmark and item["id"].startswith(benchmark + "-")
        assert item["question_sha256"] == norm_sha(item["question"])
        assert [file_sha(os.path.join(folder, p)) for p in item["images"]] == item["image_sha256"]
        if item["question_type"] == "multiple_choice":
            assert item["answer"] in item["options"]
        else:
            assert item["options"] is None
        if item["question_type"] == "yes_no":
            assert item["answer"] in ("yes", "no")
    assert len({i["id"] for i in items}) == len(items)
    return items


# ---------------------------------------------------------------------------- training sets

def test_llava_med_alignment_and_hashes(tmp_path):
    src = fixture("llava_med", tmp_path, ["images/PMC100_F1.jpg", "images/PMC101_F2.jpg"])
    info = convert.convert("llava-med-alignment", src, str(tmp_path / "out"))
    assert info["rows"] == 2
    folder = tmp_path / "out" / "llava-med-alignment"
    rows = read_items(folder / "train.jsonl")
    released = json.load(open(os.path.join(src, "llava_med_alignment_500k.json")))
    assert [r["caption"] for r in rows] == [r["conversations"][1]["value"] for r in released]
    for row, rel in zip(rows, released):
        assert os.path.samefile(folder / row["image"], os.path.join(src, "images", rel["image"]))
    hashes = leakage.load_hashes(str(folder))
    assert file_sha(os.path.join(src, "images", "PMC100_F1.jpg")) in hashes["image"]
    assert norm_sha("H&E stain of a liver biopsy.") in hashes["text"]


def test_llava_med_instruct_keeps_conversations(tmp_path):
    src = fixture("llava_med", tmp_path, ["images/PMC100_F1.jpg"])
    convert.convert("llava-med-instruct", src, str(tmp_path / "out"))
    folder = tmp_path / "out" / "llava-med-instruct"
    (row,) = read_items(folder / "train.jsonl")
    released = json.load(open(os.path.join(src, "llava_med_instruct_60k_inline_mention.json")))[0]
    assert row["conversations"] == released["conversations"]
    assert os.path.isfile(folder / row["image"])
    assert norm_sha("Which side is affected?") in leakage.load_hashes(str(folder))["text"]


def test_missing_image_is_an_error_or_counted(tmp_path):
    src = fixture("llava_med", tmp_path, ["images/PMC100_F1.jpg"])  # PMC101_F2.jpg missing
    with pytest.raises(LayoutError, match="PMC101_F2.jpg"):
        convert.convert("llava-med-alignment", src, str(tmp_path / "out"))
    info = convert.convert("llava-med-alignment", src, str(tmp_path / "out"), skip_missing=True)
    assert info["rows"] == 1 and info["skipped"] == {"missing image": 1}


def test_pmc_oa(tmp_path):
    src = fixture("pmc_oa", tmp_path, ["images/PMC212319_Fig3_4.jpg", "images/PMC300001_F1_1.jpg"])
    convert.convert("pmc-oa", src, str(tmp_path / "out"))
    rows = read_items(tmp_path / "out" / "pmc-oa" / "train.jsonl")
    assert [r["caption"] for r in rows] == ["Fluorescence image of transfected cells.",
                                            "Sagittal T2-weighted MR image of the lumbar spine."]
    assert all(os.path.isfile(tmp_path / "out" / "pmc-oa" / r["image"]) for r in rows)


# ---------------------------------------------------------------------------- VQA benchmarks

def test_slake_english_test_split(tmp_path):
    src = fixture("slake", tmp_path, ["Slake1.0/imgs/xmlab102/source.jpg", "Slake1.0/imgs/xmlab7/source.jpg"])
    info = convert.convert("slake", src, str(tmp_path / "out"))
    items = check_eval_items(str(tmp_path / "out"), "slake")
    assert info["skipped"] == {"q_lang != en": 1}
    assert [(i["question_type"], i["answer"]) for i in items] == [("open", "Liver"), ("yes_no", "no"), ("closed", "MRI")]
    assert items[0]["image_sha256"] == [file_sha(os.path.join(src, "Slake1.0/imgs/xmlab102/source.jpg"))]


def test_vqa_rad_osf_release(tmp_path):
    src = fixture("vqa_rad", tmp_path, ["VQA_RAD Image Folder/synpic54610.jpg", "VQA_RAD Image Folder/synpic29265.jpg"])
    convert.convert("vqa-rad", src, str(tmp_path / "out"))
    items = check_eval_items(str(tmp_path / "out"), "vqa_rad")
    assert [(i["question"], i["question_type"], i["answer"]) for i in items] == [
        ("Is there a fracture?", "yes_no", "no"), ("Where is the opacity?", "open", "right lower lobe"),
        ("Is this an AP or PA film?", "closed", "PA")]  # the freeform training question is not in test


def test_vqa_rad_and_pathvqa_parquet_release(tmp_path):
    rows = [{"image": {"bytes": image_bytes(1), "path": "a.png"}, "question": "Is this normal?", "answer": "Yes"},
            {"image": {"bytes": image_bytes(2, "JPEG"), "path": None}, "question": "What organ?", "answer": "liver"}]
    for name, bench in (("vqa-rad", "vqa_rad"), ("pathvqa", "pathvqa")):
        write_parquet(str(tmp_path / name / "data" / "test-00000-of-00001.parquet"), rows)
        convert.convert(name, str(tmp_path / name), str(tmp_path / "out"))
        items = check_eval_items(str(tmp_path / "out"), bench)
        assert [(i["question_type"], i["answer"]) for i in items] == [("yes_no", "yes"), ("open", "liver")]
        assert items[0]["image_sha256"] == [hashlib.sha256(image_bytes(1)).hexdigest()]
        assert items[1]["images"][0].endswith(".jpg")  # sniffed from the JPEG magic bytes


def test_pathvqa_pickle_release_is_refused(tmp_path):
    (tmp_path / "qas" / "test").mkdir(parents=True)
    (tmp_path / "qas" / "test" / "test_qa.pkl").write_bytes(b"\x80\x04N.")
    with pytest.raises(LayoutError, match="pickle"):
        convert.convert("pathvqa", str(tmp_path), str(tmp_path / "out"))


def test_pmc_vqa_v2_and_v1_csv(tmp_path):
    src = fixture("pmc_vqa", tmp_path, ["images/PMC8253797_Fig1_41.jpg", "images/PMC8253800_Fig2_1.jpg"])
    convert.convert("pmc-vqa", src, str(tmp_path / "out"))
    items = check_eval_items(str(tmp_path / "out"), "pmc_vqa")
    assert items[0]["options"] == {"A": "CT", "B": "MRI", "C": "PET", "D": "Ultrasound"}  # 'A:' labels dropped
    assert [i["answer"] for i in items] == ["A", "A"]
    convert.convert("pmc-vqa", src, str(tmp_path / "v1"), split="test")
    (item,) = check_eval_items(str(tmp_path / "v1"), "pmc_vqa")
    assert item["options"][item["answer"]] == "MRI"  # Answer_label points at the released Answer text


def test_mmmu_medical_subjects_and_image_tags(tmp_path):
    def row(i, question, options, answer, n_images, qtype="multiple-choice"):
        r = {"id": f"validation_X_{i}", "question": question, "options": options, "answer": answer,
             "question_type": qtype, "explanation": "", "img_type": "['Photos']", "topic_difficulty": "Easy",
             "subfield": "x"}
        for k in range(1, 8):
            r[f"image_{k}"] = {"bytes": image_bytes(10 * i + k), "path": None} if k <= n_images else None
        return r
    write_parquet(str(tmp_path / "mmmu" / "Clinical_Medicine" / "validation-00000-of-00001.parquet"), [
        row(1, "Compare <image 2> with <image 1>. Which is abnormal?", "['left', 'right', 'both', 'neither']", "B", 2),
        row(2, "What is the dose?", "[]", "5 mg", 0, "open")])
    write_parquet(str(tmp_path / "mmmu" / "Art" / "validation-00000-of-00001.parquet"),
                  [row(3, "Who painted <image 1>?", "['a', 'b']", "A", 1)])
    info = convert.convert("mmmu", str(tmp_path / "mmmu"), str(tmp_path / "out"))
    items = check_eval_items(str(tmp_path / "out"), "mmmu_med")
    assert info["skipped"] == {"not a medical subject": 1}
    first, second = items
    assert first["options"] == {"A": "left", "B": "right", "C": "both", "D": "neither"} and first["answer"] == "B"
    assert first["question"] == "Compare <image> with <image>. Which is abnormal?"
    assert first["image_sha256"] == [hashlib.sha256(image_bytes(12)).hexdigest(),  # image 2 first, as in the text
                                     hashlib.sha256(image_bytes(11)).hexdigest()]
    assert (second["question_type"], second["answer"], second["images"]) == ("open", "5 mg", [])


def test_medxpertqa_both_subsets(tmp_path):
    src = fixture("medxpertqa", tmp_path, ["images/MM-0-a.jpeg", "images/MM-0-b.jpeg"])
    infos = convert.convert("medxpertqa", src, str(tmp_path / "out"))
    assert [i["benchmark"] for i in infos] == ["medxpertqa_mm", "medxpertqa_text"]
    (mm,) = check_eval_items(str(tmp_path / "out"), "medxpertqa_mm")
    (text,) = check_eval_items(str(tmp_path / "out"), "medxpertqa_text")
    assert mm["question"] == "A 40-year-old man presents with chest pain. What is the diagnosis?"
    assert (mm["answer"], len(mm["images"]), len(mm["options"])) == ("C", 2, 5)
    assert (text["answer"], text["images"]) == ("B", [])


def test_medframeqa_parquet(tmp_path):
    row = {"question_id": "q1", "system": "Cardiovascular", "organ": "heart", "keyword": "k", "modality": "CT",
           "question": "Across the frames, what changes?", "options": ["size", "shape", "colour", "nothing"],
           "correct_answer": "B", "explanation": ""}
    for k in range(1, 6):
        row[f"image_{k}"] = {"bytes": image_bytes(k), "path": f"{k}.png"} if k <= 3 else None
    write_parquet(str(tmp_path / "mfqa" / "data" / "test-00000-of-00001.parquet"), [row])
    convert.convert("medframeqa", str(tmp_path / "mfqa"), str(tmp_path / "out"))
    (item,) = check_eval_items(str(tmp_path / "out"), "medframeqa")
    assert (item["answer"], item["options"]["B"], len(item["images"])) == ("B", "shape", 3)


# ---------------------------------------------------------------------------- text benchmarks

def test_medqa_answer_idx_matches_answer_text(tmp_path):
    src = fixture("medqa", tmp_path)
    convert.convert("medqa", src, str(tmp_path / "out"))
    items = check_eval_items(str(tmp_path / "out"), "medqa")
    path = os.path.join(src, "data_clean/questions/US/4_options/phrases_no_exclude_test.jsonl")
    released = [json.loads(line) for line in open(path)]
    assert [i["options"][i["answer"]] for i in items] == [r["answer"] for r in released]


def test_medmcqa_one_based_json_and_zero_based_parquet(tmp_path):
    src = fixture("medmcqa", tmp_path)
    convert.convert("medmcqa", src, str(tmp_path / "out"))
    items = check_eval_items(str(tmp_path / "out"), "medmcqa")
    assert [i["options"][i["answer"]] for i in items] == ["Vitamin C", "Ethosuximide"]
    rows = [{"id": "x", "question": "Which vitamin deficiency causes scurvy?", "opa": "Vitamin A", "opb": "Vitamin B12",
             "opc": "Vitamin C", "opd": "Vitamin D", "cop": 2, "choice_type": "single", "exp": "",
             "subject_name": "Biochemistry", "topic_name": None}]
    write_parquet(str(tmp_path / "hf" / "data" / "validation-00000-of-00001.parquet"), rows)
    convert.convert("medmcqa", str(tmp_path / "hf"), str(tmp_path / "out2"))
    (item,) = check_eval_items(str(tmp_path / "out2"), "medmcqa")
    assert item["options"][item["answer"]] == "Vitamin C"


def test_medmcqa_test_split_without_answers_is_explained(tmp_path):
    with pytest.raises(LayoutError, match="no public answers"):
        convert.convert("medmcqa", os.path.join(FIXTURES, "medmcqa_test"), str(tmp_path), split="test")


def test_pubmedqa_test_split(tmp_path):
    src = fixture("pubmedqa", tmp_path)
    convert.convert("pubmedqa", src, str(tmp_path / "out"))
    items = check_eval_items(str(tmp_path / "out"), "pubmedqa")
    assert [(i["id"], i["options"][i["answer"]]) for i in items] == [("pubmedqa-21645374", "yes"),
                                                                      ("pubmedqa-16418930", "maybe")]
    assert "Programmed cell death (PCD) is ..." in items[0]["question"]
    assert items[0]["question"].endswith("during programmed cell death?")


@pytest.mark.parametrize("split,n", [("op4", 1), ("op5", 2)])
def test_medbullets(tmp_path, split, n):
    src = fixture("medbullets", tmp_path)
    convert.convert("medbullets", src, str(tmp_path / "out"), split=split)
    items = check_eval_items(str(tmp_path / "out"), "medbullets")
    assert len(items) == n and all(len(i["options"]) == int(split[-1]) for i in items)
    assert [i["options"][i["answer"]] for i in items] == ["Acetazolamide", "Purkinje fibers"][:n]


# ---------------------------------------------------------------------------- errors, CLI, overlap

def test_layout_error_names_file_line_and_field(tmp_path):
    src = fixture("slake", tmp_path, ["Slake1.0/imgs/xmlab102/source.jpg"])
    path = os.path.join(src, "Slake1.0", "test.json")
    rows = json.load(open(path))
    del rows[1]["answer_type"]
    json.dump(rows, open(path, "w"))
    with pytest.raises(LayoutError) as error:
        convert.convert("slake", src, str(tmp_path / "out"))
    message = str(error.value)
    assert "test.json" in message and "item 2" in message and "'answer_type'" in message and "found fields" in message


def test_wrong_folder_says_what_was_looked_for(tmp_path):
    with pytest.raises(LayoutError, match="ori_pqal.json"):
        convert.convert("pubmedqa", str(tmp_path), str(tmp_path / "out"))


def test_cli_exit_codes(tmp_path, capsys):
    assert convert.main(["medqa", "--src", os.path.join(FIXTURES, "medqa"), "--out", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out)["items"] == 2
    assert convert.main(["medqa", "--src", str(tmp_path / "nothing"), "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_overlap_between_training_hashes_and_eval_items(tmp_path):
    src = fixture("llava_med", tmp_path, ["images/PMC100_F1.jpg", "images/PMC101_F2.jpg"])
    convert.convert("llava-med-instruct", src, str(tmp_path / "out"), skip_missing=True)
    hashes = leakage.load_hashes(str(tmp_path / "out"))
    items = [{"id": "a", "question_sha256": norm_sha("which SIDE is   affected?"), "image_sha256": []},
             {"id": "b", "question_sha256": norm_sha("other"), "image_sha256": [file_sha(os.path.join(src, "images/PMC100_F1.jpg"))]},
             {"id": "c", "question_sha256": norm_sha("other"), "image_sha256": [file_sha(os.path.join(src, "images/PMC101_F2.jpg"))]}]
    assert leakage.overlap(items, hashes) == ["a", "b"]


# ---------------------------------------------------------------------------- releases as they ship (raw_releases)

import eval as harness  # noqa: E402  (the prompt wording the stage-3 conversations must use)
import raw_releases  # noqa: E402


def test_pmc_vqa_both_zips_unpacked_uses_figures_and_index_ids(tmp_path):
    pytest.importorskip("skimage")
    src = raw_releases.make_pmc_vqa(str(tmp_path))
    convert.convert("pmc-vqa", src, str(tmp_path / "out"))
    items = check_eval_items(str(tmp_path / "out"), "pmc_vqa")
    assert [i["id"] for i in items] == ["pmc_vqa-17", "pmc_vqa-42"]  # the release's index column
    assert items[0]["options"]["A"] == "Right Coronary Artery"
    assert items[0]["image_sha256"] == [file_sha(os.path.join(src, "figures", "PMC8253867_Fig2_41.jpg"))]


def test_mmmu_pro_root_selects_config_and_refuses_vision(tmp_path):
    src = raw_releases.make_mmmu_pro(str(tmp_path))
    for bench, n in (("mmmu_pro_med_4", 4), ("mmmu_pro_med_10", 10)):
        convert.convert("mmmu", src, str(tmp_path / "out"), benchmark=bench)
        (item,) = check_eval_items(str(tmp_path / "out"), bench)
        assert len(item["options"]) == n and item["options"][item["answer"]] == "Pneumothorax"
    with pytest.raises(LayoutError, match="mmmu_pro_med_4 or --benchmark mmmu_pro_med_10"):
        convert.convert("mmmu", src, str(tmp_path / "out2"))
    with pytest.raises(LayoutError, match="vision"):
        convert.convert("mmmu", os.path.join(src, "vision"), str(tmp_path / "out3"))


def test_llava_med_official_layout_and_images_flag(tmp_path):
    pytest.importorskip("skimage")
    src = raw_releases.make_llava_med(str(tmp_path))
    for root in (src, os.path.join(src, "data"), os.path.join(src, "data", "alignment")):
        info = convert.convert("llava-med-alignment", root, str(tmp_path / "out"))
        assert info["rows"] == 2
    info = convert.convert("llava-med-instruct", src, str(tmp_path / "out"))
    assert info["rows"] == 1
    elsewhere = tmp_path / "pictures"
    shutil.move(os.path.join(src, "data", "images"), elsewhere)
    with pytest.raises(LayoutError, match="--images"):
        convert.convert("llava-med-alignment", src, str(tmp_path / "out"))
    info = convert.convert("llava-med-alignment", src, str(tmp_path / "out"), images=str(elsewhere))
    assert info["rows"] == 2


def test_vqa_rad_question_types_do_not_depend_on_the_release(tmp_path):
    osf = raw_releases.make_vqa_rad_osf(str(tmp_path))
    hub = raw_releases.make_vqa_rad_parquet(str(tmp_path))  # default/test/0000.parquet
    convert.convert("vqa-rad", osf, str(tmp_path / "osf"))
    convert.convert("vqa-rad", hub, str(tmp_path / "hub"))
    from_osf = [(i["question"], i["question_type"]) for i in check_eval_items(str(tmp_path / "osf"), "vqa_rad")]
    from_hub = [(i["question"], i["question_type"]) for i in check_eval_items(str(tmp_path / "hub"), "vqa_rad")]
    assert from_osf == from_hub == [("is there a fracture?", "yes_no"), ("is this an ap or pa film?", "closed"),
                                    ("where is the opacity?", "open")]


def test_pathvqa_hub_auto_converted_layout(tmp_path):
    rows = [{"image": raw_releases.struct("JPEG"), "question": "is this normal?", "answer": "no"}]
    raw_releases.write_parquet(str(tmp_path / "path-vqa" / "default" / "test" / "0000.parquet"), rows)
    assert convert.convert("pathvqa", str(tmp_path / "path-vqa"), str(tmp_path / "out"))["items"] == 1


def test_zero_items_is_an_error_with_the_reason(tmp_path, capsys):
    src = fixture("pmc_vqa", tmp_path)  # no image files at all
    with pytest.raises(LayoutError, match=r"wrote 0 pmc_vqa items \(2 x missing image\)"):
        convert.convert("pmc-vqa", src, str(tmp_path / "out"), skip_missing=True)
    assert convert.main(["pmc-vqa", "--src", src, "--out", str(tmp_path / "out"), "--skip-missing"]) == 2
    assert "wrote 0" in capsys.readouterr().err


def test_limit(tmp_path, capsys):
    src = fixture("medmcqa", tmp_path)
    assert convert.main(["medmcqa", "--src", src, "--out", str(tmp_path / "out"), "--limit", "1"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["items"] == 1 and info["limit"] == 1
    assert len(read_items(tmp_path / "out" / "medmcqa" / "test.jsonl")) == 1


def test_train_split_becomes_conversations_and_leaves_the_test_set(tmp_path):
    pytest.importorskip("skimage")
    src = raw_releases.make_slake(str(tmp_path))
    out = str(tmp_path / "out")
    convert.convert("slake", src, out)
    test_bytes = open(os.path.join(out, "slake", "test.jsonl"), "rb").read()
    info = convert.convert("slake", src, out, split="train")
    assert open(os.path.join(out, "slake", "test.jsonl"), "rb").read() == test_bytes
    assert info["name"] == "slake_train" and info["skipped"] == {"q_lang != en": 1}
    rows = read_items(os.path.join(out, "slake_train", "train.jsonl"))
    released = [r for r in json.load(open(os.path.join(src, "train.json"))) if r["q_lang"] == "en"]
    for row, r in zip(rows, released):
        qtype = "open" if r["answer_type"] == "OPEN" else "yes_no"
        prompt = harness.build_prompt({"question_type": qtype, "question": r["question"], "options": None,
                                       "images": ["x"]})
        assert row["conversations"] == [{"from": "human", "value": prompt},
                                        {"from": "gpt", "value": r["answer"].lower() if qtype == "yes_no" else r["answer"]}]
        assert os.path.samefile(os.path.join(out, "slake_train", row["image"]), os.path.join(src, "imgs", r["img_name"]))


def test_text_qa_train_splits_carry_explanations(tmp_path):
    out = str(tmp_path / "out")
    convert.convert("medmcqa", raw_releases.make_medmcqa(str(tmp_path)), out, split="train")
    (row,) = read_items(os.path.join(out, "medmcqa_train", "train.jsonl"))
    assert row["conversations"][1] == {"from": "gpt", "value": "B", "thinking": "Chloroquine is safe in pregnancy."}
    assert "B. Chloroquine" in row["conversations"][0]["value"] and "image" not in row
    convert.convert("pubmedqa", raw_releases.make_pubmedqa(str(tmp_path)), out, split="train")
    test_pmids = set(json.load(open(os.path.join(FIXTURES, "pubmedqa", "data", "test_ground_truth.json"))))
    rows = read_items(os.path.join(out, "pubmedqa_train", "train.jsonl"))
    assert rows and not {r["id"].split("-")[-1] for r in rows} & test_pmids


def test_roco_and_rocov2_captions(tmp_path):
    out = str(tmp_path / "out")
    convert.convert("roco", raw_releases.make_roco(str(tmp_path)), out)
    rows = read_items(os.path.join(out, "roco", "train.jsonl"))
    assert [r["caption"] for r in rows] == ["Computed tomography scan in axial view showing obliteration of the "
                                            "left maxillary sinus", "Axial MRI of the brain."]
    convert.convert("rocov2", raw_releases.make_rocov2(str(tmp_path)), out)
    assert read_items(os.path.join(out, "rocov2", "train.jsonl"))[1]["caption"] == "Chest X-ray, PA view: no effusion."
    data = raw_releases.image_bytes()
    raw_releases.write_parquet(str(tmp_path / "hf" / "data" / "train-00000-of-00001.parquet"),
                               [{"image": {"bytes": data, "path": None}, "image_id": "ROCOv2_2023_train_000001",
                                 "caption": "Head CT.", "cui": ["C0040405"]}])
    convert.convert("rocov2", str(tmp_path / "hf"), str(tmp_path / "out2"))
    (row,) = read_items(tmp_path / "out2" / "rocov2" / "train.jsonl")
    assert file_sha(tmp_path / "out2" / "rocov2" / row["image"]) == hashlib.sha256(data).hexdigest()


def test_pmc_article_figures_follow_their_first_citation(tmp_path):
    src = raw_releases.make_pmc_articles(str(tmp_path))
    convert.convert("pmc-articles", src, str(tmp_path / "out"))
    (doc,) = read_items(tmp_path / "out" / "pmc-articles" / "train.jsonl")
    parts = doc["content"]
    images = [os.path.basename(p["image"]) for p in parts if p["type"] == "image"]
    assert images == ["gr2.jpg", "gr1.jpg", "gr3.jpg"]  # Fig. 2 is cited first; Fig. 3 never (at the end)
    text = [p["text"] for p in parts if p["type"] == "text"]
    assert text[0].startswith("Pleural effusion in a young adult: a case report\n\nWe report a pleural effusion.")
    assert text[0].rstrip().endswith("The radiograph (Fig. 2) showed an effusion.")
    assert text[1].strip().startswith("Fig. 2 Chest radiograph, PA view.")
    assert "A reference." not in " ".join(text) and "Table 1 Laboratory values." in " ".join(text)


def test_pubmed_abstracts_and_text_folder(tmp_path):
    out = str(tmp_path / "out")
    info = convert.convert("pubmed", raw_releases.make_pubmed(str(tmp_path)), out)
    assert info["skipped"] == {"no abstract": 1}
    (doc,) = read_items(os.path.join(out, "pubmed", "train.jsonl"))
    assert doc == {"id": "pmid100", "text": "Statins after myocardial infarction.\n\nBACKGROUND: Statins lower "
                                           "LDL.\n\nRESULTS: Mortality fell by 20%."}
    info = convert.convert("text-folder", raw_releases.make_text(str(tmp_path)), out)
    docs = read_items(os.path.join(out, "text-folder", "train.jsonl"))
    assert info["skipped"] == {"empty file": 1}
    assert [d["id"] for d in docs] == ["asthma/step-up.md", "sepsis.txt"]
    assert docs[1]["text"] == "Sepsis bundle.\n\nGive antibiotics within one hour."
