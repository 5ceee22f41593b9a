"""The demo data set (data/demo.py): formats, truth of the answers, a clean split, statistics, determinism.

References: the answers are checked against the DICOM tags as pydicom reads them (independently of data.demo's
reader), the planes against nibabel's orientation codes, the baseline against a count made here from the files.
"""
import hashlib
import json
import os
from collections import Counter

import pytest

from data import demo

MODALITY_OF_DICOM = {"CT": "ct", "MR": "mri", "CR": "x-ray", "DX": "x-ray", "US": "ultrasound", "NM": "nuclear medicine"}


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def tree_digest(root):
    """{relative path: sha256} of every file under root."""
    digests = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                digests[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return digests


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    stats = demo.build(str(out), seed=1337, size=64)
    return out, stats


def test_deterministic(built, tmp_path):
    out, _ = built
    demo.build(str(tmp_path), seed=1337, size=64)
    assert tree_digest(out) == tree_digest(tmp_path)


def test_stage_formats_and_image_paths(built):
    out, _ = built
    captions = read_jsonl(out / "captions.jsonl")
    assert len(captions) > 300 and all(set(c) == {"image", "caption"} for c in captions)
    for row in read_jsonl(out / "conversations.jsonl"):
        assert os.path.isfile(out / row["image"])
        turns = row["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        assert sum(t["value"].count("<image>") for t in turns) == 1 and turns[0]["value"].startswith("<image>\n")
    for row in read_jsonl(out / "interleaved.jsonl"):
        assert {part["type"] for part in row["content"]} == {"text", "image"}
        assert all(os.path.isfile(out / p["image"]) for p in row["content"] if p["type"] == "image")
    assert all(set(r) == {"id", "conversations"} for r in read_jsonl(out / "text_conversations.jsonl"))
    assert all(r["text"].strip() for r in read_jsonl(out / "text.jsonl"))
    for stage in (1, 2, 3):
        spec = json.load(open(out / f"stage{stage}.json"))
        assert all(os.path.isfile(out / d["path"]) and d["weight"] > 0 for d in spec["datasets"])


def test_eval_items_follow_the_contract(built):
    out, _ = built
    for bench in ("demo_vqa", "demo_report_qa"):
        folder = out / "eval" / bench
        items = read_jsonl(folder / "test.jsonl")
        assert items and len({i["id"] for i in items}) == len(items)
        for item in items:
            assert item["benchmark"] == bench and item["question_type"] in ("closed", "yes_no", "multiple_choice")
            for rel, digest in zip(item["images"], item["image_sha256"], strict=True):
                assert hashlib.sha256(open(folder / rel, "rb").read()).hexdigest() == digest
            if item["question_type"] == "multiple_choice":
                assert item["answer"] in item["options"]
            else:
                assert item["options"] is None


def test_split_shares_no_source_image_or_question_text(built):
    out, _ = built
    manifest = json.load(open(out / "manifest.json"))
    eval_sources = {s["name"] for s in manifest["sources"] if s["split"] == "eval"}
    train_sources = {s["name"] for s in manifest["sources"] if s["split"] == "train"}
    assert eval_sources and train_sources and not eval_sources & train_sources
    files = {s["file_sha256"] for s in manifest["sources"] if s["split"] == "train"}
    assert not files & {s["file_sha256"] for s in manifest["sources"] if s["split"] == "eval"}
    items = read_jsonl(out / "eval" / "demo_vqa" / "test.jsonl")
    assert {os.path.basename(p).rsplit("_", 1)[0] for i in items for p in i["images"]} <= eval_sources
    hashes = [json.loads(line) for line in open(out / "hashes.jsonl")]
    train_images = {h["sha256"] for h in hashes if h["kind"] == "image"}
    assert not train_images & {d for i in items for d in i["image_sha256"]}
    reports = read_jsonl(out / "eval" / "demo_report_qa" / "test.jsonl")
    train_text = {h["sha256"] for h in hashes if h["kind"] == "text"}
    assert not train_text & {i["question_sha256"] for i in reports}  # held-out reports never seen in training
    assert len({i["source_report"] for i in reports}) == 100


def test_answers_match_the_dicom_tags():
    pydicom = pytest.importorskip("pydicom")
    for source in demo.SOURCES:
        if source.file.endswith(".dcm"):
            ds = pydicom.dcmread(os.path.join(demo.package_dir(source.package), source.file), stop_before_pixels=True)
            assert MODALITY_OF_DICOM[ds.Modality] == source.modality, source.name
            if source.view:
                assert ds.ViewPosition.lower() == source.view, source.name
            body = str(ds.get("BodyPartExamined", "")).lower()
            if body in ("head", "chest", "abdomen"):
                assert source.region == body, source.name


def test_planes_from_geometry():
    assert demo.plane_from_orientation([1, 0, 0, 0, 1, 0]) == "axial"
    assert demo.plane_from_orientation([1, 0, 0, 0, 0, -1]) == "coronal"
    assert demo.plane_from_orientation([0, 1, 0, 0, 0, -1]) == "sagittal"
    assert demo.plane_from_orientation([0.569486, 0.822001, 0, 0, 0, -1]) is None  # MR2 shoulder: oblique
    nibabel = pytest.importorskip("nibabel")
    image = nibabel.load(os.path.join(demo.package_dir("nibabel"), "anatomical.nii"))
    volume, zooms = demo.read_volume(image.get_filename())
    canonical = nibabel.as_closest_canonical(image)
    assert nibabel.aff2axcodes(canonical.affine) == ("R", "A", "S")  # axis 0 -> sagittal slices, 2 -> axial
    assert volume.shape == canonical.shape[:3]
    axial, _ = demo.volume_slice(volume, zooms, "axial", 5)
    assert axial.shape == (volume.shape[1], volume.shape[0])  # (A-P rows, R-L columns)


def test_statistics_and_majority_baseline(built, capsys):
    out, stats = built
    saved = json.load(open(out / "stats.json"))
    assert saved["images_per_split"] == {"train": len(read_jsonl(out / "captions.jsonl")),
                                         "eval": len(os.listdir(out / "eval" / "demo_vqa" / "imgs"))}
    assert sum(c["train"] + c["eval"] for c in saved["images_per_source"].values()) == sum(saved["images_per_split"].values())
    # recount the modality baseline from the files: majority training answer to modality questions
    train = Counter()
    for row in read_jsonl(out / "conversations.jsonl"):
        turns = row["conversations"]
        for human, gpt in zip(turns[::2], turns[1::2]):
            if human["value"].replace("<image>\n", "").split("\n")[0] in demo.MODALITY_QUESTIONS:
                train[gpt["value"]] += 1
    majority = train.most_common(1)[0][0]
    items = [i for i in read_jsonl(out / "eval" / "demo_vqa" / "test.jsonl") if i["question"] in demo.MODALITY_QUESTIONS]
    expected = sum(i["answer"] == majority for i in items) / len(items)
    assert saved["majority_baseline"]["modality"]["accuracy"] == pytest.approx(expected, abs=1e-4)
    assert 0 < saved["majority_baseline_demo_vqa"] < 0.7  # a model that learns must have room to beat it
    demo.print_stats(stats)
    assert "majority-answer baseline on demo_vqa" in capsys.readouterr().out


def test_manifest_records_provenance_and_licence(built):
    out, _ = built
    manifest = json.load(open(out / "manifest.json"))
    assert len(manifest["sources"]) == len(demo.SOURCES)
    for source in manifest["sources"]:
        assert source["licence"] and source["provenance"] and source["package_version"] != "unknown"
        with open(os.path.join(demo.package_dir(source["package"]), source["file"]), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == source["file_sha256"]
    assert manifest["reports"]["licence"].startswith("MIT")


def test_a_changed_tag_stops_the_build():
    wrong = demo.Source("x", "pydicom-data", "RG1_UNCR.dcm", "train", "x-ray", "chest", "", "", "",
                        (("BodyPartExamined", "KNEE"),), n_images=1)
    with pytest.raises(ValueError, match="BodyPartExamined is 'CHEST'"):
        demo.source_views(wrong, 0, 32)


def test_the_stage_readers_load_every_record(built):
    """The stage scripts' reader (data.datasets) reads all three mixtures without a bad record."""
    datasets = pytest.importorskip("data.datasets")
    from data.tokenizer import load_tokenizer
    out, _ = built
    tok, spec = load_tokenizer(), datasets.ImageTokens(image_size=56, tokens_per_tile=16)
    sizes = {"1": len(read_jsonl(out / "captions.jsonl")),
             "2": len(read_jsonl(out / "interleaved.jsonl")) + len(read_jsonl(out / "text.jsonl")),
             "3": len(read_jsonl(out / "conversations.jsonl")) + len(read_jsonl(out / "text_conversations.jsonl"))}
    readers = {1: datasets.caption_sample, 2: datasets.document_sample, 3: datasets.conversation_sample}
    for stage in (1, 2, 3):
        loaded = datasets.load_dataset(str(out / f"stage{stage}.json"), readers[stage], tok, spec)
        assert len(loaded.samples) == sizes[str(stage)]


def test_every_image_question_asks_the_sources_modality(built):
    """Stage 3 and eval ask the closed modality question, answered with the catalogue's modality of the image's
    source (checked against the DICOM tags above); eval holds only held-out sources, each with EVAL_VIEWS views."""
    out, _ = built
    truth = {s.name: s.modality for s in demo.SOURCES}
    split = {s.name: s.split for s in demo.SOURCES}
    rows = read_jsonl(out / "conversations.jsonl")
    assert len(rows) == demo.TRAIN_VIEWS * sum(s.split == "train" for s in demo.SOURCES)
    for row in rows:
        question, reply = row["conversations"][0]["value"].split("\n"), row["conversations"][1]
        source = os.path.basename(row["image"]).rsplit("_", 1)[0]
        assert split[source] == "train" and question[1] in demo.MODALITY_QUESTIONS
        assert reply == {"from": "gpt", "value": truth[source]}
    items = read_jsonl(out / "eval" / "demo_vqa" / "test.jsonl")
    per_source = Counter(os.path.basename(i["images"][0]).rsplit("_", 1)[0] for i in items)
    assert per_source == {s.name: demo.EVAL_VIEWS for s in demo.SOURCES if s.split == "eval"}
    for item in items:
        source = os.path.basename(item["images"][0]).rsplit("_", 1)[0]
        assert item["kind"] == "modality" and item["answer"] == truth[source]


def test_control_items_keep_questions_and_permute_images(built):
    """The shuffled control keeps every question and answer in place and deals the same images out again in
    another order (deterministically); the blank control gives every question the one blank image."""
    out, _ = built
    items = read_jsonl(out / "eval" / "demo_vqa" / "test.jsonl")
    for item in items:
        item["image_paths"] = [str(out / "eval" / "demo_vqa" / item["images"][0])]
    controls = demo.control_items(items, "blank.png")
    shuffled = controls["shuffled"]
    fields = lambda rows: [(r["id"], r["question"], r["answer"]) for r in rows]
    assert fields(shuffled) == fields(items)
    assert sorted(c["image_paths"][0] for c in shuffled) == sorted(i["image_paths"][0] for i in items)
    moved = sum(c["image_paths"] != i["image_paths"] for c, i in zip(shuffled, items))
    assert moved > 0.9 * len(items)
    assert shuffled == demo.control_items(items, "blank.png")["shuffled"]
    assert all(c["image_paths"] == ["blank.png"] for c in controls["blank"])
