"""
LoRA (Hu et al. 2021, "Low-Rank Adaptation of Large Language Models"), applied to a built MedGPT from outside, as
torchtitan applies parallelism: model.py holds only the model, `apply` swaps some of its modules for adapted ones.

    lora.apply(model, rank=16, alpha=32, dropout=0.05, targets=["q_proj", "k_proj", "v_proj", "o_proj"])

Design choices
- An adapted projection is still an nn.Linear (`LoRALinear`) holding the *same* weight and bias Parameters, plus
  lora_A (r, in) and lora_B (out, r) as bias-free nn.Linear: parameter names stay transformers' (the checkpoint
  readers and ZeRO-3 see nothing new) and the adapter's names are peft's (`q_proj.lora_A.weight`).
- peft's LoRA exactly: y = W x + b + (alpha / r) * B A dropout(x); A initialised as nn.Linear's default (kaiming
  uniform, a = sqrt(5)), B as zeros, so at initialisation the model's logits are unchanged bit for bit.
- Targets: the attention projections (q_proj, k_proj, v_proj, o_proj) of every block and, optionally, the router
  (`router`): peft adapts the router's weight parameter (`target_parameters=["mlp.router.weight"]`,
  W + (alpha / r) B A, which allows no dropout); `LoRARouter` adds the same low-rank term to the router logits.
  The experts are not adapted (peft's expert LoRA materialises W + delta of every expert on each forward).
- What trains: the adapters, and with `train_projector` the projector in full (peft's `modules_to_save`); every
  other parameter is frozen, so ZeRO-3 keeps no gradient, master copy or AdamW state for it (zero.py: frozen
  parameters carry none). Adapters are created on the CPU even when the model is on the meta device: ZeRO-3 cuts
  their shards from their values, and reads only the base weights from the checkpoint.
- Merging folds W += (alpha / r) B A (in fp32) and turns the module back into a plain nn.Linear / Router; on a
  stream of gathered (name, tensor) pairs, `merged_params` does the same one tensor at a time (training.save_final).
- The adapter's file format (peft's names for LlavaForConditionalGeneration and GptOssForCausalLM) is
  checkpoint.py's (write_peft_adapter / read_peft_adapter); this file builds peft's adapter_config.json.
- Generation: merge first. fused_cpu's CPU decode path reads the projections' weights directly, so it would not
  see unmerged adapters; a LoRA run's final/ holds the merged model.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoint
from model import GPT, Router

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
TARGETS = ATTENTION_TARGETS + ("router",)

# ----------------------------------------------------------------------------------------------------------
# Adapted modules


def new_factors(n_in, n_out, rank, like):
    """lora_A (rank, n_in) as nn.Linear initialises it (peft's default init), lora_B (n_out, rank) zeros, in the
    dtype of `like` (the adapted weight) and on its device (the CPU for a weight on the meta device)."""
    kw = {"device": "cpu" if like.is_meta else like.device, "dtype": like.dtype}
    lora_A = nn.Linear(n_in, rank, bias=False, **kw)
    lora_B = nn.Linear(rank, n_out, bias=False, **kw)
    nn.init.zeros_(lora_B.weight)
    return lora_A, lora_B


class LoRALinear(nn.Linear):
    """nn.Linear + (alpha / r) * lora_B(lora_A(dropout(x))); weight and bias are the adapted Linear's own."""

    def __init__(self, linear: nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        self.weight, self.bias = linear.weight, linear.bias
        self.lora_A, self.lora_B = new_factors(linear.in_features, linear.out_features, rank, linear.weight)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.rank, self.scaling = rank, alpha / rank  # rank kept: ZeRO-3 empties the parameters between uses

    def forward(self, x):
        x_lora = self.lora_dropout(x).to(self.lora_A.weight.dtype)
        return super().forward(x) + self.lora_B(self.lora_A(x_lora)) * self.scaling


class LoRARouter(Router):
    """The router with (alpha / r) * x A^T B^T added to its logits: x (W + (alpha / r) B A)^T, peft's adapted
    router weight, without forming W + B A."""

    def __init__(self, router: Router, rank: int, alpha: float):
        nn.Module.__init__(self)
        self.top_k, self.weight, self.bias = router.top_k, router.weight, router.bias
        E, H = router.weight.shape
        self.lora_A, self.lora_B = new_factors(H, E, rank, router.weight)
        self.rank, self.scaling = rank, alpha / rank

    def forward(self, x):
        """x (N, H) -> router logits (N, E), top-k weights (N, K), top-k ids (N, K), as Router.forward."""
        logits = F.linear(x, self.weight, self.bias) + self.lora_B(self.lora_A(x)) * self.scaling  # (N, E)
        top_logits, top_idx = torch.topk(logits, self.top_k, dim=-1)
        return logits, torch.softmax(top_logits, dim=-1), top_idx


def adapted_modules(model) -> dict:
    """{module name: module} of every LoRALinear / LoRARouter in `model`."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (LoRALinear, LoRARouter))}


# ----------------------------------------------------------------------------------------------------------
# Applying, merging


def check_targets(targets, dropout):
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets:
        raise SystemExit(f"--lora_targets={','.join(targets)}: expected a comma list of {', '.join(TARGETS)}")
    if "router" in targets and dropout > 0:
        raise SystemExit("--lora_targets with router needs --lora_dropout=0: peft adapts the router's weight "
                         "parameter, which allows no dropout (a peft adapter with it would not load)")


def language_model(model) -> GPT:
    return model if isinstance(model, GPT) else model.language_model


def apply(model, rank: int, alpha: float, dropout: float = 0.0, targets=ATTENTION_TARGETS, train_projector=False):
    """Freeze `model` (a MedGPT, or a GPT alone), then put LoRA adapters of `rank` on `targets` of every
    language-model block; with train_projector a MedGPT's projector trains in full. Returns the model."""
    if rank <= 0:
        raise SystemExit(f"--lora_rank={rank}: expected a positive rank (0 turns LoRA off)")
    check_targets(list(targets), dropout)
    model.requires_grad_(False)
    if train_projector:
        model.multi_modal_projector.requires_grad_(True)
    for block in language_model(model).model.layers:
        for name in targets:
            if name == "router":
                block.mlp.router = LoRARouter(block.mlp.router, rank, alpha)
            else:
                setattr(block.self_attn, name, LoRALinear(getattr(block.self_attn, name), rank, alpha, dropout))
    return model


def delta_weight(lora_A, lora_B, scaling):
    """(alpha / r) B A in fp32: (out, r) @ (r, in) -> (out, in)."""
    return (lora_B.float() @ lora_A.float()) * scaling


@torch.no_grad()
def merge(model):
    """Fold every adapter into its weight (W += (alpha / r) B A, in fp32) and put back the plain module."""
    for name, m in adapted_modules(model).items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        w = m.weight
        w.copy_((w.float() + delta_weight(m.lora_A.weight, m.lora_B.weight, m.scaling)).to(w.dtype))
        if isinstance(m, LoRARouter):
            plain = Router.__new__(Router)
            nn.Module.__init__(plain)
            plain.top_k, plain.weight, plain.bias = m.top_k, m.weight, m.bias
        else:
            plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
            plain.weight, plain.bias = m.weight, m.bias
        setattr(parent, attr, plain)
    return model


def merged_params(named_params, model, adapter: dict):
    """A stream of (name, tensor) pairs of `model`'s parameters (zero.iter_full_params) with each adapter folded into
    its weight and the lora_* tensors left out: the merged model's parameters, one tensor at a time. The adapter's
    tensors (the factors, and the projector when it trains) are put into `adapter` ({name: fp32 tensor}) on the
    way. A weight that comes before its factors waits for them (only that one tensor is held)."""
    scaling = {name: m.scaling for name, m in adapted_modules(model).items()}
    trains_projector = trains_in_full(model)
    waiting = {}  # module name -> its weight, until both factors have come
    for name, t in named_params:
        module, _, leaf = name.rpartition(".")
        if leaf == "weight" and module.endswith((".lora_A", ".lora_B")):
            adapter[name] = t.float()
            module = module.rpartition(".")[0]
        elif leaf == "weight" and module in scaling:
            waiting[module] = t
        else:
            if trains_projector and name.startswith("multi_modal_projector."):
                adapter[name] = t.float()
            yield name, t
            continue
        A, B = adapter.get(module + ".lora_A.weight"), adapter.get(module + ".lora_B.weight")
        if module in waiting and A is not None and B is not None:
            w = waiting.pop(module)
            yield module + ".weight", (w.float() + delta_weight(A, B, scaling[module])).to(w.dtype)
    if waiting:
        raise ValueError(f"lora.merged_params: no factors came for {sorted(waiting)}")


def trains_in_full(model) -> bool:
    """Whether a MedGPT's projector trains (peft's modules_to_save)."""
    return not isinstance(model, GPT) and any(p.requires_grad for p in model.multi_modal_projector.parameters())


def adapter_state(model) -> dict:
    """{name: tensor} of what an adapter holds: every lora_A / lora_B weight, and the projector when it trains."""
    full = trains_in_full(model)
    return {name: p.detach() for name, p in model.named_parameters()
            if ".lora_" in name or (full and name.startswith("multi_modal_projector."))}


# ----------------------------------------------------------------------------------------------------------
# peft's format: adapter_config.json, saving and loading


def peft_config(model, base_model_name_or_path=None) -> dict:
    """adapter_config.json of `model`'s adapters as peft 0.21 writes it for LlavaForConditionalGeneration (a MedGPT:
    the attention targets as a regex over the language model, as a plain list would also match the CLIP tower's
    q/k/v; the projector in modules_to_save when it trains) or GptOssForCausalLM (a GPT); the router as a target
    parameter."""
    adapted = adapted_modules(model)
    if not adapted:
        raise ValueError("lora.peft_config: the model has no LoRA adapters (lora.apply first)")
    first = next(iter(adapted.values()))
    rank = first.rank
    attention = sorted({n.rpartition(".")[2] for n, m in adapted.items() if isinstance(m, LoRALinear)})
    dropout = max([m.lora_dropout.p for m in adapted.values() if isinstance(m, LoRALinear)
                   and isinstance(m.lora_dropout, nn.Dropout)], default=0.0)
    is_gpt = isinstance(model, GPT)
    base_class, library = (("GptOssForCausalLM", "transformers.models.gpt_oss.modeling_gpt_oss") if is_gpt else
                           ("LlavaForConditionalGeneration", "transformers.models.llava.modeling_llava"))
    if not attention:
        target_modules = None
    elif is_gpt:
        target_modules = attention
    else:
        target_modules = rf".*language_model.*\.({'|'.join(attention)})"
    router = any(isinstance(m, LoRARouter) for m in adapted.values())
    return {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model_name_or_path,
        "auto_mapping": {"base_model_class": base_class, "parent_library": library},
        "r": rank, "lora_alpha": first.scaling * rank, "lora_dropout": dropout,
        "target_modules": target_modules, "target_parameters": ["mlp.router.weight"] if router else None,
        "modules_to_save": ["multi_modal_projector"] if trains_in_full(model) else None,
        "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "use_rslora": False, "use_dora": False,
        "lora_bias": False, "inference_mode": True, "rank_pattern": {}, "alpha_pattern": {},
    }


def apply_peft_config(model, config: dict):
    """Put the adapters that a peft adapter_config.json describes on `model` (a MedGPT) before loading its
    weights: r, lora_alpha, lora_dropout, the attention targets and the router."""
    unsupported = {k: config.get(k) for k in ("use_rslora", "use_dora", "lora_bias", "fan_in_fan_out")
                   if config.get(k)}
    if config.get("peft_type") != "LORA" or unsupported or config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValueError(f"adapter_config.json: only plain LoRA loads (peft_type LORA, one r and alpha); got "
                         f"peft_type={config.get('peft_type')}, {unsupported or ''} rank_pattern="
                         f"{config.get('rank_pattern')}, alpha_pattern={config.get('alpha_pattern')}")
    modules = config.get("target_modules") or []
    text = modules if isinstance(modules, str) else " ".join(modules)
    targets = [t for t in ATTENTION_TARGETS if t in text]
    if "mlp.router.weight" in (config.get("target_parameters") or []):
        targets.append("router")
    train_projector = "multi_modal_projector" in (config.get("modules_to_save") or [])
    return apply(model, config["r"], config["lora_alpha"], config.get("lora_dropout") or 0.0, targets,
                 train_projector=train_projector)


def lora_params(model) -> int:
    """Parameters of the adapters (the lora_A / lora_B factors)."""
    return sum(p.numel() for name, p in model.named_parameters() if ".lora_" in name)


def save_adapter(model, path, base_model_name_or_path=None):
    """`model`'s adapter in peft's format (checkpoint.write_peft_adapter): what peft's save_pretrained writes."""
    checkpoint.write_peft_adapter(adapter_state(model), peft_config(model, base_model_name_or_path), path)


@torch.no_grad()
def load_adapter(model, path):
    """Put a peft LoRA adapter (ours or peft's save_pretrained) on `model` (a MedGPT, or a GPT for a GptOss
    adapter): its adapted modules, then its tensors, every name and shape checked. Returns the model."""
    config, tensors = checkpoint.read_peft_adapter(path)
    apply_peft_config(model, config)
    params = dict(model.named_parameters())
    expected = {name: params[name].shape for name in adapter_state(model)}
    checkpoint.check_state(tensors, expected, f"{path}/adapter_model.safetensors")
    for name, t in tensors.items():
        params[name].copy_(t)
    return model
