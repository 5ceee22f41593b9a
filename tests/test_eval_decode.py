"""eval.py's decoding driver on tiny random checkpoints written with save_pretrained: harmony prompts (against
openai-harmony), batch-size invariance, greedy predictions against a cache-free argmax loop, text-only GPT,
resume after an interruption, and torchrun sharding."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import eval as ev
import model as M
import vision as V
from data import tokenizer as T
from test_tokenizer import harmony_enc, ranks_dirs  # noqa: F401  (session fixtures: the offline oracle)

FIXTURES = Path(__file__).parent / "fixtures" / "eval"
REPO = Path(__file__).resolve().parent.parent
TEXT_BENCHES = "medqa,medmcqa,pubmedqa,medbullets,medxpertqa_text"
IMAGE_BENCHES = "slake,mmmu_med,medframeqa,pmc_vqa,medqa,mimic_cxr_findings"   # 1 to 4 images per item, and text-only


def tiny_text_config():
    # the full o200k_harmony vocabulary (prompts are real harmony tokens), everything else tiny
    return M.GPTConfig.preset("tiny", hidden_size=32, intermediate_size=32, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=8, sliding_window=8)


def randomize_(module, seed):
    """Random biases, sinks and norms too (init makes them constants), so every parameter matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith(("bias", "sinks", "norm.weight", "layer_norm1.weight", "layer_norm2.weight")):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.fixture(scope="module")
def medgpt_dir(tmp_path_factory):
    torch.manual_seed(0)
    vision = V.CLIPVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                image_size=56, patch_size=14)   # 56 px tiles: 16 image tokens per tile
    model = M.MedGPT(M.MedGPTConfig(text=tiny_text_config(), vision=vision)).float()
    randomize_(model, 1)
    path = tmp_path_factory.mktemp("tiny_medgpt")
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def gpt_dir(tmp_path_factory):
    torch.manual_seed(2)
    model = M.GPT(tiny_text_config()).float()
    randomize_(model, 3)
    path = tmp_path_factory.mktemp("tiny_gpt")
    model.save_pretrained(path)
    return path


def run_eval(model_dir, benches, out_dir, *extra):
    ev.main(["--model", str(model_dir), "--bench", benches, "--data_dir", str(FIXTURES), "--out_dir", str(out_dir),
             "--dtype", "float32", *extra])
    return [json.loads(line) for line in (Path(out_dir) / "items.jsonl").read_text().splitlines()]


def test_prompt_ids_equal_openai_harmony(harmony_enc):
    """Our prompt + the model's answer + <|return|> is exactly harmony's rendering of that conversation."""
    from openai_harmony import Conversation, Message, Role
    tok = ev.load_tokenizer_for(FIXTURES)
    encoder = ev.Encoder(tok)
    for bench in ("medqa", "pubmedqa"):
        item = ev.load_items(FIXTURES, bench)[0]
        prompt = encoder.prompt_ids(item)
        answer = "B. Axillary"
        conversation = Conversation.from_messages([
            Message.from_role_and_content(Role.USER, ev.build_prompt(item)),
            Message.from_role_and_content(Role.ASSISTANT, answer).with_channel("final")])
        want = harmony_enc.render_conversation_for_training(conversation)
        assert prompt + T.encode_ordinary(tok, answer) + [T.RETURN] == want
        assert ev.final_channel_text(tok, want[len(prompt):]) == answer


def test_image_prompt_holds_one_run_per_tile(medgpt_dir):
    model, _ = ev.load_model(medgpt_dir, torch.float32, "cpu")
    encoder = ev.Encoder(ev.load_tokenizer_for(FIXTURES), model, is_multimodal=True)
    item = ev.load_items(FIXTURES, "medframeqa")[0]
    ids = encoder.prompt_ids(item)
    assert ids.count(model.image_token_id) == 4 * model.tokens_per_tile == 64
    assert encoder.pixel_values(item).shape == (4, 3, 56, 56)
    tiled = ev.Encoder(ev.load_tokenizer_for(FIXTURES), model, is_multimodal=True, max_tiles=4)
    wide = ev.load_items(FIXTURES, "pmc_vqa")[0]   # 64 x 40 px: more than one tile, plus a thumbnail
    n_tiles = tiled.pixel_values(wide).shape[0]
    assert n_tiles == V.num_tiles(64, 40, 4, 56) > 1
    assert tiled.prompt_ids(wide).count(model.image_token_id) == n_tiles * 16


@pytest.fixture(scope="module")
def image_runs(medgpt_dir, tmp_path_factory):
    """The image benchmarks' fixtures decoded at batch size 1 and at batch size 8 (11 items: two batches)."""
    out = tmp_path_factory.mktemp("image_runs")
    one = run_eval(medgpt_dir, IMAGE_BENCHES, out / "b1", "--batch_size", "1", "--max_new_tokens", "6")
    eight = run_eval(medgpt_dir, IMAGE_BENCHES, out / "b8", "--batch_size", "8", "--max_new_tokens", "6")
    return one, eight, out


def test_batch_size_does_not_change_predictions(image_runs):
    one, eight, out = image_runs
    assert len(one) == 11
    assert [r["prediction"] for r in one] == [r["prediction"] for r in eight]
    assert [r["id"] for r in one] == [r["id"] for r in eight]
    assert sum(bool(r["prediction"]) for r in one) >= 9   # a random model still says something
    assert json.loads((out / "b1" / "results.json").read_text())["benchmarks"].keys() == \
        {"slake", "mmmu_med", "medframeqa", "pmc_vqa", "medqa", "mimic_cxr_findings"}


def greedy_without_cache(model, ids, pixels, n):
    """Reference decoding: a full forward pass per new token, argmax, stop at <|return|>/<|end|>."""
    seq = torch.tensor([ids])
    new = []
    with torch.no_grad():
        for _ in range(n):
            next_token = int(model(seq, pixels)[0][0, -1].argmax())
            new.append(next_token)
            if next_token in (T.RETURN, T.END, T.CALL):
                break
            seq = torch.cat([seq, torch.tensor([[next_token]])], dim=1)
    return new


def test_predictions_equal_cache_free_greedy_decoding(medgpt_dir, image_runs):
    """Batched, left-padded, KV-cached decoding at batch 8 = a plain argmax loop over full forward passes."""
    records = [r for r in image_runs[1] if r["benchmark"] in ("medframeqa", "medqa") or r["id"] == "slake-00001"]
    model, _ = ev.load_model(medgpt_dir, torch.float32, "cpu")
    tok = ev.load_tokenizer_for(FIXTURES)
    encoder = ev.Encoder(tok, model, is_multimodal=True)
    items = {i["id"]: i for b in ("medframeqa", "slake", "medqa") for i in ev.load_items(FIXTURES, b)}
    assert len(records) == 4
    for record in records:
        item = items[record["id"]]
        new = greedy_without_cache(model, encoder.prompt_ids(item), encoder.pixel_values(item), 6)
        assert record["prediction"] == ev.final_channel_text(tok, new), record["id"]


def test_text_only_gpt_checkpoint(gpt_dir, tmp_path):
    records = run_eval(gpt_dir, TEXT_BENCHES, tmp_path / "out", "--max_new_tokens", "4")
    assert [r["benchmark"] for r in records] == TEXT_BENCHES.split(",")
    model, is_multimodal = ev.load_model(gpt_dir, torch.float32, "cpu")
    assert not is_multimodal
    tok = ev.load_tokenizer_for(FIXTURES)
    item = ev.load_items(FIXTURES, "medqa")[0]
    prompt = ev.Encoder(tok).prompt_ids(item)
    new = []
    with torch.no_grad():
        for _ in range(4):
            new.append(int(model(torch.tensor([prompt + new]))[0][0, -1].argmax()))
    assert records[0]["prediction"] == ev.final_channel_text(tok, new)
    with pytest.raises(ValueError, match="has images but the model is text-only"):
        run_eval(gpt_dir, "slake", tmp_path / "img")


def test_interrupted_run_resumes_without_redoing_items(gpt_dir, tmp_path, monkeypatch):
    full = run_eval(gpt_dir, TEXT_BENCHES, tmp_path / "full", "--batch_size", "1", "--max_new_tokens", "4")
    real_generate, calls = ev.generate_batch, []

    def failing_after_two(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated interruption")
        calls.append(1)
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(ev, "generate_batch", failing_after_two)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        run_eval(gpt_dir, TEXT_BENCHES, out, "--batch_size", "1", "--max_new_tokens", "4")
    assert len((out / "progress" / "rank0.jsonl").read_text().splitlines()) == 2
    assert not (out / "items.jsonl").exists()

    resumed_calls = []
    monkeypatch.setattr(ev, "generate_batch", lambda *a, **k: resumed_calls.append(1) or real_generate(*a, **k))
    resumed = run_eval(gpt_dir, TEXT_BENCHES, out, "--batch_size", "1", "--max_new_tokens", "4")
    assert len(resumed_calls) == 3                      # only the three unfinished items were decoded
    assert resumed == full
    assert not list((out / "progress").glob("*.jsonl"))
    resumed_calls.clear()
    assert run_eval(gpt_dir, TEXT_BENCHES, out, "--max_new_tokens", "4") == full and not resumed_calls

    with pytest.raises(SystemExit, match="other settings"):   # resuming with other decoding settings is refused
        run_eval(gpt_dir, TEXT_BENCHES, out, "--max_new_tokens", "8")


def test_later_runs_keep_earlier_benchmarks(gpt_dir, tmp_path):
    run_eval(gpt_dir, "medqa", tmp_path, "--max_new_tokens", "4")
    records = run_eval(gpt_dir, "medmcqa", tmp_path, "--max_new_tokens", "4")
    assert [r["benchmark"] for r in records] == ["medmcqa", "medqa"]
    assert set(json.loads((tmp_path / "results.json").read_text())["benchmarks"]) == {"medqa", "medmcqa"}


def test_final_channel_text_with_reasoning():
    tok = ev.load_tokenizer_for(FIXTURES)
    enc = lambda text: T.encode_ordinary(tok, text)  # noqa: E731
    analysis = [T.CHANNEL] + enc("analysis") + [T.MESSAGE] + enc("The angle is blunted.") + [T.END]
    final = [T.START] + enc("assistant") + [T.CHANNEL] + enc("final") + [T.MESSAGE] + enc(" B ") + [T.RETURN]
    assert ev.final_channel_text(tok, analysis + final, reasoning=True) == "B"
    assert ev.final_channel_text(tok, analysis, reasoning=True) == ""          # never reached the final channel
    assert ev.final_channel_text(tok, analysis + final[:-1], reasoning=True) == "B"   # ran out of tokens
    assert ev.final_channel_text(tok, enc("Liver") + [T.END] + enc("junk")) == "Liver"
    assert ev.final_channel_text(tok, enc("Liver")) == "Liver"


@pytest.mark.slow
def test_torchrun_two_ranks_equal_one_process(gpt_dir, tmp_path):
    single = run_eval(gpt_dir, TEXT_BENCHES, tmp_path / "one", "--max_new_tokens", "4")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
           str(REPO / "eval.py"), "--model", str(gpt_dir), "--bench", TEXT_BENCHES, "--data_dir", str(FIXTURES),
           "--out_dir", str(tmp_path / "two"), "--dtype", "float32", "--max_new_tokens", "4", "--batch_size", "2"]
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank 1/2" in done.stderr and "rank 0/2" in done.stderr
    two = [json.loads(line) for line in (tmp_path / "two" / "items.jsonl").read_text().splitlines()]
    assert two == single
