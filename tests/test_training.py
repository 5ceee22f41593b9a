"""training.py's shared machinery and the stage scripts' own step loops, in one process: CLI, schedule, guard,
logs, and each script's `train` against a plain PyTorch training loop (torch.optim.AdamW, clip_grad_norm_, LambdaLR)
on the same model and batches."""
import dataclasses
import json
import math

import pytest
import torch

import train_stage1
import train_stage2
import train_stage3
import training
import vision
import zero
from model import GPTConfig, MedGPT, MedGPTConfig

STAGES = {1: (train_stage1, train_stage1.Stage1Config), 2: (train_stage2, train_stage2.Stage2Config),
          3: (train_stage3, train_stage3.Stage3Config)}

# ----------------------------------------------------------------------------------------------------------
# configuration


def test_overrides_convert_types_and_flags():
    cfg = training.parse_config(train_stage2.Stage2Config, train_stage2.PRESETS,
                                ["--lr=3e-4", "--max_steps", "7", "--resume", "--dtype=float32",
                                 "--activation-checkpointing=false", "--out_dir=x/y", "--seq_len_schedule="])
    assert (cfg.lr, cfg.max_steps, cfg.resume, cfg.dtype, cfg.activation_checkpointing, cfg.out_dir,
            cfg.seq_len_schedule) == (3e-4, 7, True, "float32", False, "x/y", "")


@pytest.mark.parametrize("arg, message", [("--max_step=3", "did you mean --max_steps"),
                                          ("--max_steps=three", "invalid int value"),
                                          ("--resume=maybe", "expected true or false"),
                                          ("--lr", "expected one argument"), ("lr=3", "expected --key=value"),
                                          ("--preset=b", "invalid choice")])
def test_bad_overrides_say_what_is_wrong(arg, message):
    with pytest.raises(SystemExit, match=message):
        training.parse_config(train_stage1.Stage1Config, train_stage1.PRESETS, [arg])


@pytest.mark.parametrize("stage, key", [(1, "--system_prompt=hi"), (1, "--seq_len_schedule=0:8"),
                                        (1, "--train_vision=true"), (2, "--vision_path=x"), (2, "--system_prompt=hi"),
                                        (3, "--lm_path=x"), (3, "--seq_len_schedule=0:8")])
def test_a_key_of_another_stage_is_an_error(stage, key):
    """A stage-specific option that this stage does not use stops the run (it would be silently ignored)."""
    script, config_class = STAGES[stage]
    with pytest.raises(SystemExit, match=f"train_stage{stage}.py has no key"):
        training.parse_config(config_class, script.PRESETS, [key], prog=f"train_stage{stage}.py")


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_presets_name_only_what_differs(stage):
    """The recipe is the config class's defaults (preset medgpt-20b, the default); a preset sets only keys whose
    value differs from them, and every preset builds a valid config."""
    script, config_class = STAGES[stage]
    defaults = config_class()
    assert script.PRESETS["medgpt-20b"] == {}
    assert training.parse_config(config_class, script.PRESETS, []) == defaults
    for name, preset in script.PRESETS.items():
        same = [k for k, v in preset.items() if getattr(defaults, k) == v]
        assert not same, f"preset {name} repeats defaults: {same}"
    tiny = training.parse_config(config_class, script.PRESETS, ["--preset=tiny", "--max_steps=9"])
    assert tiny.max_steps == 9 and tiny.arch == "tiny" and tiny.dtype == "float32"


def test_lr_schedule_matches_torch_schedulers():
    """Warm-up then cosine, against torch's LinearLR -> CosineAnnealingLR (SequentialLR) on a real optimizer."""
    cfg = training.TrainConfig(lr=1e-3, min_lr=1e-4, max_steps=100, warmup_frac=0.05)
    warmup = math.ceil(cfg.warmup_frac * cfg.max_steps)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.SequentialLR(opt, [
        torch.optim.lr_scheduler.LinearLR(opt, start_factor=1 / warmup, end_factor=1.0, total_iters=warmup - 1),
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.max_steps - warmup, eta_min=cfg.min_lr)],
        milestones=[warmup])
    for step in range(cfg.max_steps):
        assert training.lr_at(step, cfg) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9, abs=1e-12), step
        opt.step()
        sched.step()


def test_phases_keep_tokens_per_step():
    cfg = train_stage2.Stage2Config(global_batch=32, micro_batch=1, seq_len=131072, max_steps=1000,
                                    seq_len_schedule="0:8192,0.5:32768,0.8:131072")
    plan = train_stage2.phases(cfg, world_size=8)
    assert plan == [(0, 8192, 512), (500, 32768, 128), (800, 131072, 32)]
    assert {length * rows for _, length, rows in plan} == {32 * 131072}
    assert [train_stage2.seq_len_at(s, cfg) for s in (0, 499, 500, 799, 800, 999)] == [8192, 8192, 32768, 32768,
                                                                                   131072, 131072]
    with pytest.raises(SystemExit, match="not a multiple"):
        train_stage2.phases(dataclasses.replace(cfg, global_batch=4), world_size=8)
    with pytest.raises(SystemExit, match="must start at 0"):
        train_stage2.parse_seq_len_schedule("0.5:8,0:16", 16)


def test_guard_skips_then_stops():
    guard = training.NonFiniteGuard(max_in_a_row=3)
    assert guard.step_ok(1.0, 1.0)
    assert not guard.step_ok(float("nan"), 1.0)
    assert not guard.step_ok(1.0, float("inf"))
    assert guard.step_ok(2.0, 1.0) and guard.in_a_row == 0 and guard.skipped == 2
    guard.step_ok(float("nan"), 0.0)
    guard.step_ok(float("nan"), 0.0)
    with pytest.raises(training.NonFiniteError, match="3 steps in a row"):
        guard.step_ok(float("inf"), 0.0)


def test_peak_table_and_cpu_measurement():
    assert training.PEAK_TFLOPS["B200"]["bfloat16"] > training.PEAK_TFLOPS["H200"]["bfloat16"] \
        == training.PEAK_TFLOPS["H100"]["bfloat16"]
    name, peak = training.device_peak_tflops(torch.device("cpu"), torch.float32)
    assert name.startswith("cpu") and 1e-4 < peak < 100  # a CPU core does 0.1 to a few hundred GFLOP/s


# ----------------------------------------------------------------------------------------------------------
# the step loop, on a micro model


# Adam's g / (|g| + eps) turns rounding noise in near-zero gradients (key biases, the class embedding: summation
# order differs between the sharded and the plain run) into lr-sized updates when eps is 1e-8; 1e-6 keeps it quiet.
EPS = 1e-6


def micro_config():
    text = GPTConfig.preset("tiny", vocab_size=512, hidden_size=32, intermediate_size=32, num_attention_heads=2,
                            num_key_value_heads=1, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                            sliding_window=8)
    tower = vision.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                    image_size=28, patch_size=14)
    return MedGPTConfig(text=text, vision=tower, image_token_index=500)


def micro_batches(step, n_micro, config, with_images=True, nan_pixels=False):
    """Deterministic micro-batches of global step `step`: 2 rows, an image in the first row, ragged targets."""
    g = torch.Generator().manual_seed(step)
    out = []
    for m in range(n_micro):
        T = 12
        ids = torch.randint(0, 400, (2, T), generator=g)
        pixel_values = None
        if with_images and m % 2 == 0:
            ids[0, 1:1 + 4] = config.image_token_index  # one tile = (28 / 14)^2 = 4 image tokens
            pixel_values = torch.randn(1, 3, 28, 28, generator=g)
            if nan_pixels:
                pixel_values[:] = float("nan")
        targets = torch.randint(0, 400, (2, T), generator=g)
        targets[:, : 2 + m] = -100  # a different number of target tokens in each micro-batch
        out.append({"input_ids": ids, "targets": targets, "pixel_values": pixel_values,
                    "doc_ids": None, "position_ids": None})
    return out


class ListLoader:
    """Stands in for data.loader.DataLoader inside this test: the same next_batch / state_dict interface."""

    def __init__(self, make, n_micro):
        self.make, self.n_micro, self.step = make, n_micro, 0

    def next_batch(self):
        self.step += 1
        return self.make(self.step - 1, self.n_micro)

    def state_dict(self):
        return {"step": self.step}

    def load_state_dict(self, state):
        self.step = state["step"]

    def close(self):
        pass


def trainability(stage):
    """What each stage script's main() sets: the projector alone in stage 1, everything in stages 2 and 3."""
    return dict(vision=False, projector=True, lm=False) if stage == 1 else dict(vision=True, projector=True, lm=True)


def run_ours(cfg, make, n_micro, stage=2):
    """The stage script's own step loop (`train`) over ZeRO3, fed by a ListLoader."""
    torch.manual_seed(0)
    model = MedGPT(micro_config())
    model.set_trainable(**trainability(stage))
    training.freeze_unused(model)
    run = training.Run(0, 1, torch.device("cpu"), torch.float32)
    fm = training.flops_model(model)
    engine = training.build_engine(cfg, model, run)
    script = STAGES[stage][0]
    if stage == 2:
        script.train(cfg, model, engine, lambda seq_len, rows, phase: ListLoader(make, n_micro), run, fm)
    else:
        script.train(cfg, model, engine, ListLoader(make, n_micro), run, fm)
    with engine.gathered():
        return {k: v.detach().clone() for k, v in model.state_dict().items()}


def run_plain_torch(cfg, make, n_micro, stage=2):
    """The reference: no sharding, torch.optim.AdamW, torch.nn.utils.clip_grad_norm_, LambdaLR."""
    torch.manual_seed(0)
    model = MedGPT(micro_config())
    model.set_trainable(**trainability(stage))
    training.freeze_unused(model)
    if cfg.router_aux_loss_coef >= 0:
        model.language_model.config.router_aux_loss_coef = cfg.router_aux_loss_coef
    opt = torch.optim.AdamW(zero.adamw_param_groups(model, cfg.weight_decay), lr=cfg.lr,
                            betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: training.lr_at(step, cfg) / cfg.lr)
    model.train()
    for step in range(cfg.max_steps):
        batches = make(step, n_micro)
        n_total = sum(int((b["targets"] != -100).sum()) for b in batches)
        for b in batches:
            _, loss = model(b["input_ids"], b["pixel_values"], b["targets"])
            (loss * int((b["targets"] != -100).sum()) / n_total).backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_step_loop_equals_plain_torch_training(tmp_path, stage):
    """Same weights after 4 steps of accumulation, clipping, warm-up + cosine, weight decay: ZeRO3 + each stage
    script's own loop against torch.optim.AdamW on the unsharded model. Stage 1 trains only the projector, stages 2
    and 3 everything."""
    config_class = STAGES[stage][1]
    extra = dict(seq_len_schedule="") if stage == 2 else {}
    cfg = config_class(out_dir=str(tmp_path), max_steps=4, global_batch=6, micro_batch=2, seq_len=12,
                       lr=3e-3, min_lr=3e-4, warmup_frac=0.3, weight_decay=0.1, grad_clip=0.5, ckpt_every=0,
                       activation_checkpointing=False,
                       router_aux_loss_coef=0.01, dtype="float32", adam_eps=EPS, log_every=1, **extra)
    make = lambda step, n: micro_batches(step, n, micro_config())  # noqa: E731
    ours, reference = run_ours(cfg, make, 3, stage), run_plain_torch(cfg, make, 3, stage)
    for name, ref in reference.items():
        torch.testing.assert_close(ours[name], ref, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    torch.manual_seed(0)
    start = MedGPT(micro_config()).state_dict()
    changed = [n for n in reference if not torch.equal(start[n], reference[n])]
    if stage == 1:
        assert changed and all(n.startswith("multi_modal_projector.") for n in changed)
    else:
        assert any(n.startswith("vision_tower.") for n in changed) and any(n.startswith("language_model.") for n in changed)
    lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [m["step"] for m in lines] == [1, 2, 3, 4]
    assert all(m["tokens"] == 3 * 2 * 12 and m["skipped_steps"] == 0 for m in lines)


def test_nonfinite_steps_are_skipped_then_the_run_stops(tmp_path, capsys):
    """NaN pixels make the loss NaN: those steps change nothing; max_nonfinite in a row save a checkpoint and stop."""
    cfg = train_stage2.Stage2Config(out_dir=str(tmp_path), max_steps=6, global_batch=2, micro_batch=2, seq_len=12,
                                    seq_len_schedule="", lr=1e-3, dtype="float32", adam_eps=EPS, max_nonfinite=3,
                                    log_every=1, ckpt_every=0, weight_decay=0.0, activation_checkpointing=False)
    bad_from = 1

    def make(step, n):
        return micro_batches(step, n, micro_config(), nan_pixels=step >= bad_from)

    with pytest.raises(SystemExit, match="3 steps in a row had a non-finite loss"):
        run_ours(cfg, make, 1)
    path = zero.latest_checkpoint(str(tmp_path / "ckpt"))
    assert path is not None and path.endswith("step_00000003")  # steps 1..3 were all skipped
    lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [m["skipped_steps"] for m in lines] == [0, 1, 2]
    # the skipped steps left the weights as step 1 made them: equal to a 1-step clean run
    reference = run_plain_torch(dataclasses.replace(cfg, max_steps=1), make, 1)
    params = dict(zero.iter_checkpoint_params(path))
    for name, ref in reference.items():
        torch.testing.assert_close(params[name], ref, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def test_empty_micro_batch_contributes_nothing(tmp_path):
    """A micro-batch without targets (all -100) adds no gradient: same weights as leaving it out."""
    cfg = train_stage2.Stage2Config(out_dir=str(tmp_path), max_steps=2, global_batch=4, micro_batch=2, seq_len=12,
                                    seq_len_schedule="", lr=1e-3, dtype="float32", adam_eps=EPS,
                                    router_aux_loss_coef=0.0, ckpt_every=0, weight_decay=0.0,
                                    activation_checkpointing=False)

    def with_empty(step, n):
        batches = micro_batches(step, 1, micro_config())
        empty = micro_batches(step + 100, 1, micro_config(), with_images=False)[0]
        empty["targets"][:] = -100
        return batches + [empty]

    ours = run_ours(cfg, with_empty, 2)
    reference = run_plain_torch(cfg, lambda step, n: micro_batches(step, 1, micro_config()), 1)
    for name, ref in reference.items():
        torch.testing.assert_close(ours[name], ref, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def test_loss_only_on_target_rows_and_zero_without_targets():
    """GPT.forward scores only rows whose target is not -100 (the rest never reach the unembedding): the loss and
    gradients equal torch's cross-entropy over the full logits; with no target at all the loss is a finite zero
    whose backward reaches every parameter (zeros, not None), so ZeRO3 sees the same gradients on every rank."""
    torch.manual_seed(0)
    lm = MedGPT(micro_config()).language_model.train()
    lm.config.router_aux_loss_coef = 0.0
    idx = torch.randint(0, 400, (2, 12))
    targets = torch.randint(0, 400, (2, 12))
    targets[0, :7] = -100
    targets[1, 3:] = -100
    _, loss = lm(idx, targets)
    loss.backward()
    ours = {n: p.grad.clone() for n, p in lm.named_parameters() if p.grad is not None}
    lm.zero_grad()
    logits = lm.lm_head(lm.hidden_states(idx)[0])  # (B, T, V): the unfused reference
    ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for n, p in lm.named_parameters():
        torch.testing.assert_close(ours[n], p.grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")
    lm.zero_grad(set_to_none=True)
    _, loss = lm(idx, torch.full_like(targets, -100))
    assert loss.item() == 0.0 and lm.last_losses["ce"] == 0.0
    loss.backward()
    for n, p in lm.named_parameters():
        assert p.grad is not None and not p.grad.any(), n
