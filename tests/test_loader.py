"""Loader: deterministic from (seed, step), same global batch on 1 and 2 processes, exact resume, images."""
import json
import os
import subprocess
import sys
from collections import Counter

import pytest
import torch

from data import datasets as D
from data.loader import DataLoader, epoch_members, load_tiles
from data.tokenizer import ENDOFTEXT, IMAGE_TOKEN_ID
from test_datasets import real_images, write_jsonl
from test_tokenizer import tok  # noqa: F401  (session fixture)

SPEC = D.ImageTokens(max_tiles=1, image_size=28, tokens_per_tile=4)


def stage3_file(folder, n=11):
    imgs = real_images(folder / "imgs")
    records = []
    for i in range(n):
        name = list(imgs)[i % 3]
        if i % 4 == 3:  # some text-only conversations
            records.append({"conversations": [{"from": "human", "value": f"Question {i}?"}, {"from": "gpt", "value": "Answer " * (i + 1)}]})
        else:
            records.append({"image": f"imgs/{name}.png", "conversations": [
                {"from": "human", "value": f"<image>\nWhat is shown in image {i}?"}, {"from": "gpt", "value": f"A {name} image."}]})
    return write_jsonl(folder / "conv.jsonl", records)


def stage2_mixture(folder):
    imgs = real_images(folder / "imgs")
    docs = [{"text": "word " * (3 + 7 * i)} for i in range(9)]
    docs += [{"content": [{"type": "text", "text": f"Figure {i}:"}, {"type": "image", "image": f"imgs/{name}.png"},
                          {"type": "text", "text": " caption " * i}]} for i, name in enumerate(list(imgs) * 2)]
    write_jsonl(folder / "a.jsonl", docs[:9])
    write_jsonl(folder / "b.jsonl", docs[9:])
    (folder / "mix.json").write_text(json.dumps({"datasets": [{"path": "a.jsonl", "weight": 1.5}, {"path": "b.jsonl", "weight": 2}]}))
    return folder / "mix.json"


def unpad(row):
    return [t for t in row.tolist() if t != ENDOFTEXT]


def flat(micro_batches, key):
    """The micro-batches' tensors under `key` concatenated (micro-batches without images have None)."""
    tensors = [mb[key] for mb in micro_batches if mb[key] is not None]
    return torch.cat(tensors) if tensors else None


def test_same_global_batch_on_any_world_size_packed(tok, tmp_path):
    ds = D.load_dataset(stage2_mixture(tmp_path), D.document_sample, tok, SPEC)
    common = dict(seq_len=64, global_batch_size=4, packing=True, seed=3, image_size=28)
    one = DataLoader(ds, micro_batch_size=2, **common)
    ranks = [DataLoader(ds, micro_batch_size=1, rank=r, world_size=2, **common) for r in range(2)]
    assert one.grad_accum == 2 and ranks[0].grad_accum == 2
    for step in range(3 * one.rows_per_epoch // 4 + 2):  # crosses epoch boundaries
        whole = one.next_batch()
        parts = [mb for r in ranks for mb in r.next_batch()]  # rank 0's rows, then rank 1's
        for key in ("input_ids", "targets", "doc_ids", "position_ids", "pixel_values"):
            a, b = flat(whole, key), flat(parts, key)
            assert (a is None and b is None) or torch.equal(a, b), (step, key)


def test_same_global_batch_on_any_world_size_padded(tok, tmp_path):
    ds = D.load_dataset(stage3_file(tmp_path), D.conversation_sample, tok, SPEC)
    one = DataLoader(ds, seq_len=256, global_batch_size=4, micro_batch_size=4, seed=1, image_size=28)
    ranks = [DataLoader(ds, seq_len=256, global_batch_size=4, micro_batch_size=1, rank=r, world_size=2, seed=1,
                        image_size=28) for r in range(2)]
    for step in range(8):
        [whole] = one.get_batch(step)
        parts = [mb for r in ranks for mb in r.get_batch(step)]
        assert [unpad(row) for row in whole["input_ids"]] == [unpad(mb["input_ids"][0]) for mb in parts]
        pix = [mb["pixel_values"] for mb in parts if mb["pixel_values"] is not None]
        assert torch.equal(whole["pixel_values"], torch.cat(pix)) if pix else whole["pixel_values"] is None
        assert whole["doc_ids"] is None and whole["position_ids"] is None


@pytest.mark.slow
def test_two_real_processes(tok, tmp_path):
    """Two OS processes (ranks 0 and 1 of 2) together see exactly the one-process global batches."""
    path = stage3_file(tmp_path)
    script = (
        "import sys, json; sys.path[:0] = [{root!r}]\n"
        "from data import datasets as D; from data.loader import DataLoader; from data.tokenizer import load_tokenizer\n"
        "rank, world, micro = map(int, sys.argv[1:4])\n"
        "ds = D.load_dataset({path!r}, D.conversation_sample, load_tokenizer(), D.ImageTokens(image_size=28, tokens_per_tile=4))\n"
        "dl = DataLoader(ds, seq_len=256, global_batch_size=4, micro_batch_size=micro, rank=rank, world_size=world,"
        " seed=5, image_size=28, num_workers=1)\n"
        "out = [[[int(t) for t in row if t != 199999] for mb in dl.next_batch() for row in mb['input_ids']] for _ in range(5)]\n"
        "print(json.dumps(out))\n").format(root=os.getcwd(), path=str(path))
    env = dict(os.environ, MEDGPT_CACHE=os.environ["MEDGPT_CACHE"])
    run = lambda *args: subprocess.Popen([sys.executable, "-c", script, *map(str, args)], stdout=subprocess.PIPE, env=env)
    procs = [run(0, 2, 1), run(1, 2, 1)]
    r0, r1 = [json.loads(p.communicate(timeout=240)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    one = DataLoader(D.load_dataset(path, D.conversation_sample, tok, SPEC), seq_len=256, global_batch_size=4, micro_batch_size=2,
                     seed=5, image_size=28, load_images=False)
    single = [[unpad(row) for mb in one.next_batch() for row in mb["input_ids"]] for _ in range(5)]
    assert single == [a + b for a, b in zip(r0, r1)]


def test_resume_continues_with_the_next_batch(tok, tmp_path):
    ds = D.load_dataset(stage2_mixture(tmp_path), D.document_sample, tok, SPEC)
    make = lambda: DataLoader(ds, seq_len=48, global_batch_size=2, micro_batch_size=1, packing=True, seed=7, image_size=28)
    first = make()
    batches, states = [], []
    for _ in range(12):
        states.append(first.state_dict())
        batches.append(first.next_batch())
    resumed = make()
    resumed.load_state_dict(json.loads(json.dumps(states[5])))  # the state survives a JSON round trip
    for step in range(5, 12):
        for a, b in zip(resumed.next_batch(), batches[step]):
            for key in a:
                assert (a[key] is None and b[key] is None) or torch.equal(a[key], b[key]), (step, key)
    other_seed = DataLoader(ds, seq_len=48, global_batch_size=2, micro_batch_size=1, packing=True, seed=8, image_size=28)
    with pytest.raises(ValueError, match="seed is 7 in the checkpoint but 8 now"):
        other_seed.load_state_dict(states[5])
    assert not all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(other_seed.get_batch(0), batches[0])) or \
        not torch.equal(other_seed.get_batch(1)[0]["input_ids"], batches[1][0]["input_ids"])


def test_mixture_weights_per_epoch(tok, tmp_path):
    ds = D.load_dataset(stage2_mixture(tmp_path), D.document_sample, tok, SPEC)
    kept = [True] * len(ds.samples)
    (_, a0, a1, _), (_, b0, b1, _) = ds.parts
    draws = []
    for epoch in range(4):
        counts = Counter(epoch_members(ds.parts, kept, seed=0, epoch=epoch))
        assert all(counts[i] == 2 for i in range(b0, b1))  # weight 2: every sample twice
        once_more = {i for i in range(a0, a1) if counts[i] == 2}
        assert all(counts[i] in (1, 2) for i in range(a0, a1)) and len(once_more) == round(0.5 * (a1 - a0))
        draws.append(frozenset(once_more))
    assert len(set(draws)) > 1  # the fractional half is redrawn each epoch
    assert epoch_members(ds.parts, kept, 0, 2) == epoch_members(ds.parts, kept, 0, 2)


def test_pixel_values_in_run_order_with_tiling(tok, tmp_path):
    spec = D.ImageTokens(max_tiles=4, image_size=28, tokens_per_tile=4)
    ds = D.load_dataset(stage2_mixture(tmp_path), D.document_sample, tok, spec)
    dl = DataLoader(ds, seq_len=200, global_batch_size=2, micro_batch_size=2, packing=True, max_tiles=4, image_size=28)
    for step in range(3):
        [mb] = dl.get_batch(step)
        [[images]] = [[[img for row in rows for i in row for img in zip(dl.samples[i].images, dl.samples[i].image_tiles)]]
                      for rows in dl.rank_rows(step)]
        want = torch.cat([load_tiles(p, 4, 28) for p, _ in images]) if images else None
        assert (want is None and mb["pixel_values"] is None) or torch.equal(mb["pixel_values"], want)
        n_tiles = 0 if want is None else want.shape[0]
        assert int((mb["input_ids"] == IMAGE_TOKEN_ID).sum()) == 4 * n_tiles  # one id per image feature
        assert sum(n for _, n in images) == n_tiles


def test_thread_process_and_inline_workers_agree(tok, tmp_path):
    ds = D.load_dataset(stage3_file(tmp_path), D.conversation_sample, tok, SPEC)
    loaders = [DataLoader(ds, seq_len=256, global_batch_size=4, micro_batch_size=2, image_size=28, **kw)
               for kw in (dict(num_workers=0), dict(workers="thread"), dict(workers="process", num_workers=2))]
    try:
        for step in range(3):
            batches = [dl.next_batch() for dl in loaders]
            for other in batches[1:]:
                for a, b in zip(batches[0], other):
                    assert torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["input_ids"], b["input_ids"])
    finally:
        for dl in loaders:
            dl.close()


def test_corrupt_pixels_found_at_decode_name_the_record(tok, tmp_path):
    path = stage3_file(tmp_path, n=3)
    ds = D.load_dataset(path, D.conversation_sample, tok, SPEC)  # headers are fine now
    png = tmp_path / "imgs" / "retina.png"
    png.write_bytes(png.read_bytes()[:200])  # then the file is cut short
    dl = DataLoader(ds, seq_len=256, global_batch_size=3, micro_batch_size=3, image_size=28)
    with pytest.raises(D.DataError, match=r"conv\.jsonl:1: cannot decode image .*retina\.png"):
        dl.next_batch()
    dl.close()
    with pytest.raises(D.DataError, match=r"conv\.jsonl:1: cannot read image"):  # verify=True finds it at load time
        D.load_dataset(path, D.conversation_sample, tok, D.ImageTokens(image_size=28, tokens_per_tile=4, verify=True))


def test_geometry_and_drop_report(tok, tmp_path):
    ds = D.load_dataset(stage3_file(tmp_path), D.conversation_sample, tok, SPEC)
    with pytest.raises(ValueError, match="multiple of world_size 2 x micro_batch_size 3"):
        DataLoader(ds, seq_len=256, global_batch_size=4, micro_batch_size=3, world_size=2)
    longest = max(len(s.ids) for s in ds.samples)
    dl = DataLoader(ds, seq_len=longest - 1, global_batch_size=1, micro_batch_size=1, image_size=28)
    assert dl.report.truncated + dl.report.dropped >= 1 and ds.report.truncated == ds.report.dropped == 0
    assert all(len(s.ids) <= longest - 1 for s in dl.samples if s is not None)
