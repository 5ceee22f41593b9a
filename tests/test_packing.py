"""Packing: rows within seq_len, attention kept inside documents, images never cut, truncation counted."""
import random

import pytest
import torch

from data.datasets import DataReport, Sample
from data.harmony import targets_from_mask
from data.packing import pack, packed_row, truncate, truncate_all

IMG = 7  # a tiny vocabulary's image id


def make_sample(rng, n_text, images=(), source="s"):
    """Text tokens (ids 10..99) with image runs inserted at random places; loss on text tokens."""
    ids, loss, spans = [rng.randrange(10, 100) for _ in range(n_text)], [True] * n_text, []
    for n in images:
        at = rng.randrange(len(ids) + 1)
        # keep earlier spans intact: insert only after the last span
        at = max(at, spans[-1][1] if spans else 0)
        ids[at:at] = [IMG] * n
        loss[at:at] = [False] * n
        spans.append((at, at + n))
    return Sample(ids, targets_from_mask(ids, loss), [f"img{k}.png" for k in range(len(spans))], spans,
                  [n // 4 for n in images], source)


def test_pack_fits_and_covers_everything():
    rng = random.Random(0)
    lengths = [rng.randint(1, 64) for _ in range(500)]
    rows = pack(lengths, 64)
    assert sorted(i for row in rows for i in row) == list(range(500))  # each sample exactly once
    assert all(sum(lengths[i] for i in row) <= 64 for row in rows)
    fill = sum(lengths) / (64 * len(rows))
    assert fill > 0.95, fill  # best-fit decreasing packs mixed lengths tightly
    assert rows == pack(lengths, 64)  # deterministic


def test_packed_row_keeps_documents_apart():
    rng = random.Random(1)
    samples = [make_sample(rng, 9, (4,)), make_sample(rng, 5), make_sample(rng, 12, (8, 4))]
    row = packed_row(samples, 64, pad_id=0)
    assert len(row["input_ids"]) == len(row["doc_ids"]) == len(row["position_ids"]) == 64
    offset = 0
    for doc, s in enumerate(samples):
        n = len(s.ids)
        span = slice(offset, offset + n)
        assert row["input_ids"][span] == s.ids
        assert row["doc_ids"][span] == [doc] * n and list(row["position_ids"][span]) == list(range(n))
        assert row["targets"][offset + n - 1] == -100  # nothing predicts across a boundary
        assert row["targets"][span] == s.targets
        offset += n
    pad = slice(offset, 64)
    assert set(row["doc_ids"][pad]) == {len(samples)} and set(row["targets"][pad]) == {-100}
    assert [path for path, _, _ in row["images"]] == ["img0.png", "img0.png", "img1.png"]


def test_packed_attention_equals_each_document_alone():
    """With the kernel's mask (fused.attention_torch, doc_ids), every document's outputs in a packed row equal
    those of the document run alone: no attention across documents."""
    import fused
    rng = random.Random(2)
    samples = [make_sample(rng, n) for n in (7, 13, 4, 20)]
    row = packed_row(samples, 48, pad_id=0)
    torch.manual_seed(0)
    table = torch.randn(100, 2, 8)  # per token id: (heads, head_dim)

    def attend(ids, doc_ids=None):
        x = table[torch.tensor(ids)][None]  # (1, T, H, D)
        sinks = torch.zeros(2)
        return fused.attention_torch(x, x, x, sinks, doc_ids=doc_ids)[0]  # (T, H, D)

    packed = attend(row["input_ids"], torch.tensor([row["doc_ids"]]))
    offset = 0
    for s in samples:
        alone = attend(s.ids)
        torch.testing.assert_close(packed[offset:offset + len(s.ids)], alone)
        offset += len(s.ids)
    # and without doc_ids they would differ (the check above is not vacuous)
    assert not torch.allclose(attend(row["input_ids"])[7:20], attend(samples[1].ids))


def test_truncate_never_cuts_an_image():
    rng = random.Random(3)
    s = make_sample(rng, 10, ())
    s = Sample(s.ids[:5] + [IMG] * 8 + s.ids[5:], targets_from_mask(s.ids[:5] + [IMG] * 8 + s.ids[5:],
               [True] * 5 + [False] * 8 + [True] * 5), ["a.png"], [(5, 13)], [2], "x:1")
    cut = truncate(s, 9)  # 9 falls inside the image run 5..13: cut before it
    assert cut.ids == s.ids[:5] and cut.images == [] and cut.image_spans == []
    assert cut.targets == s.targets[:5]
    whole = truncate(s, 14)  # after the run: the image is kept whole
    assert whole.ids == s.ids[:14] and whole.images == ["a.png"] and whole.image_spans == [(5, 13)]
    assert whole.targets[13] == s.targets[13] == s.ids[14]  # the last kept token still predicts its true next token
    assert truncate(s, 100) is s


def test_truncate_all_counts():
    rng = random.Random(4)
    image_first = Sample([IMG] * 20 + [11, 12], [-100] * 19 + [11, 12, -100], ["a.png"], [(0, 20)], [5], "y:1")
    samples = [make_sample(rng, 5), make_sample(rng, 40), image_first, make_sample(rng, 16)]
    report = DataReport()
    out = truncate_all(samples, 16, report)
    assert out[0] is samples[0] and out[3] is samples[3]
    assert len(out[1].ids) == 16
    assert out[2] is None  # the image alone does not fit: dropped, not cut
    assert (report.truncated, report.dropped) == (1, 1)
    assert "1 truncated, 1 dropped as too long" in report.summary()


def test_pack_refuses_over_long():
    with pytest.raises(ValueError, match="truncate before packing"):
        pack([3, 70], 64)
