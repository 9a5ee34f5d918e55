"""The Transformers config of a sliceserve checkpoint (copied into every checkpoint we write).

A checkpoint's config.json describes its decoder in one dict, ``model`` (our DecoderSpec:
widths per layer, the original width, rope, block kind, ...), next to provenance keys that
this class keeps as plain attributes. The sizes Transformers looks for by their usual names
(``hidden_size``, ``num_hidden_layers``, ``num_key_value_heads``, ``sliding_window``, ...) are
derived from ``model`` here, so generation, caches and masks see a familiar config.

This file imports only Transformers: it runs where sliceserve is not installed.
"""

from transformers import PretrainedConfig

# Keys derived from `model`: ignored when they come back from a saved config.json, so that
# `model` stays the one description of the decoder.
DERIVED_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "sliding_window",
    "layer_types",
    "tie_word_embeddings",
)


class SliceserveConfig(PretrainedConfig):
    model_type = "sliceserve"

    def __init__(self, model: dict | None = None, linear_biases: list | None = None, **kwargs):
        self.model = dict(model or {})
        # Which linears carry a bias ("attn.q", ..., "mlp.down", "head"): the decoder
        # description does not say, the checkpoint's tensors do.
        self.linear_biases = list(linear_biases or [])
        for key in DERIVED_KEYS:
            kwargs.pop(key, None)
        spec = self.model
        self.vocab_size = spec.get("vocab_size", 0)
        self.hidden_size = spec.get("original_width", 0)
        self.intermediate_size = spec.get("intermediate_size", 0)
        self.num_hidden_layers = spec.get("num_layers", 0)
        self.num_attention_heads = spec.get("num_heads", 0)
        self.num_key_value_heads = spec.get("num_kv_heads", 0)
        self.head_dim = spec.get("head_dim", 0)
        self.hidden_act = spec.get("activation", "silu")
        self.max_position_embeddings = spec.get("max_positions", 0)
        self.rms_norm_eps = spec.get("norm_eps", 1e-5)
        self.sliding_window = spec.get("sliding_window")
        kind = "full_attention" if self.sliding_window is None else "sliding_attention"
        self.layer_types = [kind] * self.num_hidden_layers
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            kwargs.setdefault(name, spec.get(name))
        self.use_cache = kwargs.pop("use_cache", True)
        self.tie_word_embeddings = False  # the head reads another basis than the embedding writes
        super().__init__(**kwargs)
