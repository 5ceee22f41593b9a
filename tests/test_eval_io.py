"""eval.py's readers (every benchmark's converted format), prompts, outputs, --rescore, overlap warnings."""
import hashlib
import json
from pathlib import Path

import pytest

import eval as ev

FIXTURES = Path(__file__).parent / "fixtures" / "eval"
ALL_BENCHES = sorted(p.name for p in FIXTURES.iterdir() if (p / "test.jsonl").is_file())


# report benchmarks whose items tests/test_mimic.py writes with the converters from release-layout fixtures
CONVERTED_REPORT_BENCHES = {"mimic_cxr_impression", "iu_xray_findings", "iu_xray_impression",
                            "chexpert_plus_findings", "chexpert_plus_impression"}


def test_every_benchmark_of_the_paper_has_a_fixture():
    assert set(ALL_BENCHES) | CONVERTED_REPORT_BENCHES == set(ev.BENCHMARKS)
    assert set(ev.PAPER_RESULTS) | set(ev.PAPER_REPORT) | set(ev.PAPER_SHOTS) <= set(ev.BENCHMARKS)


@pytest.mark.parametrize("bench", ALL_BENCHES)
def test_reader_on_fixture(bench):
    items = ev.load_items(FIXTURES, bench)
    raw = [json.loads(line) for line in (FIXTURES / bench / "test.jsonl").read_text().splitlines()]
    assert [i["id"] for i in items] == [r["id"] for r in raw]
    for item, record in zip(items, raw):
        assert item["benchmark"] == bench
        assert item["question_type"] in ev.QUESTION_TYPES
        assert len(item["image_paths"]) == len(record["images"])
        for rel, absolute in zip(record["images"], item["image_paths"]):
            assert Path(absolute).is_absolute() and Path(absolute) == (FIXTURES / bench / rel).resolve()
            assert hashlib.sha256(Path(absolute).read_bytes()).hexdigest() in record["image_sha256"]
        prompt = ev.build_prompt(item)
        assert prompt.count("<image>") == len(record["images"])
        if item["question_type"] == "multiple_choice":
            assert item["answer"] in item["options"]
            for letter, text in item["options"].items():
                assert f"\n{letter}. {text}\n" in prompt
            assert prompt.endswith("\nAnswer with the option's letter from the given choices directly.")


def test_multi_image_items():
    frames = ev.load_items(FIXTURES, "medframeqa")
    assert [len(i["image_paths"]) for i in frames] == [4, 2]
    assert ev.build_prompt(frames[0]).startswith("<image>\n" * 4)
    # MMMU keeps one marker per image where the question put it (interleaved), and adds nothing
    mmmu = ev.load_items(FIXTURES, "mmmu_med")[0]
    prompt = ev.build_prompt(mmmu)
    assert len(mmmu["image_paths"]) == 3 and prompt.startswith("Compare <image> with <image> and <image>.")
    # a question whose marker count does not match gets every image up front instead
    second = ev.load_items(FIXTURES, "mmmu_med")[1]
    second = dict(second, images=second["images"] * 2)
    assert ev.build_prompt(second).startswith("<image>\n<image>\nA 45-year-old presents with chest pain.  What")
    text_only = dict(second, images=[])   # a marker without an image would break the harmony renderer
    assert "<image>" not in ev.build_prompt(text_only)


def test_prompt_per_question_type():
    base = {"id": "x", "options": None, "images": []}
    assert ev.build_prompt({**base, "question_type": "closed", "question": "Which organ? ", "answer": "liver"}) \
        == "Which organ?\nAnswer the question using a single word or phrase."
    assert ev.build_prompt({**base, "question_type": "yes_no", "question": "Is it normal?", "answer": "no"}) \
        == "Is it normal?\nAnswer yes or no."
    assert ev.build_prompt({**base, "question_type": "open", "question": "Where is it?", "answer": "x"}) \
        == "Where is it?\nAnswer the question concisely."
    mc = {**base, "question_type": "multiple_choice", "question": "Which?", "options": {"A": "x", "B": "y"}}
    assert ev.build_prompt(mc) == "Which?\nA. x\nB. y\nAnswer with the option's letter from the given choices directly."
    report = {**base, "question_type": "report", "question": "", "images": ["a.png"]}
    assert ev.build_prompt(report) == "<image>\n" + ev.REPORT_INSTRUCTION
    assert "Findings" in ev.REPORT_INSTRUCTION and "Impression" in ev.REPORT_INSTRUCTION


def _write_bench(tmp_path, lines, bench="b"):
    (tmp_path / bench).mkdir(exist_ok=True)
    (tmp_path / bench / "test.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path


GOOD = {"id": "q1", "question_type": "multiple_choice", "question": "Which?", "options": {"a": "x", "b": "y"},
        "answer": "b", "images": []}


@pytest.mark.parametrize("change,message", [
    ({"question_type": "essay"}, "question_type 'essay' is not one of"),
    ({"answer": "C"}, "answer 'C' is not one of the option letters"),
    ({"options": {"A": "x"}}, "needs options as an object of two or more"),
    ({"options": {"AA": "x", "B": "y"}}, "option keys must be single letters"),
    ({"question_type": "yes_no", "options": None, "answer": "maybe"}, "must be 'yes' or 'no'"),
    ({"question_type": "closed"}, "options must be null for question_type 'closed'"),
    ({"images": ["imgs/missing.png"]}, "image 'imgs/missing.png' not found"),
    ({"question": 3}, "question and answer must be strings"),
])
def test_bad_items_name_file_and_line(tmp_path, change, message):
    lines = [json.dumps(GOOD), json.dumps({**GOOD, "id": "q2", **change})]
    _write_bench(tmp_path, lines)
    with pytest.raises(ev.ItemError) as e:
        ev.load_items(tmp_path, "b")
    assert f"{tmp_path / 'b' / 'test.jsonl'}:2:" in str(e.value) and message in str(e.value)


def test_bad_json_duplicate_and_missing_fields(tmp_path):
    _write_bench(tmp_path, [json.dumps(GOOD), "{not json"])
    with pytest.raises(ev.ItemError, match=r"test.jsonl:2: not valid JSON"):
        ev.load_items(tmp_path, "b")
    _write_bench(tmp_path, [json.dumps(GOOD), json.dumps(GOOD)])
    with pytest.raises(ev.ItemError, match="duplicate id 'q1'"):
        ev.load_items(tmp_path, "b")
    _write_bench(tmp_path, [json.dumps({k: v for k, v in GOOD.items() if k != "answer"})])
    with pytest.raises(ev.ItemError, match=r"test.jsonl:1: missing field 'answer'"):
        ev.load_items(tmp_path, "b")
    with pytest.raises(FileNotFoundError, match="convert it first"):
        ev.load_items(tmp_path, "nope")


def test_reader_normalises_letters_and_limit(tmp_path):
    _write_bench(tmp_path, [json.dumps({**GOOD, "id": f"q{i}"}) for i in range(5)])
    items = ev.load_items(tmp_path, "b", limit=2)
    assert len(items) == 2 and items[0]["options"] == {"A": "x", "B": "y"} and items[0]["answer"] == "B"


def _records(bench, pairs):
    items = ev.load_items(FIXTURES, bench)
    return [ev.make_record(item, prediction, lenient=True) for item, prediction in zip(items, pairs)]


def test_outputs_results_and_table(tmp_path):
    records = _records("slake", ["Yes, it does.", "Liver", "MRI", "left lung, right."])
    records += _records("medqa", ["Escherichia coli"])
    records += _records("mimic_cxr_findings", ["The lungs are clear."])
    results, table = ev.write_outputs(tmp_path, records, ["WARNING: test"], model_name="tiny")
    assert [r["correct"] for r in records] == [True, True, False, True, True, None]
    saved = [json.loads(line) for line in (tmp_path / "items.jsonl").read_text().splitlines()]
    for record in saved:
        assert {"id", "benchmark", "question_type", "question", "options", "answer", "prediction",
                "correct"} <= set(record)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["benchmarks"] == json.loads(json.dumps(results)) and on_disk["warnings"] == ["WARNING: test"]
    slake = results["slake"]
    assert slake["n"] == 4 and slake["accuracy"] == 75.0
    assert slake["by_type"] == {"yes_no": {"n": 1, "accuracy": 100.0}, "closed": {"n": 1, "accuracy": 100.0},
                                "open": {"n": 2, "accuracy": 50.0}}
    assert slake["ci95"][0] <= 75.0 <= slake["ci95"][1]
    report = results["mimic_cxr_findings"]["report"]
    assert 0 < report["rouge_l"] < 1 and results["mimic_cxr_findings"]["accuracy"] is None   # the 0-1 scale
    assert report["radcliq_v1"].startswith("not computed: needs")   # no model-based parts on this machine
    assert "| SLAKE | 0 | 4 | 75.00 |" in table and "| 71.53 |" in table           # ours beside the paper's
    assert "| MedQA | 0 | 1 | 100.00 |" in table
    main, reports = table.split("\n\n")[:2]
    assert len(main.splitlines()) == 2 + 3 and "ROUGE-L" in main   # header, rule, one row per benchmark
    assert "| MIMIC-CXR findings (MedGPT-oss-20B, paper) | 0 | - |" in reports and "| 0.189 |" in reports
    assert "n/c" in reports and "- 1/RadCliQ-v1: not computed: needs" in table
    assert "WARNING: test" in (tmp_path / "results.md").read_text()


def test_rescore_cli(tmp_path, capsys):
    records = _records("pmc_vqa", ["C"]) + _records("vqa_rad", ["no, there is not", "Pineal region."])
    tampered = [dict(r, correct=not r["correct"]) for r in records]   # stale scores must be recomputed
    for r in tampered:
        r.pop("chosen", None)
    ev.write_jsonl(tmp_path / "in.jsonl", tampered)
    ev.main(["--rescore", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "out.jsonl")])
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["correct"] for r in out] == [True, True, True]
    assert [r["prediction"] for r in out] == ["C", "no, there is not", "Pineal region."]
    printed = capsys.readouterr().out
    assert "| PMC-VQA | 0 | 1 | 100.00 |" in printed and "| VQA-RAD | 0 | 2 | 100.00 |" in printed


def test_rescore_needs_the_fields(tmp_path):
    ev.write_jsonl(tmp_path / "in.jsonl", [{"id": "x", "benchmark": "b", "question_type": "open"}])
    with pytest.raises(ev.ItemError, match="missing .*'prediction'"):
        ev.main(["--rescore", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "out.jsonl")])


def test_lenient_column(tmp_path):
    records = _records("medbullets", ["an ECG first"])
    assert records[0]["correct"] is False and records[0]["lenient_correct"] is True
    results, table = ev.write_outputs(tmp_path, records)
    assert results["medbullets"]["accuracy"] == 0.0 and results["medbullets"]["lenient_accuracy"] == 100.0
    assert "| lenient |" in table and "| Medbullets | 0 | 1 | 0.00 | 0.0–0.0 | 100.00 | 68.71 |" in table


def test_overlap_warning(tmp_path):
    items = ev.load_items(FIXTURES, "slake") + ev.load_items(FIXTURES, "medqa")
    slake_image = hashlib.sha256(Path(items[2]["image_paths"][0]).read_bytes()).hexdigest()
    medqa_question = items[-1]["question_sha256"]
    (tmp_path / "train" / "pmc-oa").mkdir(parents=True)
    (tmp_path / "train" / "pmc-oa" / "hashes.jsonl").write_text(   # data/convert.py's layout
        json.dumps({"kind": "image", "sha256": slake_image, "ref": "imgs/a.png"}) + "\n"
        + json.dumps({"kind": "text", "sha256": "0" * 64, "ref": "imgs/a.png"}) + "\n"
        + json.dumps({"kind": "text", "sha256": medqa_question, "ref": "q7"}) + "\n")
    train_images, train_questions = ev.load_training_hashes([tmp_path / "train"])
    warnings = ev.overlap_warnings(items, train_images, train_questions)
    assert len(warnings) == 2
    assert "slake: 2 item(s) share an image" in warnings[0] and "slake-00003" in warnings[0]
    assert "medqa: 0 item(s) share an image and 1 a question" in warnings[1]
    # items without recorded hashes are hashed from their image files
    bare = [dict(i, image_sha256=None) for i in items[:3]]
    assert "slake-00003" in ev.overlap_warnings(bare, train_images, set())[0]
    assert ev.overlap_warnings(items, set(), set()) == []
    with pytest.raises(FileNotFoundError, match="no hashes.jsonl there"):
        ev.load_training_hashes([tmp_path / "train" / "missing"])


def test_overlap_with_demo_hash_layout(tmp_path):
    """data/demo.py writes {"kind": "image"|"text", "sha256": ...}; questions hashed lower-cased, spaces collapsed."""
    items = ev.load_items(FIXTURES, "vqa_rad")
    question = "  Is there evidence of an AORTIC aneurysm? "
    (tmp_path / "hashes.jsonl").write_text(
        json.dumps({"kind": "text", "sha256": hashlib.sha256(" ".join(question.lower().split()).encode()).hexdigest(),
                    "ref": "x"}) + "\n")
    warnings = ev.overlap_warnings([dict(i, question_sha256=None) for i in items],
                                   *ev.load_training_hashes([tmp_path / "hashes.jsonl"]))
    assert len(warnings) == 1 and "vqa_rad: 0 item(s) share an image and 1 a question" in warnings[0]
    assert "vqa_rad-00001" in warnings[0] and "vqa_rad-00002" not in warnings[0]


# data/convert.py's output, read by eval.py: (converter, raw fixture in tests/fixtures, images to create, benchmarks)
CONVERTED = [
    ("slake", "slake", ["Slake1.0/imgs/xmlab102/source.jpg", "Slake1.0/imgs/xmlab7/source.jpg"], ["slake"]),
    ("vqa-rad", "vqa_rad", ["VQA_RAD Image Folder/synpic54610.jpg", "VQA_RAD Image Folder/synpic29265.jpg"],
     ["vqa_rad"]),
    ("pmc-vqa", "pmc_vqa", ["images/PMC8253797_Fig1_41.jpg", "images/PMC8253800_Fig2_1.jpg"], ["pmc_vqa"]),
    ("medxpertqa", "medxpertqa", ["images/MM-0-a.jpeg", "images/MM-0-b.jpeg"], ["medxpertqa_mm", "medxpertqa_text"]),
    ("medqa", "medqa", [], ["medqa"]),
    ("medmcqa", "medmcqa", [], ["medmcqa"]),
    ("pubmedqa", "pubmedqa", [], ["pubmedqa"]),
    ("medbullets", "medbullets", [], ["medbullets"]),
]


def gold_response(item):
    """How a right model answer looks: the letter, 'Yes.', the answer text."""
    return {"multiple_choice": f"{item['answer']}.", "yes_no": f"{item['answer'].capitalize()}."}.get(
        item["question_type"], item["answer"])


@pytest.mark.parametrize("name,fixture,images,benches", CONVERTED, ids=[c[0] for c in CONVERTED])
def test_converter_output_is_read_and_scored(tmp_path, name, fixture, images, benches):
    from data import convert
    from test_convert import fixture as raw_fixture
    src = raw_fixture(fixture, tmp_path, images)
    convert.convert(name, src, str(tmp_path / "out"))
    for bench in benches:
        items = ev.load_items(tmp_path / "out", bench)
        assert items
        for item in items:
            assert ev.build_prompt(item).count("<image>") == len(item["image_paths"])
            record = ev.make_record(item, gold_response(item))
            assert record["correct"] is True or (item["question_type"] == "report" and record["rouge_l"] == 1.0)
            wrong = ev.make_record(item, "I cannot tell from this image.")
            assert not wrong["correct"]
