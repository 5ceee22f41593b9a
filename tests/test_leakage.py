"""Leakage control (data/leakage.py): eval images found in training records, exact and near-duplicate.

Images are real (scikit-image's retina, cell, microaneurysm and histology images, pydicom's CT and MR test
slices). The copies are made the way leaks happen: the same pixels saved again, a re-encoded JPEG, a resize.
"""
import hashlib
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from data import leakage


def real_images():
    from pydicom import dcmread
    from pydicom.data import get_testdata_file
    from skimage import data as skdata
    images = {"retina": Image.fromarray(skdata.retina()), "cell": Image.fromarray(skdata.cell()),
              "micro": Image.fromarray(skdata.microaneurysms()), "histology": Image.fromarray(skdata.immunohistochemistry())}
    for name in ("CT_small.dcm", "MR_small.dcm"):
        pixels = dcmread(get_testdata_file(name)).pixel_array.astype(np.float64)
        images[name] = Image.fromarray((255 * (pixels - pixels.min()) / np.ptp(pixels)).astype(np.uint8))
    return images


def jpeg(image, quality):
    out = io.BytesIO()
    image.convert("RGB").save(out, "JPEG", quality=quality)
    return Image.open(io.BytesIO(out.getvalue()))


def test_phash_equals_imagehash():
    imagehash = pytest.importorskip("imagehash")  # oracle: pip install imagehash (scratch venv)
    for name, image in real_images().items():
        assert leakage.phash(image) == int(str(imagehash.phash(image)), 16), name


def test_pixel_hash_ignores_the_container(tmp_path):
    image = real_images()["cell"]
    image.save(tmp_path / "a.png", compress_level=1)
    image.save(tmp_path / "b.png", compress_level=9)
    image.save(tmp_path / "c.bmp")
    files = [tmp_path / n for n in ("a.png", "b.png", "c.bmp")]
    assert len({hashlib.sha256(f.read_bytes()).hexdigest() for f in files}) == 3
    assert len({leakage.image_hashes(str(f))[0] for f in files}) == 1
    image.rotate(90).save(tmp_path / "d.png")  # other pixels, other hash
    assert leakage.image_hashes(str(tmp_path / "d.png"))[0] != leakage.image_hashes(str(files[0]))[0]


def test_copies_are_near_and_other_scans_are_far():
    images = real_images()
    for name, image in images.items():
        h = leakage.phash(image)
        assert leakage.hamming(h, leakage.phash(jpeg(image, 40))) <= leakage.NEAR_THRESHOLD, name
        half = image.resize((image.width // 2, image.height // 2), Image.Resampling.BICUBIC)
        assert leakage.hamming(h, leakage.phash(half)) <= leakage.NEAR_THRESHOLD, name
    names = list(images)
    distances = [leakage.hamming(leakage.phash(images[a]), leakage.phash(images[b]))
                 for i, a in enumerate(names) for b in names[i + 1:]]
    assert min(distances) > 2 * leakage.NEAR_THRESHOLD


def write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def qsha(text):
    return hashlib.sha256(" ".join(text.lower().split()).encode()).hexdigest()


def leak_fixture(tmp_path):
    """An eval benchmark over retina, CT and histology; training records holding copies of them."""
    images = real_images()
    bench = tmp_path / "eval" / "slake"
    (bench / "imgs").mkdir(parents=True)
    items = []
    for i, name in enumerate(("retina", "CT_small.dcm", "histology")):
        images[name].save(bench / "imgs" / f"{i}.png")
        items.append({"id": f"slake-{i}", "question": "Which organ is shown?", "images": [f"imgs/{i}.png"],
                      "question_sha256": qsha("Which organ is shown?")})
    write_jsonl(str(bench / "test.jsonl"), items)
    train = tmp_path / "train" / "vqa"
    (train / "imgs").mkdir(parents=True)
    images["retina"].save(train / "imgs" / "exact.png", compress_level=9)      # same pixels, other bytes
    jpeg(images["CT_small.dcm"], 60).save(train / "imgs" / "reencoded.jpg")   # re-encoded JPEG
    histology = images["histology"]
    histology.resize((200, 200), Image.Resampling.BICUBIC).save(train / "imgs" / "resized.png")
    images["cell"].save(train / "imgs" / "other.png")                          # not an eval image
    def row(i, image, question):
        return {"id": f"r{i}", "image": f"imgs/{image}", "conversations": [
            {"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": "x"}]}
    rows = [row(0, "exact.png", "Which organ is shown?"), row(1, "reencoded.jpg", "Is this a CT?"),
            row(2, "resized.png", "What stain is used?"), row(3, "other.png", "Which organ is shown?")]
    write_jsonl(str(train / "train.jsonl"), rows)
    index = leakage.EvalIndex()
    index.add_benchmark(str(bench), "slake")
    return train, index


def test_filter_drops_exact_reencoded_and_resized_copies(tmp_path):
    train, index = leak_fixture(tmp_path)
    counts = leakage.filter_records(str(train / "train.jsonl"), str(train / "clean.jsonl"), index)
    assert counts == {"kept": 1, "dropped": 3, "by_benchmark": {"slake": {"exact": 1, "near": 2}}}
    kept = [json.loads(line)["id"] for line in open(train / "clean.jsonl")]
    assert kept == ["r3"]  # the same template question on another image stays: matching is on the image
    assert os.path.isfile(train / "image_hashes.jsonl")  # cached: a re-run hashes nothing new
    assert leakage.filter_records(str(train / "train.jsonl"), str(train / "clean.jsonl"), index) == counts


def test_image_plus_question_keeps_other_questions_on_a_shared_image(tmp_path):
    train, index = leak_fixture(tmp_path)
    asked = {"r0": {qsha("Which organ is shown?")}, "r1": {qsha("Is this a CT?")},
             "r2": {qsha("What stain is used?")}, "r3": {qsha("Which organ is shown?")}}
    counts = leakage.filter_records(str(train / "train.jsonl"), str(train / "clean.jsonl"), index,
                                    match="image+question", question_shas=asked)
    assert counts == {"kept": 3, "dropped": 1, "by_benchmark": {"slake": {"exact": 1}}}
