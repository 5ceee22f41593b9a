"""Stage readers: records -> (ids, targets, images), checked against tiktoken / openai-harmony; bad input."""
import json
import os

import pytest
from openai_harmony import Conversation, DeveloperContent, Message, RenderConversationConfig, Role, TextContent
from PIL import Image

from data import datasets as D
from data.tokenizer import ENDOFTEXT, IMAGE_TOKEN_ID
from test_tokenizer import harmony_enc, ranks_dirs, tiktoken_enc, tok  # noqa: F401  (session fixtures)

SPEC = D.ImageTokens(max_tiles=1, image_size=28, tokens_per_tile=4)


def real_images(folder):
    """Small copies of real medical photographs that scikit-image ships (CC0): fundus, retina vessels, histology."""
    import skimage
    shipped = os.path.join(os.path.dirname(skimage.__file__), "data")
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, file, size in (("retina", "retina.jpg", (60, 60)), ("microaneurysms", "microaneurysms.png", (70, 40)),
                             ("ihc", "ihc.png", (40, 90))):
        path = folder / f"{name}.png"
        Image.open(os.path.join(shipped, file)).resize(size).save(path)
        out[name] = path
    return out


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


@pytest.fixture
def images(tmp_path):
    return real_images(tmp_path / "imgs")


def trained(sample):
    """Token ids that carry loss (the targets that are not -100)."""
    return [t for t in sample.targets if t != -100]


def test_stage1_both_layouts(tok, tiktoken_enc, images, tmp_path):
    caption = "Fundus photograph of the right eye: optic disc and macula normal."
    f = write_jsonl(tmp_path / "cap.jsonl", [
        {"image": "imgs/retina.png", "caption": caption},
        {"id": "x", "image": "imgs/retina.png", "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image."}, {"from": "gpt", "value": caption}]},
    ])
    a, b = D.load_jsonl(f, D.caption_sample, tok, SPEC)
    want = [IMAGE_TOKEN_ID] * 4 + tiktoken_enc.encode_ordinary(caption) + [ENDOFTEXT]
    assert a.ids == b.ids == want
    assert trained(a) == tiktoken_enc.encode_ordinary(caption) + [ENDOFTEXT]  # loss on caption + <|endoftext|>
    assert a.targets[3] == want[4] and a.targets[:3] == [-100] * 3
    assert a.images == [str(images["retina"])] and a.image_spans == [(0, 4)] and a.image_tiles == [1]
    assert a.source == f"{f}:1"


def test_stage2_text_and_interleaved(tok, tiktoken_enc, images, tmp_path):
    t1, t2 = "Diabetic retinopathy is graded by", " the presence of microaneurysms:"
    f = write_jsonl(tmp_path / "docs.jsonl", [
        {"text": t1 + t2},
        {"content": [{"type": "text", "text": t1}, {"type": "image", "image": "imgs/microaneurysms.png"},
                     {"type": "text", "text": t2}, {"type": "image", "image": str(images["ihc"])}]},
    ])
    text, mixed = D.load_jsonl(f, D.document_sample, tok, SPEC)
    assert text.ids == tiktoken_enc.encode_ordinary(t1 + t2) + [ENDOFTEXT]
    assert trained(text) == text.ids[1:]  # every next token is trained
    e1, e2 = tiktoken_enc.encode_ordinary(t1), tiktoken_enc.encode_ordinary(t2)
    assert mixed.ids == e1 + [IMAGE_TOKEN_ID] * 4 + e2 + [IMAGE_TOKEN_ID] * 4 + [ENDOFTEXT]
    for t, target in enumerate(mixed.targets[:-1]):  # never a loss on (or towards) an image token
        assert target == (-100 if mixed.ids[t + 1] == IMAGE_TOKEN_ID else mixed.ids[t + 1])
    assert mixed.image_spans == [(len(e1), len(e1) + 4), (len(e1) + 4 + len(e2), len(e1) + 8 + len(e2))]


def test_stage3_equals_harmony(tok, harmony_enc, images, tmp_path):
    record = {"id": "q1", "image": "imgs/retina.png", "conversations": [
        {"from": "system", "value": "You are an ophthalmologist."},
        {"from": "human", "value": "What is shown?\n<image>"},
        {"from": "gpt", "value": "A fundus photograph.", "thinking": "Orange disc, vessels: a retina."},
        {"from": "human", "value": "Any haemorrhage?"}, {"from": "gpt", "value": "No."}]}
    f = write_jsonl(tmp_path / "conv.jsonl", [record, {"conversations": [
        {"from": "human", "value": "Define HbA1c."}, {"from": "gpt", "value": "Glycated haemoglobin."}]}])
    s, text_only = D.load_jsonl(f, D.conversation_sample, tok, SPEC)
    A = Role.ASSISTANT
    conv = Conversation.from_messages([
        Message.from_role_and_content(Role.DEVELOPER, DeveloperContent.new().with_instructions("You are an ophthalmologist.")),
        Message.from_role_and_contents(Role.USER, [TextContent(text="What is shown?\n"), TextContent(text="IMG")]),
        Message.from_role_and_content(A, "Orange disc, vessels: a retina.").with_channel("analysis"),
        Message.from_role_and_content(A, "A fundus photograph.").with_channel("final"),
        Message.from_role_and_content(Role.USER, "Any haemorrhage?"),
        Message.from_role_and_content(A, "No.").with_channel("final")])
    want = harmony_enc.render_conversation_for_training(conv, RenderConversationConfig(auto_drop_analysis=False))
    start, end = s.image_spans[0]
    assert s.ids[:start] + tok.encode("IMG").ids + s.ids[end:] == want
    assert s.ids[start:end] == [IMAGE_TOKEN_ID] * 4
    assert text_only.images == [] and text_only.image_spans == []
    assert tok.decode(trained(text_only), skip_special_tokens=False) == \
        "<|channel|>final<|message|>Glycated haemoglobin.<|return|>"


def test_tiling_counts_tokens_with_vision(tok, images, tmp_path):
    import vision
    spec = D.ImageTokens(max_tiles=4, image_size=28, tokens_per_tile=4)
    f = write_jsonl(tmp_path / "cap.jsonl", [{"image": f"imgs/{n}.png", "caption": "x"} for n in ("retina", "microaneurysms", "ihc")])
    for s, name in zip(D.load_jsonl(f, D.caption_sample, tok, spec), ("retina", "microaneurysms", "ihc")):
        w, h = Image.open(images[name]).size
        n = vision.num_tiles(w, h, 4, 28)
        assert s.image_tiles == [n] and s.ids.count(IMAGE_TOKEN_ID) == 4 * n
    assert {s.image_tiles[0] for s in D.load_jsonl(f, D.caption_sample, tok, spec)} != {1}  # tiling happened


def test_mixture(tok, images, tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "alpha"}, {"text": "beta"}])
    write_jsonl(tmp_path / "b.jsonl", [{"content": [{"type": "image", "image": "imgs/ihc.png"}, {"type": "text", "text": "gamma"}]}])
    (tmp_path / "mix.json").write_text(json.dumps({"datasets": [{"path": "a.jsonl", "weight": 2}, {"path": "b.jsonl", "weight": 0.5}]}))
    ds = D.load_dataset(tmp_path / "mix.json", D.document_sample, tok, SPEC)
    assert [(os.path.basename(p), s, e, w) for p, s, e, w in ds.parts] == [("a.jsonl", 0, 2, 2.0), ("b.jsonl", 2, 3, 0.5)]
    assert len(ds.samples) == 3 and ds.report.samples == 3
    (tmp_path / "bad.json").write_text(json.dumps({"datasets": [{"path": "a.jsonl", "weight": -1}]}))
    with pytest.raises(D.DataError, match="weight must be a number >= 0"):
        D.load_dataset(tmp_path / "bad.json", D.document_sample, tok, SPEC)


READERS = {1: D.caption_sample, 2: D.document_sample, 3: D.conversation_sample}
BAD = [  # (stage, record line, reason the error must give)
    (3, '{"conversations": [{"from": "human", "value": "hi"}', "malformed JSON"),
    (3, '["not", "an", "object"]', "malformed JSON: expected an object"),
    (3, {"image": "imgs/nope.png", "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}]}, "image not found"),
    (3, {"image": "imgs/corrupt.png", "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}]}, "cannot read image"),
    (3, {"conversations": []}, "empty conversation"),
    (3, {"conversations": [{"from": "human", "value": "hi"}]}, "empty conversation: no gpt turn"),
    (3, {"conversations": [{"from": "nurse", "value": "hi"}, {"from": "gpt", "value": "x"}]}, "unknown role"),
    (3, {"image": "imgs/retina.png", "conversations": [{"from": "human", "value": "<image> vs <image>"}, {"from": "gpt", "value": "x"}]}, "more <image> placeholders than images"),
    (1, {"image": "imgs/retina.png", "caption": ""}, "empty caption"),
    (2, {"text": ""}, "empty document"),
    (2, {"content": [{"type": "video", "video": "a.mp4"}]}, "content\\[0\\]"),
]


@pytest.mark.parametrize("stage,line,reason", BAD)
def test_bad_input_errors_name_file_and_line(tok, images, tmp_path, stage, line, reason):
    (tmp_path / "imgs" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    good = {1: {"image": "imgs/retina.png", "caption": "ok"}, 2: {"text": "ok"},
            3: {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}}[stage]
    f = write_jsonl(tmp_path / "d.jsonl", [good, "", line])  # the bad record is on line 3
    with pytest.raises(D.DataError, match=rf"d\.jsonl:3: {reason}"):
        D.load_jsonl(f, READERS[stage], tok, SPEC)


def test_skip_mode_counts_and_lists(tok, images, tmp_path):
    (tmp_path / "imgs" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    good = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    bad3 = [line for stage, line, _ in BAD if stage == 3]
    f = write_jsonl(tmp_path / "d.jsonl", [good] + bad3 + [good])
    ds = D.load_dataset(f, D.conversation_sample, tok, SPEC, skip_bad=True)
    assert len(ds.samples) == 2 and ds.report.samples == 2
    assert [line for _, line, _ in ds.report.skipped] == list(range(2, 2 + len(bad3)))
    summary = ds.report.summary()
    assert f"2 samples read, {len(bad3)} records skipped" in summary
    for _, line, reason in ds.report.skipped:
        assert f"d.jsonl:{line}: {reason}" in summary
    assert "skipped 2 x malformed JSON" in summary
