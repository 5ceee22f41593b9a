"""eval.py's in-context shots: the exemplar rules (seeded random, nearest image), the test-set exclusion by image hash,
the harmony turns they become, and a whole run with --shots 0,1 and --prior on a MIMIC-CXR release fixture."""
import json
from pathlib import Path

import pytest
import torch

import eval as ev
import model as M
import report_fixtures as F
import vision as V
from data import convert
from data.harmony import render_generation_prompt
from data.tokenizer import load_tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "eval"


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """The MIMIC fixture with one train image a byte copy of a test image, converted: test items and the train
    split's stage-3 conversations (the shot pool)."""
    root = tmp_path_factory.mktemp("shots")
    studies = F.write_mimic_cxr(root / "src", leak_test_image_into_train=True)
    convert.convert("mimic-cxr", str(root / "src"), str(root / "eval"))
    convert.convert("mimic-cxr-instruct", str(root / "src"), str(root / "train"))
    return root, studies


def items_and_pool(root, bench="mimic_cxr_impression", max_views=3, prior=False):
    items = ev.load_items(root / "eval", bench)
    for item in items:
        ev.apply_report_context(item, max_views, prior)
    return items, ev.load_shot_pool([root / "train" / "mimic_cxr_instruct" / "train.jsonl"], max_views, prior)


def test_random_rule_is_seeded_per_item_and_never_uses_a_test_image(release):
    root, studies = release
    items, pool = items_and_pool(root)
    test_hashes = ev.test_image_hashes(items)
    leaked = F.file_sha(next(s for s in studies.values() if s["split"] == "train")["images"][0])   # a test image
    assert leaked in test_hashes

    def shows_leak(exemplar):   # the leaked image, in the study or as its prior
        return leaked in {F.file_sha(p) for p in exemplar["image_paths"]}

    chosen = {}
    for seed in range(6):
        for item in items:
            shots = ev.pick_shots(item, pool, 2, "random", seed, test_hashes)
            assert [e["id"] for e in shots] == [e["id"] for e in ev.pick_shots(item, list(reversed(pool)), 2,
                                                                                "random", seed, test_hashes)]
            assert all(e["task"] == "impression" and not shows_leak(e) for e in shots)
            chosen.setdefault(item["id"], set()).add(tuple(e["id"] for e in shots))
    assert any(len(choices) > 1 for choices in chosen.values())   # the seed matters
    clean = [e for e in pool if e["task"] == "impression" and not shows_leak(e)]
    assert 0 < len(clean) < sum(e["task"] == "impression" for e in pool)
    with pytest.raises(ev.ItemError, match=f"only {len(clean)} exemplar"):
        ev.pick_shots(items[0], pool, len(clean) + 1, "random", 0, test_hashes)


def test_nearest_rule_takes_the_most_similar_images(release, tmp_path):
    root, _ = release
    items, pool = items_and_pool(root)
    item = items[0]
    # an exemplar showing the item's images re-encoded (other bytes, nearly the same pixels) must come first
    copies = []
    for k, path in enumerate(item["image_paths"]):
        copies.append(tmp_path / f"copy{k}.png")
        with ev.Image.open(path) as image:
            image.save(copies[-1])
    twin = {"id": "zz-twin", "prompt": item["question"], "answer": "x", "images": [], "task": "impression",
            "question_type": "report", "image_paths": [str(p) for p in copies]}
    shots = ev.pick_shots(item, pool + [twin], 1, "nearest", 0, ev.test_image_hashes(items))
    assert shots[0]["id"] == "zz-twin"
    # the order is the cosine of the mean thumbnails, highest first
    ranked = ev.pick_shots(item, pool, 3, "nearest", 0, set())
    target = ev.image_signature(item["image_paths"])
    sims = [float(ev.image_signature(e["image_paths"]) @ target) for e in ranked]
    assert sims == sorted(sims, reverse=True)


def test_shots_work_for_vqa_items():
    items = [i for i in ev.load_items(FIXTURES, "slake") if i["question_type"] in ("open", "yes_no")]
    pool = ev.load_shot_pool([FIXTURES / "vqa_rad" / "test.jsonl", FIXTURES / "pathvqa" / "test.jsonl"])
    for item in items:   # eval-format items as the pool: exemplars of the item's question type
        shots = ev.pick_shots(item, pool, 2, "random", 0, ev.test_image_hashes(items))
        assert [e["question_type"] for e in shots] == [item["question_type"]] * 2
    units = ev.with_shots(items, [0, 1], pool, "random", 0)
    assert [u["n_shots"] for u in units] == [0] * len(items) + [1] * len(items)
    assert units[-1]["shot_examples"][0]["prompt"].endswith(ev.OPEN_INSTRUCTION if items[-1]["question_type"] ==
                                                              "open" else ev.YES_NO_INSTRUCTION)


def test_shots_become_earlier_harmony_turns(release):
    root, _ = release
    items, pool = items_and_pool(root)
    unit = ev.with_shots(items[:1], [1], pool, "random", 0)[0]
    tok = load_tokenizer()
    model = type("Spec", (), {"image_token_id": 200_000, "tokens_per_tile": 3,
                              "vision_tower": type("T", (), {"config": V.CLIPVisionConfig(image_size=56)})(),
                              "config": type("C", (), {"preprocessing": None})()})()  # None: CLIP's
    encoder = ev.Encoder(tok, model, is_multimodal=True)
    shot = unit["shot_examples"][0]
    messages = [{"role": "user", "content": shot["prompt"]}, {"role": "assistant", "content": shot["answer"]},
                {"role": "user", "content": unit["question"]}]
    n_images = len(shot["image_paths"]) + len(unit["image_paths"])
    expected = render_generation_prompt(tok, messages, [3] * n_images, 200_000).ids + encoder.final_header
    assert encoder.prompt_ids(unit) == expected and expected.count(200_000) == 3 * n_images
    assert encoder.pixel_values(unit).shape == (n_images, 3, 56, 56)


@pytest.fixture(scope="module")
def medgpt_dir(tmp_path_factory):
    torch.manual_seed(0)
    text = M.GPTConfig.preset("tiny", hidden_size=32, intermediate_size=32, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=8, sliding_window=8)
    vision = V.CLIPVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                image_size=56, patch_size=14)
    path = tmp_path_factory.mktemp("tiny_medgpt")
    M.MedGPT(M.MedGPTConfig(text=text, vision=vision)).float().save_pretrained(path)
    return path


def test_run_with_shots_and_prior(release, medgpt_dir, tmp_path):
    root, _ = release
    pool = root / "train" / "mimic_cxr_instruct" / "train.jsonl"
    args = ["--model", str(medgpt_dir), "--bench", "mimic_cxr_findings,mimic_cxr_impression", "--data_dir",
            str(root / "eval"), "--dtype", "float32", "--max_new_tokens", "6", "--prior", "--max_views", "2",
            "--shots", "0,1", "--shot_pool", str(pool)]
    results = ev.main(args + ["--out_dir", str(tmp_path / "a")])
    records = [json.loads(line) for line in (tmp_path / "a" / "items.jsonl").read_text().splitlines()]
    n_items = sum(1 for b in ("mimic_cxr_findings", "mimic_cxr_impression")
                  for _ in (root / "eval" / b / "test.jsonl").open())
    assert len(records) == 2 * n_items and {r["shots"] for r in records} == {0, 1}
    assert all(len(r["shot_ids"]) == r["shots"] for r in records)
    assert set(results) == {"mimic_cxr_findings", "mimic_cxr_impression", "mimic_cxr_findings/1-shot",
                            "mimic_cxr_impression/1-shot"}
    table = (tmp_path / "a" / "results.md").read_text()
    assert "| MIMIC-CXR impression | ROUGE-L |" in table and "| 47.22 | 55.60 |" in table
    # the same seed picks the same exemplars in another run
    ev.main(args + ["--out_dir", str(tmp_path / "b")])
    again = [json.loads(line) for line in (tmp_path / "b" / "items.jsonl").read_text().splitlines()]
    assert [r["shot_ids"] for r in again] == [r["shot_ids"] for r in records]
    assert [r["prediction"] for r in again] == [r["prediction"] for r in records]


def test_run_computes_every_report_metric_with_local_models(release, medgpt_dir, tmp_path):
    """--shots 0,1 on the MIMIC fixture with each metric's model given by its flag (random models of the released
    architectures, tests/report_fixtures.py): every RadCliQ-v1 part is a number, so RadCliQ-v1 is too, and it is
    the published composite of the per-report parts; the tables show each value."""
    root, _ = release
    refs = [json.loads(line)["answer"] for b in ("mimic_cxr_findings", "mimic_cxr_impression")
            for line in (root / "eval" / b / "test.jsonl").open()]
    models = tmp_path / "metric_models"
    F.write_chexbert_model(models / "chexbert", refs)
    F.write_bertscore_model(models / "distilroberta", refs)
    F.write_radgraph_model(models / "radgraph", refs)
    F.write_ratescore_models(models / "ratescore", refs)
    pool = root / "train" / "mimic_cxr_instruct" / "train.jsonl"
    results = ev.main(["--model", str(medgpt_dir), "--bench", "mimic_cxr_findings,mimic_cxr_impression",
                       "--data_dir", str(root / "eval"), "--dtype", "float32", "--max_new_tokens", "6", "--prior",
                       "--shots", "0,1", "--shot_pool", str(pool), "--out_dir", str(tmp_path / "out"),
                       "--semb_model", str(models / "chexbert"), "--bertscore_model", str(models / "distilroberta"),
                       "--radgraph_model", str(models / "radgraph"), "--ratescore_model", str(models / "ratescore")])
    records = [json.loads(line) for line in (tmp_path / "out" / "items.jsonl").read_text().splitlines()]
    paths = {"semb": str(models / "chexbert"), "bertscore": str(models / "distilroberta"),
             "radgraph": str(models / "radgraph"), "ratescore": str(models / "ratescore")}
    for key, entry in results.items():
        report = entry["report"]
        for name in ("bleu4", "rouge_l", "bertscore", "semb", "radgraph_f1", "radgraph_combined", "ratescore",
                     "radcliq_v1"):
            assert isinstance(report[name], float), (key, name, report[name])
        group = [r for r in records if r["benchmark"] == entry["benchmark"] and r["shots"] == entry["shots"]]
        hyps, answers = [r["prediction"] for r in group], [r["answer"] for r in group]
        parts = ev.report_metrics.model_metrics(hyps, answers, paths)
        parts["bleu2"] = [ev.report_metrics.radcliq_bleu2(h, a) for h, a in zip(hyps, answers)]
        features = [[parts[name][i] for name in ev.report_metrics.RADCLIQ_V1_FEATURES] for i in range(len(group))]
        assert report["radcliq_v1"] == pytest.approx(float(ev.report_metrics.radcliq_v1(features).mean()))
        assert report["inv_radcliq_v1"] == pytest.approx(1 / report["radcliq_v1"])
    table = (tmp_path / "out" / "results.md").read_text()
    assert "RadCliQ-v1" in table and "0.803" in table and "n/c" not in table
