"""Streaming load of a synthetic MXFP4 gpt-oss checkpoint of a few GB: peak RSS (measured in a fresh subprocess)
stays below 1.3x the size of the bf16 model it builds."""
import json
import os
import subprocess
import sys

import pytest
import torch

import model as M

LOAD_AND_REPORT = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[2])
import model
m = model.GPT.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
n_bytes = sum(p.numel() * p.itemsize for p in m.parameters())
sample = m.model.layers[-1].mlp.experts.down_proj
# VmHWM (this process's own peak), not ru_maxrss: Linux carries ru_maxrss over from the forking pytest parent
peak_kib = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({"peak_bytes": peak_kib * 1024, "model_bytes": n_bytes,
                  "finite": bool(torch.isfinite(sample).all()), "nonzero": bool(sample.abs().sum() > 0)}))
"""


def write_synthetic_mxfp4(path, cfg: M.GPTConfig):
    """One safetensors shard per layer (random MXFP4 experts, bf16 rest) plus an index, written a layer at a time."""
    from safetensors.torch import save_file
    os.makedirs(path, exist_ok=True)
    d = cfg.to_dict()
    d["quantization_config"] = {"quant_method": "mxfp4"}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(d, f)
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in M.GPT(cfg).named_parameters()}
    g = torch.Generator().manual_seed(0)
    weight_map = {}
    for shard in ["other"] + list(range(cfg.num_hidden_layers)):
        prefix = f"model.layers.{shard}." if shard != "other" else None
        names = [n for n in shapes if (n.startswith(prefix) if prefix else not n.startswith("model.layers."))]
        tensors = {}
        for n in names:
            if n.endswith(("experts.gate_up_proj", "experts.down_proj")):
                E, n_in, n_out = shapes[n]
                n_bytes = E * n_out * (n_in // 32) * 16  # os.urandom: much faster than torch.randint here
                tensors[n + "_blocks"] = torch.frombuffer(bytearray(os.urandom(n_bytes)), dtype=torch.uint8).view(
                    E, n_out, n_in // 32, 16)  # (E, out, in/32, 16)
                tensors[n + "_scales"] = torch.randint(120, 127, (E, n_out, n_in // 32), generator=g,
                                                       dtype=torch.uint8)
            else:
                tensors[n] = (0.02 * torch.randn(shapes[n], generator=g)).to(torch.bfloat16)
        fname = f"shard-{shard}.safetensors"
        save_file(tensors, os.path.join(path, fname))
        weight_map.update({n: fname for n in tensors})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


@pytest.mark.slow
def test_mxfp4_load_peak_memory(tmp_path):
    cfg = M.GPTConfig(vocab_size=4096, hidden_size=1024, intermediate_size=1024, num_hidden_layers=12,
                      num_attention_heads=16, num_key_value_heads=4, head_dim=64, num_local_experts=32,
                      pad_token_id=0, eos_token_id=1)
    write_synthetic_mxfp4(str(tmp_path / "ckpt"), cfg)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-c", LOAD_AND_REPORT, str(tmp_path / "ckpt"), repo],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["model_bytes"] == 2 * M.param_counts(cfg)["total"]
    assert report["model_bytes"] > 2 * 2**30  # a model of a few GB
    assert report["finite"] and report["nonzero"]
    ratio = report["peak_bytes"] / report["model_bytes"]
    print(f"peak RSS {report['peak_bytes'] / 2**30:.2f} GiB for a {report['model_bytes'] / 2**30:.2f} GiB bf16 model "
          f"({ratio:.2f}x)")
    assert ratio < 1.3
