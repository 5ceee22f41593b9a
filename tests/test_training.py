"""training.py's shared machinery, in one process: CLI, schedule, guard, logs, and the step loop against a plain
PyTorch training loop (torch.optim.AdamW, clip_grad_norm_, LambdaLR) on the same model and batches."""
import dataclasses
import json
import math

import pytest
import torch

import training
import vision
from model import GPTConfig, MedGPT, MedGPTConfig

# ----------------------------------------------------------------------------------------------------------
# configuration


def test_overrides_convert_types_and_flags():
    cfg = training.apply_overrides(training.TrainConfig(), ["--lr=3e-4", "--max_steps=7", "--resume", "--dtype=float32",
                                                            "--activation-checkpointing=false", "--out_dir=x/y"])
    assert (cfg.lr, cfg.max_steps, cfg.resume, cfg.dtype, cfg.activation_checkpointing, cfg.out_dir) == \
        (3e-4, 7, True, "float32", False, "x/y")


@pytest.mark.parametrize("arg, message", [("--max_step=3", "did you mean --max_steps"),
                                          ("--max_steps=three", "expected a value of type int"),
                                          ("--resume=maybe", "expected true or false"),
                                          ("--lr", "needs a value"), ("lr=3", "expected --key=value")])
def test_bad_overrides_say_what_is_wrong(arg, message):
    with pytest.raises(SystemExit, match=message):
        training.apply_overrides(training.TrainConfig(), [arg])


def test_preset_then_overrides():
    presets = {"a": dict(lr=1.0, max_steps=5), "medgpt-20b": dict(lr=2.0)}
    assert training.stage_config(presets, ["--preset=a", "--max_steps=9"]).max_steps == 9
    assert training.stage_config(presets, []).lr == 2.0  # the 8 x B200 recipe is the default
    with pytest.raises(SystemExit, match="unknown preset"):
        training.stage_config(presets, ["--preset=b"])


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
    cfg = training.TrainConfig(global_batch=32, micro_batch=1, seq_len=131072, max_steps=1000,
                               seq_len_schedule="0:8192,0.5:32768,0.8:131072")
    plan = training.phases(cfg, world_size=8)
    assert plan == [(0, 8192, 512), (500, 32768, 128), (800, 131072, 32)]
    assert {length * rows for _, length, rows in plan} == {32 * 131072}
    assert [training.seq_len_at(s, cfg) for s in (0, 499, 500, 799, 800, 999)] == [8192, 8192, 32768, 32768,
                                                                                   131072, 131072]
    with pytest.raises(SystemExit, match="not a multiple"):
        training.phases(dataclasses.replace(cfg, global_batch=4), world_size=8)
    with pytest.raises(SystemExit, match="must start at 0"):
        training.parse_seq_len_schedule("0.5:8,0:16", 16)


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


def run_ours(cfg, make, n_micro):
    torch.manual_seed(0)
    model = MedGPT(micro_config())
    model.set_trainable(vision=cfg.train_vision, projector=cfg.train_projector, lm=cfg.train_lm)
    training.freeze_unused(model)
    run = training.Run(0, 1, torch.device("cpu"), torch.float32)
    fm = training.flops_model(model, cfg)
    engine = training.build_engine(cfg, model, run)
    training.train(cfg, "test", model, engine, lambda seq_len, rows, phase: ListLoader(make, n_micro), run, fm)
    with engine.gathered():
        return {k: v.detach().clone() for k, v in model.state_dict().items()}


def run_plain_torch(cfg, make, n_micro):
    """The reference: no sharding, torch.optim.AdamW, torch.nn.utils.clip_grad_norm_, LambdaLR."""
    torch.manual_seed(0)
    model = MedGPT(micro_config())
    model.set_trainable(vision=cfg.train_vision, projector=cfg.train_projector, lm=cfg.train_lm)
    training.freeze_unused(model)
    if cfg.router_aux_loss_coef >= 0:
        model.language_model.config.router_aux_loss_coef = cfg.router_aux_loss_coef
    import zero
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


@pytest.mark.parametrize("stage", [1, 2])
def test_step_loop_equals_plain_torch_training(tmp_path, stage):
    """Same weights after 4 steps of accumulation, clipping, warm-up + cosine, weight decay: ZeRO3 + training.train
    against torch.optim.AdamW on the unsharded model. Stage 1 trains only the projector, stage 2 everything."""
    trains = dict(train_vision=False, train_projector=True, train_lm=False) if stage == 1 else {}
    cfg = training.TrainConfig(out_dir=str(tmp_path), max_steps=4, global_batch=6, micro_batch=2, seq_len=12,
                               lr=3e-3, min_lr=3e-4, warmup_frac=0.3, weight_decay=0.1, grad_clip=0.5,
                               router_aux_loss_coef=0.01, dtype="float32", adam_eps=EPS, log_every=1, **trains)
    make = lambda step, n: micro_batches(step, n, micro_config())  # noqa: E731
    ours, reference = run_ours(cfg, make, 3), run_plain_torch(cfg, make, 3)
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
    cfg = training.TrainConfig(out_dir=str(tmp_path), max_steps=6, global_batch=2, micro_batch=2, seq_len=12,
                               lr=1e-3, dtype="float32", adam_eps=EPS, max_nonfinite=3, log_every=1)
    bad_from = 1

    def make(step, n):
        return micro_batches(step, n, micro_config(), nan_pixels=step >= bad_from)

    with pytest.raises(SystemExit, match="3 steps in a row had a non-finite loss"):
        run_ours(cfg, make, 1)
    import zero
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
    cfg = training.TrainConfig(out_dir=str(tmp_path), max_steps=2, global_batch=4, micro_batch=2, seq_len=12,
                               lr=1e-3, dtype="float32", adam_eps=EPS, router_aux_loss_coef=0.0)

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
