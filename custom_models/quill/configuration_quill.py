"""Quill model configuration.

One dial sets the size: ``depth`` (number of layers). Width, heads and MLP size follow from it the way
nanochat does it (width = 64 * depth, 64-dim heads, SwiGLU hidden ~ 8/3 * width), and every derived field can
still be set explicitly. Field names are the standard ones (``hidden_size``, ``num_key_value_heads``, ...) so
tools that read configs (vLLM, PEFT, TRL, accelerate's size estimates) understand a Quill checkpoint.

The architecture choices the textbook transformers differ in are options, each a code path in ``modeling_quill.py``:
decoder or encoder (``is_decoder``), the position encoding, where the norm sits and which norm, and the MLP
(``hidden_act``). Values outside the listed choices are refused here, at config time.
"""

import copy

from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_rope_utils import RopeParameters

# Width per layer of depth and the head size used when the caller does not set them (nanochat's aspect ratio).
WIDTH_PER_LAYER = 64
DEFAULT_HEAD_DIM = 64

# Every Quill checkpoint names all the Auto classes it can be loaded as, not just the one it was saved from:
# TRL's RewardTrainer loads AutoModelForSequenceClassification from a causal-LM checkpoint.
# A decoder checkpoint lists the heads a decoder is used with, an encoder checkpoint the BERT-style heads (a causal-LM
# head on an encoder, or a masked-LM head on a decoder, is refused by the model).
AUTO_MAP = {
    "AutoConfig": "configuration_quill.QuillConfig",
    "AutoModel": "modeling_quill.QuillModel",
    "AutoModelForCausalLM": "modeling_quill.QuillForCausalLM",
    "AutoModelForSequenceClassification": "modeling_quill.QuillForSequenceClassification",
}
ENCODER_AUTO_MAP = {
    "AutoConfig": "configuration_quill.QuillConfig",
    "AutoModel": "modeling_quill.QuillModel",
    "AutoModelForMaskedLM": "modeling_quill_encoder.QuillForMaskedLM",
    "AutoModelForSequenceClassification": "modeling_quill.QuillForSequenceClassification",
    "AutoModelForTokenClassification": "modeling_quill_encoder.QuillForTokenClassification",
    "AutoModelForQuestionAnswering": "modeling_quill_encoder.QuillForQuestionAnswering",
}

# transformers 5.24 removed its question-answering pipeline; an encoder checkpoint names Quill's (pipeline_quill.py,
# copied beside the weights) so that pipeline("question-answering", model=folder, trust_remote_code=True) answers.
QA_PIPELINE = {
    "question-answering": {
        "impl": "pipeline_quill.QuillQuestionAnsweringPipeline",
        "pt": ["AutoModelForQuestionAnswering"],
        "tf": [],
        "type": "text",
    }
}

# The choices of each architecture option; the first is the default.
POSITION_EMBEDDINGS = ("rope", "sinusoidal", "learned", "alibi")
NORM_POSITIONS = ("pre", "post")
NORM_TYPES = ("rmsnorm", "layernorm")
GATED_ACTIVATIONS = ("silu",)  # SwiGLU: silu(gate) * up
PLAIN_ACTIVATIONS = ("gelu", "gelu_new", "relu")  # a 2-layer MLP: down(act(up(x)))
CLASSIFIER_POOLINGS = ("first", "mean", "last")


def _round_up(x: float, multiple: int) -> int:
    return int(-(-x // multiple) * multiple)


@strict(accept_kwargs=True)
class QuillConfig(PreTrainedConfig):
    r"""
    Configuration of a Quill transformer. The default is a decoder: pre-norm, RMSNorm, RoPE, grouped-query attention
    with optional QK-norm, SwiGLU MLP, no biases, fused QKV and gate/up projections.

    Architecture options (a value outside the choices raises ``ValueError``):

    - ``is_decoder``: True (default) a causal decoder (CausalLM, generation, KV cache); False a bidirectional encoder
      (MaskedLM, classification, token classification and QA heads; no cache).
    - ``position_embedding``: ``rope`` (default; rotates q and k), ``sinusoidal`` (Vaswani et al.'s fixed table added
      to the scaled token embeddings), ``learned`` (a trained table of ``max_position_embeddings`` rows, BERT/GPT-2),
      ``alibi`` (a per-head linear distance penalty added to the attention scores; it needs an explicit float mask,
      so SDPA cannot use its fused ``is_causal`` kernel, and flash/flex attention are refused).
    - ``norm_position``: ``pre`` (default; norm -> sublayer -> add, plus a final norm) or ``post`` (the original
      "Add & Norm": add -> norm after each sublayer, no final norm).
    - ``norm_type``: ``rmsnorm`` (default) or ``layernorm`` (with bias, as in BERT); QK-norm uses the same type.
      ``rms_norm_eps`` is the epsilon of either.
    - ``hidden_act``: ``silu`` -> SwiGLU (gated, default); ``gelu``, ``gelu_new`` or ``relu`` -> a plain 2-layer MLP.
      ``intermediate_size`` defaults to 8/3 * hidden for SwiGLU and 4 * hidden for the plain MLP.
    - ``classifier_pooling``: how ``QuillForSequenceClassification`` pools: ``first`` token (encoder default),
      ``mean`` over non-pad tokens, or ``last`` non-pad token (decoder default; TRL's reward-model shape).

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
    num_decoder_layers: int | None = None  # QuillForConditionalGeneration's decoder depth (default num_hidden_layers)
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    is_decoder: bool = True
    position_embedding: str = "rope"
    norm_position: str = "pre"
    norm_type: str = "rmsnorm"
    classifier_pooling: str | None = None
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
        # A ValueError here, not in validate_architecture (whose errors reach the caller wrapped in hub's
        # StrictDataclassClassValidationError, which is no ValueError).
        choices = {
            "position_embedding": POSITION_EMBEDDINGS,
            "norm_position": NORM_POSITIONS,
            "norm_type": NORM_TYPES,
            "hidden_act": GATED_ACTIVATIONS + PLAIN_ACTIVATIONS,
            "classifier_pooling": (None, *CLASSIFIER_POOLINGS),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                shown = ", ".join(a for a in allowed if a is not None)
                raise ValueError(f"{name} must be one of {shown}; got {getattr(self, name)!r}")
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
            gated = self.hidden_act in GATED_ACTIVATIONS
            self.intermediate_size = _round_up(8 * self.hidden_size / 3, 64) if gated else 4 * self.hidden_size
        if self.rope_parameters is None:
            self.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
        if self.classifier_pooling is None:
            self.classifier_pooling = "last" if self.is_decoder else "first"
        if not self.is_decoder:
            self.use_cache = False  # an encoder sees the whole input at once: nothing to cache
        default_map = AUTO_MAP if self.is_decoder else ENCODER_AUTO_MAP
        kwargs["auto_map"] = {**default_map, **(kwargs.get("auto_map") or {})}
        if not self.is_decoder:
            # A copy: pipeline() rewrites the entry it uses in place (class names -> classes).
            kwargs["custom_pipelines"] = {**copy.deepcopy(QA_PIPELINE), **(kwargs.get("custom_pipelines") or {})}
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Called by `@strict`: shape errors surface at config time, not as a matmul failure deep in forward."""
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.position_embedding == "rope" and self.head_dim % 2 != 0:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for rotary embeddings")
        if self.position_embedding == "sinusoidal" and self.hidden_size % 2 != 0:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be even for sinusoidal position embeddings")


__all__ = ["QuillConfig"]
