"""
GPT-oss language model (and, in the last section, the MedGPT vision-language composite).

Design choices
- Module and parameter names are transformers' (`model.layers.N.self_attn.q_proj`, `model.layers.N.mlp.experts.gate_up_proj`,
  `lm_head`, ...), so `state_dict()` maps 1:1 onto a Hugging Face gpt-oss checkpoint with no renaming table.
  Expert weights keep transformers' `x @ W` layout: gate_up_proj (E, H, 2I), down_proj (E, I, H).
- Every heavy op goes through fused.py (rms_norm, apply_rope, attention, swiglu/moe_experts, linear_cross_entropy):
  that is the MEDGPT_KERNELS seam, so this file never knows whether Triton or plain torch ran.
- GPTConfig is one flat dataclass whose fields are config.json's field names; from_json/to_json read the released
  format (rope_scaling + rope_theta) and transformers' newer one (rope_parameters), and write the newer one.
- One dtype for all parameters (no fp32 islands), so zero.py can flatten a block into one buffer.
  RoPE frequencies are not a buffer (so `.to(bfloat16)` cannot round them); cos/sin are computed in fp32 per forward.
- The released formats in and out (safetensors discovery, MXFP4, LLaVA name layouts, shard writing) are
  checkpoint.py's: from_pretrained reads config.json, builds the model on the meta device, allocates it and lets
  checkpoint.py stream the tensors in (peak memory: the model plus about one tensor).
- Generation: KV caches allocated once and written in place: every position for full-attention layers, a ring of
  `window` slots for sliding ones (memory bounded by the window). The prompt, then each new token, go through the
  blocks' own forward with the cache. Beside it, clearly marked, a CPU fast path (fused_cpu.decode_step: the same
  math for one position in fewer ops, tested equal to the blocks' forward) decodes on a CPU with the torch path.
  Prompts of different lengths are LEFT-padded (see GPT.generate).
- Training: the loss is computed by fused.linear_cross_entropy from the final hidden states (no (B, T, V) logits);
  in training mode router_aux_loss_coef * load-balancing loss (Switch style, as transformers computes it) is added.
"""
import json
import math
import os
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoint
import fused
import fused_cpu
import vision as vision_lib

# ----------------------------------------------------------------------------------------------------------
# Config


def _default_layer_types(n_layer):
    # gpt-oss alternates: even layers slide, odd layers see everything
    return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layer)]


def _default_rope_parameters():
    return {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
            "original_max_position_embeddings": 4096, "truncate": False}


@dataclass
class GPTConfig:
    """gpt-oss hyper-parameters; the field names are those of a Hugging Face gpt-oss config.json (20B defaults)."""
    vocab_size: int = 201088
    hidden_size: int = 2880
    intermediate_size: int = 2880
    num_hidden_layers: int = 24
    num_attention_heads: int = 64
    num_key_value_heads: int = 8
    head_dim: int = 64
    num_local_experts: int = 32
    num_experts_per_tok: int = 4
    sliding_window: int = 128
    layer_types: list = None  # "sliding_attention" | "full_attention" per layer; None = alternate, sliding first
    max_position_embeddings: int = 131072
    rope_theta: float = 150000.0
    rope_parameters: dict = field(default_factory=_default_rope_parameters)  # YaRN; rope_theta kept separately
    rms_norm_eps: float = 1e-5
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    router_aux_loss_coef: float = 0.9
    attention_bias: bool = True
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    pad_token_id: int = 199999
    eos_token_id: object = 200002  # int or list of ints
    bos_token_id: int = None

    def __post_init__(self):
        if self.layer_types is None:
            self.layer_types = _default_layer_types(self.num_hidden_layers)
        self.validate()

    def validate(self, where="GPTConfig"):
        """Raise a clear error for a value this implementation does not support."""
        def bad(msg):
            raise ValueError(f"{where}: {msg}")
        if len(self.layer_types) != self.num_hidden_layers:
            bad(f"layer_types has {len(self.layer_types)} entries, expected num_hidden_layers={self.num_hidden_layers}")
        for i, t in enumerate(self.layer_types):
            if t not in ("sliding_attention", "full_attention"):
                bad(f"layer_types[{i}]={t!r}: expected 'sliding_attention' or 'full_attention'")
        if self.num_attention_heads % self.num_key_value_heads:
            bad(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim % 2:
            bad(f"head_dim={self.head_dim} must be even (RoPE rotates halves)")
        if not 1 <= self.num_experts_per_tok <= self.num_local_experts:
            bad(f"num_experts_per_tok={self.num_experts_per_tok} must be in [1, num_local_experts="
                f"{self.num_local_experts}]")
        if self.tie_word_embeddings:
            bad("tie_word_embeddings=true is not supported (gpt-oss unties embedding and unembedding)")
        rope_type = self.rope_parameters.get("rope_type", "default")
        if rope_type not in ("yarn", "default"):
            bad(f"rope_parameters.rope_type={rope_type!r}: only 'yarn' (gpt-oss) and 'default' are supported")
        if "sliding_attention" in self.layer_types and not self.sliding_window:
            bad("layer_types has sliding_attention layers but sliding_window is not set")

    # --- config.json -----------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, d, where="config"):
        d = dict(d)
        if d.get("model_type", "gpt_oss") != "gpt_oss":
            raise ValueError(f"{where}: model_type={d['model_type']!r}, expected 'gpt_oss'")
        quant = (d.get("quantization_config") or {}).get("quant_method")
        if quant not in (None, "mxfp4"):
            raise ValueError(f"{where}: quantization_config.quant_method={quant!r}; only 'mxfp4' (the released "
                             f"format) or dense checkpoints are supported")
        if "num_experts" in d and "num_local_experts" not in d:
            d["num_local_experts"] = d["num_experts"]  # transformers' attribute_map alias
        # The released config.json has rope_theta + rope_scaling; transformers 5 writes rope_parameters (theta inside).
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        if "type" in rope and "rope_type" not in rope:
            rope["rope_type"] = rope.pop("type")
        theta = rope.pop("rope_theta", d.get("rope_theta", cls.rope_theta))
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known and k not in ("rope_parameters", "rope_theta")}
        kwargs["rope_theta"] = float(theta)
        if rope:
            kwargs["rope_parameters"] = rope
        elif "rope_parameters" in d or "rope_scaling" in d:
            kwargs["rope_parameters"] = {"rope_type": "default"}
        if kwargs.get("sliding_window") is None:
            kwargs["sliding_window"] = 0
        try:
            cfg = cls(**kwargs)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from None
        return cfg

    @classmethod
    def from_json(cls, path):
        """A config.json file, or a checkpoint directory holding one."""
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        with open(path) as f:
            return cls.from_dict(json.load(f), where=path)

    def to_dict(self):
        """transformers 5 layout (rope_theta inside rope_parameters), loadable by GptOssConfig."""
        d = asdict(self)
        d["rope_parameters"] = {**self.rope_parameters, "rope_theta": self.rope_theta}
        del d["rope_theta"]
        d.update(model_type="gpt_oss", architectures=["GptOssForCausalLM"], hidden_act="silu",
                 attention_dropout=0.0, output_router_logits=False, use_cache=True)
        if not d["sliding_window"]:
            d["sliding_window"] = None
        return d

    def to_json(self, path):
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)

    # --- presets -----------------------------------------------------------------------------------------

    @classmethod
    def preset(cls, name, **overrides):
        """'gpt-oss-20b', 'gpt-oss-120b' or 'tiny' (a CPU-sized model with the full o200k_harmony vocabulary)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def window_of(self, layer_idx):
        """Sliding window (keys visible to a query, itself included) of a layer; 0 = full causal attention."""
        return self.sliding_window if self.layer_types[layer_idx] == "sliding_attention" else 0


PRESETS = {
    "gpt-oss-20b": dict(),
    "gpt-oss-120b": dict(num_hidden_layers=36, num_local_experts=128),
    # tiny: seconds per step on a laptop CPU; keeps the real vocabulary so the o200k_harmony tokenizer works.
    "tiny": dict(hidden_size=128, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, num_local_experts=4, num_experts_per_tok=2, sliding_window=16,
                 rope_parameters={"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                  "original_max_position_embeddings": 256, "truncate": False},
                 max_position_embeddings=1024),
}


def param_counts(config: GPTConfig) -> dict:
    """Parameter counts from the config alone (no weights). 'active' = per token, input embedding excluded:
    everything but the embedding, with num_experts_per_tok of num_local_experts experts."""
    H, I, E = config.hidden_size, config.intermediate_size, config.num_local_experts
    q_out = config.num_attention_heads * config.head_dim
    kv_out = config.num_key_value_heads * config.head_dim
    bias = 1 if config.attention_bias else 0
    attn = (H * q_out + q_out * bias) + 2 * (H * kv_out + kv_out * bias) + (q_out * H + H * bias) \
        + config.num_attention_heads
    router = E * H + E
    one_expert = (H * 2 * I + 2 * I) + (I * H + H)
    norms = 2 * H
    L = config.num_hidden_layers
    embedding = config.vocab_size * H
    unembedding = config.vocab_size * H
    experts = L * E * one_expert
    dense_per_layer = attn + router + norms
    total = embedding + unembedding + H + L * dense_per_layer + experts
    active = unembedding + H + L * (dense_per_layer + config.num_experts_per_tok * one_expert)
    return {"total": total, "active": active, "embedding": embedding, "unembedding": unembedding,
            "experts": experts, "attention": L * attn, "per_layer": dense_per_layer + E * one_expert}


# ----------------------------------------------------------------------------------------------------------
# RoPE (YaRN)


def rope_inv_freq(config: GPTConfig):
    """(head_dim/2,) fp32 inverse frequencies and the attention factor that scales cos and sin (YaRN)."""
    dim, base = config.head_dim, config.rope_theta
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim)  # (D/2,)
    rope = config.rope_parameters
    if rope.get("rope_type", "default") == "default":
        return 1.0 / pos_freqs, 1.0
    factor = float(rope["factor"])
    original_ctx = rope["original_max_position_embeddings"]
    beta_fast, beta_slow = rope.get("beta_fast") or 32.0, rope.get("beta_slow") or 1.0
    attention_factor = rope.get("attention_factor")
    if attention_factor is None:
        attention_factor = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0

    # YaRN: dimensions that rotate fast (many turns within the original context) keep their frequency
    # (extrapolate), slow ones are divided by `factor` (interpolate), with a linear ramp in between.
    def dim_of_rotations(n_rot):
        return dim * math.log(original_ctx / (n_rot * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_of_rotations(beta_fast), dim_of_rotations(beta_slow)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid dividing by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)  # (D/2,)
    keep = 1 - ramp  # 1 = extrapolate (keep the original frequency)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep
    return inv_freq, float(attention_factor)


# ----------------------------------------------------------------------------------------------------------
# Modules (transformers' names)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return fused.rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    """GQA with biases, RoPE on halves, one learned sink logit per query head, sliding or full."""

    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        H, D = config.hidden_size, config.head_dim
        self.n_head, self.n_kv_head, self.head_dim = config.num_attention_heads, config.num_key_value_heads, D
        self.window = config.window_of(layer_idx)
        self.q_proj = nn.Linear(H, self.n_head * D, bias=config.attention_bias)
        self.k_proj = nn.Linear(H, self.n_kv_head * D, bias=config.attention_bias)
        self.v_proj = nn.Linear(H, self.n_kv_head * D, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.n_head * D, H, bias=config.attention_bias)
        self.sinks = nn.Parameter(torch.zeros(self.n_head))

    def forward(self, x, cos, sin, doc_ids=None, cache=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim)  # (B, T, nh, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim)  # (B, T, nkv, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim)  # (B, T, nkv, hd)
        q, k = fused.apply_rope(q, cos, sin), fused.apply_rope(k, cos, sin)
        key_mask = None
        if cache is not None:
            k, v, key_mask = cache.update(k, v)  # (B, S, nkv, hd): the cached keys, then these T
        y = fused.attention(q, k, v, self.sinks, window=self.window, doc_ids=doc_ids, key_mask=key_mask)
        return self.o_proj(y.reshape(B, T, self.n_head * self.head_dim))  # (B, T, nh * hd) -> (B, T, H)


class Router(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.weight = nn.Parameter(torch.zeros(config.num_local_experts, config.hidden_size))
        self.bias = nn.Parameter(torch.zeros(config.num_local_experts))

    def forward(self, x):
        """x (N, H) -> router logits (N, E), top-k weights (N, K) (softmax over the chosen k), top-k ids (N, K)."""
        logits = F.linear(x, self.weight, self.bias)
        top_logits, top_idx = torch.topk(logits, self.top_k, dim=-1)
        return logits, torch.softmax(top_logits, dim=-1), top_idx


class Experts(nn.Module):
    """E experts stored as transformers stores them: gate_up_proj (E, H, 2I) with gate/up interleaved, down_proj (E, I, H).

    mxfp4=True (MXFP4-resident): the two projections are kept as the released uint8 tensors instead, under the
    released names, gate_up_proj_blocks (E, 2I, H/32, 16) / _scales (E, 2I, H/32) and down_proj_blocks
    (E, H, I/32, 16) / _scales (E, H, I/32) (4.25 bits a weight), dequantised per expert inside the forward
    (fused.moe_experts_mxfp4). They are buffers, not parameters: a frozen base that no optimizer, gradient or ZeRO-3
    shard sees (the QLoRA pattern); the biases stay parameters."""

    def __init__(self, config: GPTConfig, mxfp4=False):
        super().__init__()
        E, H, I = config.num_local_experts, config.hidden_size, config.intermediate_size
        self.mxfp4 = mxfp4
        if mxfp4:
            if H % 32 or I % 32:
                raise ValueError(f"MXFP4 experts need hidden_size ({H}) and intermediate_size ({I}) divisible by 32")
            self.register_buffer("gate_up_proj_blocks", torch.zeros(E, 2 * I, H // 32, 16, dtype=torch.uint8))
            self.register_buffer("gate_up_proj_scales", torch.zeros(E, 2 * I, H // 32, dtype=torch.uint8))
            self.register_buffer("down_proj_blocks", torch.zeros(E, H, I // 32, 16, dtype=torch.uint8))
            self.register_buffer("down_proj_scales", torch.zeros(E, H, I // 32, dtype=torch.uint8))
        # registration order = transformers' state-dict order (each weight, then its bias)
        self.gate_up_proj = None if mxfp4 else nn.Parameter(torch.zeros(E, H, 2 * I))
        self.gate_up_proj_bias = nn.Parameter(torch.zeros(E, 2 * I))
        self.down_proj = None if mxfp4 else nn.Parameter(torch.zeros(E, I, H))
        self.down_proj_bias = nn.Parameter(torch.zeros(E, H))
        self.limit, self.alpha = config.swiglu_limit, config.swiglu_alpha

    def forward(self, x, top_idx, top_weight, decoding=False):
        """decoding=True: a few new tokens without autograd (fused.moe_experts_torch may then go slot by slot)."""
        if self.mxfp4:
            return fused.moe_experts_mxfp4(x, top_idx, top_weight, self.gate_up_proj_blocks, self.gate_up_proj_scales,
                                           self.gate_up_proj_bias, self.down_proj_blocks, self.down_proj_scales,
                                           self.down_proj_bias, self.limit, self.alpha, decoding=decoding)
        return fused.moe_experts(x, top_idx, top_weight, self.gate_up_proj, self.gate_up_proj_bias,
                                 self.down_proj, self.down_proj_bias, self.limit, self.alpha, decoding=decoding)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.router = Router(config)
        self.experts = Experts(config)

    def forward(self, x):
        """x (B, T, H) -> (B, T, H) and the router logits (B*T, E) for the load-balancing loss."""
        B, T, H = x.shape
        flat = x.reshape(B * T, H)  # (N, H)
        router_logits, top_weight, top_idx = self.router(flat)
        y = self.experts(flat, top_idx, top_weight)
        return y.view(B, T, H), router_logits  # (N, H) -> (B, T, H)


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(config, layer_idx)  # registration order = transformers' state-dict order
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, doc_ids=None, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, doc_ids, cache)
        y, router_logits = self.mlp(self.post_attention_layernorm(x))
        return x + y, router_logits


class Backbone(nn.Module):
    """transformers' GptOssModel: the embedding, the blocks and the final norm (`GPT.model`)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        # as transformers: the pad token's row gets no gradient (padding_idx)
        pad = config.pad_token_id if config.pad_token_id is not None and config.pad_token_id < config.vocab_size else None
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=pad)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


def load_balancing_loss(router_logits, num_experts, top_k):
    """Switch-style auxiliary loss as transformers computes it (no padding mask): E * sum_e f_e * P_e, where over
    all layers' tokens f_e is the fraction of top-k slots routed to e and P_e the mean router probability of e."""
    probs = torch.softmax(torch.cat(router_logits).float(), dim=-1)  # (L*N, E)
    top_idx = torch.topk(probs, top_k, dim=-1).indices  # (L*N, K)
    tokens_per_expert = F.one_hot(top_idx, num_experts).float().sum(dim=(0, 1)) / probs.shape[0]  # (E,)
    prob_per_expert = probs.mean(dim=0)  # (E,)
    return num_experts * torch.sum(tokens_per_expert * prob_per_expert)


# ----------------------------------------------------------------------------------------------------------
# KV cache


class KVCache:
    """Keys and values of one layer for incremental decoding, in buffers allocated once and written in place.

    Full-attention layers: (B, max_len, nkv, hd), position p in slot p.
    Sliding layers: a ring of `window` slots, position p in slot p % window: memory bounded by the window. One new
    position sees exactly the ring (itself and the window - 1 positions before it); the ring is returned as it lies,
    out of position order, which attention does not mind (a softmax over keys is order-free). Several new positions
    (a prompt) see the window - 1 positions before them in order, then themselves.
    key_mask (B, max_len) (None = no padding) marks real keys by absolute position.
    """

    def __init__(self, batch, max_len, n_kv_head, head_dim, window, dtype, device, key_mask=None):
        self.window, self.length, self.key_mask = window, 0, key_mask
        slots = min(window, max_len) if window else max_len
        self.k = torch.zeros(batch, slots, n_kv_head, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        # sliding layers with padding: the key mask of the position each ring slot holds
        self.slot_mask = None if key_mask is None or not window else torch.zeros(batch, slots, dtype=torch.bool,
                                                                                  device=device)

    def update(self, k, v):
        """Append k, v (B, T, nkv, hd); return the keys, values (B, S, nkv, hd) and key mask (B, S) to attend to."""
        T, start = k.shape[1], self.length
        self.length = end = start + T
        if not self.window:
            self.k[:, start:end] = k
            self.v[:, start:end] = v
            return self.k[:, :end], self.v[:, :end], None if self.key_mask is None else self.key_mask[:, :end]
        slots = self.k.shape[1]
        if T == 1:  # decoding: write the ring slot, attend to the ring
            slot, n = start % slots, min(end, slots)
            self.k[:, slot] = k[:, 0]
            self.v[:, slot] = v[:, 0]
            if self.slot_mask is None:
                return self.k[:, :n], self.v[:, :n], None
            self.slot_mask[:, slot] = self.key_mask[:, start]
            return self.k[:, :n], self.v[:, :n], self.slot_mask[:, :n]
        first = max(0, start - (self.window - 1))  # the earliest kept position the first new query still sees
        kept = torch.arange(first, start, device=k.device) % slots  # (start - first,) their slots, in position order
        k_all = torch.cat([self.k[:, kept], k], dim=1)  # (B, start - first + T, nkv, hd)
        v_all = torch.cat([self.v[:, kept], v], dim=1)
        stored = torch.arange(max(start, end - slots), end, device=k.device)  # (m,) the new positions that stay
        self.k[:, stored % slots] = k[:, stored - start]
        self.v[:, stored % slots] = v[:, stored - start]
        if self.slot_mask is not None:
            self.slot_mask[:, stored % slots] = self.key_mask[:, stored]
        return k_all, v_all, None if self.key_mask is None else self.key_mask[:, first:end]


# ----------------------------------------------------------------------------------------------------------
# GPT


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        inv_freq, self.attention_factor = rope_inv_freq(config)
        self._inv_freq = inv_freq  # fp32, deliberately not a buffer: .to(dtype) must not round it
        self.last_losses = {}
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """transformers' initialisation: normal(0, initializer_range) weights, zero biases, unit norms."""
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith("_bias") or (name.endswith(".bias") and ".router." not in name):
                p.zero_()
            else:  # weights, sinks, router weight and bias
                p.normal_(0.0, std)

    def rope(self, position_ids, device):
        """position_ids (T,) or (B, T) -> cos, sin (..., T, hd/2) in fp32, scaled by YaRN's attention factor."""
        if self._inv_freq.device != device:
            self._inv_freq = self._inv_freq.to(device)
        freqs = position_ids[..., None].float() * self._inv_freq  # (..., T, hd/2)
        return freqs.cos() * self.attention_factor, freqs.sin() * self.attention_factor

    def hidden_states(self, idx=None, inputs_embeds=None, doc_ids=None, position_ids=None, caches=None):
        """Run the blocks; returns the final-normed hidden states (B, T, H) and the router logits per layer."""
        x = self.model.embed_tokens(idx) if inputs_embeds is None else inputs_embeds
        if position_ids is None:
            start = 0 if caches is None else caches[0].length  # decoding continues after the cached positions
            position_ids = torch.arange(start, start + x.shape[1], device=x.device)  # (T,)
        cos, sin = self.rope(position_ids, x.device)
        router_logits = []
        for i, block in enumerate(self.model.layers):
            x, logits = block(x, cos, sin, doc_ids, None if caches is None else caches[i])
            router_logits.append(logits)
        return self.model.norm(x), router_logits

    def forward(self, idx=None, targets=None, *, inputs_embeds=None, doc_ids=None, position_ids=None):
        """idx (B, T) token ids, or inputs_embeds (B, T, H). targets (B, T): the token after each position, -100 =
        no loss. doc_ids (B, T): attention stays inside equal ids (packing); position_ids (B, T) restart per document.
        Returns (logits (B, T, V), None) without targets, (None, loss) with them."""
        if (idx is None) == (inputs_embeds is None):
            raise ValueError("GPT.forward: pass exactly one of idx (B, T) or inputs_embeds (B, T, H)")
        x, router_logits = self.hidden_states(idx, inputs_embeds, doc_ids, position_ids)
        if targets is None:
            return self.lm_head(x), None
        B, T, H = x.shape
        if targets.shape != (B, T):
            raise ValueError(f"GPT.forward: targets have shape {tuple(targets.shape)}, expected {(B, T)}")
        # Only rows with a target reach the unembedding: with a 201088-row lm_head it dominates the step, and
        # instruction data scores ~10% of its tokens (image tokens and prompts are -100).
        flat_targets = targets.reshape(B * T)  # (N,)
        scored = (flat_targets != -100).nonzero().squeeze(1)  # (n,)
        if scored.numel() == 0:  # nothing to score: a zero that keeps the graph (a mean over none would be nan),
            ce = (x.sum() + self.lm_head.weight.sum()) * 0.0  # lm_head in it too, so every rank sees the same grads
        else:
            ce = fused.linear_cross_entropy(x.reshape(B * T, H)[scored], self.lm_head.weight,  # (n, H), (V, H)
                                            flat_targets[scored])  # (n,)
        loss, aux = ce, None
        if self.training and self.config.router_aux_loss_coef:
            aux = load_balancing_loss(router_logits, self.config.num_local_experts, self.config.num_experts_per_tok)
            loss = ce + self.config.router_aux_loss_coef * aux
        self.last_losses = {"ce": ce.item(), "aux": 0.0 if aux is None else aux.item()}
        return None, loss

    # --- checkpoints (Hugging Face gpt-oss format) ---------------------------------------------------------

    def use_mxfp4_experts(self):
        """Swap every block's experts for MXFP4-resident ones (Experts(mxfp4=True)), built on the device of the
        ones they replace with zero weights (from_pretrained fills them, on the meta device first). Biases are new
        parameters too: load or copy them afterwards."""
        for block in self.model.layers:
            old = block.mlp.experts
            with torch.device(old.gate_up_proj_bias.device):
                block.mlp.experts = Experts(self.config, mxfp4=True).to(old.gate_up_proj_bias.dtype)
        return self

    @property
    def mxfp4_resident(self):
        return any(block.mlp.experts.mxfp4 for block in self.model.layers)

    @classmethod
    def from_pretrained(cls, path, dtype=torch.bfloat16, device="cpu", mxfp4_resident=False):
        """A Hugging Face gpt-oss directory: config.json and one or many safetensors files (with an index), experts
        dense (bf16/fp32) or MXFP4. Tensors are streamed into preallocated parameters of `dtype` on `device`.
        mxfp4_resident: keep the experts as MXFP4 (Experts(mxfp4=True)): the released bytes as they are, or a dense
        checkpoint's experts quantised (checkpoint.mxfp4_quantize); the 20B's weights then take ~13 GB."""
        config = GPTConfig.from_json(path)
        with torch.device("meta"):
            model = cls(config).to(dtype)
            if mxfp4_resident:
                model.use_mxfp4_experts()
        model.to_empty(device=device)  # uninitialised storage, every tensor is then filled from the checkpoint
        checkpoint.load_gpt_oss(model, path)
        return model.eval()

    def save_pretrained(self, path, dtype=None, max_shard_bytes=5 * 2**30, mxfp4=None):
        """Write config.json and safetensors shards (with an index when there are several) that transformers'
        GptOssForCausalLM.from_pretrained loads. dtype: None keeps the parameters' dtype (MXFP4 bytes are never cast).
        mxfp4: None writes the experts as they are held (resident MXFP4 bytes as they are, dense as dense); True
        quantises dense experts to the released MXFP4 layout (checkpoint.mxfp4_quantize) and adds the released
        quantization_config; False dequantises resident experts to dense."""
        mxfp4 = self.mxfp4_resident if mxfp4 is None else mxfp4
        os.makedirs(path, exist_ok=True)
        config = self.config.to_dict()
        if mxfp4:
            config["quantization_config"] = checkpoint.mxfp4_quantization_config()
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        state = self.state_dict().items()
        state = checkpoint.mxfp4_state(state) if mxfp4 else checkpoint.dense_state(state, self.lm_head.weight.dtype)
        checkpoint.write_safetensors(state, path, max_shard_bytes, dtype)

    # --- generation ----------------------------------------------------------------------------------------

    def new_caches(self, batch, max_len, key_mask=None):
        """One KVCache per layer for `batch` rows of up to `max_len` positions; key_mask (B, max_len) bool or None."""
        c, w = self.config, self.lm_head.weight
        return [KVCache(batch, max_len, c.num_key_value_heads, c.head_dim, c.window_of(i), w.dtype, w.device, key_mask)
                for i in range(c.num_hidden_layers)]

    def plain_blocks(self) -> bool:
        """Whether every projection and router is this file's own module. The CPU fast path copies their weights;
        a module wrapped from outside (a LoRA adapter, lora.py) changes the maths, so its block runs its forward."""
        return all(type(m) is nn.Linear for block in self.model.layers for m in
                   (block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj, block.self_attn.o_proj)) \
            and all(type(block.mlp.router) is Router for block in self.model.layers)

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, stop_tokens=None, inputs_embeds=None,
                 prompt_lens=None, generator=None, cpu_fast_path=True, on_token=None):
        """Sample max_new_tokens after the prompt with a KV cache; temperature=0.0 is greedy.

        idx (B, T) prompt ids; or inputs_embeds (B, T, H) for the prompt (MedGPT's image features), with idx the ids to
        copy into the output (or None: then only the new tokens are returned).
        Prompts of different lengths are LEFT-padded to T: prompt_lens (B,) holds each row's real length, its tokens
        being the last prompt_lens[b] of the row (None = no padding). Padding keys are masked out of attention and
        positions count from each row's first real token, so every row gets the tokens it would get alone.
        stop_tokens: ids that end a row (None = never stop early); a finished row is filled with config.pad_token_id
        (or its stop token when that is None), and generation ends when every row has finished.
        cpu_fast_path: on a CPU with the torch path, decode with fused_cpu.decode_step (False: every new token through
        the blocks' forward, the path the fast one is tested against).
        on_token: called with each step's new tokens (B,) as they come (sample.py streams the answer with it).
        Returns (B, T + n) LongTensor, the new tokens in [:, T:], n <= max_new_tokens.
        """
        # inference mode, not just no_grad: torch skips version counters and view tracking on every op, a sizeable
        # share of a decoded token's time on a CPU (docs/model.md). Its tensors cannot be changed in place or saved
        # for backward outside it, so the caller gets an ordinary copy of the ids.
        with torch.inference_mode():
            out = self._generate(idx, max_new_tokens, temperature, top_k, stop_tokens, inputs_embeds, prompt_lens,
                                 generator, cpu_fast_path, on_token)
        return out.clone()

    def _generate(self, idx, max_new_tokens, temperature, top_k, stop_tokens, inputs_embeds, prompt_lens, generator,
                  cpu_fast_path, on_token=None):
        """GPT.generate's loop (called in inference mode)."""
        prompt = idx if inputs_embeds is None else inputs_embeds
        B, T = prompt.shape[:2]
        device = prompt.device
        max_len = T + max_new_tokens
        positions = torch.arange(max_len, device=device)  # (max_len,)
        key_mask = None
        if prompt_lens is not None:
            pad = T - torch.as_tensor(prompt_lens, device=device).long().view(B)  # (B,) padding slots per row
            if (pad < 0).any():
                raise ValueError(f"generate: prompt_lens {prompt_lens} exceed the prompt length T={T}")
            positions = (positions[None] - pad[:, None]).clamp(min=0)  # (B, max_len)
            if (pad > 0).any():
                key_mask = torch.arange(max_len, device=device)[None] >= pad[:, None]  # (B, max_len)
        caches = self.new_caches(B, max_len, key_mask)
        out = torch.zeros(B, max_len, dtype=torch.long, device=device)
        if idx is not None:
            out[:, :T] = idx
        stops = None if not stop_tokens else torch.as_tensor(list(stop_tokens), device=device)
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        fill = self.config.pad_token_id
        # CPU fast path: fused_cpu.decode_step, tested equal to the blocks' forward
        fast = cpu_fast_path and device.type == "cpu" and fused.kernel_path(prompt) == "torch" and self.plain_blocks()
        weights = fused_cpu.decode_weights(self) if fast else None
        # the prompt through the blocks' own forward, filling the caches
        h, _ = self.hidden_states(idx if inputs_embeds is None else None, inputs_embeds,
                                  position_ids=positions[..., :T], caches=caches)
        x = h[:, -1]  # (B, H): only the last position's logits are needed
        n = 0
        while n < max_new_tokens:
            logits = fused_cpu.rows_matmul(x, weights.head) if fast else self.lm_head(x)  # (B, V)
            next_token = sample_next(logits, temperature, top_k, generator)  # (B,)
            if stops is not None:
                row_fill = next_token if fill is None else torch.full_like(next_token, fill)
                next_token = torch.where(finished, row_fill, next_token)
                finished |= torch.isin(next_token, stops)
            out[:, T + n] = next_token
            if on_token is not None:
                on_token(next_token)
            n += 1
            if n == max_new_tokens or (stops is not None and bool(finished.all())):
                break
            position = positions[..., T + n - 1:T + n]  # (1,) or (B, 1)
            if fast:  # CPU fast path
                x = fused_cpu.decode_step(self, weights, self.model.embed_tokens(next_token), position, caches)
            else:  # the new token through the blocks' own forward with the cache
                h, _ = self.hidden_states(next_token[:, None], position_ids=position, caches=caches)  # (B, 1, H)
                x = h[:, -1]
        return out[:, :T + n] if idx is not None else out[:, T:T + n]


def sample_next(logits, temperature=1.0, top_k=None, generator=None):
    """logits (B, V) -> next token ids (B,): argmax when temperature == 0, else softmax(logits / T) over the top k."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ---------------- MedGPT: vision tower + projector + GPT-oss ----------------
#
# Design choices
# - MedGPT holds .vision_tower (vision.CLIPVision, SiglipVision or OpenCLIPVision, picked by the config's vision
#   family: vision.build_tower), .multi_modal_projector (vision.Projector) and
#   .language_model (GPT); with the GPT's own "model." / "lm_head." names its state dict is transformers 5's
#   LLaVA save layout, so the checkpoint mapping is a prefix table (checkpoint.LLAVA_LAYOUTS).
# - The image features of every tile are scattered into the token embeddings at the image-token positions, in
#   order (row-major over the batch), as transformers' LlavaModel does with masked_scatter. A sample may hold
#   any number of images, zero included; each must bring a whole number of tiles' worth of image tokens.
# - save_pretrained writes llava-hf's released layout (vision_tower.vision_model.*, language_model.model.*,
#   language_model.lm_head.*, multi_modal_projector.*), from_pretrained reads it and transformers 5's own
#   layouts; both through checkpoint.py, which streams tensor by tensor into the allocated parameters, so a
#   LLaVA directory with MXFP4 experts loads without ever holding two copies of the model.
# - The stages' sharded start (training.llava_on_meta / parts_on_meta: meta device + checkpoint's readers)
#   needs configs without weights: MedGPTConfig.from_json, MedGPTConfig.from_parts, and new_projector
#   (from_parts' own seeded projector init, so both starts give the same values).

IMAGE_TOKEN_ID = 200017  # <|reserved_200017|> of o200k_harmony; equals data.tokenizer.IMAGE_TOKEN_ID


@dataclass
class MedGPTConfig:
    """A LLaVA config.json's fields that matter here (transformers' defaults where a file omits them), and the
    image preprocessing (preprocessor_config.json beside it; None: the vision family's release default)."""
    text: GPTConfig = field(default_factory=GPTConfig)
    vision: object = field(default_factory=vision_lib.CLIPVisionConfig)  # a vision.*VisionConfig of any family
    image_token_index: int = IMAGE_TOKEN_ID
    vision_feature_layer: object = -2  # int, or a list of ints whose hidden states are concatenated
    vision_feature_select_strategy: str = "default"  # 'default' drops the first (class) token, 'full' keeps it
    projector_hidden_act: str = "gelu"
    multimodal_projector_bias: bool = True
    preprocessing: vision_lib.Preprocessing = None

    def __post_init__(self):
        if self.preprocessing is None:
            self.preprocessing = self.vision.preprocessing()

    @classmethod
    def from_dict(cls, d, where="config.json"):
        if d.get("model_type") != "llava":
            raise ValueError(f"{where}: model_type={d.get('model_type')!r}, expected 'llava' (a LLaVA directory; "
                             f"use GPT.from_pretrained for a plain gpt-oss one)")
        text = d.get("text_config") or {}
        if text.get("model_type") != "gpt_oss":
            raise ValueError(f"{where}: text_config.model_type={text.get('model_type')!r}, expected 'gpt_oss'")
        if d.get("vision_config") is None:
            vision_config = vision_lib.CLIPVisionConfig()  # LlavaConfig's default tower: ViT-L/14-336
        else:
            vision_config = vision_lib.vision_config_from_hf(d["vision_config"], where)
        if d.get("tie_word_embeddings"):
            raise ValueError(f"{where}: tie_word_embeddings=true is not supported (gpt-oss unties them)")
        config = cls(text=GPTConfig.from_dict(text, where=f"{where} text_config"), vision=vision_config,
                     image_token_index=d.get("image_token_index", d.get("image_token_id", 32000)),
                     vision_feature_layer=d.get("vision_feature_layer", -2),
                     vision_feature_select_strategy=d.get("vision_feature_select_strategy", "default"),
                     projector_hidden_act=d.get("projector_hidden_act", "gelu"),
                     multimodal_projector_bias=d.get("multimodal_projector_bias", True))
        config.validate(where)
        return config

    @classmethod
    def from_json(cls, path):
        """A LLaVA directory's config.json (or the file itself), and its preprocessor_config.json if there is one."""
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found: expected a LLaVA-format checkpoint directory")
        with open(path) as f:
            config = cls.from_dict(json.load(f), where=path)
        config.preprocessing = vision_lib.read_preprocessing(os.path.dirname(path), config.vision)
        return config

    def validate(self, where="MedGPTConfig"):
        if not 0 <= self.image_token_index < self.text.vocab_size:
            raise ValueError(f"{where}: image_token_index={self.image_token_index} is outside the vocabulary "
                             f"(vocab_size={self.text.vocab_size})")
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise ValueError(f"{where}: vision_feature_select_strategy={self.vision_feature_select_strategy!r}, "
                             f"expected 'default' or 'full'")
        if self.projector_hidden_act not in vision_lib.ACTIVATIONS:
            raise ValueError(f"{where}: projector_hidden_act={self.projector_hidden_act!r}; supported: "
                             f"{sorted(vision_lib.ACTIVATIONS)}")

    def to_dict(self, dtype=None):
        """transformers' LlavaConfig layout."""
        return {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
                "text_config": self.text.to_dict(), "vision_config": self.vision.to_hf(),
                "image_token_index": self.image_token_index, "image_seq_length": self.tokens_per_tile,
                "vision_feature_layer": self.vision_feature_layer,
                "vision_feature_select_strategy": self.vision_feature_select_strategy,
                "projector_hidden_act": self.projector_hidden_act,
                "multimodal_projector_bias": self.multimodal_projector_bias, "tie_word_embeddings": False,
                # transformers 5 reads "dtype"; older versions and the serving engines built on them "torch_dtype"
                **({"dtype": str(dtype).removeprefix("torch."), "torch_dtype": str(dtype).removeprefix("torch.")}
                   if dtype is not None else {})}

    def preprocessor_dict(self):
        """preprocessor_config.json for a LLaVA directory; None for an open_clip tower (its preprocess_cfg rides in
        vision_config: no transformers image processor crops as torchvision does)."""
        return None if self.preprocessing.crop_offset != "floor" else self.preprocessing.to_hf()

    @property
    def n_feature_layers(self):
        return 1 if isinstance(self.vision_feature_layer, int) else len(self.vision_feature_layer)

    @property
    def tokens_per_tile(self):
        """Patches plus class token(s), less the first token with 'default' (576 for CLIP-336, 729 for SigLIP-384)."""
        tokens = self.vision.tokens_per_tile + self.vision.class_tokens
        return tokens - (1 if self.vision_feature_select_strategy == "default" else 0)

    @classmethod
    def from_parts(cls, lm_path, vision_path, vision_feature_layer=None, vision_feature_select_strategy=None,
                   **llava_fields):
        """The config MedGPT.from_parts builds, from the directories' config files alone (no weights read): the
        meta-device start of stage 1 (training.parts_on_meta). Feature layer and strategy: None is the family's."""
        vision_config = vision_lib.read_vision_config(vision_path)[0]
        config = cls(text=GPTConfig.from_json(lm_path), vision=vision_config,
                     vision_feature_layer=vision_config.feature_layer if vision_feature_layer is None
                     else vision_feature_layer,
                     vision_feature_select_strategy=vision_feature_select_strategy or vision_config.select_strategy,
                     preprocessing=vision_lib.read_preprocessing(vision_path, vision_config), **llava_fields)
        config.validate(f"MedGPT.from_parts({lm_path!r}, {vision_path!r})")
        return config


def new_projector(config, seed, dtype=torch.float32, device="cpu"):
    """A freshly initialised projector (PyTorch's default Linear init, as LLaVA's) from `seed`, without disturbing
    the caller's RNG stream: the same values on every rank, in MedGPT.from_parts and in the meta-device start."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        projector = vision_lib.Projector(config.vision.hidden_size * config.n_feature_layers, config.text.hidden_size,
                                         act=config.projector_hidden_act, bias=config.multimodal_projector_bias)
    return projector.to(device=device, dtype=dtype)


class MedGPT(nn.Module):
    """Vision tower -> projector -> image features scattered into GPT-oss's token embeddings."""

    def __init__(self, config: MedGPTConfig):
        super().__init__()
        self.config = config
        self.vision_tower = vision_lib.build_tower(config.vision)
        self.multi_modal_projector = vision_lib.Projector(
            config.vision.hidden_size * config.n_feature_layers, config.text.hidden_size,
            act=config.projector_hidden_act, bias=config.multimodal_projector_bias)
        self.language_model = GPT(config.text)

    @property
    def image_token_id(self):
        return self.config.image_token_index

    @property
    def tokens_per_tile(self):
        return self.config.tokens_per_tile

    def set_trainable(self, vision=True, projector=True, lm=True):
        """Freeze or unfreeze each part (stage 1: projector only; stages 2 and 3: everything)."""
        self.vision_tower.requires_grad_(vision)
        self.multi_modal_projector.requires_grad_(projector)
        self.language_model.requires_grad_(lm)
        return self

    # --- forward -----------------------------------------------------------------------------------------

    def image_features(self, pixel_values):
        """pixel_values (N_tiles, 3, S, S) -> (N_tiles, tokens_per_tile, lm hidden)."""
        c = self.config
        features = self.vision_tower(pixel_values, c.vision_feature_layer, c.vision_feature_select_strategy)
        projector_dtype = self.multi_modal_projector.linear_1.weight.dtype
        return self.multi_modal_projector(features.to(projector_dtype))

    def check_image_tokens(self, input_ids, n_tiles):
        """Every sample's image tokens must be whole tiles, and all of them together exactly the tiles given."""
        per_sample = (input_ids == self.image_token_id).sum(dim=1).tolist()  # (B,) image tokens per sample
        tpt, first_tile = self.tokens_per_tile, 0
        for b, count in enumerate(per_sample):
            if count % tpt:
                raise ValueError(f"MedGPT: sample {b} holds {count} image tokens, not a multiple of the "
                                 f"{tpt} features one tile gives (expand each image placeholder to "
                                 f"num_tiles * {tpt} image tokens)")
            if first_tile + count // tpt > n_tiles:
                raise ValueError(f"MedGPT: sample {b} holds {count} image tokens ({count // tpt} tiles from tile "
                                 f"{first_tile}) but pixel_values hold only {n_tiles} tiles = {n_tiles * tpt} "
                                 f"image features for the batch ({sum(per_sample)} image tokens)")
            first_tile += count // tpt
        if first_tile != n_tiles:
            raise ValueError(f"MedGPT: input_ids hold {sum(per_sample)} image tokens ({first_tile} tiles; per sample "
                             f"{per_sample}) but pixel_values hold {n_tiles} tiles = {n_tiles * tpt} image features")

    def embed(self, input_ids, pixel_values=None):
        """Token embeddings (B, T, H) with each image-token position replaced by the next image feature."""
        embeds = self.language_model.model.embed_tokens(input_ids)  # (B, T, H)
        n_tiles = 0 if pixel_values is None else pixel_values.shape[0]
        self.check_image_tokens(input_ids, n_tiles)
        if n_tiles == 0:
            if not (self.training and torch.is_grad_enabled()):
                return embeds
            # training: run the tower on zero tiles anyway (adds exactly 0), so every rank runs and backpropagates
            # through the same ZeRO-3 units whatever its micro-batch holds (zero.py's collectives pair up)
            size = self.config.vision.image_size
            empty = embeds.new_zeros(0, self.config.vision.num_channels, size, size)  # (0, 3, S, S)
            return embeds + 0 * self.image_features(empty).sum().to(embeds.dtype)
        features = self.image_features(pixel_values).to(embeds.dtype)  # (N_tiles, tokens_per_tile, H)
        is_image = (input_ids == self.image_token_id)[..., None]  # (B, T, 1)
        return embeds.masked_scatter(is_image, features)  # fills True positions row-major, in feature order

    def forward(self, input_ids, pixel_values=None, targets=None, *, doc_ids=None, position_ids=None):
        """input_ids (B, T) with one image token per image feature; pixel_values (N_tiles, 3, S, S) in the order
        the image-token runs appear (row-major over the batch). Returns GPT.forward's (logits, loss)."""
        embeds = self.embed(input_ids, pixel_values)
        return self.language_model(targets=targets, inputs_embeds=embeds, doc_ids=doc_ids, position_ids=position_ids)

    @torch.no_grad()
    def generate(self, input_ids, pixel_values=None, max_new_tokens=64, temperature=0.0, top_k=None,
                 stop_tokens=None, prompt_lens=None, generator=None, on_token=None):
        """Decode after prompts that may hold images (greedy by default); see GPT.generate for left padding and
        on_token. Returns (B, T + n) LongTensor."""
        embeds = self.embed(input_ids, pixel_values)
        return self.language_model.generate(input_ids, max_new_tokens, temperature=temperature, top_k=top_k,
                                            stop_tokens=stop_tokens, inputs_embeds=embeds, prompt_lens=prompt_lens,
                                            generator=generator, on_token=on_token)

    # --- checkpoints -----------------------------------------------------------------------------------------

    @classmethod
    def from_parts(cls, lm_path, vision_path, dtype=torch.bfloat16, device="cpu", seed=0,
                   image_token_index=IMAGE_TOKEN_ID, vision_feature_layer=None, vision_feature_select_strategy=None,
                   projector_hidden_act="gelu", mxfp4_resident=False):
        """Stage-1 initialisation: a released gpt-oss directory, a released vision tower's directory (CLIP's
        CLIPModel or CLIPVisionModel, SigLIP's SiglipModel or SiglipVisionModel, an open_clip directory such as
        BiomedCLIP's, or a LLaVA directory), and a projector freshly initialised (PyTorch's default Linear init, as
        LLaVA's) from `seed`. Feature layer and strategy: None takes the family's default (vision.*VisionConfig).
        mxfp4_resident: keep the experts as MXFP4 (see GPT.from_pretrained)."""
        config = MedGPTConfig.from_parts(lm_path, vision_path, image_token_index=image_token_index,
                                         vision_feature_layer=vision_feature_layer,
                                         vision_feature_select_strategy=vision_feature_select_strategy,
                                         projector_hidden_act=projector_hidden_act)
        with torch.device("meta"):
            model = cls(config)
        model.language_model = GPT.from_pretrained(lm_path, dtype=dtype, device=device, mxfp4_resident=mxfp4_resident)
        model.vision_tower = vision_lib.load_tower(vision_path, dtype=dtype, device=device)
        model.multi_modal_projector = new_projector(config, seed, dtype, device)
        return model

    @classmethod
    def from_pretrained(cls, path, dtype=torch.bfloat16, device="cpu", mxfp4_resident=False):
        """A transformers LLaVA directory (gpt_oss text_config; clip_vision_model, siglip_vision_model or our
        open_clip_vision vision_config), any of the checkpoint.LLAVA_LAYOUTS, experts dense or MXFP4, one or many
        safetensors files. mxfp4_resident: keep the experts as MXFP4 (see GPT.from_pretrained)."""
        config = MedGPTConfig.from_json(path)
        with torch.device("meta"):
            model = cls(config).to(dtype)
            if mxfp4_resident:
                model.language_model.use_mxfp4_experts()
        model.to_empty(device=device)  # uninitialised storage, every tensor is then filled from the checkpoint
        checkpoint.load_llava(model, path)
        return model.eval()

    def save_pretrained(self, path, dtype=None, max_shard_bytes=5 * 2**30, mxfp4=None):
        """config.json + safetensors in llava-hf's layout, split into shards of at most max_shard_bytes (with a
        model.safetensors.index.json when there are several), and preprocessor_config.json.
        dtype: None keeps the parameters' dtype. mxfp4: the experts' format, as in GPT.save_pretrained (MXFP4 adds
        the released quantization_config, its module names under language_model.)."""
        lm = self.language_model
        mxfp4 = lm.mxfp4_resident if mxfp4 is None else mxfp4
        state = self.state_dict().items()
        state = checkpoint.mxfp4_state(state) if mxfp4 else checkpoint.dense_state(state, lm.lm_head.weight.dtype)
        config = self.config.to_dict(dtype or lm.lm_head.weight.dtype)
        if mxfp4:
            config["quantization_config"] = checkpoint.mxfp4_quantization_config("language_model.")
        checkpoint.write_llava(state, config, path, max_shard_bytes, dtype, self.config.preprocessor_dict())

