"""
Hand-rolled ZeRO-3 on torch.distributed: sharded parameters, gradients and AdamW state; sharded checkpoints;
streaming consolidation; a memory plan; PyTorch's FSDP2 as a reference.

Design choices
- Model-agnostic: `ZeRO3(model, units)` takes the model and the list of submodules to shard one by one (each GPT
  block, each vision block, the projector). Parameters that belong to no listed unit (embeddings, final norm,
  lm_head) form the root unit, gathered for the whole forward of the model (GPT reads lm_head.weight directly).
- One unit = one flat buffer of its trainable parameters and one of its frozen ones, each padded to a multiple of
  the world size; rank r owns elements [r * S, (r + 1) * S). The flat layout does not depend on the world size (only
  the padding does), which is what makes an N -> M checkpoint reshard a plain range copy.
- Parameters stay the model's own nn.Parameter objects; gathering points `param.data` at a view of the gathered
  flat buffer, freeing points it at an empty tensor. Autograd keeps the Parameter itself, so a re-gather before
  backward is all it needs (DeepSpeed's trick; setting .data does not bump version counters).
- Hooks: forward pre-hook gathers (and starts the async all-gather of the next unit: prefetch), forward hook
  frees; full-backward pre-hook re-gathers (and prefetches the unit that ran before); each trainable parameter's
  post-accumulate-grad hook counts, and the unit's last one reduce-scatters the unit's gradient (async, one in
  flight) into the fp32 shard accumulator, then frees. A callback at the end of backward flushes the rest. So at
  most about two units are ever gathered and no full gradient of the model ever exists.
- Collectives pair up across ranks: every rank must run the same units in the same order each forward (MedGPT runs
  its vision tower even on text-only micro-batches, with zero tiles if need be). List units in the order the model
  calls them: forward prefetch follows the list.
- Compute dtype (`dtype`) for the gathered parameters; fp32 master shard, fp32 gradient accumulator and fp32 AdamW
  moments for trainable parameters only. With dtype=float32 the master *is* the compute shard (exact tests).
  Gradients are reduce-scattered in `reduce_dtype` (fp32 by default: sums of bf16 gradients lose bits).
- Frozen parameters (requires_grad False when wrapping) are sharded and gathered like the rest but carry no
  master copy, gradient or optimizer state. Set trainability before wrapping.
- AdamW (decoupled weight decay, torch.optim.AdamW's formula) on the flat fp32 shards. Weight decay goes to
  matrices and convolutions (dim >= 2) except nn.Embedding tables; never to biases, norms, sinks, router biases or
  class/position embeddings. Decay is applied on the shard's (start, end) segments, no per-element mask.
- Gradient clipping: the squared norms of all local gradient shards, all-reduced, give the global norm
  (torch.nn.utils.clip_grad_norm_'s formula).
- Activation checkpointing per unit (torch.utils.checkpoint, non-reentrant), on or off for all units.
- Meta-device start: build the model under torch.device("meta") and pass `load=reader`; each rank reads only the
  flat range of every parameter that its shard covers (checkpoint.SafetensorsReader reads rows of safetensors
  files and dequantises MXFP4 experts one expert at a time), so no process ever holds the whole model.
- Checkpoints: `<root>/step_XXXXXXXX/` holds `rank00000.safetensors` (fp32 masters or frozen shards, AdamW moments,
  torch RNG), `rank00000.json` (the caller's `extra` dict: schedule, data-loader position, ...; python/numpy RNG)
  and `manifest.json` (layout, step). Written into `.tmp` and renamed by rank 0 after a barrier: a crash leaves
  the previous checkpoint whole. `latest` names the newest. Resume on any world size (range copy).
- Consolidation streams tensor by tensor: `iter_checkpoint_params` reads a checkpoint's shards from disk, one
  parameter at a time; `iter_full_params` gathers one unit at a time from a live run.
- Communication is counted (bytes of full buffers moved per collective kind) in `ZeRO3.comm_bytes`.
- On CUDA, NCCL runs async collectives on its own stream (the side stream); `wait()` makes compute wait for it.
- Memory plans: `memory_plan` (ZeRO-3 training per GPU: full, projector-only or LoRA; experts dense or
  MXFP4-resident) and `inference_plan` (one device generating at a context length), from the config alone.
- `FSDP2` is PyTorch's fully_shard on the same units behind the same engine methods (`--sharding=fsdp2`): the
  reference ZeRO3 is measured against. torch.optim.AdamW on DTensors; no checkpoints (it refuses, clearly).
"""
import json
import math
import os
import random
import shutil
import warnings
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.checkpoint import checkpoint

import fused_cpu

# the first unit's inputs (token ids) never need a gradient; that is expected, not worth a warning per step
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed with respect "
                                          "to module outputs since no inputs require gradients")

# ----------------------------------------------------------------------------------------------------------
# Process group


def init_distributed(backend=None):
    """(rank, local_rank, world_size, device) from torchrun's RANK / LOCAL_RANK / WORLD_SIZE; one process without them.
    NCCL on CUDA, gloo on CPU. Nothing here assumes a single node."""
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        backend = backend or ("nccl" if device.type == "cuda" else "gloo")
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    return rank, local_rank, world_size, device


def _world():
    """(rank, world_size) of the default group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier():
    if _world()[1] > 1:
        dist.barrier()


def default_decay(name, param, module):
    """Weight decay for matrices and convolutions, not for embedding tables, biases, norms, sinks."""
    return param.dim() >= 2 and not isinstance(module, nn.Embedding)


# ----------------------------------------------------------------------------------------------------------
# Flat shards


@dataclass
class Slot:
    """One parameter's place in a flat buffer."""
    name: str            # full name in the model (state-dict name)
    param: nn.Parameter  # the model's own Parameter; its .data is a view of the gathered buffer or empty
    module: nn.Module    # the module that holds it, as `attr` (to replace a meta-device Parameter)
    attr: str
    shape: tuple
    offset: int          # first element in the (unpadded) flat buffer
    numel: int
    decay: bool


class FlatShard:
    """The trainable (or the frozen) parameters of one unit, flattened, padded to the world size, sharded."""

    def __init__(self, unit_name, trainable, slots, rank, world_size, device, dtype):
        self.key = f"{unit_name or '<root>'}.{'trainable' if trainable else 'frozen'}"
        self.trainable, self.slots = trainable, slots
        self.numel = sum(s.numel for s in slots)
        self.shard_numel = -(-self.numel // world_size)  # ceil: padding goes at the end of the last shard
        self.lo = rank * self.shard_numel  # this rank's first element in the flat buffer
        self.shard = torch.zeros(self.shard_numel, dtype=dtype, device=device)  # compute dtype: what is gathered
        self.master = self.grad = self.exp_avg = self.exp_avg_sq = None
        if trainable:
            fp32 = dict(dtype=torch.float32, device=device)
            self.master = self.shard if dtype == torch.float32 else torch.zeros(self.shard_numel, **fp32)
            self.grad = torch.zeros(self.shard_numel, **fp32)
            self.exp_avg = torch.zeros(self.shard_numel, **fp32)
            self.exp_avg_sq = torch.zeros(self.shard_numel, **fp32)
        self.full = None      # gathered flat buffer (world_size * shard_numel,) while gathered
        self.handle = None    # async all-gather in flight
        self.decay_segments = [(a, b) for slot, a, b, _ in self.pieces() if slot.decay]

    def pieces(self):
        """(slot, shard_start, shard_end, param_start): the part of each parameter inside this rank's shard."""
        hi = self.lo + self.shard_numel
        for slot in self.slots:
            a, b = max(slot.offset, self.lo), min(slot.offset + slot.numel, hi)
            if a < b:
                yield slot, a - self.lo, b - self.lo, a - slot.offset


class Unit:
    """A module whose parameters are gathered together (a block, the projector, or the root)."""

    def __init__(self, name, module, buffers):
        self.name, self.module, self.buffers = name, module, buffers
        self.trainable_slots = [s for b in buffers if b.trainable for s in b.slots]
        self.gathered = False
        self.needs_backward = False   # its forward output required grad: backward will come through it
        self.grads_seen = 0           # trainable parameters whose gradient arrived in this backward
        self.reduced = False
        self.backward_done = False


# ----------------------------------------------------------------------------------------------------------
# ZeRO-3


class ZeRO3:
    """Shard `model`'s parameters per unit over the default process group and train them with AdamW.

    units: submodules of model, in the order forward calls them, none inside another.
    dtype: compute dtype of gathered parameters (fp32 masters and optimizer state either way).
    load: for a model on the meta device, `load(name, start, end) -> 1-D tensor` of elements [start, end) of the
        flattened parameter `name` (see checkpoint.SafetensorsReader); otherwise shards are cut from the model's values.
    """

    def __init__(self, model, units, *, dtype=torch.float32, device=None, lr=1e-4, betas=(0.9, 0.95), eps=1e-8,
                 weight_decay=0.0, checkpointing=False, reduce_dtype=torch.float32, decay=default_decay, load=None):
        self.model, self.dtype, self.reduce_dtype = model, dtype, reduce_dtype
        self.rank, self.world_size = _world()
        self.device = torch.device(device) if device is not None else _default_device()
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.adam_step = 0
        self.comm_bytes = Counter()  # bytes of full buffers moved, per collective kind
        self._empty = torch.empty(0, dtype=dtype, device=self.device)
        self.units = self._build_units(model, units, decay, load)  # root last
        self.root = self.units[-1]
        self._forward_order = []   # units in the order this step's forward ran them
        self._in_backward = False
        self._pending_reduce = None
        self._install_hooks(checkpointing)

    # --- building ------------------------------------------------------------------------------------------

    def _build_units(self, model, unit_modules, decay, load):
        names = {id(m): n for n, m in model.named_modules()}
        for m in unit_modules:
            if id(m) not in names:
                raise ValueError(f"ZeRO3: unit {type(m).__name__} is not a submodule of the model")
        unit_names = [names[id(m)] for m in unit_modules]
        for a in unit_names:
            for b in unit_names:
                if a != b and b.startswith(a + ".") or (a == b and unit_names.count(a) > 1) or a == "":
                    raise ValueError(f"ZeRO3: units must be distinct, non-nested submodules; got {a!r} and {b!r}")
        owner = {}  # parameter name -> unit index (root = len(units))
        for i, prefix in enumerate(unit_names):
            for n, _ in unit_modules[i].named_parameters(prefix=prefix):
                owner[n] = i
        module_of = {n + "." + pn: m for n, m in model.named_modules() for pn, _ in m.named_parameters(recurse=False)}
        module_of.update({pn: model for pn, _ in model.named_parameters(recurse=False)})
        grouped = [[] for _ in range(len(unit_modules) + 1)]
        for n, p in model.named_parameters():
            grouped[owner.get(n, len(unit_modules))].append((n, p))
        for n, buf in model.named_buffers():
            if buf.is_meta:
                raise ValueError(f"ZeRO3: buffer {n} is on the meta device; materialise buffers before wrapping "
                                 f"(only parameters are sharded)")
        units = []
        for i, params in enumerate(grouped):
            name = unit_names[i] if i < len(unit_modules) else ""
            module = unit_modules[i] if i < len(unit_modules) else model
            buffers = []
            for trainable in (True, False):
                chosen = [(n, p) for n, p in params if p.requires_grad == trainable]
                if not chosen:
                    continue
                slots, offset = [], 0
                for n, p in chosen:
                    m = module_of[n]
                    slots.append(Slot(n, p, m, n.rsplit(".", 1)[-1], tuple(p.shape), offset, p.numel(), decay(n, p, m)))
                    offset += p.numel()
                buf = FlatShard(name, trainable, slots, self.rank, self.world_size, self.device, self.dtype)
                self._fill_shard(buf, load)
                buffers.append(buf)
            units.append(Unit(name, module, buffers))
        return units

    @torch.no_grad()
    def _fill_shard(self, buf, load):
        """Copy this rank's range of every parameter into the shard, then release the parameter's full tensor."""
        target = buf.master if buf.trainable else buf.shard
        for slot, a, b, pa in buf.pieces():
            if slot.param.is_meta:
                if load is None:
                    raise ValueError(f"ZeRO3: parameter {slot.name} is on the meta device and no `load` was given")
                piece = load(slot.name, pa, pa + (b - a))
                if piece.numel() != b - a:
                    raise ValueError(f"ZeRO3: load({slot.name!r}, {pa}, {pa + b - a}) returned {piece.numel()} elements")
            else:
                piece = slot.param.detach().reshape(-1)[pa:pa + (b - a)]
            target[a:b].copy_(piece)
        if buf.master is not None and buf.master is not buf.shard:
            buf.shard.copy_(buf.master)
        for slot in buf.slots:
            if slot.param.is_meta:  # a meta tensor cannot take CPU/CUDA data: a fresh Parameter takes its place
                slot.param = nn.Parameter(self._empty, requires_grad=slot.param.requires_grad)
                setattr(slot.module, slot.attr, slot.param)
            slot.param.data = self._empty

    def _install_hooks(self, checkpointing):
        for unit in self.units:
            m = unit.module
            m.register_forward_pre_hook(lambda mod, args, u=unit: self._pre_forward(u))
            m.register_forward_hook(lambda mod, args, out, u=unit: self._post_forward(u, out))
            m.register_full_backward_pre_hook(lambda mod, grad_out, u=unit: self._pre_backward(u))
            m.register_full_backward_hook(lambda mod, grad_in, grad_out, u=unit: self._post_backward(u))
            for slot in unit.trainable_slots:
                slot.param.register_post_accumulate_grad_hook(lambda p, u=unit: self._on_grad(u))
            if checkpointing and unit is not self.units[-1]:
                m.forward = _checkpointed(m.forward)

    # --- gather / free -------------------------------------------------------------------------------------

    def _start_gather(self, unit):
        """Begin the all-gather of unit's buffers (async); a no-op if gathered or in flight."""
        if unit.gathered:
            return
        unit.gathered = True
        for buf in unit.buffers:
            if self.world_size == 1:
                buf.full = buf.shard
                continue
            buf.full = torch.empty(buf.shard_numel * self.world_size, dtype=self.dtype, device=self.device)
            buf.handle = dist.all_gather_into_tensor(buf.full, buf.shard, async_op=True)
            self.comm_bytes["all_gather"] += buf.full.numel() * buf.full.element_size()

    def _gather(self, unit):
        """Make unit's parameters whole: wait for its all-gather and point each parameter at its view."""
        self._start_gather(unit)
        for buf in unit.buffers:
            if buf.handle is not None:
                buf.handle.wait()
                buf.handle = None
            for slot in buf.slots:
                if slot.param.data.numel() != slot.numel:
                    slot.param.data = buf.full[slot.offset:slot.offset + slot.numel].view(slot.shape)  # (param shape)

    def _free(self, unit):
        for buf in unit.buffers:
            if buf.handle is not None:
                buf.handle.wait()
                buf.handle = None
            for slot in buf.slots:
                slot.param.data = self._empty
            buf.full = None
        unit.gathered = False

    # --- hooks ---------------------------------------------------------------------------------------------

    def _pre_forward(self, unit):
        if self._in_backward:  # recomputation under activation checkpointing: already gathered for backward
            return
        if unit is self.root:
            self._forward_order = []
        self._forward_order.append(unit)
        self._gather(unit)
        if unit is self.root:
            nxt = self.units[0] if len(self.units) > 1 else None
        else:
            i = self.units.index(unit)
            nxt = self.units[i + 1] if i + 1 < len(self.units) - 1 else None
        if nxt is not None:
            self._start_gather(nxt)  # prefetch: overlaps with this unit's compute

    def _post_forward(self, unit, output):
        if self._in_backward:
            return
        unit.needs_backward = torch.is_grad_enabled() and any(t.requires_grad for t in _tensors(output))
        self._free(unit)
        if unit is self.root:  # a prefetch that forward never used must not stay gathered
            for u in self.units:
                if u.gathered:
                    self._free(u)

    def _pre_backward(self, unit):
        if not self._in_backward:
            self._in_backward = True
            torch.autograd.Variable._execution_engine.queue_callback(self._finish_backward)
        self._gather(unit)
        # prefetch the unit that ran before this one in forward, if backward goes through it
        order = self._forward_order
        if unit in order:
            i = order.index(unit)
            for prev in reversed(order[:i]):
                if prev.needs_backward and prev is not self.root:
                    self._start_gather(prev)
                    break

    def _on_grad(self, unit):
        unit.grads_seen += 1
        if unit.grads_seen == len(unit.trainable_slots):
            self._reduce(unit)
            self._maybe_free_after_backward(unit)

    def _post_backward(self, unit):
        unit.backward_done = True
        self._maybe_free_after_backward(unit)

    def _maybe_free_after_backward(self, unit):
        if unit.backward_done and (unit.reduced or not unit.trainable_slots) and unit is not self.root:
            self._free(unit)

    def _finish_backward(self):
        """End of backward: reduce what has not been reduced (parameters without a gradient count as zero), free."""
        for unit in reversed(self._forward_order):
            if unit.trainable_slots and unit.needs_backward and not unit.reduced:
                self._reduce(unit)
        self._wait_reduce()
        for unit in self.units:
            if unit.gathered:
                self._free(unit)
            unit.grads_seen, unit.reduced, unit.backward_done, unit.needs_backward = 0, False, False, False
        self._in_backward = False

    # --- gradients -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def _reduce(self, unit):
        """Reduce-scatter the unit's trainable gradients (mean over ranks) and add them to the fp32 shards."""
        unit.reduced = True
        for buf in unit.buffers:
            if not buf.trainable:
                continue
            flat = torch.zeros(buf.shard_numel * self.world_size, dtype=self.reduce_dtype, device=self.device)
            for slot in buf.slots:
                if slot.param.grad is not None:
                    flat[slot.offset:slot.offset + slot.numel].copy_(slot.param.grad.reshape(-1))  # (numel,)
                    slot.param.grad = None
            self._wait_reduce()  # one reduce-scatter in flight at a time bounds the memory of flat gradients
            if self.world_size == 1:
                buf.grad.add_(flat)
                continue
            out = torch.empty(buf.shard_numel, dtype=self.reduce_dtype, device=self.device)
            handle = dist.reduce_scatter_tensor(out, flat, op=dist.ReduceOp.SUM, async_op=True)
            self.comm_bytes["reduce_scatter"] += flat.numel() * flat.element_size()
            self._pending_reduce = (handle, out, buf, flat)

    def _wait_reduce(self):
        if self._pending_reduce is None:
            return
        handle, out, buf, _ = self._pending_reduce
        handle.wait()
        buf.grad.add_(out.float(), alpha=1.0 / self.world_size)
        self._pending_reduce = None

    def trainable_buffers(self):
        return [b for u in self.units for b in u.buffers if b.trainable]

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm):
        """Scale the accumulated gradients so their global L2 norm is at most max_norm (0: no clipping).
        Returns the norm before clipping (a float, equal on every rank)."""
        sq = torch.zeros((), dtype=torch.float32, device=self.device)
        for buf in self.trainable_buffers():
            sq += buf.grad.pow(2).sum()
        if self.world_size > 1:
            dist.all_reduce(sq)
            self.comm_bytes["all_reduce"] += sq.element_size()
        norm = sq.sqrt()
        if max_norm and max_norm > 0:
            coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
            for buf in self.trainable_buffers():
                buf.grad.mul_(coef)
        return norm.item()

    def zero_grad(self):
        """Drop the accumulated gradients (after a step, or to skip a non-finite one)."""
        for buf in self.trainable_buffers():
            buf.grad.zero_()

    @torch.no_grad()
    def step(self, lr=None):
        """One AdamW step on the fp32 master shards (torch.optim.AdamW's formula), then zero the gradients."""
        lr = self.lr if lr is None else lr
        self.adam_step += 1
        beta1, beta2 = self.betas
        bias1, bias2 = 1 - beta1 ** self.adam_step, 1 - beta2 ** self.adam_step
        for buf in self.trainable_buffers():
            p, g = buf.master, buf.grad
            if self.weight_decay:
                for a, b in buf.decay_segments:
                    p[a:b].mul_(1 - lr * self.weight_decay)
            buf.exp_avg.lerp_(g, 1 - beta1)
            buf.exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (buf.exp_avg_sq.sqrt() / math.sqrt(bias2)).add_(self.eps)
            p.addcdiv_(buf.exp_avg, denom, value=-lr / bias1)
            if buf.shard is not p:
                buf.shard.copy_(p)
        self.zero_grad()

    # --- inspection ----------------------------------------------------------------------------------------

    def memory_bytes(self):
        """Bytes this rank holds for parameters (compute shards + fp32 masters), gradients and optimizer state."""
        out = Counter()
        for unit in self.units:
            for buf in unit.buffers:
                out["params"] += _nbytes(buf.shard)
                if buf.trainable:
                    out["params"] += 0 if buf.master is buf.shard else _nbytes(buf.master)
                    out["grads"] += _nbytes(buf.grad)
                    out["optimizer"] += _nbytes(buf.exp_avg) + _nbytes(buf.exp_avg_sq)
        return dict(out)

    def layout(self):
        """The flat layout (independent of the world size), as written to a checkpoint's manifest."""
        return [{"key": b.key, "trainable": b.trainable, "numel": b.numel,
                 "params": [[s.name, list(s.shape), s.offset] for s in b.slots]}
                for u in self.units for b in u.buffers]

    @contextmanager
    def gathered(self):
        """All parameters whole inside the block (evaluation or generation of a model that fits one device)."""
        for unit in self.units:
            self._gather(unit)
        try:
            yield self.model
        finally:
            for unit in self.units:
                self._free(unit)


def _default_device():
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _nbytes(t):
    return t.numel() * t.element_size()


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    return []


def _checkpointed(forward):
    """forward under non-reentrant activation checkpointing while grad is on (the unit keeps only its inputs)."""
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return run


# ----------------------------------------------------------------------------------------------------------
# Sharded checkpoints


def _rng_state():
    state = {"python": _jsonable(random.getstate()), "numpy": _jsonable(np.random.get_state())}
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    return state, tensors


def _set_rng_state(state, tensors):
    random.setstate(_tuples(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])


def _jsonable(x):
    if isinstance(x, (tuple, list)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    return x


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, list) else x


def save_checkpoint(zero, root, step, extra=None, keep_last=2):
    """Write `<root>/step_<step>/` (every rank its shards, rank 0 the manifest) atomically; returns its path.
    extra: this rank's JSON-able state (schedule, data-loader position, ...), returned by load_checkpoint."""
    _refuse_fsdp2(zero, root)
    final = os.path.join(root, f"step_{step:08d}")
    tmp = final + ".tmp"
    if zero.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier()
    rng_json, tensors = _rng_state()
    for unit in zero.units:
        for buf in unit.buffers:
            tensors[buf.key + ".param"] = buf.master if buf.trainable else buf.shard
            if buf.trainable:
                tensors[buf.key + ".exp_avg"] = buf.exp_avg
                tensors[buf.key + ".exp_avg_sq"] = buf.exp_avg_sq
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    save_file(tensors, os.path.join(tmp, f"rank{zero.rank:05d}.safetensors"))
    _write_json(os.path.join(tmp, f"rank{zero.rank:05d}.json"), {"extra": extra, "rng": rng_json})
    _barrier()
    if zero.rank == 0:
        manifest = {"format": "medgpt-zero3", "step": step, "adam_step": zero.adam_step,
                    "world_size": zero.world_size, "dtype": str(zero.dtype).removeprefix("torch."),
                    "buffers": zero.layout()}
        _write_json(os.path.join(tmp, "manifest.json"), manifest)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)  # the atomic step: a checkpoint directory is complete or absent
        _write_json(os.path.join(root, "latest.tmp"), {"path": os.path.basename(final)})
        os.replace(os.path.join(root, "latest.tmp"), os.path.join(root, "latest"))
        done = sorted(d for d in os.listdir(root) if d.startswith("step_") and not d.endswith(".tmp"))
        for old in done[:-keep_last] if keep_last else []:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    _barrier()
    return final


def _refuse_fsdp2(engine, path):
    if isinstance(engine, FSDP2):
        raise ValueError(f"{path}: --sharding=fsdp2 is a reference path; checkpoints need --sharding=zero3 "
                         f"(run fsdp2 with --ckpt_every=0 and without --resume)")


def latest_checkpoint(root):
    """Path of the newest complete checkpoint under root, or None."""
    pointer = os.path.join(root, "latest")
    if os.path.exists(pointer):
        with open(pointer) as f:
            path = os.path.join(root, json.load(f)["path"])
        if os.path.exists(os.path.join(path, "manifest.json")):
            return path
    done = sorted(d for d in os.listdir(root) if d.startswith("step_") and not d.endswith(".tmp")) \
        if os.path.isdir(root) else []
    return os.path.join(root, done[-1]) if done else None


def _write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())


class _ShardFiles:
    """Reads flat ranges of a checkpoint's buffers across its rank files (any world size)."""

    def __init__(self, path):
        with open(os.path.join(path, "manifest.json")) as f:
            self.manifest = json.load(f)
        self.path, self.world_size = path, self.manifest["world_size"]
        self.buffers = {b["key"]: b for b in self.manifest["buffers"]}
        self.handles = {}

    def file(self, rank):
        if rank not in self.handles:
            self.handles[rank] = safe_open(os.path.join(self.path, f"rank{rank:05d}.safetensors"), framework="pt")
        return self.handles[rank]

    def read(self, key, what, start, end):
        """Elements [start, end) of flat buffer `key`'s `what` (param, exp_avg, exp_avg_sq), pieced from rank files."""
        shard = -(-self.buffers[key]["numel"] // self.world_size)
        pieces = []
        for r in range(start // shard, -(-end // shard)):
            a, b = max(start, r * shard) - r * shard, min(end, (r + 1) * shard) - r * shard
            pieces.append(self.file(r).get_slice(f"{key}.{what}")[a:b])
        return torch.cat(pieces) if pieces else torch.empty(0)


def load_checkpoint(zero, path):
    """Restore parameters, AdamW state, RNG states from a checkpoint written by any number of processes.
    Returns (step, extra) where extra is what this rank (or rank % N of an N-process checkpoint) saved."""
    _refuse_fsdp2(zero, path)
    files = _ShardFiles(path)
    mine = zero.layout()
    theirs = files.manifest["buffers"]
    if [(b["key"], b["params"]) for b in mine] != [(b["key"], b["params"]) for b in theirs]:
        diff = next((a, b) for a, b in zip(mine + [None] * len(theirs), theirs + [None] * len(mine)) if a != b)
        raise ValueError(f"{path}/manifest.json: the checkpoint's parameter layout differs from the model's "
                         f"(first difference: model {diff[0] and diff[0]['key']} vs checkpoint "
                         f"{diff[1] and diff[1]['key']}). Same model config and the same trainable parameters are "
                         f"needed to resume; to change them, consolidate and start a new run from the weights.")
    with torch.no_grad():
        for unit in zero.units:
            for buf in unit.buffers:
                end = min(buf.lo + buf.shard_numel, buf.numel)
                n = max(0, end - buf.lo)
                whats = ("param", "exp_avg", "exp_avg_sq") if buf.trainable else ("param",)
                targets = (buf.master, buf.exp_avg, buf.exp_avg_sq) if buf.trainable else (buf.shard,)
                for what, target in zip(whats, targets):
                    target.zero_()
                    if n:
                        target[:n].copy_(files.read(buf.key, what, buf.lo, end))
                if buf.trainable:
                    buf.grad.zero_()
                    if buf.shard is not buf.master:
                        buf.shard.copy_(buf.master)
    zero.adam_step = files.manifest["adam_step"]
    src_rank = zero.rank % files.world_size
    with open(os.path.join(path, f"rank{src_rank:05d}.json")) as f:
        saved = json.load(f)
    rng_tensors = {k: files.file(src_rank).get_tensor(k) for k in ("rng.torch", "rng.cuda")
                   if k in files.file(src_rank).keys()}
    _set_rng_state(saved["rng"], rng_tensors)
    return files.manifest["step"], saved["extra"]


# ----------------------------------------------------------------------------------------------------------
# Consolidation (full tensors, one at a time)


def iter_checkpoint_params(path):
    """(name, tensor) for every parameter of a sharded checkpoint, read from disk one tensor at a time:
    no process group, no model, memory of one tensor."""
    files = _ShardFiles(path)
    for buf in files.manifest["buffers"]:
        for name, shape, offset in buf["params"]:
            numel = math.prod(shape)
            yield name, files.read(buf["key"], "param", offset, offset + numel).reshape(shape)  # (param shape)


def iter_full_params(zero, dtype=torch.float32):
    """(name, tensor on CPU) for every parameter of a live run, gathering one buffer at a time on every rank
    (a collective: every rank must iterate to the end). Trainable values come from the fp32 masters.
    An FSDP2 engine: DTensor.full_tensor() one parameter at a time."""
    if isinstance(zero, FSDP2):
        for name, param in zero.model.named_parameters():
            yield name, param.detach().full_tensor().to("cpu", dtype)
        return
    for unit in zero.units:
        for buf in unit.buffers:
            src = buf.master if buf.trainable else buf.shard
            full = src
            if zero.world_size > 1:
                full = torch.empty(buf.shard_numel * zero.world_size, dtype=src.dtype, device=src.device)
                dist.all_gather_into_tensor(full, src.contiguous())
            for slot in buf.slots:
                yield slot.name, full[slot.offset:slot.offset + slot.numel].view(slot.shape).to("cpu", dtype)
            del full


def adamw_param_groups(model, weight_decay, decay=default_decay):
    """torch.optim.AdamW parameter groups with the same decay rule as ZeRO3 (trainable parameters only)."""
    module_of = {n + ("." if n else "") + pn: m for n, m in model.named_modules()
                 for pn, _ in m.named_parameters(recurse=False)}
    groups = {True: [], False: []}
    for n, p in model.named_parameters():
        if p.requires_grad:
            groups[decay(n, p, module_of[n])].append(p)
    return [{"params": groups[True], "weight_decay": weight_decay}, {"params": groups[False], "weight_decay": 0.0}]


def shard_fsdp2(model, units, dtype=torch.float32, reduce_dtype=torch.float32, device=None):
    """`--sharding=fsdp2`: torch.distributed.fsdp.fully_shard on every unit, then on the root (same units as ZeRO3).
    Units reshard after forward (gathered again for backward, like ZeRO3); the root stays gathered from forward to
    backward (GPT reads lm_head.weight in its fused loss at the very end of forward)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    device = torch.device(device) if device is not None else _default_device()
    mesh = init_device_mesh(device.type, (_world()[1],))
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=reduce_dtype)
    for unit in units:
        fully_shard(unit, mesh=mesh, reshard_after_forward=True, mp_policy=mp)
    fully_shard(model, mesh=mesh, reshard_after_forward=False, mp_policy=mp)
    return model


def _init_single_process_group(device):
    """FSDP2 needs a process group even for one process: a 1-rank group on an in-memory store (no network)."""
    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                            device_id=device if device.type == "cuda" else None)


class FSDP2:
    """PyTorch's FSDP2 (fully_shard) behind ZeRO3's engine interface, so `--sharding=fsdp2` runs the same training
    loop on the same units: a reference for ZeRO3's numbers and speed.

    Parameters become DTensors sharded on dim 0 (fp32: they are the masters); forward and backward compute in
    `dtype` (MixedPrecisionPolicy), gradients are reduce-scattered in `reduce_dtype`. torch.optim.AdamW runs on the
    DTensors with adamw_param_groups (ZeRO3's weight-decay rule). Checkpoints are not supported (save_checkpoint
    and load_checkpoint refuse): this is a reference path, resumable runs use ZeRO3.
    """

    def __init__(self, model, units, *, dtype=torch.float32, device=None, lr=1e-4, betas=(0.9, 0.95), eps=1e-8,
                 weight_decay=0.0, checkpointing=False, reduce_dtype=torch.float32, decay=default_decay):
        if any(p.is_meta for p in model.parameters()):
            raise ValueError("FSDP2: the model has meta-device parameters; build it with real weights "
                             "(the meta-device start with `load=` is ZeRO3's)")
        self.model, self.dtype, self.lr = model, dtype, lr
        self.device = torch.device(device) if device is not None else _default_device()
        _init_single_process_group(self.device)
        self.rank, self.world_size = _world()
        self.units = list(units)
        if checkpointing:  # before fully_shard: FSDP2's hooks stay outside, the recomputation runs gathered
            for unit in self.units:
                unit.forward = _checkpointed(unit.forward)
        shard_fsdp2(model, self.units, dtype=dtype, reduce_dtype=reduce_dtype, device=self.device)
        self.optimizer = torch.optim.AdamW(adamw_param_groups(model, weight_decay, decay), lr=lr, betas=betas,
                                           eps=eps)

    def trainable_params(self):
        return [p for p in self.model.parameters() if p.requires_grad]

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm):
        """Global L2 norm of the sharded gradients (a DTensor norm made whole: one all-reduce), clipped to
        max_norm (0: no clipping) with torch.nn.utils' formula. Returns the norm before clipping (a float)."""
        params = [p for p in self.trainable_params() if p.grad is not None]
        if not params:
            return 0.0
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # Partial sums -> the global norm
        if max_norm and max_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        return norm.item()

    def step(self, lr=None):
        """One torch.optim.AdamW step on the sharded fp32 parameters, then drop the gradients."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr if lr is None else lr
        self.optimizer.step()
        self.zero_grad()

    def zero_grad(self):
        """Drop the accumulated gradients (after a step, or to skip a non-finite one)."""
        self.optimizer.zero_grad(set_to_none=True)

    def memory_bytes(self):
        """Bytes this rank holds for parameters (the sharded fp32 masters, frozen shards included), gradients
        (one fp32 shard per trainable parameter while accumulating) and AdamW moments (two per trainable)."""
        local = lambda p: p.to_local() if hasattr(p, "to_local") else p  # noqa: E731
        params = sum(_nbytes(local(p)) for p in self.model.parameters())
        trainable = sum(_nbytes(local(p)) for p in self.trainable_params())
        return {"params": params, "grads": trainable, "optimizer": 2 * trainable}

    def fsdp_modules(self):
        return self.units + [self.model]

    @contextmanager
    def gathered(self):
        """All parameters whole (in `dtype`) inside the block: every FSDP module unsharded and kept so through
        forwards (evaluation or generation of a model that fits one device)."""
        for m in self.units:
            m.set_reshard_after_forward(False, recurse=False)
        for m in self.fsdp_modules():
            m.unshard()
        try:
            yield self.model
        finally:
            for m in self.fsdp_modules():
                m.reshard()
            for m in self.units:
                m.set_reshard_after_forward(True, recurse=False)


# ----------------------------------------------------------------------------------------------------------
# Memory plan

GiB = 2**30


def _cfg(config, key):
    return config[key] if isinstance(config, dict) else getattr(config, key)


def gpt_oss_block_params(config):
    """Parameters of one GPT-oss block (attention with biases and sinks, router, experts, two norms)."""
    H, nh, nkv, d = (_cfg(config, k) for k in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim"))
    E, I = _cfg(config, "num_local_experts"), _cfg(config, "intermediate_size")
    attention = (H + 1) * nh * d + 2 * (H + 1) * nkv * d + nh * d * H + H + nh
    moe = E * H + E + E * (H * 2 * I + 2 * I + I * H + H)
    return attention + moe + 2 * H


def gpt_oss_block_activation_bytes(config, tokens, seq_len, dtype_bytes=2, attention="flash"):
    """Bytes one GPT-oss block keeps for backward (everything its forward saves) for `tokens` tokens.
    attention="flash": a fused kernel saves q, k, v, the output and the log-sum-exp per head;
    attention="torch": fused_cpu.attention_blocked (the CPU path) also keeps fp32 copies of q, k, v and the output and
    the fp32 probabilities of the (query, key) blocks it computes, about heads x T^2 / 2 per sequence for a
    full-attention layer: quadratic in seq_len, which is why the GPU path must be the fused kernel."""
    H, nh, nkv, d = (_cfg(config, k) for k in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim"))
    E, I, K = (_cfg(config, k) for k in ("num_local_experts", "intermediate_size", "num_experts_per_tok"))
    per_token = dtype_bytes * (
        2 * H                           # the two RMSNorm outputs (inputs of the projections)
        + 2 * (nh * d + 2 * nkv * d)    # q, k, v before and after RoPE
        + nh * d                        # attention output (input of o_proj)
        + H                             # the residual stream after attention
        + E                             # router logits (kept for the load-balancing loss)
        + K * (H + 2 * I + I))          # per chosen expert: its input rows, gate_up output, SwiGLU output
    per_token += 4 * nh                 # log-sum-exp per head (fp32)
    total = tokens * per_token
    if attention == "torch":  # fp32 copies of q, k, v and the output, and the probabilities of the visible pairs
        total += tokens * 4 * (2 * nh * d + 2 * nkv * d)
        total += -(-tokens // seq_len) * 4 * nh * fused_cpu.attention_blocked_pairs(seq_len)  # a full-attention layer
    return total


MXFP4_BYTES = 17 / 32  # bytes per MXFP4 weight: a 4-bit code, and one uint8 scale per group of 32


def gpt_oss_expert_weights(config):
    """Weights of one block's experts (gate_up and down matrices, biases excluded): what MXFP4 holds."""
    E, H, I = (_cfg(config, k) for k in ("num_local_experts", "hidden_size", "intermediate_size"))
    return E * (H * 2 * I + I * H)


def memory_plan(config, world_size, seq_len, *, micro_batch=1, dtype=torch.bfloat16, trainable=1.0,
                extra_unit_params=(), checkpointing=True, reduce_dtype=torch.float32, attention="flash",
                ce_chunk_bytes=2**28, largest_trainable=None, mxfp4_experts=False, head_trains=True):
    """Per-GPU memory in GiB of ZeRO3 training of a GPT-oss LM (config: GPTConfig or a dict of its fields) for
    one micro-batch of micro_batch x seq_len tokens. extra_unit_params: parameter counts of further units (the
    vision blocks, the projector). trainable: fraction of parameters that train (1.0; stage 1 about 0.001; LoRA
    about 0.0005). largest_trainable: the most trainable parameters of one unit, whose gradients are staged for
    the reduce-scatter (None: the largest unit, everything trains). mxfp4_experts: the (frozen) expert weights
    stay MXFP4 (MXFP4_BYTES a weight) and are dequantised one expert at a time in the MoE forward. head_trains:
    the unembedding trains (the fused loss then accumulates its fp32 gradient).
    Returns {"params", "grads", "optimizer", "activations", "loss", "comm", "total"}."""
    H, V, L = (_cfg(config, k) for k in ("hidden_size", "vocab_size", "num_hidden_layers"))
    b = torch.tensor([], dtype=dtype).element_size()
    rb = torch.tensor([], dtype=reduce_dtype).element_size()
    block = gpt_oss_block_params(config)
    root = 2 * V * H + H  # embedding, lm_head, final norm: the root unit
    units = [block] * L + list(extra_unit_params)
    total = sum(units) + root
    shard = lambda n: -(-n // world_size)  # noqa: E731  (elements per rank, padding included)
    n_shard = sum(shard(n) for n in units) + shard(root)
    n_train = n_shard * trainable
    master = 0 if dtype == torch.float32 else 4
    experts = L * shard(gpt_oss_expert_weights(config)) if mxfp4_experts else 0  # their elements, this rank's
    largest_trainable = max(units + [0]) if largest_trainable is None else largest_trainable
    tokens = micro_batch * seq_len
    block_act = gpt_oss_block_activation_bytes(config, tokens, seq_len, b, attention)
    # saved for backward: each block's input under checkpointing, else everything each block saves; plus the
    # working set of one block (its recomputation, or the forward temporaries of the last one)
    saved = L * tokens * H * b if checkpointing else L * block_act
    activations = saved + block_act
    # fused loss: fp32 logits of one chunk (overwritten by their gradient), the fp32 dW accumulator, the fp32 dx
    loss = min(ce_chunk_bytes, tokens * V * 4) + V * H * 4 * head_trains + tokens * H * 4
    largest = max(units + [0])
    # gathered: the root for the whole step, the running unit and the prefetched one; gradient staging: the
    # unit's parameter gradients plus its flat reduce buffer and the one in flight
    staged = largest_trainable  # the trainable part of a unit has gradients to reduce
    comm = (root + 2 * largest) * b + staged * (b + 2 * rb) if world_size > 1 else staged * (b + rb)
    if mxfp4_experts:  # one expert's weights dequantised at a time (gate_up and down) in the compute dtype
        comm += gpt_oss_expert_weights(config) // _cfg(config, "num_local_experts") * b
    params = (n_shard - experts) * b + experts * MXFP4_BYTES + n_train * master
    plan = {"params": params, "grads": n_train * 4, "optimizer": n_train * 8,
            "activations": activations, "loss": loss, "comm": comm}
    plan = {k: v / GiB for k, v in plan.items()}
    plan["total"] = sum(plan.values())
    plan["params_total"] = total
    return plan


def inference_plan(config, context, *, batch=1, dtype=torch.bfloat16, mxfp4_experts=True, extra_params=0):
    """GiB on one device to generate with a GPT-oss LM (a GPTConfig) at `context` tokens: the weights (experts
    MXFP4 or dense; extra_params: the vision tower and projector, dense), the KV caches (model.KVCache: every
    position in full-attention layers, `window` slots in sliding ones), and the prefill's working set (one block's
    activations for the whole prompt, fused attention) with the last position's fp32 logits.
    Returns {"weights", "kv_cache", "activations", "total"}."""
    H, V, L = config.hidden_size, config.vocab_size, config.num_hidden_layers
    b = torch.tensor([], dtype=dtype).element_size()
    experts = L * gpt_oss_expert_weights(config)
    dense = L * gpt_oss_block_params(config) + 2 * V * H + H + extra_params - experts
    weights = dense * b + experts * (MXFP4_BYTES if mxfp4_experts else b)
    slots = sum(min(config.window_of(i), context) if config.window_of(i) else context for i in range(L))
    kv_cache = batch * slots * 2 * config.num_key_value_heads * config.head_dim * b
    activations = gpt_oss_block_activation_bytes(config, batch * context, context, b) + batch * V * 4
    plan = {"weights": weights / GiB, "kv_cache": kv_cache / GiB, "activations": activations / GiB}
    plan["total"] = sum(plan.values())
    return plan
