"""
What the three MedGPT-oss training stages share: configuration, the learning-rate schedule, the step loop,
logging, the non-finite guard and the checkpoint glue. Each train_stageN.py holds its design notes and recipe
(presets) and calls `run_stage`, the steps every stage takes, in order.

Design choices
- One flat dataclass, `TrainConfig`, holds every key of every stage. A preset is a plain dict of overrides per
  stage; the command line applies `--key=value` on top (nanoGPT's configurator, minus
  exec). Unknown keys and badly typed values stop the run with the closest valid key. Each stage script keeps
  its own presets at its top, so a stage's recipe is read where the stage is.
- `global_batch` counts sequences per optimizer step over *all* processes; gradient accumulation is derived from
  it and the world size, so 1 or 8 processes take the same steps. The loss of a micro-batch is weighted by its
  share of the step's target tokens (an all-reduced count), so the gradient is the mean over every target token
  of the global batch however the batch is cut into micro-batches and ranks.
- The optimizer, gradient clipping, sharding and sharded checkpoints are zero.py's; this file only drives them.
- The starting model is built on the meta device and each rank reads only its ZeRO-3 shard of the checkpoint
  (build_model -> zero.ZeRO3(load=...)): loading the whole 20B model first would cost ~84 GB of host memory per
  rank. fsdp2 (a reference path) and --sharded_init=false keep the whole-model load.
- LR: linear warm-up over `warmup_frac` of the steps, then cosine decay to `min_lr` (paper: AdamW, cosine).
- Non-finite guard: a step whose loss or gradient norm is not finite is skipped (grads dropped, counted); after
  `max_nonfinite` in a row the run saves a checkpoint and stops with a clear message.
- MFU: model FLOPs (6 x active parameters per token + attention, backward counted as 2 x forward; the unembedding
  only for tokens with a target, as GPT.forward computes it) against a table
  of dense peaks per device (B200, H100, H200, A100) or, on a CPU, a peak measured once with a matmul.
- Logs: one console line per `log_every` steps (a progress bar with ETA on a terminal), `metrics.jsonl` in out_dir
  (TensorBoard too when the `tensorboard` package is installed). Nothing logs sample text.
"""
import dataclasses
import difflib
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import torch

import checkpoint

# ----------------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class TrainConfig:
    # what to train from and where to write
    out_dir: str = "out/stage"
    init_from: str = ""          # stage 1: "parts" (lm_path + clip_path) or "scratch"; stages 2-3: a LLaVA dir
    lm_path: str = ""            # stage 1, init_from=parts: a released gpt-oss directory
    clip_path: str = ""          # stage 1, init_from=parts: a released CLIP directory (CLIPModel checkpoint)
    arch: str = "tiny"           # architecture for init_from=scratch and --dry_run: tiny | medgpt-20b
    data: str = ""               # stage JSONL or mixture JSON (see docs/internals.md)
    system_prompt: str = ""      # stage 3: a system message rendered before every conversation (eval.py's too)
    seed: int = 1337
    # batch and context
    global_batch: int = 128      # sequences per optimizer step, over all processes
    micro_batch: int = 1         # sequences per forward pass on one process
    seq_len: int = 4096          # tokens per sequence (the last length of seq_len_schedule, if one is given)
    seq_len_schedule: str = ""   # "FRAC:LEN,..." e.g. "0:8192,0.5:32768,0.8:131072" (stage 2's long context)
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
    # train what (stage scripts set these; exposed so an ablation is one flag)
    train_vision: bool = True
    train_projector: bool = True
    train_lm: bool = True
    # precision and memory
    dtype: str = "bfloat16"      # compute dtype; master weights and optimizer state are fp32 (zero.py)
    activation_checkpointing: bool = False
    sharding: str = "zero3"  # zero3 (zero.ZeRO3, ours) | fsdp2 (PyTorch's fully_shard: a reference, no checkpoints)
    sharded_init: bool = True    # zero3: model on the meta device, each rank reads only its shard of the weights
    # bookkeeping
    log_every: int = 1
    ckpt_every: int = 0          # steps between resumable checkpoints (0: only at the end)
    resume: bool = False
    dry_run: bool = False
    plan_world_size: int = 0     # --dry_run plans for this many processes (0: this run's world size)
    device: str = ""             # "" = cuda:LOCAL_RANK when CUDA is available, else cpu


def stage_config(presets: dict, argv: list) -> TrainConfig:
    """A stage's config from its `--preset=NAME` (default medgpt-20b) and `--key=value` overrides in argv."""
    preset = "medgpt-20b"
    rest = []
    for arg in argv:
        if arg.startswith("--preset="):
            preset = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    if preset not in presets:
        raise SystemExit(f"--preset={preset}: unknown preset; choose one of {sorted(presets)}")
    cfg = TrainConfig(**presets[preset])
    return apply_overrides(cfg, rest)


def apply_overrides(cfg: TrainConfig, argv: list) -> TrainConfig:
    """Apply `--key=value` (or `--flag` for a boolean) to a copy of cfg, converting to each field's type."""
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    values = {}
    for arg in argv:
        if not arg.startswith("--"):
            raise SystemExit(f"argument {arg!r}: expected --key=value (keys: {', '.join(fields)})")
        key, has_value, text = arg[2:].partition("=")
        key = key.replace("-", "_")
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f"; did you mean --{close[0]}?" if close else f"; keys: {', '.join(fields)}"
            raise SystemExit(f"argument {arg!r}: unknown key {key!r}{hint}")
        kind = type(getattr(cfg, key))
        if not has_value:
            if kind is not bool:
                raise SystemExit(f"argument {arg!r}: --{key} needs a value (--{key}=...)")
            text = "true"
        values[key] = parse_value(key, text, kind)
    return dataclasses.replace(cfg, **values)


def parse_value(key: str, text: str, kind: type):
    if kind is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise SystemExit(f"--{key}={text}: expected true or false")
    try:
        return kind(text)
    except ValueError:
        raise SystemExit(f"--{key}={text}: expected a value of type {kind.__name__}") from None


# ----------------------------------------------------------------------------------------------------------
# Schedules


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up for the first warmup_frac of the steps, then cosine decay from lr to min_lr."""
    warmup = math.ceil(cfg.warmup_frac * cfg.max_steps)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, cfg.max_steps - warmup))
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def parse_seq_len_schedule(text: str, default: int) -> list:
    """'0:8192,0.5:32768' -> [(0.0, 8192), (0.5, 32768)]; '' -> [(0.0, default)]."""
    if not text:
        return [(0.0, default)]
    points = []
    for item in text.split(","):
        frac, _, length = item.partition(":")
        try:
            points.append((float(frac), int(length)))
        except ValueError:
            raise SystemExit(f"--seq_len_schedule={text}: expected FRAC:LEN,... e.g. 0:8192,0.5:32768") from None
    if points[0][0] != 0.0 or any(a[0] >= b[0] for a, b in zip(points, points[1:])):
        raise SystemExit(f"--seq_len_schedule={text}: fractions must start at 0 and increase")
    return points


def seq_len_at(step: int, cfg: TrainConfig) -> int:
    """Context length for this step: the last schedule point whose fraction of max_steps has been reached."""
    length = cfg.seq_len
    for frac, point_len in parse_seq_len_schedule(cfg.seq_len_schedule, cfg.seq_len):
        if step >= frac * cfg.max_steps:
            length = point_len
    return length


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
    import resource
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
    """Rank 0 only: metrics.jsonl (appended, so a resumed run continues it), TensorBoard when installed."""

    def __init__(self, out_dir: str, name: str, enabled: bool):
        self.name, self.enabled, self.tb = name, enabled, None
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

    def log(self, step: int, max_steps: int, metrics: dict, eta_s: float):
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    self.tb.add_scalar(f"{self.name}/{key}", value, step)
        line = progress_line(self.name, step, max_steps, metrics, eta_s)
        print("\r" + line if self.tty else line, end="" if self.tty and step < max_steps else "\n", flush=True)

    def close(self):
        if self.enabled:
            self.jsonl.close()
            if self.tb is not None:
                self.tb.close()


# ----------------------------------------------------------------------------------------------------------
# Set-up: process group, dtype, the model's ZeRO units


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
    import warnings
    import zero
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
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def has_tokenizer(path: str) -> bool:
    return bool(path) and os.path.isfile(os.path.join(path, "tokenizer.json"))


def vision_blocks_used(model) -> int:
    """Vision blocks whose output reaches the features (LLaVA takes layer -2: the last block never runs)."""
    n = model.config.vision.num_hidden_layers
    layers = model.config.vision_feature_layer
    layers = [layers] if isinstance(layers, int) else list(layers)
    return max(layer % (n + 1) for layer in layers)


def freeze_unused(model):
    """Parameters that no forward uses (vision blocks after the feature layer, CLIP's post_layernorm) are frozen,
    so they carry no optimizer state, take no weight decay and stay as loaded."""
    for block in model.vision_tower.encoder.layers[vision_blocks_used(model):]:
        block.requires_grad_(False)
    model.vision_tower.post_layernorm.requires_grad_(False)


def zero_units(model) -> list:
    """The submodules ZeRO3 gathers one at a time, in forward order: vision blocks that run, the projector, the
    GPT blocks. The rest (embeddings, norms, lm_head, unused vision blocks) is the root unit."""
    vision_blocks = list(model.vision_tower.encoder.layers[:vision_blocks_used(model)])
    return vision_blocks + [model.multi_modal_projector] + list(model.language_model.model.layers)


def build_engine(cfg: TrainConfig, model, run: Run, load=None):
    """ZeRO3 (or, with --sharding=fsdp2, PyTorch's fully_shard as a reference) over `model` (trainability
    already set): fp32 masters and AdamW state, compute in run.dtype. load: build_model's reader for a model
    on the meta device (ZeRO3 fills each rank's shard from it)."""
    import zero
    if cfg.sharding not in ("zero3", "fsdp2"):
        raise SystemExit(f"--sharding={cfg.sharding}: expected zero3 or fsdp2")
    if cfg.sharding == "fsdp2" and (cfg.resume or cfg.ckpt_every > 0):
        raise SystemExit("--sharding=fsdp2 is a reference path without checkpoints: use --ckpt_every=0 and no "
                         "--resume, or --sharding=zero3")
    if cfg.sharding == "fsdp2" and load is not None:
        raise ValueError("--sharding=fsdp2 needs a model with real weights (build_model loads the whole model for "
                         "it); the sharded meta-device start is ZeRO3's")
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


def build_model(cfg: TrainConfig, stage: int) -> tuple:
    """(model, load) for build_engine. Stage 1 starts from `parts` (--lm_path, --clip_path) or `scratch`; stages 2
    and 3 from a LLaVA directory (--init_from, the previous stage's final/). With ZeRO3 (and --sharded_init, the
    default) the model is built on the meta device and `load(name, start, end)` reads a flat range of a parameter
    from the checkpoint, so no rank ever holds the whole model. --sharding=fsdp2 and --sharded_init=false load
    the whole model in fp32 on every rank (about 84 GB for the 20B recipe) and return load=None."""
    from model import MedGPT
    whole = cfg.sharding == "fsdp2" or not cfg.sharded_init
    if stage == 1 and cfg.init_from == "scratch":
        return MedGPT(arch_config(cfg.arch)), None  # random weights from the seed every rank set in setup()
    if stage == 1:
        if cfg.init_from != "parts":
            raise SystemExit(f"--init_from={cfg.init_from}: stage 1 starts from 'parts' (--lm_path, --clip_path) or "
                             f"'scratch'")
        if not cfg.lm_path or not cfg.clip_path:
            raise SystemExit("stage 1 with --init_from=parts needs --lm_path=<gpt-oss dir> and "
                             "--clip_path=<CLIP dir> (or --preset=tiny to try it on a CPU)")
        if whole:
            return MedGPT.from_parts(cfg.lm_path, cfg.clip_path, dtype=torch.float32, seed=cfg.seed), None
        return parts_on_meta(cfg.lm_path, cfg.clip_path, cfg.seed)
    if not cfg.init_from or not os.path.isfile(os.path.join(cfg.init_from, "config.json")):
        raise SystemExit(f"--init_from={cfg.init_from!r}: stage {stage} starts from a LLaVA directory (config.json + "
                         f"safetensors), e.g. the previous stage's <out_dir>/final")
    if whole:
        return MedGPT.from_pretrained(cfg.init_from, dtype=torch.float32), None  # fp32: ZeRO3 casts to cfg.dtype
    return llava_on_meta(cfg.init_from)


def llava_on_meta(path: str) -> tuple:
    """(MedGPT on the meta device, reader) for a LLaVA directory in any of checkpoint.LLAVA_LAYOUTS."""
    from model import MedGPTConfig
    model = meta_model(MedGPTConfig.from_json(path))
    return model, checkpoint.llava_reader(model, path)


def parts_on_meta(lm_path: str, clip_path: str, seed: int) -> tuple:
    """(MedGPT on the meta device, reader) for stage 1's parts, what MedGPT.from_parts loads: language-model
    names from the gpt-oss directory (dense or MXFP4), vision-tower names from the CLIP directory (CLIPModel,
    CLIPVisionModel or LLaVA layout), the projector freshly initialised from `seed` (model.new_projector: the
    same values on every rank and as from_parts)."""
    from model import MedGPTConfig, new_projector
    config = MedGPTConfig.from_parts(lm_path, clip_path)
    model = meta_model(config)
    projector = new_projector(config, seed)
    return model, checkpoint.parts_reader(model, lm_path, clip_path, projector.state_dict())


# ----------------------------------------------------------------------------------------------------------
# Data: one loader per context-length phase


def phases(cfg: TrainConfig, world_size: int) -> list:
    """[(first step, seq_len, rows per step)] of the context-length schedule. Tokens per step stay constant:
    global_batch rows at the final seq_len, proportionally more rows at shorter lengths."""
    out = []
    for frac, length in parse_seq_len_schedule(cfg.seq_len_schedule, cfg.seq_len):
        rows = cfg.global_batch * cfg.seq_len // length
        if rows % (cfg.micro_batch * world_size):
            raise SystemExit(f"seq_len {length}: {rows} rows per step (global_batch x seq_len / {length}) is not a "
                             f"multiple of micro_batch={cfg.micro_batch} x world_size={world_size}")
        out.append((math.ceil(frac * cfg.max_steps), length, rows))
    return out


def make_loader(cfg: TrainConfig, dataset, run: Run, seq_len: int, rows: int, phase: int, packing: bool,
                image_size: int):
    """The deterministic, resumable loader (data.loader) for one phase of the schedule."""
    from data.loader import DataLoader
    return DataLoader(dataset, seq_len=seq_len, global_batch_size=rows, micro_batch_size=cfg.micro_batch,
                      seed=cfg.seed + 1000 * phase, rank=run.rank, world_size=run.world_size, packing=packing,
                      max_tiles=cfg.max_tiles, image_size=image_size)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


# ----------------------------------------------------------------------------------------------------------
# Model FLOPs


def flops_model(model, cfg: TrainConfig) -> dict:
    """Forward FLOPs per LM token / per image tile and the training multipliers, from the (unsharded) model.
    A multiplier is 3 when the part's weights train (forward + backward for inputs and weights), 2 when only
    the gradient of its input is needed (something before it trains), 1 when no backward runs through it."""
    from model import param_counts
    lm = model.language_model.config
    vc = model.config.vision
    used = vision_blocks_used(model)
    vision_params = sum(p.numel() for p in model.vision_tower.embeddings.parameters()) \
        + sum(p.numel() for b in model.vision_tower.encoder.layers[:used] for p in b.parameters())
    n_vis = vc.tokens_per_tile + 1  # patches + class token
    projector = sum(p.numel() for p in model.multi_modal_projector.parameters())
    before_lm = cfg.train_vision or cfg.train_projector
    return {
        # the unembedding runs only on rows with a target (GPT.forward), so it is counted per target token
        "lm_per_token": 2 * (param_counts(lm)["active"] - lm.hidden_size * lm.vocab_size),
        "unembed_per_target": 2 * lm.hidden_size * lm.vocab_size,
        "lm_attn": [(lm.num_attention_heads * lm.head_dim, lm.window_of(i)) for i in range(lm.num_hidden_layers)],
        "vision_per_tile": 2 * vision_params * n_vis + used * 4 * vc.hidden_size * n_vis * n_vis
        + 2 * projector * model.tokens_per_tile,
        "lm_mult": 3 if cfg.train_lm else (2 if before_lm else 1),
        "vision_mult": 3 if (cfg.train_vision or cfg.train_projector) else 1,
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
# The step loop


def all_reduce_sum(values: list, device: torch.device) -> list:
    """Sum a few floats over all processes (one collective)."""
    import torch.distributed as dist
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
    import zero
    extra = {"loader": loader.state_dict() if loader is not None else None, "guard": guard.state_dict(),
             "config": dataclasses.asdict(cfg)}
    return zero.save_checkpoint(engine, os.path.join(cfg.out_dir, "ckpt"), step, extra)


def restore_state(engine, cfg: TrainConfig, guard: NonFiniteGuard) -> tuple:
    """(step, saved loader state) from the newest checkpoint in <out_dir>/ckpt, or (0, None) without --resume."""
    import zero
    if not cfg.resume:
        return 0, None
    ckpt_dir = os.path.join(cfg.out_dir, "ckpt")
    path = zero.latest_checkpoint(ckpt_dir)
    if path is None:
        raise SystemExit(f"--resume: no checkpoint in {ckpt_dir}; run without --resume to start fresh")
    step, extra = zero.load_checkpoint(engine, path)
    guard.load_state_dict(extra["guard"])
    return step, extra["loader"]


def train(cfg: TrainConfig, name: str, model, engine, loader_for, run: Run, fm: dict):
    """Run steps until max_steps: schedule, accumulation, clipping, guard, logs, checkpoints.

    loader_for(seq_len, rows, phase) returns the DataLoader of a phase of the context-length schedule;
    fm is flops_model(model, cfg), taken before ZeRO3 emptied the model's parameters.
    """
    guard = NonFiniteGuard(cfg.max_nonfinite)
    step, loader_state = restore_state(engine, cfg, guard)
    plan = phases(cfg, run.world_size)
    logger = MetricsLogger(cfg.out_dir, name, enabled=run.is_main)
    peak_name, peak_tflops = device_peak_tflops(run.device, run.dtype)
    if run.is_main:
        print(f"{name}: {cfg.max_steps} steps from step {step}, world {run.world_size}, device {run.device} "
              f"({peak_name}, peak {peak_tflops or 0:.3g} TFLOP/s {cfg.dtype}), phases (step, seq_len, rows) {plan}",
              flush=True)
    loader, phase = None, -1
    model.train()
    t_run, steps_timed = time.perf_counter(), 0
    try:
        while step < cfg.max_steps:
            current = max(i for i, (first, _, _) in enumerate(plan) if first <= step)
            if current != phase:  # a new context length: a new loader, positioned inside its phase
                if loader is not None:
                    loader.close()
                phase, (first, seq_len, rows) = current, plan[current]
                loader = loader_for(seq_len, rows, phase)
                if loader_state is not None and loader_state["step"] != step - first:
                    raise SystemExit(f"--resume: the checkpoint's loader is at step {loader_state['step']} of its "
                                     f"phase, expected {step - first}; was --seq_len_schedule or --max_steps changed?")
                loader.load_state_dict(loader_state or {**loader.state_dict(), "step": step - first})
                loader_state = None
            t0 = time.perf_counter()
            micro_batches = loader.next_batch()
            lr = lr_at(step, cfg)
            losses = forward_backward(model, micro_batches, run)
            grad_norm = engine.clip_grad_norm_(cfg.grad_clip)
            try:
                if guard.step_ok(losses["ce"] + losses["aux"], grad_norm):
                    engine.step(lr)
                else:
                    engine.zero_grad()
            except NonFiniteError as e:
                engine.zero_grad()
                path = save_state(engine, cfg, step, loader, guard)
                raise SystemExit(f"{name}: stopped at step {step}: {e}. State saved to {path}") from None
            step += 1
            dt = time.perf_counter() - t0
            if step > 1:
                steps_timed += 1  # the first step pays for warm-up; the ETA uses the rest
            if cfg.ckpt_every and step % cfg.ckpt_every == 0 and step < cfg.max_steps:
                save_state(engine, cfg, step, loader, guard)
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                tokens, flops = all_reduce_sum([sum(mb["input_ids"].numel() for mb in micro_batches),
                                                step_flops(fm, micro_batches)], run.device)
                mean_dt = (time.perf_counter() - t_run) / max(1, steps_timed + 1)
                metrics = {"loss": losses["ce"], "aux_loss": losses["aux"], "grad_norm": grad_norm, "lr": lr,
                           "seq_len": plan[phase][1], "tokens": int(tokens), "target_tokens": losses["target_tokens"],
                           "tokens_per_s": tokens / dt, "step_time_s": dt,
                           "mfu": flops / run.world_size / dt / (peak_tflops * 1e12) if peak_tflops else None,
                           "mem_gib": memory_gib(run.device), "skipped_steps": guard.skipped}
                logger.log(step, cfg.max_steps, metrics, eta_s=mean_dt * (cfg.max_steps - step))
    finally:
        if loader is not None:
            loader.close()
        logger.close()
    return step


def barrier():
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def save_final(engine, model, cfg: TrainConfig, run: Run, tokenizer=None) -> str:
    """The trained model to <out_dir>/final in llava-hf's LLaVA layout (what MedGPT.from_pretrained and
    transformers read), streamed one ZeRO3 buffer at a time: no process ever holds the whole model."""
    import zero
    path = os.path.join(cfg.out_dir, "final")
    params = zero.iter_full_params(engine, dtype=run.dtype)  # a collective: every rank iterates to the end
    if not run.is_main:
        for _ in params:
            pass
        barrier()
        return path
    checkpoint.write_llava(params, model.config.to_dict(run.dtype), path)
    if tokenizer is not None:
        tokenizer.save(os.path.join(path, "tokenizer.json"))
    barrier()
    return path


def run_stage(cfg: TrainConfig, stage: int, packing: bool):
    """One stage, start to end, the same steps for all three (what differs is in each script's presets and its
    `packing`): the model on the meta device with a shard reader, trainability, the tokenizer that travels with
    the weights, the data, ZeRO-3, the step loop, the final model in LLaVA format under <out_dir>/final."""
    from data.datasets import ImageTokens, load_dataset
    from data.tokenizer import load_tokenizer
    name = f"stage{stage}"
    run = setup(cfg)
    if cfg.dry_run:
        print(json.dumps(dry_run(cfg, stage, run.world_size)))
        return None

    model, load = build_model(cfg, stage)  # meta device + a reader of each rank's shard
    model.set_trainable(vision=cfg.train_vision, projector=cfg.train_projector, lm=cfg.train_lm)
    freeze_unused(model)
    weights_dir = cfg.lm_path if cfg.init_from == "parts" else cfg.init_from  # stage 1 starts from gpt-oss's dir
    tok = load_tokenizer(weights_dir if weights_dir and has_tokenizer(weights_dir) else None)
    vision_cfg = model.config.vision
    image_tokens = ImageTokens(max_tiles=cfg.max_tiles, image_size=vision_cfg.image_size,
                               tokens_per_tile=model.tokens_per_tile, image_token_id=model.image_token_id)
    dataset = load_dataset(cfg.data, stage, tok, image_tokens, system_prompt=cfg.system_prompt or None)

    fm = flops_model(model, cfg)  # before ZeRO3 takes the parameters' storage
    engine = build_engine(cfg, model, run, load)

    def loader_for(seq_len, rows, phase):
        return make_loader(cfg, dataset, run, seq_len, rows, phase, packing=packing, image_size=vision_cfg.image_size)

    train(cfg, name, model, engine, loader_for, run, fm)
    path = save_final(engine, model, cfg, run, tok)
    if run.is_main:
        print(f"{name}: final model in {path}", flush=True)
    shutdown()
    return path


# ----------------------------------------------------------------------------------------------------------
# Architectures and the dry run


def arch_config(name: str):
    """MedGPTConfig of an architecture: 'medgpt-20b' (CLIP ViT-L/14-336 + gpt-oss-20b) or 'tiny' (a CPU-sized
    model that keeps the real 201088-token vocabulary, so the real o200k_harmony tokenizer works)."""
    import vision
    from model import GPTConfig, MedGPTConfig
    if name == "medgpt-20b":
        return MedGPTConfig(text=GPTConfig.preset("gpt-oss-20b"), vision=vision.CLIPVisionConfig())
    if name == "tiny":
        # GPTConfig's tiny, narrowed to 64: the 201088-row unembedding dominates a CPU step, its cost is linear in it.
        # 4 layers and a 128-token window (tiny's 16 hides a question from the answer in the sliding layers) let
        # the answer see the question and the image in more than one layer; depth is cheap next to the vocabulary.
        text = GPTConfig.preset("tiny", hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                num_key_value_heads=2, head_dim=16, num_hidden_layers=4, sliding_window=128)
        tower = vision.CLIPVisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=3,
                                        num_attention_heads=4, image_size=112, patch_size=14)
        return MedGPTConfig(text=text, vision=tower)
    raise SystemExit(f"--arch={name}: expected tiny or medgpt-20b")


def meta_model(config):
    """MedGPT on the meta device: shapes and counts, no parameter memory. What __init__ computes rather than
    allocates must come out real (ZeRO3 shards parameters only): GPT._inv_freq, an fp32 attribute that is not a
    buffer, is recomputed if it landed on meta; any other meta buffer or tensor attribute is an error."""
    from model import MedGPT, rope_inv_freq
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


def dry_run(cfg: TrainConfig, stage: int, world_size: int) -> dict:
    """The plan of a run without running it: parameter counts, the batch arithmetic, and the per-GPU memory of
    ZeRO-3 at the longest context (zero.memory_plan). Printed as one JSON line, last."""
    world_size = cfg.plan_world_size or world_size
    import zero
    from model import param_counts
    config = arch_config(cfg.arch)
    model = meta_model(config)
    freeze_unused(model)
    counts = param_counts(config.text)
    vision_params = sum(p.numel() for p in model.vision_tower.parameters())
    projector_params = sum(p.numel() for p in model.multi_modal_projector.parameters())
    vision_units = [sum(p.numel() for p in b.parameters()) for b in zero_units(model)[:vision_blocks_used(model)]]
    trainable = {"vision": cfg.train_vision, "projector": cfg.train_projector, "lm": cfg.train_lm}
    n_trainable = (counts["total"] * cfg.train_lm + vision_params * cfg.train_vision
                   + projector_params * cfg.train_projector)
    n_all = counts["total"] + vision_params + projector_params
    plan = phases(cfg, world_size)
    longest = max(length for _, length, _ in plan)
    memory = zero.memory_plan(config.text, world_size, longest, micro_batch=cfg.micro_batch, dtype=torch_dtype(cfg.dtype),
                              trainable=n_trainable / n_all, extra_unit_params=vision_units + [projector_params],
                              checkpointing=cfg.activation_checkpointing)
    out = {"stage": stage, "arch": cfg.arch, "lm_params_total": counts["total"], "lm_params_active": counts["active"],
           "vision_params": vision_params, "projector_params": projector_params, "trainable_params": n_trainable,
           "trains": trainable, "world_size": world_size, "seq_len": longest,
           "seq_len_phases": [{"first_step": s, "seq_len": n, "rows_per_step": r} for s, n, r in plan],
           "global_batch": cfg.global_batch, "micro_batch": cfg.micro_batch,
           "grad_accum": plan[-1][2] // (cfg.micro_batch * world_size),
           "tokens_per_step": plan[-1][2] * longest, "max_steps": cfg.max_steps, "lr": cfg.lr,
           "warmup_steps": math.ceil(cfg.warmup_frac * cfg.max_steps), "dtype": cfg.dtype,
           "activation_checkpointing": cfg.activation_checkpointing,
           "per_gpu_gib": round(memory["total"], 2),
           "per_gpu_gib_parts": {k: round(v, 2) for k, v in memory.items() if k not in ("total", "params_total")}}
    return out


# ----------------------------------------------------------------------------------------------------------
# `make demo`'s closing report: python training.py demo-report out/demo


def demo_report(root: str) -> str:
    """Loss per stage, held-out accuracy per question kind against the majority-answer baseline, and the trained
    model answering one held-out image question. Reads what the demo's steps wrote under root."""
    lines = ["", "## MedGPT-oss nano demo: results", "", "| stage | steps | first loss | last loss |", "|---|---|---|---|"]
    for stage in ("stage1", "stage2", "stage3"):
        with open(os.path.join(root, stage, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        lines.append(f"| {stage} | {rows[-1]['step']} | {rows[0]['loss']:.3f} | {rows[-1]['loss']:.3f} |")
    with open(os.path.join(root, "data", "stats.json")) as f:
        stats = json.load(f)
    with open(os.path.join(root, "data", "eval", "demo_vqa", "test.jsonl")) as f:
        kind_of = {item["id"]: item["kind"] for item in map(json.loads, f)}
    with open(os.path.join(root, "eval", "items.jsonl")) as f:
        records = [r for r in map(json.loads, f) if r["benchmark"] == "demo_vqa"]
    lines += ["", "| held-out question kind | n | trained model | majority answer (from training) |", "|---|---|---|---|"]
    for kind, base in stats["majority_baseline"].items():
        mine = [r["correct"] for r in records if kind_of.get(r["id"]) == kind]
        if mine:
            lines.append(f"| {kind} | {len(mine)} | {100 * sum(mine) / len(mine):.1f}% | "
                         f"{100 * base['accuracy']:.1f}% ('{base['majority_train_answer']}') |")
    accuracy = sum(r["correct"] for r in records) / len(records)
    baseline = stats["majority_baseline_demo_vqa"]
    with open(os.path.join(root, "eval", "results.json")) as f:
        low, high = json.load(f)["benchmarks"]["demo_vqa"]["ci95"]  # eval.py's bootstrap interval, in percent
    verdict = "beats" if accuracy > baseline else "does NOT beat"
    # say whether the margin is more than resampling noise: the baseline inside the interval means it is not
    margin = ("clearly (the baseline is below the 95% interval)" if 100 * baseline < low else
              "but within noise (the baseline is inside the 95% interval)" if accuracy > baseline else "")
    lines += [f"| **all demo_vqa** | {len(records)} | **{100 * accuracy:.1f}%** (95% CI {low:.1f}-{high:.1f}) | "
              f"{100 * baseline:.1f}% |", "",
              f"The trained model {verdict} the majority-answer baseline on held-out images {margin}".rstrip() + "."]
    oracle = stats.get("best_constant_baseline_demo_vqa")
    if oracle is not None:  # stricter: the best constant answer per kind, chosen on the held-out answers
        side = ("below" if 100 * oracle < low else "inside" if 100 * oracle <= high else "above")
        lines.append(f"Stricter check: the best constant answer per kind, chosen on the held-out set itself, scores "
                     f"{100 * oracle:.1f}% ({side} the model's 95% interval).")
    return "\n".join(lines)


def demo_answer(root: str) -> str:
    """The trained model answering the first held-out image question (greedy, eval.py's prompt)."""
    import eval as harness
    items = harness.load_items(os.path.join(root, "data", "eval"), "demo_vqa", limit=1)
    model, is_multimodal = harness.load_model(os.path.join(root, "stage3", "final"), torch.float32, "cpu")
    # reasoning: the demo model names the modality in its analysis message first (data/demo.py), as `make demo`
    # evaluates it (eval.py --reasoning)
    encoder = harness.Encoder(harness.load_tokenizer_for(os.path.join(root, "stage3", "final")), model,
                              is_multimodal, reasoning=True)
    item = items[0]
    answer = harness.predict(model, is_multimodal, encoder, [item], 1, 24)[0]
    return (f"\nimage: {item['images'][0]}\nquestion: {harness.build_prompt(item)}\n"
            f"model answer: {answer!r}   (reference: {item['answer']!r})")


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "demo-report":
        raise SystemExit("usage: python training.py demo-report OUT_DIR   (the stage scripts are train_stage{1,2,3}.py)")
    print(demo_answer(sys.argv[2]))
    print(demo_report(sys.argv[2]))
