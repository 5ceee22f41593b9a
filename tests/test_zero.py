"""
zero.py: ZeRO-3 on 2 CPU processes (gloo, torchrun) against one plain PyTorch process and against FSDP2 (raw
fully_shard, and the zero.FSDP2 engine that `--sharding=fsdp2` uses);
memory, bytes moved, checkpoints N -> M, the memory plan against PyTorch's MemTracker.

The torchrun launches run once per session (module fixture `runs`); tests read their outputs.
"""
import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
import zero  # noqa: E402
import zero_worker  # noqa: E402
from checkpoint import write_safetensors  # noqa: E402
from model import GPT, GPTConfig, param_counts  # noqa: E402

WORKER = os.path.join(ROOT, "tests", "zero_worker.py")
STEPS, SAVE_AT = 4, 2


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc, args, timeout=240):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, WORKER, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(free_port()), WORKER, *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero")
    torch.manual_seed(0)
    init = GPT(zero_worker.config())
    save_file({k: v.contiguous() for k, v in init.state_dict().items()}, str(out / "init.safetensors"))
    common = ["--init", str(out / "init.safetensors"), "--out", str(out), "--steps", str(STEPS)]
    ckpt = f"step_{SAVE_AT:08d}"
    launch(1, common + ["--jobs", "ref,zero,engine,mem", "--tag", "z1", "--save_at", str(SAVE_AT)])
    launch(2, common + ["--jobs", "zero,fsdp2,engine,resume,mem", "--tag", "z2", "--save_at", str(SAVE_AT),
                        "--checkpointing", "--resume", str(out / "z1_ckpt" / ckpt), "--resume_tag", "r12"])
    launch(1, common + ["--jobs", "resume", "--resume", str(out / "z2_ckpt" / ckpt), "--resume_tag", "r21"])
    return out


def weights(runs, tag):
    return load_file(str(runs / f"{tag}.safetensors"))


def info(runs, tag):
    with open(runs / f"{tag}.json") as f:
        return json.load(f)


def assert_close_weights(got, want, rtol=1e-5):
    assert sorted(got) == sorted(want)
    for name, w in want.items():
        err = (got[name] - w).norm() / w.norm().clamp_min(1e-12)
        assert err <= rtol, f"{name}: relative error {err:.2e} > {rtol}"


@pytest.mark.slow
def test_two_processes_equal_one_plain_pytorch_process(runs):
    ref = weights(runs, "ref")
    init = load_file(str(runs / "init.safetensors"))
    moved = [n for n in ref if not torch.equal(ref[n], init[n])]
    frozen = [n for n in ref if zero_worker.is_frozen(n)]
    assert moved and all(torch.equal(ref[n], init[n]) for n in frozen)  # training moved, frozen stayed
    assert_close_weights(weights(runs, "z1"), ref)  # ZeRO3 on 1 process
    assert_close_weights(weights(runs, "z2"), ref)  # ZeRO3 on 2 processes, activation checkpointing on
    ranks = info(runs, "z2")["ranks"]
    assert all(r["full_params_held"] == 0 for r in ranks)  # meta start: no full parameter tensor on any rank


@pytest.mark.slow
def test_two_processes_equal_fsdp2(runs):
    assert_close_weights(weights(runs, "z2"), weights(runs, "fsdp2"))


@pytest.mark.slow
@pytest.mark.parametrize("ws", [1, 2])
def test_fsdp2_engine_equals_zero3_engine(runs, ws):
    """zero.FSDP2 driven through the engine interface (clip_grad_norm_, step(lr), zero_grad of a skipped step,
    iter_full_params) trains like ZeRO3 on the same units, world sizes 1 and 2 (2: activation checkpointing on)."""
    assert_close_weights(weights(runs, f"engine_ws{ws}"), weights(runs, f"z{ws}"))
    assert_close_weights(weights(runs, f"engine_ws{ws}"), weights(runs, "ref"))
    for got, want in zip(info(runs, f"engine_ws{ws}")["ranks"], info(runs, f"z{ws}")["ranks"]):
        assert got["losses"] == pytest.approx(want["losses"], rel=1e-5)
        assert got["grad_norms"] == pytest.approx(want["grad_norms"], rel=1e-5)
        assert len(got["grad_norms"]) == STEPS and min(got["grad_norms"]) > zero_worker.CLIP  # clipping was active


@pytest.mark.slow
def test_fsdp2_engine_gathered_memory_and_refusals(runs):
    final = weights(runs, "engine_ws2")
    # gathered(): plain, whole tensors equal to the consolidated weights; a forward inside it equals a plain GPT
    assert_close_weights(load_file(str(runs / "engine_ws2_gathered.safetensors")), final, rtol=0.0)
    probe = load_file(str(runs / "engine_ws2_probe.safetensors"))
    plain = GPT(zero_worker.config())
    plain.load_state_dict(final)
    with torch.no_grad():
        logits, _ = plain(probe["probe"])
    torch.testing.assert_close(probe["logits"], logits, rtol=1e-5, atol=1e-5)
    one, two = info(runs, "engine_ws1")["ranks"], info(runs, "engine_ws2")["ranks"]
    for rank in two:
        assert rank["whole_param_types"] == ["Tensor"]  # not DTensor: really unsharded
        assert "--sharding=zero3" in rank["refusal"]
        for kind in ("params", "grads", "optimizer"):
            assert rank["memory"][kind] <= 0.55 * one[0]["memory"][kind], kind
        bf16 = rank["bf16"]  # dtype=bfloat16: fp32 sharded masters and gradient shards, bf16 compute
        assert (bf16["masters"], bf16["grads"], bf16["gathered"]) == (["torch.float32"], ["torch.float32"],
                                                                      ["torch.bfloat16"])


@pytest.mark.slow
def test_memory_per_rank_halves(runs):
    one = info(runs, "z1")["ranks"][0]["memory"]
    for rank in info(runs, "z2")["ranks"]:
        two = rank["memory"]
        for kind in ("params", "grads", "optimizer"):
            assert two[kind] <= 0.55 * one[kind], (kind, two[kind], one[kind])
        assert sum(two.values()) <= 0.55 * sum(one.values())


@pytest.mark.slow
def test_bytes_moved_per_step(runs):
    """Per micro-batch: every buffer all-gathered for forward; again for backward where backward passes (all but
    the fully frozen first block, whose input needs no gradient); one reduce-scatter of each trainable buffer.
    Per step: one all-reduce of the squared gradient norm."""
    rank0 = info(runs, "z2")["ranks"][0]
    ws, elem = 2, 4  # fp32 compute and reduce
    padded = {b["key"]: math.ceil(b["numel"] / ws) * ws * elem for b in rank0["layout"]}
    trainable = sum(n for k, n in padded.items() if k.endswith(".trainable"))
    frozen_fwd = sum(n for k, n in padded.items() if k.endswith(".frozen"))
    frozen_bwd = sum(n for k, n in padded.items() if k.endswith(".frozen") and not k.startswith("model.layers.0."))
    assert "model.layers.0.trainable" not in padded and "model.layers.1.frozen" in padded
    want_gather = zero_worker.ACCUM * (2 * trainable + frozen_fwd + frozen_bwd)
    want_reduce = zero_worker.ACCUM * trainable
    for step in rank0["comm_per_step"]:
        assert step == {"all_gather": want_gather, "reduce_scatter": want_reduce, "all_reduce": 4}
    print(f"\nbytes per step (2 ranks, fp32): all-gather {want_gather}, reduce-scatter {want_reduce}")


@pytest.mark.slow
def test_checkpoint_two_to_one_and_one_to_two(runs):
    ref = weights(runs, "ref")
    assert_close_weights(weights(runs, "r12"), ref)  # written by 1 process, resumed on 2
    assert_close_weights(weights(runs, "r21"), ref)  # written by 2 processes, resumed on 1
    per_step = len(info(runs, "z1")["ranks"][0]["losses"]) // STEPS
    z1 = info(runs, "z1")["ranks"][0]["losses"][SAVE_AT * per_step:]
    r21 = info(runs, "r21")["ranks"][0]
    assert r21["losses"] == pytest.approx(z1, rel=1e-5)  # the same continuation (data stream from restored RNG)
    assert r21["resumed_extra"] == {"data_position": SAVE_AT, "rank": 0}
    z2 = info(runs, "z2")["ranks"]
    for rank, r in enumerate(info(runs, "r12")["ranks"]):
        assert r["losses"] == pytest.approx(z2[rank]["losses"][SAVE_AT * per_step:], rel=1e-5)
        assert r["resumed_extra"] == {"data_position": SAVE_AT, "rank": 0}  # rank % 1 of the 1-process checkpoint


@pytest.mark.slow
def test_consolidation_streams_the_same_tensors(runs, tmp_path):
    ckpt1 = runs / "z1_ckpt" / f"step_{SAVE_AT:08d}"
    ckpt2 = runs / "z2_ckpt" / f"step_{SAVE_AT:08d}"
    one, two = dict(zero.iter_checkpoint_params(str(ckpt1))), dict(zero.iter_checkpoint_params(str(ckpt2)))
    assert_close_weights(two, one)
    # stream the 2-process checkpoint into a Hugging Face directory and load it with model.py's loader
    out = tmp_path / "hf"
    write_safetensors(zero.iter_checkpoint_params(str(ckpt2)), str(out), max_shard_bytes=1 << 20)
    zero_worker.config().to_json(str(out / "config.json"))
    assert len([f for f in os.listdir(out) if f.endswith(".safetensors")]) > 1
    model = GPT.from_pretrained(str(out), dtype=torch.float32)
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), two[name]), name


@pytest.mark.slow
def test_memory_plan_within_20_percent_of_measured(runs):
    for ws in (1, 2):
        with open(runs / f"mem_ws{ws}.json") as f:
            for r in json.load(f):
                ratio = r["planned_bytes"] / r["measured_bytes"]
                print(f"\nws={ws} checkpointing={r['checkpointing']} B={r['B']} T={r['T']}: measured "
                      f"{r['measured_bytes'] / 2**20:.1f} MiB, planned {r['planned_bytes'] / 2**20:.1f} MiB, "
                      f"ratio {ratio:.3f}")
                assert 0.8 <= ratio <= 1.2


def test_memory_plan_20b_on_8_gpus():
    cfg = GPTConfig.preset("gpt-oss-20b")
    plan = zero.memory_plan(cfg, 8, 131072)
    print("\n20B, 8 GPUs, 131072 tokens, bf16 + fp32 masters, checkpointing (GiB per GPU):")
    print(json.dumps({k: round(v, 2) for k, v in plan.items() if k != "params_total"}))
    assert plan["params_total"] == param_counts(cfg)["total"]  # the planner's count equals model.py's
    n = param_counts(cfg)["total"]
    assert plan["optimizer"] == pytest.approx(8 * n / 8 / zero.GiB, rel=1e-6)  # two fp32 moments, 1/8 each
    assert plan["grads"] * 2 == pytest.approx(plan["optimizer"], rel=1e-9)


# ---------------------------------------------------------------------------------------------------------
# In-process: one process, no process group


def tiny_zero(tmp_path=None, **kw):
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny", vocab_size=64, num_hidden_layers=2, router_aux_loss_coef=0.0))
    return model, zero.ZeRO3(model, list(model.model.layers), lr=1e-2, **kw)


def one_step(model, z):
    idx = torch.randint(0, 64, (2, 8))
    _, loss = model(idx, idx)
    loss.backward()
    z.step()


def test_checkpoint_save_is_atomic(tmp_path, monkeypatch):
    model, z = tiny_zero()
    one_step(model, z)
    first = zero.save_checkpoint(z, str(tmp_path), 1, extra={"pos": 1})
    saved = dict(zero.iter_checkpoint_params(first))
    one_step(model, z)

    def crash(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(zero, "_write_json", crash)  # dies after the shards, before the manifest and rename
    with pytest.raises(OSError):
        zero.save_checkpoint(z, str(tmp_path), 2)
    monkeypatch.undo()
    assert zero.latest_checkpoint(str(tmp_path)) == first
    step, extra = zero.load_checkpoint(z, first)
    assert (step, extra) == (1, {"pos": 1})
    for name, t in zero.iter_full_params(z):
        assert torch.equal(t, saved[name]), name


def test_checkpoint_of_another_model_is_refused(tmp_path):
    model, z = tiny_zero()
    path = zero.save_checkpoint(z, str(tmp_path), 1)
    torch.manual_seed(0)
    other = GPT(GPTConfig.preset("tiny", vocab_size=64, num_hidden_layers=3))
    z_other = zero.ZeRO3(other, list(other.model.layers))
    with pytest.raises(ValueError, match="layout differs"):
        zero.load_checkpoint(z_other, path)


def test_bf16_compute_keeps_fp32_masters():
    model, z = tiny_zero(dtype=torch.bfloat16)
    masters = [b.master.clone() for b in z.trainable_buffers()]
    one_step(model, z)
    for b, before in zip(z.trainable_buffers(), masters):
        assert b.master.dtype == torch.float32 and b.shard.dtype == torch.bfloat16
        assert torch.equal(b.shard, b.master.to(torch.bfloat16))
        assert not torch.equal(b.master, before)
    mem = z.memory_bytes()
    n = sum(b.shard_numel for b in z.trainable_buffers())
    assert mem == {"params": n * 6, "grads": n * 4, "optimizer": n * 8}
