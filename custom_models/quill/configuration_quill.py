"""Quill model configuration.

One dial sets the size: ``depth`` (number of layers). Width, heads and MLP size follow from it the way
nanochat does it (width = 64 * depth, 64-dim heads, SwiGLU hidden ~ 8/3 * width), and every derived field can
still be set explicitly. Field names are the standard ones (``hidden_size``, ``num_key_value_heads``, ...) so
tools that read configs (vLLM, PEFT, TRL, accelerate's size estimates) understand a Quill checkpoint.
"""

from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_rope_utils import RopeParameters

# Width per layer of depth and the head size used when the caller does not set them (nanochat's aspect ratio).
WIDTH_PER_LAYER = 64
DEFAULT_HEAD_DIM = 64

# Every Quill checkpoint names all the Auto classes it can be loaded as, not just the one it was saved from:
# TRL's RewardTrainer loads AutoModelForSequenceClassification from a causal-LM checkpoint.
AUTO_MAP = {
    "AutoConfig": "configuration_quill.QuillConfig",
    "AutoModel": "modeling_quill.QuillModel",
    "AutoModelForCausalLM": "modeling_quill.QuillForCausalLM",
    "AutoModelForSequenceClassification": "modeling_quill.QuillForSequenceClassification",
}


def _round_up(x: float, multiple: int) -> int:
    return int(-(-x // multiple) * multiple)


@strict(accept_kwargs=True)
class QuillConfig(PreTrainedConfig):
    r"""
    Configuration of a Quill decoder-only transformer: pre-norm, RMSNorm, RoPE, grouped-query attention with
    optional QK-norm, SwiGLU MLP, no biases, fused QKV and gate/up projections.

    ```python
    >>> from quill.model import QuillConfig, QuillForCausalLM
    >>> config = QuillConfig(depth=4, vocab_size=8192)   # hidden 256, 4 heads, MLP 704
    >>> model = QuillForCausalLM(config)
    ```
    """

    model_type = "quill"
    # The KV cache in model outputs, under its name before and after transformers 5.24 (see modeling_quill.py).
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    depth: int | None = None
    vocab_size: int = 8192
    hidden_size: int | None = None
    intermediate_size: int | None = None
    num_hidden_layers: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    qk_norm: bool = True
    rope_parameters: RopeParameters | dict | None = None
    attention_dropout: float = 0.0
    use_cache: bool = True
    tie_word_embeddings: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs):
        # The dial: depth sets everything not given explicitly.
        if self.num_hidden_layers is None:
            self.num_hidden_layers = self.depth if self.depth is not None else 4
        if self.depth is None:
            self.depth = self.num_hidden_layers
        if self.hidden_size is None:
            self.hidden_size = WIDTH_PER_LAYER * self.depth
        if self.head_dim is None:
            self.head_dim = (
                self.hidden_size // self.num_attention_heads if self.num_attention_heads else DEFAULT_HEAD_DIM
            )
        if self.num_attention_heads is None:
            self.num_attention_heads = max(1, self.hidden_size // self.head_dim)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.intermediate_size is None:
            self.intermediate_size = _round_up(8 * self.hidden_size / 3, 64)
        if self.rope_parameters is None:
            self.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
        kwargs["auto_map"] = {**AUTO_MAP, **(kwargs.get("auto_map") or {})}
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Called by `@strict`: shape errors surface at config time, not as a matmul failure deep in forward."""
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for rotary embeddings")


__all__ = ["QuillConfig"]
