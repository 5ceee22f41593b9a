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
@pytest.mark.parametrize("arch, family", [("tiny-siglip", "siglip_vision_model"),
                                          ("tiny-biomedclip", "open_clip_vision")])
def test_stage1_vision_ablation_runs_end_to_end(data_dir, tmp_path, arch, family):
    """The tiny demo's stage 1 with another vision family (random weights): trains, saves LLaVA format with that
    tower and its preprocessing, and loads back with the same logits."""
    import model as M
    import training
    out = str(tmp_path)
    run_script("train_stage1.py", f"--arch={arch}", f"--data={data_dir}/captions.jsonl", f"--out_dir={out}",
               "--max_steps=4", "--global_batch=4", "--micro_batch=2", "--lr=1e-2", "--log_every=1", "--seq_len=256")
    losses = [m["loss"] for m in metrics(out)]
    assert len(losses) == 4 and all(np.isfinite(losses)), losses
    config = json.loads(open(f"{out}/final/config.json").read())
    assert config["vision_config"]["model_type"] == family
    loaded = M.MedGPT.from_pretrained(f"{out}/final", dtype=torch.float32)
    want = training.arch_config(arch)
    assert loaded.config.vision == want.vision and loaded.config.preprocessing == want.preprocessing
    assert loaded.tokens_per_tile == want.tokens_per_tile == {"tiny-siglip": 64, "tiny-biomedclip": 196}[arch]
    assert os.path.isfile(f"{out}/final/preprocessor_config.json") == (arch == "tiny-siglip")


@pytest.mark.slow
def test_three_stages_chain_and_loss_falls(data_dir, tmp_path):
    """Stage 1 from scratch -> 2 -> 3, each from the previous final/; the loss falls in each; the final model
    is LLaVA format that transformers reads with our logits."""
    out = str(tmp_path)
    common = ["--log_every=1", "--seq_len=256"]
    run_script("train_stage1.py", f"--data={data_dir}/captions.jsonl", f"--out_dir={out}/s1", "--max_steps=8",
               "--global_batch=4", "--micro_batch=2", "--lr=1e-2", *common)
    run_script("train_stage2.py", f"--data={data_dir}/stage2.json", f"--init_from={out}/s1/final",
               f"--out_dir={out}/s2", "--max_steps=8", "--global_batch=2", "--lr=3e-3", "--seq_len_schedule=", *common)
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


# ----------------------------------------------------------------------------------------------------------
# Sharded initialisation: the model on the meta device, each rank reading only its ZeRO-3 shard of the checkpoint
# (train_stage1.build_model, training.start_from_llava), against the whole-model load every rank did before
# (--sharded_init=false)

INIT_WORKER = os.path.join(ROOT, "tests", "init_worker.py")
sys.path.insert(0, os.path.join(ROOT, "tests"))


def tiny_gpt_oss_config(vocab_size=201088):
    """Stage 1 from parts needs the real vocabulary: the image token is 200017 of o200k_harmony. Hidden 64 and
    intermediate 32: multiples of MXFP4's groups of 32."""
    import transformers
    return transformers.GptOssConfig(hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, head_dim=16, vocab_size=vocab_size, num_local_experts=4,
                                     num_experts_per_tok=2, sliding_window=8, pad_token_id=0, eos_token_id=1,
                                     bos_token_id=None)


TINY_CLIP = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, image_size=56,
                 patch_size=14)


def randomise(module, seed):
    """transformers initialises biases, sinks and norms to constants: random values make every tensor count."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return module


def to_mxfp4(src, dst, seed=0):
    """A dense gpt-oss directory rewritten in the released format (test_model.write_mxfp4_checkpoint: experts as
    random MXFP4 blocks/scales, everything else bf16). Returns {expert name: transformers' dequantised
    (E, in, out)}, the reference values."""
    from test_model import write_mxfp4_checkpoint
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors
    write_mxfp4_checkpoint(src, dst, seed)
    tensors = load_file(os.path.join(dst, "model.safetensors"))
    return {name.removesuffix("_blocks"): convert_moe_packed_tensors(  # (E, in, out)
        tensors[name], tensors[name.removesuffix("_blocks") + "_scales"], dtype=torch.float32)
        for name in tensors if name.endswith("_blocks")}


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """Released-format parts written by transformers: a dense and an MXFP4 gpt-oss directory; CLIP as a CLIPModel
    (safetensors and pytorch_model.bin) and as a CLIPVisionModel; SigLIP as a full SiglipModel (google's release
    layout); BiomedCLIP's open_clip layout (open_clip_config.json + open_clip_pytorch_model.bin); a LLaVA directory
    written by transformers."""
    import transformers
    root = tmp_path_factory.mktemp("parts")
    torch.manual_seed(0)
    lm = randomise(transformers.GptOssForCausalLM(tiny_gpt_oss_config()), 1)
    lm.save_pretrained(root / "lm")
    mxfp4 = to_mxfp4(str(root / "lm"), str(root / "lm_mxfp4"))
    clip = randomise(transformers.CLIPModel(transformers.CLIPConfig(
        vision_config=TINY_CLIP, text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                  num_attention_heads=4, vocab_size=99, bos_token_id=0, eos_token_id=1,
                                                  pad_token_id=1))), 2)
    clip.save_pretrained(root / "clip")
    os.makedirs(root / "clip_bin")
    torch.save(clip.state_dict(), root / "clip_bin" / "pytorch_model.bin")
    clip.config.to_json_file(root / "clip_bin" / "config.json")
    tower = randomise(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**TINY_CLIP)), 3)
    tower.save_pretrained(root / "clip_vision")
    llava_config = transformers.LlavaConfig(vision_config=transformers.CLIPVisionConfig(**TINY_CLIP),
                                            text_config=tiny_gpt_oss_config(vocab_size=128), image_token_index=120)
    llava = randomise(transformers.LlavaForConditionalGeneration(llava_config), 4)
    llava.save_pretrained(root / "llava")
    siglip = randomise(transformers.SiglipModel(transformers.SiglipConfig(
        vision_config=TINY_CLIP, text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                  num_attention_heads=4, vocab_size=99, pad_token_id=1,
                                                  bos_token_id=None, eos_token_id=1))), 5)
    siglip.save_pretrained(root / "siglip")
    import vision
    from test_vision_families import write_open_clip_dir
    open_clip_config = {"model_cfg": {"embed_dim": 32, "vision_cfg": {"timm_model_name": "vit_tiny_patch16_224",
                                                                      "timm_pool": "", "timm_proj": "linear"}}}
    torch.manual_seed(6)
    with torch.device("meta"):
        shapes = vision.OpenCLIPVision(vision.OpenCLIPVisionConfig.from_hf(open_clip_config)).state_dict()
    biomedclip = {name: torch.randn(t.shape) * 0.05 for name, t in shapes.items()}
    write_open_clip_dir(root / "biomedclip", open_clip_config, biomedclip, torch_file=True)
    return {"root": root, "lm": lm, "mxfp4": mxfp4, "clip": clip, "tower": tower, "llava": llava,
            "siglip": siglip.vision_model.state_dict(), "biomedclip": biomedclip}


def init_case(name, stage, parts_root=None, lm=None, clip=None, init_from="parts", dtype="float32"):
    case = {"name": name, "stage": stage, "init_from": init_from, "dtype": dtype}
    if lm:
        case.update(lm_path=str(parts_root / lm), vision_path=str(parts_root / clip))
    return case


def built_params(case):
    """{name: tensor} of a case built whole and on the meta device, each consolidated from ZeRO3 (1 process)."""
    import init_worker
    import zero
    run = training_run()
    out = {}
    for sharded in (False, True):
        cfg = init_worker.case_config(case)
        import dataclasses
        model, engine, info = init_worker.build(dataclasses.replace(cfg, sharded_init=sharded), case["stage"], run)
        assert info["meta"] == sharded
        out[sharded] = ({n: t.clone() for n, t in zero.iter_full_params(engine)}, info, model)
    return out


def training_run():
    import training
    return training.Run(rank=0, world_size=1, device=torch.device("cpu"), dtype=torch.float32)


@pytest.mark.parametrize("lm, clip", [("lm", "clip"), ("lm_mxfp4", "clip_vision"), ("lm", "clip_bin"),
                                     ("lm", "siglip"), ("lm_mxfp4", "biomedclip")])
def test_stage1_sharded_init_equals_from_parts_and_transformers(parts, lm, clip):
    built = built_params(init_case("s1", 1, parts["root"], lm, clip))
    (whole, whole_info, _), (sharded, sharded_info, model) = built[False], built[True]
    assert whole.keys() == sharded.keys()
    for name in whole:
        assert torch.equal(sharded[name], whole[name]), name
    for key in ("flops", "config", "inv_freq", "attention_factor"):  # what __init__ and flops_model compute
        assert sharded_info[key] == whole_info[key], key
    # against transformers' own tensors: the language model (dense, or as transformers dequantises MXFP4), CLIP
    for name, tensor in parts["lm"].state_dict().items():
        want = parts["mxfp4"].get(name, tensor) if lm == "lm_mxfp4" else tensor
        want = want if name in parts["mxfp4"] or lm == "lm" else want.to(torch.bfloat16).float()
        assert torch.equal(sharded["language_model." + name], want), name
    towers = {"clip_vision": parts["tower"].state_dict(), "siglip": parts["siglip"],
              "biomedclip": parts["biomedclip"]}  # transformers 5's CLIPVisionModel: no prefix
    tower = towers.get(clip, parts["clip"].vision_model.state_dict())
    assert {n.removeprefix("vision_tower.") for n in sharded if n.startswith("vision_tower.")} == set(tower)
    for name, tensor in tower.items():
        assert torch.equal(sharded["vision_tower." + name], tensor), name


def test_stage2_sharded_init_equals_from_pretrained(parts, stage1_model):
    """A LLaVA directory in llava-hf's layout (ours) and in transformers 5's (transformers' save_pretrained)."""
    for path, reference in ((stage1_model, None), (str(parts["root"] / "llava"), parts["llava"])):
        built = built_params(init_case("s2", 2, init_from=path))
        whole, sharded = built[False][0], built[True][0]
        assert whole.keys() == sharded.keys()
        for name in whole:
            assert torch.equal(sharded[name], whole[name]), name
        if reference is not None:  # transformers' module names (test_medgpt checks this table against them)
            from checkpoint import to_checkpoint_name
            state = reference.state_dict()
            assert len(state) == len(sharded)
            for name, tensor in sharded.items():
                assert torch.equal(tensor, state[to_checkpoint_name(name, "transformers-5-module")]), name


def edited_copy(src, dst, edit):
    """A copy of checkpoint directory src whose tensors are edit(dict) (config.json and the rest unchanged)."""
    import shutil
    from safetensors.torch import save_file
    shutil.copytree(src, dst)
    tensors = load_file(os.path.join(dst, "model.safetensors"))
    edit(tensors)
    save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    return str(dst)


def test_sharded_init_errors_name_the_file_and_tensor(parts, stage1_model, tmp_path):
    import train_stage1
    import training
    from train_stage1 import Stage1Config
    cfg = Stage1Config(init_from="parts", lm_path=str(parts["root"] / "lm_mxfp4"),
                       vision_path=str(parts["root"] / "clip"))
    key = "language_model.model.layers.1.self_attn.sinks"
    missing = edited_copy(stage1_model, tmp_path / "missing", lambda t: t.pop(key))
    with pytest.raises(ValueError, match=rf"{missing}: .*missing tensors \['{key}'\]"):
        training.start_from_llava(training.TrainConfig(init_from=missing))
    wrong = edited_copy(stage1_model, tmp_path / "wrong", lambda t: t.update({key: torch.zeros(5)}))
    with pytest.raises(ValueError, match=rf"{wrong}/model.safetensors: tensor {key} is F32 \(5,\), expected "
                                         rf"F32/BF16/F16/F64 \(4,\)"):
        training.start_from_llava(training.TrainConfig(init_from=wrong))
    extra = edited_copy(stage1_model, tmp_path / "extra",
                        lambda t: t.update({"language_model.model.layers.7.x": torch.zeros(4)}))
    with pytest.raises(ValueError, match=r"unexpected tensors \['language_model.model.layers.7.x'\]"):
        training.start_from_llava(training.TrainConfig(init_from=extra))
    # MXFP4: scales of the wrong shape; CLIP: a vision tensor missing
    scales = "model.layers.0.mlp.experts.down_proj_scales"
    bad_lm = edited_copy(cfg.lm_path, tmp_path / "bad_lm", lambda t: t.update({scales: t[scales][:-1].clone()}))
    with pytest.raises(ValueError, match=rf"{bad_lm}/model.safetensors: tensor {scales} is U8 \(3, 64, 1\), "
                                         rf"expected U8 \(4, 64, 1\)"):
        train_stage1.build_model(Stage1Config(init_from="parts", lm_path=bad_lm, vision_path=cfg.vision_path))
    fc = "vision_model.encoder.layers.0.mlp.fc2.bias"
    bad_clip = edited_copy(cfg.vision_path, tmp_path / "bad_clip", lambda t: t.pop(fc))
    with pytest.raises(ValueError, match=rf"{bad_clip}: .*missing tensors \['{fc}'\]"):
        train_stage1.build_model(Stage1Config(init_from="parts", lm_path=cfg.lm_path, vision_path=bad_clip))
    # fsdp2 is a reference path: the whole model, and no meta-device start
    model, load = training.start_from_llava(training.TrainConfig(init_from=stage1_model, sharding="fsdp2"))
    assert load is None and not any(p.is_meta for p in model.parameters())
    meta, load = training.start_from_llava(training.TrainConfig(init_from=stage1_model))
    with pytest.raises(ValueError, match="sharded meta-device start is ZeRO3's"):
        training.build_engine(training.TrainConfig(sharding="fsdp2"), meta, training_run(), load)


def test_meta_model_materialises_what_init_computes(monkeypatch):
    import model as M
    import training
    config = training.arch_config("tiny")
    meta = training.meta_model(config)
    torch.manual_seed(0)
    real = M.MedGPT(config)
    assert torch.equal(meta.language_model._inv_freq, real.language_model._inv_freq)
    assert meta.language_model.attention_factor == real.language_model.attention_factor
    assert not any(b.is_meta for b in meta.buffers())

    class WithBuffer(M.MedGPT):
        def __init__(self, config):
            super().__init__(config)
            self.multi_modal_projector.register_buffer("scale", torch.ones(3))
    monkeypatch.setattr(training, "MedGPT", WithBuffer)  # what meta_model builds
    with pytest.raises(ValueError, match="multi_modal_projector.scale is on the meta device"):
        training.meta_model(config)


def test_clip_config_without_weights_equals_the_loaders(parts):
    import model as M
    import vision
    for name in ("clip", "clip_bin", "clip_vision", "llava", "siglip", "biomedclip"):
        path = str(parts["root"] / name)
        assert vision.read_vision_config(path)[0] == vision.load_tower(path).config, name


def launch_worker(mode, cases, out, tag, nproc=2, **extra):
    args = [INIT_WORKER, "--mode", mode, "--cases", json.dumps(cases), "--out", str(out), "--tag", tag,
            *[f"--{k}={v}" for k, v in extra.items()]]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(free_port()), *args]
    res = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}"


@pytest.mark.slow
def test_sharded_init_on_two_processes_equals_whole_load(parts, stage1_model, tmp_path):
    """2 processes (gloo): for stage 1 from parts (dense LM + CLIPModel, fp32; MXFP4 LM + CLIPVisionModel, bf16
    compute) and stage 2 from a LLaVA directory, the meta-device start gives the same parameters, the same first
    losses and gradient norms, and the same parameters after two steps as the whole-model load."""
    root = parts["root"]
    cases = [init_case("dense", 1, root, "lm", "clip"), init_case("mxfp4", 1, root, "lm_mxfp4", "clip_vision",
                                                                  dtype="bfloat16"),
             init_case("llava", 2, init_from=stage1_model)]
    launch_worker("compare", cases, tmp_path, "cmp")
    with open(tmp_path / "cmp.json") as f:
        info = json.load(f)
    tensors = load_file(str(tmp_path / "cmp.safetensors"))
    for case in cases:
        whole, sharded = info[f"{case['name']}.whole"], info[f"{case['name']}.sharded"]
        assert not whole["meta"] and sharded["meta"]
        for key in ("losses", "grad_norms", "flops", "config", "inv_freq", "attention_factor"):
            assert sharded[key] == whole[key], (case["name"], key)
        assert whole["losses"][1]["ce"] != whole["losses"][0]["ce"]  # the step changed something
        names = [n.split(".", 3)[3] for n in tensors if n.startswith(f"{case['name']}.whole.init.")]
        assert len(names) > 50
        for when in ("init", "trained"):
            for n in names:
                assert torch.equal(tensors[f"{case['name']}.sharded.{when}.{n}"],
                                   tensors[f"{case['name']}.whole.{when}.{n}"]), (case["name"], when, n)


@pytest.mark.slow
def test_stage1_script_starts_sharded_from_mxfp4_parts(parts, data_dir, tmp_path):
    """train_stage1.py --init_from=parts on 2 processes (the default, sharded start), no steps: its final model is
    MedGPT.from_parts' whole-model load, bit for bit (losses: test_sharded_init_on_two_processes_...)."""
    from model import MedGPT
    lm_path, clip_path = f"{parts['root']}/lm_mxfp4", f"{parts['root']}/clip"
    wait_all(launch_ranks("train_stage1.py", [f"--data={data_dir}/captions.jsonl", "--init_from=parts",
                                              f"--lm_path={lm_path}", f"--vision_path={clip_path}", "--seed=5",
                                              "--max_steps=0", "--global_batch=4", "--micro_batch=2", "--seq_len=64",
                                              "--dtype=float32", f"--out_dir={tmp_path}"]))
    saved = final_weights(str(tmp_path))
    whole = MedGPT.from_parts(lm_path, clip_path, dtype=torch.float32, seed=5)
    whole.save_pretrained(str(tmp_path / "whole" / "final"))
    want = final_weights(str(tmp_path / "whole"))
    assert saved.keys() == want.keys()
    for name in want:
        assert torch.equal(saved[name], want[name]), name


@pytest.mark.slow
def test_sharded_init_peak_host_memory(parts, tmp_path):
    """Peak resident memory per rank (VmHWM) of stage 1's start on 2 processes, the whole-model load against the
    sharded one, for a 0.3B-parameter model (MXFP4 experts, the real vocabulary) in bf16 compute. Printed; the
    bound is loose (the saving is the fp32 model, 1.2 GB, against a shared, noisy machine)."""
    from model import GPTConfig, param_counts
    from test_model_memory import write_synthetic_mxfp4
    config = GPTConfig(vocab_size=201088, hidden_size=512, intermediate_size=512, num_hidden_layers=4,
                       num_attention_heads=8, num_key_value_heads=2, head_dim=64, num_local_experts=32,
                       pad_token_id=0, eos_token_id=1)
    write_synthetic_mxfp4(str(tmp_path / "lm"), config)
    case = init_case("mem", 1, parts["root"], "lm", "clip", dtype="bfloat16")
    case["lm_path"] = str(tmp_path / "lm")
    peaks = {}
    for sharded in (0, 1):
        launch_worker("memory", [case], tmp_path, f"mem{sharded}", sharded_init=sharded)
        reports = []
        for rank in (0, 1):
            with open(tmp_path / f"mem{sharded}.rank{rank}.json") as f:
                reports.append(json.load(f))
        assert all(r["meta"] == bool(sharded) and r["world_size"] == 2 for r in reports)
        peaks[sharded] = max(r["peak_rss_bytes"] for r in reports)
        shard_bytes = sum(reports[0]["zero3_bytes"].values())
    n = param_counts(config)["total"]
    print(f"\nLM {n / 1e6:.0f}M parameters ({4 * n / 2**30:.2f} GiB in fp32), 2 ranks, bf16: ZeRO3 holds "
          f"{shard_bytes / 2**30:.2f} GiB per rank; peak RSS per rank: whole load {peaks[0] / 2**30:.2f} GiB, "
          f"sharded {peaks[1] / 2**30:.2f} GiB (saved {(peaks[0] - peaks[1]) / 2**30:.2f} GiB)")
    assert peaks[1] < peaks[0] - 2 * n  # at least half the fp32 model saved (all of it, 4 bytes/param, expected)
