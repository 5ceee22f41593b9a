"""
The toolbox the three stage scripts share. Each train_stageN.py is a program that holds its stage top to bottom
(its config, presets, model set-up, data, engine and its own step loop); what those loops call lives here once.

Design choices
- One flat dataclass, `TrainConfig`, holds the keys every stage has. A stage script subclasses it with its own
  keys and the paper recipe's values as its defaults (`Stage1Config`, ...), so a key a stage does not use is an
  error in that stage, and a preset names only what differs from those defaults.
- The command line is argparse everywhere (stage scripts, eval.py, data tools, tools/): `parse_config` builds the
  parser from the dataclass, so `--key=value`, `--key value` and `--flag` all work, `--help` lists every key with
  its default, and an unknown key stops the run with the closest valid one.
- `global_batch` counts sequences per optimizer step over *all* processes; gradient accumulation is derived from
  it and the world size, so 1 or 8 processes take the same steps. The loss of a micro-batch is weighted by its
  share of the step's target tokens (an all-reduced count), so the gradient is the mean over every target token
  of the global batch however the batch is cut into micro-batches and ranks (`forward_backward`).
- The optimizer, gradient clipping, sharding and sharded checkpoints are zero.py's; this file only drives them.
- A stage's starting model is built on the meta device and each rank reads only its ZeRO-3 shard of the
  checkpoint (`llava_on_meta`, `parts_on_meta`: checkpoint.py's readers -> zero.ZeRO3(load=...)): loading the whole 20B model first would
  cost ~84 GB of host memory per rank. fsdp2 (a reference path) and --sharded_init=false keep the whole load.
- LR: linear warm-up over `warmup_frac` of the steps, then cosine decay to `min_lr` (paper: AdamW, cosine).
- Non-finite guard: a step whose loss or gradient norm is not finite is skipped (grads dropped, counted); after
  `max_nonfinite` in a row the run saves a checkpoint and stops with a clear message.
- MFU: model FLOPs (6 x active parameters per token + attention, backward counted as 2 x forward; the unembedding
  only for tokens with a target, as GPT.forward computes it) against a table of dense peaks per device (B200,
  H100, H200, A100) or, on a CPU, a peak measured once with a matmul.
- LoRA (--lora_rank > 0): the stage scripts call lora.apply where they set what trains; the final save writes the
  merged model to <out_dir>/final (LLaVA, as every stage) and the adapter in peft's format to final/adapter.
- Logs: one console line per `log_every` steps (a progress bar with ETA on a terminal), `metrics.jsonl` in out_dir
  (TensorBoard too when the `tensorboard` package is installed). Nothing logs sample text.
"""
import argparse
import dataclasses
import difflib
import itertools
import json
import math
import os
import resource
import sys
import time
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

import checkpoint
import lora
import vision
import zero
from data.datasets import ImageTokens, load_dataset
from data.tokenizer import load_tokenizer
from model import GPTConfig, MedGPT, MedGPTConfig, new_projector, param_counts, rope_inv_freq

# ----------------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class TrainConfig:
    """The keys every stage has. Stage scripts subclass it with their own keys and their recipe's defaults."""
    # what to train from and where to write
    out_dir: str = "out/stage"
    init_from: str = ""          # stage 1: "parts" or "scratch"; stages 2-3: a LLaVA dir (the previous final/)
    arch: str = "tiny"           # architecture for init_from=scratch and --dry_run: tiny | medgpt-20b
    data: str = ""               # stage JSONL or mixture JSON (see docs/data.md)
    skip_bad: bool = False       # skip (count and list) records that cannot be read, instead of stopping
    seed: int = 1337
    # batch and context
    global_batch: int = 128      # sequences per optimizer step, over all processes
    micro_batch: int = 1         # sequences per forward pass on one process
    seq_len: int = 4096          # tokens per sequence
    max_tiles: int = 1           # image tiles per image (1 = plain LLaVA-1.5)
    # optimisation
    max_steps: int = 1000
    lr: float = 2e-5
    min_lr: float = 2e-6
    warmup_frac: float = 0.03
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0       # 0 disables clipping
    router_aux_loss_coef: float = -1.0  # load-balancing loss weight; < 0 keeps the checkpoint config's value
    max_nonfinite: int = 5       # non-finite steps in a row before the run saves and stops
    # precision and memory
    dtype: str = "bfloat16"      # compute dtype; master weights and optimizer state are fp32 (zero.py)
    activation_checkpointing: bool = False
    sharding: str = "zero3"      # zero3 (zero.ZeRO3, ours) | fsdp2 (PyTorch's fully_shard: a reference, no checkpoints)
    sharded_init: bool = True    # zero3: model on the meta device, each rank reads only its shard of the weights
    # bookkeeping
    log_every: int = 1
    ckpt_every: int = 0          # steps between resumable checkpoints (0: only at the end)
    resume: bool = False
    dry_run: bool = False
    plan_world_size: int = 0     # --dry_run plans for this many processes (0: this run's world size)
    mxfp4_resident: bool = False  # experts kept as MXFP4 blocks and scales (4.25 bits a weight), dequantised per expert
    # LoRA (lora.py): adapters on the language model train, everything else stays frozen; 0 = the stage's recipe
    lora_rank: int = 0
    lora_alpha: float = 16.0     # the adapters' output is scaled by lora_alpha / lora_rank, as peft's
    lora_dropout: float = 0.0    # dropout on the adapters' input
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj"  # comma list of q_proj, k_proj, v_proj, o_proj, router
    lora_projector: bool = False  # the projector trains in full beside the adapters (peft's modules_to_save)
    device: str = ""             # "" = cuda:LOCAL_RANK when CUDA is available, else cpu


class ConfigParser(argparse.ArgumentParser):
    """argparse that raises SystemExit(message) instead of printing usage and exiting with 2."""

    def error(self, message):
        raise SystemExit(f"{self.prog}: {message} (--help lists the keys)")


def parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parse_config(config_class, presets: dict, argv: list, prog: str = None):
    """A stage's config: `--preset=NAME` (default medgpt-20b, the config class's own defaults) overrides the
    class's defaults, then every `--key=value` of argv overrides the preset."""
    keys = [f.name for f in dataclasses.fields(config_class)]
    parser = ConfigParser(prog=prog, allow_abbrev=False, description=(config_class.__doc__ or "").strip())
    parser.add_argument("--preset", default="medgpt-20b", choices=sorted(presets))
    for f in dataclasses.fields(config_class):
        kind = type(f.default)
        names = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        if kind is bool:
            parser.add_argument(*names, dest=f.name, type=parse_bool, nargs="?", const=True, default=None,
                                help=f"true or false (default {f.default})")
        else:
            parser.add_argument(*names, dest=f.name, type=kind, default=None, help=f"default {f.default!r}")
    args, unknown = parser.parse_known_args(argv)
    for arg in unknown:
        if not arg.startswith("--"):
            raise SystemExit(f"argument {arg!r}: expected --key=value (keys: {', '.join(keys)})")
        key = arg[2:].partition("=")[0].replace("-", "_")
        close = difflib.get_close_matches(key, keys, n=1)
        hint = f"; did you mean --{close[0]}?" if close else "; --help lists the keys"
        raise SystemExit(f"argument {arg!r}: {parser.prog} has no key {key!r}{hint}")
    cfg = config_class(**presets[args.preset])
    return dataclasses.replace(cfg, **{k: v for k, v in vars(args).items() if k in keys and v is not None})


# ----------------------------------------------------------------------------------------------------------
# Learning-rate schedule


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up for the first warmup_frac of the steps, then cosine decay from lr to min_lr."""
    warmup = math.ceil(cfg.warmup_frac * cfg.max_steps)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, cfg.max_steps - warmup))
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


# ----------------------------------------------------------------------------------------------------------
# Model FLOPs and MFU

# Dense (no sparsity) peak TFLOP/s per device and dtype, from the vendors' datasheets (SXM parts).
# fp32 is the CUDA-core figure: our fp32 runs leave TF32 off.
PEAK_TFLOPS = {
    "B200": {"bfloat16": 2250.0, "float16": 2250.0, "float32": 75.0},
    "H200": {"bfloat16": 989.4, "float16": 989.4, "float32": 66.9},
    "H100": {"bfloat16": 989.4, "float16": 989.4, "float32": 66.9},
    "A100": {"bfloat16": 312.0, "float16": 312.0, "float32": 19.5},
}
_measured_cpu_peak = {}


def measure_cpu_peak_tflops(dtype: torch.dtype = torch.float32, n: int = 256, seconds: float = 0.5) -> float:
    """This CPU's matmul throughput with torch's current thread count: the best of many short n x n matmuls, so
    that a busy machine (other processes taking the cores) still shows what one uncontended burst achieves."""
    key = (dtype, torch.get_num_threads())
    if key not in _measured_cpu_peak:
        a = torch.randn(n, n).to(dtype)
        b = torch.randn(n, n).to(dtype)
        a @ b  # warm-up: first call pays for allocation and dispatch
        best, start = 0.0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            t0 = time.perf_counter()
            a @ b
            best = max(best, 2 * n**3 / (time.perf_counter() - t0))
        _measured_cpu_peak[key] = best / 1e12
    return _measured_cpu_peak[key]


def device_peak_tflops(device: torch.device, dtype: torch.dtype) -> tuple:
    """(name, dense peak TFLOP/s) for one process's device; None as the peak for an unknown GPU."""
    dtype_name = str(dtype).removeprefix("torch.")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peaks in PEAK_TFLOPS.items():
            if key in name:
                return key, peaks.get(dtype_name)
        return name, None
    return "cpu (measured)", measure_cpu_peak_tflops(dtype)


def trains(module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def flops_model(model) -> dict:
    """Forward FLOPs per LM token / per image tile and the training multipliers, from the (unsharded) model with
    its trainability set. A multiplier is 3 when the part's weights train (forward + backward for inputs and
    weights), 2 when only the gradient of its input is needed (something before it trains), 1 when no backward
    runs through it."""
    lm = model.language_model.config
    vc = model.config.vision
    used = vision_blocks_used(model)
    tower = model.vision_tower
    unused = {id(p) for m in list(tower.blocks[used:]) + tower.unused_modules() for p in m.parameters()}
    vision_params = sum(p.numel() for p in tower.parameters() if id(p) not in unused)  # what the forward uses
    n_vis = vc.tokens_per_tile + vc.class_tokens  # patches + class token (CLIP, BiomedCLIP; none in SigLIP)
    projector = sum(p.numel() for p in model.multi_modal_projector.parameters())
    train_vision, train_projector = trains(model.vision_tower), trains(model.multi_modal_projector)
    train_lm = trains(model.language_model)  # LoRA adapters count: their gradients need the LM's backward
    train_lm_base = any(p.requires_grad for n, p in model.language_model.named_parameters() if ".lora_" not in n)
    return {
        # the unembedding runs only on rows with a target (GPT.forward), so it is counted per target token
        "lm_per_token": 2 * (param_counts(lm)["active"] - lm.hidden_size * lm.vocab_size),
        "unembed_per_target": 2 * lm.hidden_size * lm.vocab_size,
        "lm_attn": [(lm.num_attention_heads * lm.head_dim, lm.window_of(i)) for i in range(lm.num_hidden_layers)],
        "vision_per_tile": 2 * vision_params * n_vis + used * 4 * vc.hidden_size * n_vis * n_vis
        + 2 * projector * model.tokens_per_tile,
        # LoRA: the frozen weights need only the input's gradient (the adapters' own FLOPs, <1%, are not counted)
        "lm_mult": 3 if train_lm_base else (2 if train_lm or train_vision or train_projector else 1),
        "vision_mult": 3 if (train_vision or train_projector) else 1,
    }


def step_flops(fm: dict, micro_batches: list) -> float:
    """Training FLOPs of one process's micro-batches. Attention: 4 x width x (keys a query sees) per token
    forward, with causal attention seeing T/2 keys on average and a sliding window min(window, T)."""
    total = 0.0
    for mb in micro_batches:
        B, T = mb["input_ids"].shape
        attn = sum(4 * width * (min(window, T) if window else T / 2) for width, window in fm["lm_attn"])
        n_targets = int((mb["targets"] != -100).sum())
        total += fm["lm_mult"] * (B * T * (fm["lm_per_token"] + attn) + n_targets * fm["unembed_per_target"])
        if mb.get("pixel_values") is not None:
            total += fm["vision_mult"] * mb["pixel_values"].shape[0] * fm["vision_per_tile"]
    return total


# ----------------------------------------------------------------------------------------------------------
# Non-finite guard


class NonFiniteError(RuntimeError):
    pass


class NonFiniteGuard:
    """Skip steps whose loss or gradient norm is inf/nan; raise after max_in_a_row of them in a row."""

    def __init__(self, max_in_a_row: int):
        self.max_in_a_row = max_in_a_row
        self.in_a_row = 0
        self.skipped = 0

    def step_ok(self, loss: float, grad_norm: float) -> bool:
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        self.skipped += 1
        if self.in_a_row >= self.max_in_a_row:
            raise NonFiniteError(f"{self.in_a_row} steps in a row had a non-finite loss or gradient norm "
                                 f"(loss={loss}, grad_norm={grad_norm}); lower --lr, check the data, or try "
                                 f"--dtype=float32")
        return False

    def state_dict(self) -> dict:
        return {"in_a_row": self.in_a_row, "skipped": self.skipped}

    def load_state_dict(self, state: dict):
        self.in_a_row, self.skipped = state["in_a_row"], state["skipped"]


# ----------------------------------------------------------------------------------------------------------
# Logging: console line / progress bar, metrics.jsonl, TensorBoard


def memory_gib(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak, or peak resident set size on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def progress_line(name: str, step: int, max_steps: int, metrics: dict, eta_s: float, width: int = 20) -> str:
    filled = int(width * step / max(1, max_steps))
    bar = "#" * filled + "." * (width - filled)
    mfu = f"{100 * metrics['mfu']:.2f}%" if metrics.get("mfu") is not None else "n/a"
    return (f"{name} [{bar}] {step}/{max_steps} | loss {metrics['loss']:.4f} | gnorm {metrics['grad_norm']:.3f} | "
            f"lr {metrics['lr']:.2e} | {metrics['tokens_per_s']:,.0f} tok/s | MFU {mfu} | "
            f"mem {metrics['mem_gib']:.2f} GiB | eta {format_duration(eta_s)}")


class MetricsLogger:
    """Rank 0 only: metrics.jsonl (appended, so a resumed run continues it), TensorBoard when installed, and the
    console line with an ETA from the steps this process has run (first_step: where it started)."""

    def __init__(self, out_dir: str, name: str, max_steps: int, first_step: int, enabled: bool):
        self.name, self.max_steps, self.first_step, self.enabled, self.tb = name, max_steps, first_step, enabled, None
        self.t_start = time.perf_counter()
        self.tty = sys.stdout.isatty()
        if not enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        self.jsonl = open(os.path.join(out_dir, "metrics.jsonl"), "a")
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(out_dir, "tb"))
        except ImportError:
            pass  # TensorBoard is optional: `pip install tensorboard` to get event files

    def log(self, step: int, metrics: dict):
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    self.tb.add_scalar(f"{self.name}/{key}", value, step)
        per_step = (time.perf_counter() - self.t_start) / max(1, step - self.first_step)
        line = progress_line(self.name, step, self.max_steps, metrics, per_step * (self.max_steps - step))
        print("\r" + line if self.tty else line, end="" if self.tty and step < self.max_steps else "\n", flush=True)

    def close(self):
        if self.enabled:
            self.jsonl.close()
            if self.tb is not None:
                self.tb.close()


def throughput(micro_batches: list, fm: dict, seconds: float, run, peak_tflops) -> dict:
    """A step's tokens over all processes, tokens/s, MFU against the device's peak, and this process's peak
    memory (one collective: every rank calls it on the same steps)."""
    tokens, flops = all_reduce_sum([sum(mb["input_ids"].numel() for mb in micro_batches),
                                    step_flops(fm, micro_batches)], run.device)
    mfu = flops / run.world_size / seconds / (peak_tflops * 1e12) if peak_tflops else None
    return {"tokens": int(tokens), "tokens_per_s": tokens / seconds, "step_time_s": seconds, "mfu": mfu,
            "mem_gib": memory_gib(run.device)}


# ----------------------------------------------------------------------------------------------------------
# Set-up: process group, dtype, tokenizer, the model's ZeRO units and engine


@dataclass
class Run:
    """Where this process stands: its rank, the world, its device, and the compute dtype."""
    rank: int
    world_size: int
    device: torch.device
    dtype: torch.dtype

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def torch_dtype(name: str) -> torch.dtype:
    if name not in ("float32", "bfloat16"):
        raise SystemExit(f"--dtype={name}: expected float32 or bfloat16")
    return getattr(torch, name)


def setup(cfg: TrainConfig) -> Run:
    """Process group from torchrun's environment (one process without it), seeds, and the device."""
    # torch 2.13 renamed the *_tensor collectives zero.py calls; the warning would repeat on every step
    warnings.filterwarnings("ignore", message=r".*_tensor` is deprecated", category=FutureWarning)
    rank, _, world_size, device = zero.init_distributed()
    if cfg.device:
        device = torch.device(cfg.device)
    # every rank builds the same initial weights (ZeRO3 cuts each rank's shard from them): one seed for all
    torch.manual_seed(cfg.seed)
    return Run(rank, world_size, device, torch_dtype(cfg.dtype))


def shutdown():
    """Leave the process group cleanly (torchrun waits for every rank)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def tokenizer_for(weights_dir: str):
    """The tokenizer that travels with the weights (their tokenizer.json), else o200k_harmony built offline."""
    has_one = bool(weights_dir) and os.path.isfile(os.path.join(weights_dir, "tokenizer.json"))
    return load_tokenizer(weights_dir if has_one else None)


def image_tokens(model, max_tiles: int) -> ImageTokens:
    """How the data pipeline turns each image into image-token ids for this model."""
    return ImageTokens(max_tiles=max_tiles, image_size=model.config.vision.image_size,
                       tokens_per_tile=model.tokens_per_tile, image_token_id=model.image_token_id)


def load_stage_data(cfg, read_record, tok, model, run):
    """The stage's data set (data.datasets.load_dataset with this model's image tokens); with --skip_bad, the
    records it skipped are counted and listed on rank 0 (never silently dropped)."""
    dataset = load_dataset(cfg.data, read_record, tok, image_tokens(model, cfg.max_tiles), skip_bad=cfg.skip_bad)
    if run.is_main and dataset.report.skipped:
        print(f"{cfg.data}: {dataset.report.summary()}", flush=True)
    return dataset


def check_batch(rows: int, micro_batch: int, world_size: int, seq_len: int):
    """Rows per step must split evenly into micro-batches on every process."""
    if rows % (micro_batch * world_size):
        raise SystemExit(f"seq_len {seq_len}: {rows} rows per step is not a multiple of micro_batch={micro_batch} x "
                         f"world_size={world_size}; change --global_batch or --micro_batch")


def vision_blocks_used(model) -> int:
    """Vision blocks whose output reaches the features (LLaVA takes layer -2: the last block never runs)."""
    n = model.config.vision.num_hidden_layers
    layers = model.config.vision_feature_layer
    layers = [layers] if isinstance(layers, int) else list(layers)
    return max(layer % (n + 1) for layer in layers)


def freeze_unused(model):
    """Parameters that no forward uses (vision blocks after the feature layer, the tower's post-norm and pooling
    head) are frozen, so they carry no optimizer state, take no weight decay and stay as loaded."""
    for module in list(model.vision_tower.blocks[vision_blocks_used(model):]) + model.vision_tower.unused_modules():
        module.requires_grad_(False)


def zero_units(model) -> list:
    """The submodules ZeRO3 gathers one at a time, in forward order: vision blocks that run, the projector, the
    GPT blocks. The rest (embeddings, norms, lm_head, unused vision blocks) is the root unit."""
    vision_blocks = list(model.vision_tower.blocks[:vision_blocks_used(model)])
    return vision_blocks + [model.multi_modal_projector] + list(model.language_model.model.layers)


def build_engine(cfg: TrainConfig, model, run: Run, load=None):
    """ZeRO3 (or, with --sharding=fsdp2, PyTorch's fully_shard as a reference) over `model` (trainability
    already set): fp32 masters and AdamW state, compute in run.dtype. load: the reader of llava_on_meta / parts_on_meta for a model
    on the meta device (ZeRO3 fills each rank's shard from it)."""
    if cfg.sharding not in ("zero3", "fsdp2"):
        raise SystemExit(f"--sharding={cfg.sharding}: expected zero3 or fsdp2")
    if cfg.sharding == "fsdp2" and (cfg.resume or cfg.ckpt_every > 0):
        raise SystemExit("--sharding=fsdp2 is a reference path without checkpoints: use --ckpt_every=0 and no "
                         "--resume, or --sharding=zero3")
    if cfg.sharding == "fsdp2" and load is not None:
        raise ValueError("--sharding=fsdp2 needs a model with real weights (the whole-model start that "
                         "--sharded_init=false makes); the sharded meta-device start is ZeRO3's")
    if cfg.router_aux_loss_coef >= 0:
        model.language_model.config.router_aux_loss_coef = cfg.router_aux_loss_coef
    if cfg.sharding == "fsdp2":
        engine_class, extra = zero.FSDP2, {}
    else:
        engine_class, extra = zero.ZeRO3, {"load": load}
    return engine_class(model, zero_units(model), dtype=run.dtype, device=run.device, lr=cfg.lr,
                        betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps, weight_decay=cfg.weight_decay,
                        checkpointing=cfg.activation_checkpointing, **extra)


# ----------------------------------------------------------------------------------------------------------
# The starting model: whole, or on the meta device with a reader of each rank's shard


def start_from_llava(cfg) -> tuple:
    """(model, load) for build_engine from a LLaVA directory (--init_from, the previous stage's final/). With ZeRO3
    and --sharded_init (the default) the model is built on the meta device and `load(name, start, end)` reads a
    flat range of a parameter from the checkpoint, so no rank ever holds the whole model. --sharding=fsdp2 and
    --sharded_init=false load the whole model in fp32 on every rank (about 84 GB for the 20B) and return None.
    --mxfp4_resident loads whole too: the experts stay frozen MXFP4 buffers (~13 GB for the 20B) that every rank
    holds, and the rest (1.8B parameters) is sharded by ZeRO3 as usual."""
    if not cfg.init_from or not os.path.isfile(os.path.join(cfg.init_from, "config.json")):
        raise SystemExit(f"--init_from={cfg.init_from!r}: this stage starts from a LLaVA directory (config.json + "
                         f"safetensors), e.g. the previous stage's <out_dir>/final")
    if cfg.sharding == "fsdp2" or not cfg.sharded_init or cfg.mxfp4_resident:
        # fp32: ZeRO3 casts to cfg.dtype
        return MedGPT.from_pretrained(cfg.init_from, dtype=torch.float32, mxfp4_resident=cfg.mxfp4_resident), None
    return llava_on_meta(cfg.init_from)


def llava_on_meta(path: str) -> tuple:
    """(MedGPT on the meta device, reader) for a LLaVA directory in any of checkpoint.LLAVA_LAYOUTS."""
    model = meta_model(MedGPTConfig.from_json(path))
    return model, checkpoint.llava_reader(model, path)


def parts_on_meta(lm_path: str, vision_path: str, seed: int) -> tuple:
    """(MedGPT on the meta device, reader) for stage 1's parts, what MedGPT.from_parts loads: language-model
    names from the gpt-oss directory (dense or MXFP4), vision-tower names from the vision directory (CLIP, SigLIP,
    open_clip or LLaVA layout), the projector freshly initialised from `seed` (model.new_projector: the same
    values on every rank and as from_parts)."""
    config = MedGPTConfig.from_parts(lm_path, vision_path)
    model = meta_model(config)
    projector = new_projector(config, seed)
    return model, checkpoint.parts_reader(model, lm_path, vision_path, projector.state_dict())


# ----------------------------------------------------------------------------------------------------------
# What each step calls: forward/backward over micro-batches, checkpoints, the final save


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def all_reduce_sum(values: list, device: torch.device) -> list:
    """Sum a few floats over all processes (one collective)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def forward_backward(model, micro_batches: list, run: Run) -> dict:
    """Forward and backward over this process's micro-batches of one step. Each micro-batch's mean loss is
    weighted by its share of the step's target tokens (times world_size, as ZeRO3 averages over ranks), so the
    gradient is that of the mean loss over every target token of the global batch."""
    n_local = [int((mb["targets"] != -100).sum()) for mb in micro_batches]
    n_global, = all_reduce_sum([sum(n_local)], run.device)
    ce_sum = aux_sum = 0.0
    for mb, n in zip(micro_batches, n_local):
        mb = to_device(mb, run.device)
        # n == 0 still runs forward and backward (a zero loss): ZeRO3's collectives need them on every rank
        _, loss = model(mb["input_ids"], mb["pixel_values"], mb["targets"], doc_ids=mb["doc_ids"],
                        position_ids=mb["position_ids"])
        (loss * (n * run.world_size / max(n_global, 1))).backward()
        parts = model.language_model.last_losses
        ce_sum += parts["ce"] * n
        aux_sum += parts["aux"] * n
    ce_sum, aux_sum = all_reduce_sum([ce_sum, aux_sum], run.device)
    return {"ce": ce_sum / max(n_global, 1), "aux": aux_sum / max(n_global, 1), "target_tokens": int(n_global)}


def save_state(engine, cfg: TrainConfig, step: int, loader, guard: NonFiniteGuard) -> str:
    """A resumable checkpoint in <out_dir>/ckpt: ZeRO3's shards, the loader's position, the guard, the config."""
    extra = {"loader": loader.state_dict() if loader is not None else None, "guard": guard.state_dict(),
             "config": dataclasses.asdict(cfg)}
    return zero.save_checkpoint(engine, os.path.join(cfg.out_dir, "ckpt"), step, extra)


def restore_state(engine, cfg: TrainConfig, guard: NonFiniteGuard) -> tuple:
    """(step, saved loader state) from the newest checkpoint in <out_dir>/ckpt, or (0, None) without --resume."""
    if not cfg.resume:
        return 0, None
    ckpt_dir = os.path.join(cfg.out_dir, "ckpt")
    path = zero.latest_checkpoint(ckpt_dir)
    if path is None:
        raise SystemExit(f"--resume: no checkpoint in {ckpt_dir}; run without --resume to start fresh")
    step, extra = zero.load_checkpoint(engine, path)
    guard.load_state_dict(extra["guard"])
    return step, extra["loader"]


def barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def save_final(engine, model, cfg: TrainConfig, run: Run, tokenizer=None) -> str:
    """The trained model to <out_dir>/final in llava-hf's LLaVA layout (what MedGPT.from_pretrained and
    transformers read), streamed one ZeRO3 buffer at a time: no process ever holds the whole model. A LoRA run
    writes the merged model there (adapters folded in, in fp32) and the adapter in peft's format to final/adapter,
    against the base model --init_from named."""
    path = os.path.join(cfg.out_dir, "final")
    lora_run = bool(lora.adapted_modules(model))
    # a collective: every rank iterates to the end (fp32 for a LoRA run: the merge is done in fp32)
    params = zero.iter_full_params(engine, dtype=torch.float32 if lora_run else run.dtype)
    if not run.is_main:
        for _ in params:
            pass
        barrier()
        return path
    adapter = {}  # a LoRA run: lora.merged_params fills it with the adapter's tensors on the way
    if lora_run:
        params = lora.merged_params(params, model, adapter)
    config = model.config.to_dict(run.dtype)
    # MXFP4-resident experts are frozen buffers that every rank holds whole: written back as released
    resident = [(n, b) for n, b in model.named_buffers() if n.endswith(("_blocks", "_scales"))]
    if resident:
        config["quantization_config"] = checkpoint.mxfp4_quantization_config("language_model.")
    checkpoint.write_llava(itertools.chain(params, resident), config, path, dtype=run.dtype,
                           preprocessor=model.config.preprocessor_dict())
    if adapter:
        base = cfg.init_from if os.path.isdir(cfg.init_from) else None  # stage 1 from parts: no single base dir
        checkpoint.write_peft_adapter(adapter, lora.peft_config(model, base), os.path.join(path, "adapter"))
    if tokenizer is not None:
        tokenizer.save(os.path.join(path, "tokenizer.json"))
    barrier()
    return path


# ----------------------------------------------------------------------------------------------------------
# Architectures and the dry run


# The vision ablation of the paper's Fig. 1: each family's tower, random weights, in the tiny demo's size
TINY_TOWERS = {
    "tiny": vision.CLIPVisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=3,
                                    num_attention_heads=4, image_size=112, patch_size=14),
    "tiny-siglip": vision.SiglipVisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=3,
                                             num_attention_heads=4, image_size=112, patch_size=14),
    # open_clip builds timm's named ViTs only: the smallest, vit_tiny (192 wide, 12 blocks, 196 tokens at 224 px)
    "tiny-biomedclip": vision.OpenCLIPVisionConfig(hidden_size=192, intermediate_size=768, num_attention_heads=3,
                                                   timm_model_name="vit_tiny_patch16_224"),
}


def arch_config(name: str):
    """MedGPTConfig of an architecture: 'medgpt-20b' (CLIP ViT-L/14-336 + gpt-oss-20b) or 'tiny' (a CPU-sized
    model that keeps the real 201088-token vocabulary, so the real o200k_harmony tokenizer works); 'tiny-siglip'
    and 'tiny-biomedclip' swap the tiny CLIP tower for another family's (random weights)."""
    if name == "medgpt-20b":
        return MedGPTConfig(text=GPTConfig.preset("gpt-oss-20b"), vision=vision.CLIPVisionConfig())
    if name in TINY_TOWERS:
        # GPTConfig's tiny, narrowed to 64: the 201088-row unembedding dominates a CPU step, its cost is linear in it.
        # 4 layers and a 128-token window (tiny's 16 hides a question from the answer in the sliding layers) let
        # the answer see the question and the image in more than one layer; depth is cheap next to the vocabulary.
        text = GPTConfig.preset("tiny", hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                num_key_value_heads=2, head_dim=16, num_hidden_layers=4, sliding_window=128)
        tower = TINY_TOWERS[name]
        return MedGPTConfig(text=text, vision=tower, vision_feature_layer=tower.feature_layer,
                            vision_feature_select_strategy=tower.select_strategy)
    raise SystemExit(f"--arch={name}: expected medgpt-20b or one of {sorted(TINY_TOWERS)}")


def meta_model(config):
    """MedGPT on the meta device: shapes and counts, no parameter memory. What __init__ computes rather than
    allocates must come out real (ZeRO3 shards parameters only): GPT._inv_freq, an fp32 attribute that is not a
    buffer, is recomputed if it landed on meta; any other meta buffer or tensor attribute is an error."""
    with torch.device("meta"):
        model = MedGPT(config)
    lm = model.language_model
    if lm._inv_freq.is_meta:
        lm._inv_freq, lm.attention_factor = rope_inv_freq(config.text)
    for module_name, module in model.named_modules():
        tensors = {**dict(module.named_buffers(recurse=False)),
                   **{k: v for k, v in vars(module).items() if isinstance(v, torch.Tensor)}}
        for name, t in tensors.items():
            if t.is_meta:
                raise ValueError(f"training.meta_model: {module_name}.{name} is on the meta device; compute it on "
                                 f"the CPU in __init__ (as GPT._inv_freq) or materialise it here")
    return model


def dry_run(cfg: TrainConfig, model, world_size: int, phases: list) -> dict:
    """The plan of a run without running it, for `model` on the meta device with its trainability set: parameter
    counts, the batch arithmetic of each context-length phase [(first step, seq_len, rows per step)], the
    per-GPU memory of ZeRO-3 at the longest context (zero.memory_plan; LoRA adapters and --mxfp4_resident experts
    included) and the memory to serve the model on one device at that context (zero.inference_plan, experts in
    MXFP4 as `inference_gib`, and dense). Printed as one JSON line, last."""
    world_size = cfg.plan_world_size or world_size
    config = model.config
    counts = param_counts(config.text)
    vision_params = sum(p.numel() for p in model.vision_tower.parameters())
    projector_params = sum(p.numel() for p in model.multi_modal_projector.parameters())
    vision_units = [sum(p.numel() for p in b.parameters()) for b in zero_units(model)[:vision_blocks_used(model)]]
    trainable = {"vision": trains(model.vision_tower), "projector": trains(model.multi_modal_projector),
                 "lm": trains(model.language_model)}
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)  # LoRA adapters included
    n_all = sum(p.numel() for p in model.parameters())
    units = zero_units(model)
    in_units = {id(p) for u in units for p in u.parameters()}
    root_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad and id(p) not in in_units)
    largest_trainable = max([root_trainable] + [sum(p.numel() for p in u.parameters() if p.requires_grad)
                                                for u in units])
    for _, length, rows in phases:
        check_batch(rows, cfg.micro_batch, world_size, length)
    longest = max(length for _, length, _ in phases)
    memory = zero.memory_plan(config.text, world_size, longest, micro_batch=cfg.micro_batch,
                              dtype=torch_dtype(cfg.dtype), trainable=n_trainable / n_all,
                              extra_unit_params=vision_units + [projector_params],
                              checkpointing=cfg.activation_checkpointing, largest_trainable=largest_trainable,
                              mxfp4_experts=cfg.mxfp4_resident,
                              head_trains=model.language_model.lm_head.weight.requires_grad)
    # serving the trained model on one device at this context (batch 1, bf16), experts in MXFP4 and dense
    serving = {mxfp4: zero.inference_plan(config.text, longest, mxfp4_experts=mxfp4,
                                          extra_params=vision_params + projector_params) for mxfp4 in (True, False)}
    return {"arch": cfg.arch, "lm_params_total": counts["total"], "lm_params_active": counts["active"],
            "vision_params": vision_params, "projector_params": projector_params, "trainable_params": n_trainable,
            "trains": trainable, "world_size": world_size, "seq_len": longest,
            "seq_len_phases": [{"first_step": s, "seq_len": n, "rows_per_step": r} for s, n, r in phases],
            "global_batch": cfg.global_batch, "micro_batch": cfg.micro_batch,
            "grad_accum": phases[-1][2] // (cfg.micro_batch * world_size),
            "tokens_per_step": phases[-1][2] * phases[-1][1], "max_steps": cfg.max_steps, "lr": cfg.lr,
            "warmup_steps": math.ceil(cfg.warmup_frac * cfg.max_steps), "dtype": cfg.dtype,
            "activation_checkpointing": cfg.activation_checkpointing,
            "lora_rank": cfg.lora_rank, "lora_params": lora.lora_params(model), "mxfp4_resident": cfg.mxfp4_resident,
            "per_gpu_gib": round(memory["total"], 2),
            "per_gpu_gib_parts": {k: round(v, 2) for k, v in memory.items() if k not in ("total", "params_total")},
            "inference_gib": round(serving[True]["total"], 2),
            "inference_gib_parts": {k: round(v, 2) for k, v in serving[True].items() if k != "total"},
            "inference_gib_dense_experts": round(serving[False]["total"], 2)}
