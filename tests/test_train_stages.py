"""The three stage scripts as a user runs them (subprocesses, `python` and 2 processes on gloo), on a small data set
written here, with the tiny preset (the real 201088-token vocabulary and o200k_harmony tokenizer)."""
import glob
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run_script(script, *args, timeout=600):
    out = subprocess.run([sys.executable, os.path.join(ROOT, script), "--preset=tiny", *args], cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{script} {args} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_ranks(script, args, world_size=2):
    """What torchrun does, by hand, so the test knows each rank's pid (to SIGKILL one)."""
    port = free_port()
    procs = []
    for rank in range(world_size):
        env = {**ENV, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
               "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, os.path.join(ROOT, script), "--preset=tiny", *args], cwd=ROOT,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def wait_all(procs, timeout=600):
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, f"rank failed:\n{out[-4000:]}"
    return outputs[0]


def final_weights(out_dir):
    weights = {}
    for f in sorted(glob.glob(os.path.join(out_dir, "final", "*.safetensors"))):
        weights.update(load_file(f))
    assert weights, f"no final weights in {out_dir}/final"
    return weights


def metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# ----------------------------------------------------------------------------------------------------------
# a small data set for all three stages: two kinds of images (bright disc / dark stripes), captions that say which


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage_data")
    os.makedirs(root / "imgs")
    rng = np.random.default_rng(0)
    kinds = {"disc": "A bright disc on a dark background.", "stripes": "Dark stripes on a grey field."}
    records = []
    for i in range(8):
        kind = "disc" if i % 2 == 0 else "stripes"
        y, x = np.mgrid[:48, :48]
        if kind == "disc":
            pixels = 255.0 * (((y - 24) ** 2 + (x - 24) ** 2) < 150 + 20 * i)
        else:
            pixels = 128.0 + 100.0 * np.sin(x / (2 + i % 3))
        pixels = np.clip(pixels + rng.normal(0, 10, pixels.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).convert("RGB").save(root / "imgs" / f"{i}.png")
        records.append((f"imgs/{i}.png", kind, kinds[kind]))

    def write(name, rows):
        with open(root / name, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)

    write("captions.jsonl", [{"image": p, "caption": c} for p, _, c in records])
    write("text.jsonl", [{"text": f"The {k} pattern was seen in sample {i}. " * 3} for i, (_, k, _) in enumerate(records)])
    write("interleaved.jsonl", [{"content": [{"type": "text", "text": "Figure:"}, {"type": "image", "image": p},
                                             {"type": "text", "text": c}]} for p, _, c in records])
    write("conversations.jsonl", [{"id": str(i), "image": p, "conversations": [
        {"from": "human", "value": "<image>\nWhat pattern is shown?"}, {"from": "gpt", "value": k}]}
        for i, (p, k, _) in enumerate(records)] + [{"id": "t", "conversations": [
            {"from": "human", "value": "Name a pattern."}, {"from": "gpt", "value": "stripes"}]}])
    with open(root / "stage2.json", "w") as f:
        json.dump({"datasets": [{"path": "interleaved.jsonl", "weight": 1.0}, {"path": "text.jsonl", "weight": 1.0}]}, f)
    return root


@pytest.fixture(scope="module")
def stage1_model(tmp_path_factory):
    """A random tiny MedGPT in LLaVA format: the starting point of the stage-2 tests."""
    import training
    from model import MedGPT
    path = tmp_path_factory.mktemp("init") / "llava"
    torch.manual_seed(0)
    MedGPT(training.arch_config("tiny")).save_pretrained(str(path))
    return str(path)


# ----------------------------------------------------------------------------------------------------------


def test_dry_run_of_the_20b_recipe_matches_transformers_counts():
    """Counts from our meta-device plan against transformers' own modules built on the meta device."""
    import transformers
    plan = json.loads(run_script("train_stage2.py", "--preset=medgpt-20b", "--dry_run").strip().splitlines()[-1])
    with torch.device("meta"):
        lm = transformers.GptOssForCausalLM(transformers.GptOssConfig(num_hidden_layers=24, num_local_experts=32))  # 20b
        clip = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
            hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=336,
            patch_size=14, projection_dim=768))
    assert plan["lm_params_total"] == sum(p.numel() for p in lm.parameters())
    assert plan["vision_params"] == sum(p.numel() for p in clip.parameters())
    assert round(plan["lm_params_total"] / 1e9, 2) == 20.91
    assert round(plan["lm_params_active"] / 1e9, 2) == 3.61
    assert round(plan["vision_params"] / 1e6, 1) == 303.5
    assert plan["world_size"] == 8 and plan["seq_len"] == 131072
    assert 0 < plan["per_gpu_gib"] < 180  # one B200
    # stage 1 plans only the projector's optimizer state
    plan1 = json.loads(run_script("train_stage1.py", "--preset=medgpt-20b", "--dry_run").strip().splitlines()[-1])
    assert plan1["trainable_params"] == plan1["projector_params"] and plan1["seq_len"] == 4096


@pytest.mark.slow
def test_three_stages_chain_and_loss_falls(data_dir, tmp_path):
    """Stage 1 from scratch -> 2 -> 3, each from the previous final/; the loss falls in each; the final model
    is LLaVA format that transformers reads with our logits."""
    out = str(tmp_path)
    common = ["--log_every=1", "--seq_len_schedule=", "--seq_len=256"]
    run_script("train_stage1.py", f"--data={data_dir}/captions.jsonl", f"--out_dir={out}/s1", "--max_steps=8",
               "--global_batch=4", "--micro_batch=2", "--lr=1e-2", *common)
    run_script("train_stage2.py", f"--data={data_dir}/stage2.json", f"--init_from={out}/s1/final",
               f"--out_dir={out}/s2", "--max_steps=8", "--global_batch=2", "--lr=3e-3", *common)
    run_script("train_stage3.py", f"--data={data_dir}/conversations.jsonl", f"--init_from={out}/s2/final",
               f"--out_dir={out}/s3", "--max_steps=8", "--global_batch=4", "--micro_batch=2", "--lr=3e-3", *common)
    for stage in ("s1", "s2", "s3"):
        losses = [m["loss"] for m in metrics(f"{out}/{stage}")]
        assert len(losses) == 8 and all(np.isfinite(losses))
        assert np.mean(losses[-2:]) < np.mean(losses[:2]) - 0.05, (stage, losses)
    # stage 1 trained the projector only
    s1, init = final_weights(f"{out}/s1"), final_weights(f"{out}/s2")
    assert not torch.equal(s1["multi_modal_projector.linear_1.weight"], init["multi_modal_projector.linear_1.weight"])

    import transformers
    from model import MedGPT
    ours = MedGPT.from_pretrained(f"{out}/s3/final", dtype=torch.float32)
    ref = transformers.LlavaForConditionalGeneration.from_pretrained(f"{out}/s3/final", attn_implementation="eager",
                                                                     dtype=torch.float32).eval()
    ids = torch.tensor([[200006, 1825, 200008] + [ours.image_token_id] * ours.tokens_per_tile + [3086, 200007]])
    pixels = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        logits, _ = ours(ids, pixels)
        expected = ref(input_ids=ids, pixel_values=pixels).logits
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    assert os.path.isfile(f"{out}/s3/final/tokenizer.json")


@pytest.fixture(scope="module")
def stage2_runs(data_dir, stage1_model, tmp_path_factory):
    """Stage 2 tiny, fp32, 4 steps of 4 rows of 128 tokens: on 1 process, on 2 processes, and on 2 processes with
    rank 1 SIGKILLed right after the step-2 checkpoint and then resumed."""
    root = tmp_path_factory.mktemp("stage2")
    args = [f"--data={data_dir}/stage2.json", f"--init_from={stage1_model}", "--max_steps=4", "--global_batch=4",
            "--micro_batch=1", "--seq_len=128", "--seq_len_schedule=", "--dtype=float32", "--lr=3e-3",
            "--log_every=1", "--adam_eps=1e-6"]
    run_script("train_stage2.py", *args, f"--out_dir={root}/one")
    wait_all(launch_ranks("train_stage2.py", args + [f"--out_dir={root}/two", "--ckpt_every=2"]))

    killed = f"{root}/killed"
    procs = launch_ranks("train_stage2.py", args + [f"--out_dir={killed}", "--ckpt_every=2"])
    deadline = time.time() + 600
    while not os.path.exists(f"{killed}/ckpt/latest"):
        assert time.time() < deadline and all(p.poll() is None for p in procs), "no checkpoint was written"
        time.sleep(0.05)
    procs[1].kill()  # SIGKILL: no clean-up, no final save
    procs[0].kill()  # what torchrun does to the survivors when one rank dies
    for p in procs:
        p.communicate()
    assert not os.path.exists(f"{killed}/final")
    wait_all(launch_ranks("train_stage2.py", args + [f"--out_dir={killed}", "--ckpt_every=2", "--resume"]))
    return root


@pytest.mark.slow
def test_stage2_same_weights_on_1_and_2_processes(stage2_runs):
    one, two = final_weights(f"{stage2_runs}/one"), final_weights(f"{stage2_runs}/two")
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-6,
                                   msg=lambda m, name=name: f"{name}: {m}")
    assert [m["loss"] for m in metrics(f"{stage2_runs}/one")] == pytest.approx(
        [m["loss"] for m in metrics(f"{stage2_runs}/two")], rel=1e-5)


@pytest.mark.slow
def test_sigkill_after_checkpoint_then_resume_gives_the_same_weights(stage2_runs):
    two, resumed = final_weights(f"{stage2_runs}/two"), final_weights(f"{stage2_runs}/killed")
    for name in two:
        assert torch.equal(resumed[name], two[name]), name  # same world size: bit for bit
    steps = [m["step"] for m in metrics(f"{stage2_runs}/killed")]
    assert steps[-1] == 4 and 3 in steps  # the resumed run logged the steps after the checkpoint
