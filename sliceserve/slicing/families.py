"""Family adapters: where each architecture keeps its tensors, and its canonical shape.

An adapter is chosen from the config's ``model_type`` (or ``architectures``), never from
the model's name. It says which Hugging Face tensor holds each canonical tensor, which
norm reads into which linears, and whether the norms are LayerNorms (which need the
residual stream centred before they become weightless RMSNorms).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sliceserve.errors import SliceserveError
from sliceserve.model.spec import DecoderSpec, RopeSpec

ACTIVATION_NAMES = {
    "silu": "silu",
    "swish": "silu",
    "relu": "relu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
}

# Architectures we know and cannot slice exactly, with the reason.
REFUSED = {
    "gemma2": "its sandwich norms (a norm after each block as well as before) break the rotation invariance",
    "gemma3": "its sandwich norms (a norm after each block as well as before) break the rotation invariance",
    "olmo2": "its norms sit after each block (post-norm), which breaks the rotation invariance",
    "gemma": "its norm weights are stored as (1 + w) and its embedding is scaled; not supported yet",
    "phi3": "Phi-3 is not supported yet (fused qkv and gate_up projections)",
}


@dataclass(frozen=True)
class Family:
    """Canonical name -> Hugging Face name templates for one architecture."""

    name: str
    layer_norm: bool  # LayerNorm (centre the stream) rather than RMSNorm
    parallel_block: bool
    embed: str
    positions: str | None
    final_norm: str
    head: str
    layer_prefix: str
    attn: dict[str, str]  # q, k, v, o
    mlp: dict[str, str]  # gate (optional), up, down
    attn_norm: str
    mlp_norm: str | None  # None for parallel blocks (both read attn_norm)

    def layer_names(self, index: int) -> dict[str, str]:
        """Canonical layer tensor stem -> HF stem (append .weight / .bias)."""
        prefix = self.layer_prefix.format(index)
        names = {f"attn.{k}": prefix + v for k, v in self.attn.items()}
        names.update({f"mlp.{k}": prefix + v for k, v in self.mlp.items()})
        names["attn_norm"] = prefix + self.attn_norm
        if self.mlp_norm is not None:
            names["mlp_norm"] = prefix + self.mlp_norm
        return names


LLAMA_LIKE = dict(
    layer_norm=False,
    parallel_block=False,
    embed="model.embed_tokens",
    positions=None,
    final_norm="model.norm",
    head="lm_head",
    layer_prefix="model.layers.{}.",
    attn={"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj"},
    mlp={"gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"},
    attn_norm="input_layernorm",
    mlp_norm="post_attention_layernorm",
)

FAMILIES = {
    "llama": Family(name="llama", **LLAMA_LIKE),
    "mistral": Family(name="mistral", **LLAMA_LIKE),
    "qwen2": Family(name="qwen2", **LLAMA_LIKE),
    "opt": Family(
        name="opt",
        layer_norm=True,
        parallel_block=False,
        embed="model.decoder.embed_tokens",
        positions="model.decoder.embed_positions",
        final_norm="model.decoder.final_layer_norm",
        head="lm_head",
        layer_prefix="model.decoder.layers.{}.",
        attn={"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.out_proj"},
        mlp={"up": "fc1", "down": "fc2"},
        attn_norm="self_attn_layer_norm",
        mlp_norm="final_layer_norm",
    ),
    "phi": Family(
        name="phi",
        layer_norm=True,
        parallel_block=True,
        embed="model.embed_tokens",
        positions=None,
        final_norm="model.final_layernorm",
        head="lm_head",
        layer_prefix="model.layers.{}.",
        attn={"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.dense"},
        mlp={"up": "mlp.fc1", "down": "mlp.fc2"},
        attn_norm="input_layernorm",
        mlp_norm=None,
    ),
}

ARCHITECTURE_TO_TYPE = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "OPTForCausalLM": "opt",
    "PhiForCausalLM": "phi",
}

# OPT keeps two unused rows in front of its learned positions (positions start at 2).
OPT_POSITION_OFFSET = 2


def family_for(config: Any) -> Family:
    """The adapter for a Hugging Face config, or a SliceserveError saying why there is none."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        for arch in getattr(config, "architectures", None) or []:
            model_type = ARCHITECTURE_TO_TYPE.get(arch, model_type)
    if model_type in REFUSED:
        raise SliceserveError(f"model type '{model_type}' cannot be sliced: {REFUSED[model_type]}")
    if model_type not in FAMILIES:
        supported = ", ".join(sorted(FAMILIES))
        raise SliceserveError(f"unsupported model type '{model_type}' (supported: {supported})")
    check_variant(FAMILIES[model_type], config)
    return FAMILIES[model_type]


def check_variant(family: Family, config: Any) -> None:
    """Refuse variants of a supported family that the method cannot slice exactly."""
    if family.name == "opt":
        if not getattr(config, "do_layer_norm_before", True):
            raise SliceserveError(
                "this OPT variant normalises after each block (do_layer_norm_before=False, as OPT-350m): "
                "post-norm breaks the rotation invariance SliceGPT needs"
            )
        if getattr(config, "word_embed_proj_dim", config.hidden_size) != config.hidden_size:
            raise SliceserveError(
                "this OPT variant projects its embeddings (word_embed_proj_dim != hidden_size, as OPT-350m); "
                "not supported"
            )
        if getattr(config, "_remove_final_layer_norm", False):
            raise SliceserveError("this OPT variant has no final layer norm; not supported")
    if family.name == "phi" and getattr(config, "qk_layernorm", False):
        raise SliceserveError("Phi with qk_layernorm is not supported")
    if family.name == "qwen2" and getattr(config, "use_sliding_window", False):
        raise SliceserveError("Qwen2 with use_sliding_window=True (per-layer windows) is not supported")
    activation = getattr(config, "hidden_act", None) or getattr(config, "activation_function", None)
    if activation not in ACTIVATION_NAMES:
        raise SliceserveError(f"unsupported activation '{activation}'")


def rope_parameters(config: Any) -> dict:
    """Rope settings from either Transformers 5 (`rope_parameters`) or 4 (`rope_theta`, `rope_scaling`)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if not params:
        params["rope_theta"] = getattr(config, "rope_theta", 10000.0)
        params.update(getattr(config, "rope_scaling", None) or {})
    if "partial_rotary_factor" not in params and getattr(config, "partial_rotary_factor", None) is not None:
        params["partial_rotary_factor"] = config.partial_rotary_factor
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def rope_spec(config: Any, head_dim: int) -> RopeSpec:
    params = rope_parameters(config)
    kind = params["rope_type"]
    if kind not in ("default", "linear", "llama3"):
        raise SliceserveError(f"unsupported rope scaling '{kind}' (supported: default, linear, llama3)")
    return RopeSpec(
        theta=float(params["rope_theta"]),
        rotary_dim=int(head_dim * params.get("partial_rotary_factor", 1.0)),
        scaling_type=kind,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_positions=int(params.get("original_max_position_embeddings", 8192)),
    )


def decoder_spec(family: Family, config: Any) -> DecoderSpec:
    """The dense canonical description of a Hugging Face config."""
    width = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or width // heads
    activation = getattr(config, "hidden_act", None) or config.activation_function
    eps = getattr(config, "rms_norm_eps", None) or getattr(config, "layer_norm_eps", None) or 1e-5
    sliding = getattr(config, "sliding_window", None) if family.name == "mistral" else None
    spec = DecoderSpec(
        family=family.name,
        vocab_size=config.vocab_size,
        original_width=width,
        num_layers=config.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        intermediate_size=getattr(config, "intermediate_size", None) or config.ffn_dim,
        activation=ACTIVATION_NAMES[activation],
        gated_mlp="gate" in family.mlp,
        parallel_block=family.parallel_block,
        norm_eps=float(eps),
        max_positions=config.max_position_embeddings,
        rope=None if family.positions else rope_spec(config, head_dim),
        sliding_window=sliding,
        bos_token_id=getattr(config, "bos_token_id", None),
        eos_token_id=getattr(config, "eos_token_id", None),
        pad_token_id=getattr(config, "pad_token_id", None),
    )
    spec.dense_widths()
    return spec
