"""Tiny randomly initialised Transformers models of every supported family, for exact tests.

Each model is float64 with every norm weight and every bias perturbed away from the 1 / 0
that a fresh initialisation leaves (which would hide norm-fusion bugs), and with weights
large enough that attention is far from uniform. ``float64_reference`` patches the
Transformers RMSNorm classes, which compute in float32 whatever the model dtype, so that
the reference logits are a genuine float64 computation.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    PhiConfig,
    PretrainedConfig,
    Qwen2Config,
)
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.mistral.modeling_mistral import MistralRMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

from sliceserve.slicing.sources import FolderSource

VOCAB = 160
WIDTH = 80  # 25% slicing keeps int(0.75 * 80) = 60, rounded down to 56: the rounding matters
INTERMEDIATE = 144
HEADS = 4
MAX_POSITIONS = 64

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
    "rope_theta": 500000.0,
}

RMS_NORM_CLASSES = (LlamaRMSNorm, MistralRMSNorm, Qwen2RMSNorm)

VARIANTS = ("llama", "llama-biases", "llama3", "mistral", "qwen2", "opt", "phi")


def tiny_config(name: str) -> PretrainedConfig:
    """A small config of one family variant (see VARIANTS)."""
    llama_like = dict(
        vocab_size=VOCAB,
        hidden_size=WIDTH,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        num_key_value_heads=2,
        max_position_embeddings=MAX_POSITIONS,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    if name == "llama":
        return LlamaConfig(**llama_like)
    if name == "llama-biases":  # attention_bias and mlp_bias: biases on the stream's writers too
        return LlamaConfig(**llama_like, attention_bias=True, mlp_bias=True)
    if name == "llama3":  # Llama 3.1 rope scaling and tied embeddings, as SmolLM2
        return LlamaConfig(
            **{
                **llama_like,
                "num_hidden_layers": 3,
                "tie_word_embeddings": True,
                "max_position_embeddings": 128,
                "rope_parameters": dict(LLAMA3_ROPE),
            }
        )
    if name == "mistral":  # the window (8) is shorter than the test sequences; heads * head_dim != width,
        return MistralConfig(**llama_like, sliding_window=8, head_dim=16)  # as Mistral-Nemo
    if name == "qwen2":
        return Qwen2Config(**llama_like, use_sliding_window=False)
    if name == "opt":
        return OPTConfig(
            vocab_size=VOCAB,
            hidden_size=WIDTH,
            ffn_dim=INTERMEDIATE,
            num_hidden_layers=2,
            num_attention_heads=HEADS,
            max_position_embeddings=MAX_POSITIONS,
            word_embed_proj_dim=WIDTH,
            do_layer_norm_before=True,
            activation_function="relu",
            enable_bias=True,
            tie_word_embeddings=True,
            pad_token_id=1,
            bos_token_id=2,
            eos_token_id=2,
        )
    if name == "phi":  # Phi-2 shape: parallel block, partial rotary, full multi-head attention
        return PhiConfig(
            vocab_size=VOCAB,
            hidden_size=WIDTH,
            intermediate_size=INTERMEDIATE,
            num_hidden_layers=2,
            num_attention_heads=HEADS,
            num_key_value_heads=HEADS,
            max_position_embeddings=MAX_POSITIONS,
            partial_rotary_factor=0.4,
            hidden_act="gelu_new",
            layer_norm_eps=1e-5,
            tie_word_embeddings=False,
            qk_layernorm=False,
        )
    raise ValueError(f"no tiny config named {name}")


def tiny_model(config: PretrainedConfig, seed: int = 0, weight_std: float = 0.15) -> torch.nn.Module:
    """A float64 model with random weights, norm weights 1 + 0.3 N(0,1) and biases 0.1 N(0,1)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(torch.float64).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():  # tied parameters are listed once
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float64)
            if name.endswith(".bias"):
                param.copy_(0.1 * noise)
            elif "norm" in name:
                param.copy_(1 + 0.3 * noise)
            else:
                param.copy_(weight_std * noise)
    return model


def save_tiny_model(name: str, folder: Path, seed: int = 0) -> torch.nn.Module:
    """Build the tiny model `name`, save it (float64 safetensors) to `folder`, return it."""
    model = tiny_model(tiny_config(name), seed)
    model.save_pretrained(folder)
    return model


def float64_rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """The RMSNorm of the Llama family computed in the input's dtype (no float32 detour)."""
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def float64_reference(monkeypatch) -> None:
    """Make the Transformers RMSNorm classes faithful in float64 (reference side only)."""
    for cls in RMS_NORM_CLASSES:
        monkeypatch.setattr(cls, "forward", float64_rms_norm_forward)


def random_tokens(batch: int, length: int, seed: int, vocab: int = VOCAB) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=generator)


def max_relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """The largest difference relative to the largest expected value (logits of one shape)."""
    assert actual.shape == expected.shape
    return float((actual - expected).abs().max() / expected.abs().max())


def calibration_batches(seed: int = 1, length: int = 24, pad_token: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Random (tokens, mask) batches; the last batch is right-padded in some rows."""
    batches = []
    for i in range(3):
        tokens = random_tokens(4, length, seed + i)
        batches.append((tokens, torch.ones_like(tokens, dtype=torch.bool)))
    tokens = random_tokens(3, length, seed + 10)
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[1, length - 7 :] = False
    mask[2, 5:] = False
    tokens[~mask] = pad_token
    batches.append((tokens, mask))
    return batches


# Linears that write the residual stream, by their Hugging Face module name in each family.
STREAM_WRITERS = ("o_proj", "down_proj", "out_proj", "fc2", "dense")


def confine_stream(model: torch.nn.Module, rank: int, seed: int = 3) -> None:
    """Make everything that writes the residual stream write into one random subspace of
    dimension `rank`, so the stream has rank `rank` at every point and slicing to that
    width loses nothing. (LayerNorm families centre the stream, which projects the subspace
    along the all-ones vector: still `rank` dimensions.)"""
    generator = torch.Generator().manual_seed(seed)
    width = model.config.hidden_size
    basis, _ = torch.linalg.qr(torch.randn(width, rank, generator=generator, dtype=torch.float64))
    projector = basis @ basis.T
    with torch.no_grad():
        for name, param in model.named_parameters():
            module = name.rsplit(".", 2)[-2]
            if module in ("embed_tokens", "embed_positions"):  # rows are stream vectors
                param.copy_(param @ projector)
            elif module in STREAM_WRITERS:  # weight (out=D, in); bias (D,)
                param.copy_(projector @ param)


def write_tiny_checkpoint(hf_folder: Path, kind: str, out: Path, dtype: torch.dtype | None = None) -> Path:
    """The tiny model saved in `hf_folder` as a sliceserve checkpoint `out`: "dense" (exported)
    or "sliced" (25%, calibrated on calibration_batches())."""
    from sliceserve.slicing.checkpoint_writer import export_checkpoint, slice_checkpoint

    source = NoTokenizerSource(hf_folder)
    if kind == "dense":
        return export_checkpoint(source, out, dtype=dtype, progress=False)
    return slice_checkpoint(source, out, calibration_batches(), sparsity=0.25, dtype=dtype, progress=False)


class NoTokenizerSource(FolderSource):
    """A tiny model's folder, which has no tokenizer; the checkpoint writers accept None."""

    def tokenizer(self):
        return None
