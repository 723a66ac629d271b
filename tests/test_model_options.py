"""Every option of trl.ModelConfig that a stage accepts does what it says, or is refused at parse time.

LoRA variants go through `trl.get_peft_config` and must show in the adapted model; 4/8-bit loading goes through
`trl.get_quantization_config` and trains on CPU with bitsandbytes; options that would do nothing are errors.
"""

import pytest
import torch
import trl
from peft import get_peft_model
from tiny_model import save_checkpoint

from quill.arguments import DataArguments, ModelArguments, OutputArguments
from quill.errors import QuillError
from quill.loading import CAUSAL_LM, CLASSIFIER, load_model, peft_config
from quill.options import build_stage_args

SFT_TYPES = (DataArguments, ModelArguments, trl.SFTConfig, OutputArguments)


def model_args(*overrides: str) -> ModelArguments:
    return build_stage_args(SFT_TYPES, ["use_cpu=true", *overrides])[1]


def error(*overrides: str) -> str:
    with pytest.raises(QuillError) as info:
        build_stage_args(SFT_TYPES, ["use_cpu=true", *overrides])
    return str(info.value)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    _, tokenizer = save_checkpoint(path)
    return path, tokenizer


def adapted(checkpoint, *overrides: str, task: str = CAUSAL_LM):
    path, tokenizer = checkpoint
    args = model_args(f"model_name_or_path={path}", "use_peft=true", *overrides)
    model = load_model(args, tokenizer, task=task)
    config = peft_config(args, task)
    return get_peft_model(model, config), config


def test_lora_variants_reach_the_adapter(checkpoint):
    model, config = adapted(checkpoint, "lora_r=4", "lora_alpha=16", "use_rslora=true")
    assert config.use_rslora and config.r == 4
    layer = model.base_model.model.model.layers[0].self_attn.qkv_proj
    assert layer.scaling["default"] == pytest.approx(16 / 4**0.5)  # rsLoRA: alpha / sqrt(r), not alpha / r

    model, config = adapted(checkpoint, "use_dora=true")
    assert config.use_dora
    assert any("lora_magnitude_vector" in name for name, _ in model.named_parameters())

    model, config = adapted(checkpoint, "lora_target_modules=[o_proj]", "lora_modules_to_save=[norm]")
    names = [name for name, _ in model.named_parameters()]
    assert any("o_proj.lora_A" in n for n in names) and not any("qkv_proj.lora_A" in n for n in names)
    assert any("norm.modules_to_save" in n for n in names)

    model, config = adapted(
        checkpoint, "lora_target_parameters=[mlp.down_proj.weight]", "lora_dropout=0", "lora_target_modules=[o_proj]"
    )
    assert config.target_parameters == ["mlp.down_proj.weight"]
    assert any("down_proj.lora_A" in name for name, _ in model.named_parameters())


def test_task_type_follows_the_stage_and_a_mismatch_is_refused(checkpoint):
    _, config = adapted(checkpoint, task=CLASSIFIER)
    assert config.task_type == "SEQ_CLS"
    _, config = adapted(checkpoint)
    assert config.task_type == "CAUSAL_LM"
    with pytest.raises(QuillError, match="lora_task_type is CAUSAL_LM but this stage trains a classifier model"):
        adapted(checkpoint, "lora_task_type=CAUSAL_LM", task=CLASSIFIER)


def test_dtype_and_attention_backend_are_honoured(checkpoint):
    path, tokenizer = checkpoint
    model = load_model(
        model_args(f"model_name_or_path={path}", "dtype=bfloat16", "attn_implementation=eager"), tokenizer
    )
    assert model.dtype == torch.bfloat16 and model.config._attn_implementation == "eager"


@pytest.mark.parametrize("bits", ["load_in_4bit", "load_in_8bit"])
def test_qlora_loads_quantized_and_trains_on_cpu(checkpoint, bits, tmp_path):
    pytest.importorskip("bitsandbytes")
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    path, tokenizer = checkpoint
    args = model_args(f"model_name_or_path={path}", "use_peft=true", f"{bits}=true")
    model = load_model(args, tokenizer)
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert type(qkv).__name__ == ("Linear4bit" if bits == "load_in_4bit" else "Linear8bitLt")
    rows = [{"messages": [{"role": "user", "content": "two plus two?"}, {"role": "assistant", "content": "four"}]}] * 8
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(
            output_dir=str(tmp_path),
            max_steps=2,
            per_device_train_batch_size=4,
            use_cpu=True,
            report_to=[],
            gradient_checkpointing=False,
            learning_rate=1e-2,
            logging_steps=1,
            save_strategy="no",
        ),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=peft_config(args),
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    trainer.train()
    moved = [n for n, p in trainer.model.named_parameters() if "lora_B" in n and not torch.equal(p, before[n])]
    assert moved  # the adapter trained on top of the quantized base


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["bnb_4bit_quant_type=fp4"], "bnb_4bit_quant_type is set but load_in_4bit is not true"),
        (["use_bnb_nested_quant=true"], "use_bnb_nested_quant is set but load_in_4bit is not true"),
        (["lora_r=8"], "lora_r is set but use_peft is false"),
        (["use_dora=true"], "use_dora is set but use_peft is false"),
        (["hub_strategy=end"], "hub_strategy is not accepted"),
        (["model_init_kwargs={torch_dtype: bfloat16}"], "model_init_kwargs is not accepted"),
        (["hub_model_id=me/x"], "hub_model_id is set but push_to_hub is false"),
        (["model_revision=v2"], "model_revision is set but there is no model_name_or_path"),
        (["use_peft=true", "lora_target_parameters=[mlp.down_proj.weight]"], "only without dropout"),
    ],
)
def test_options_that_would_do_nothing_are_refused(overrides, expected):
    message = error(*overrides)
    assert expected in message and "\n" not in message and "fix:" in message


@pytest.mark.parametrize("bits", ["load_in_4bit", "load_in_8bit"])
def test_quantizing_a_model_built_from_scratch_is_refused(checkpoint, bits):
    # It used to train in full precision without a word: the scratch path returned before the check.
    _, tokenizer = checkpoint
    with pytest.raises(QuillError, match="4/8-bit loading applies to a pretrained checkpoint"):
        load_model(model_args("model_config={depth: 1}", f"{bits}=true"), tokenizer)


def test_model_config_vocab_size_is_refused(checkpoint):
    _, tokenizer = checkpoint
    with pytest.raises(QuillError, match="model_config.vocab_size is set"):
        load_model(model_args("model_config={depth: 1, vocab_size: 512}"), tokenizer)


def test_model_revision_loads_that_revision_from_the_hub(checkpoint, hub_server, tmp_path):
    """Two commits of one Hub repo: `model_revision=<first commit>` loads the first weights, no revision the second."""
    path, _ = checkpoint
    code = """
        import sys, torch
        from huggingface_hub import HfApi
        from safetensors.torch import load_file, save_file
        from quill.loading import load_model, load_tokenizer
        from quill.arguments import ModelArguments

        path, changed = sys.argv[1], sys.argv[2]
        api = HfApi()
        api.create_repo("user/m")
        first = api.upload_folder(folder_path=path, repo_id="user/m").oid
        weights = load_file(f"{path}/model.safetensors")
        save_file({k: v + 1.0 for k, v in weights.items()}, f"{changed}/model.safetensors", metadata={"format": "pt"})
        api.upload_folder(folder_path=changed, repo_id="user/m")

        def embedding(revision):
            args = ModelArguments(model_name_or_path="user/m", model_revision=revision, trust_remote_code=True)
            model = load_model(args, load_tokenizer("user/m", revision=revision))
            return model.get_input_embeddings().weight

        local = weights["model.embed_tokens.weight"]
        assert torch.equal(embedding(first), local), "model_revision was not honoured"
        assert torch.equal(embedding(None), local + 1.0), "no revision must load the newest commit"
        print("ok")
    """
    (tmp_path / "changed").mkdir()
    proc = hub_server.run_python(code, str(path), str(tmp_path / "changed"), timeout=300)
    assert proc.stdout.strip().endswith("ok")


# ----------------------------------------------------------------------------------------------------------------
# QuillConfig's architecture options: each value builds its own code path, anything else is refused at config time.
# ----------------------------------------------------------------------------------------------------------------


def quill(cls=None, seed=0, **options):
    from quill.model import QuillConfig, QuillForCausalLM

    torch.manual_seed(seed)
    config = QuillConfig(depth=2, hidden_size=32, num_attention_heads=2, vocab_size=50, pad_token_id=0, **options)
    return (cls or QuillForCausalLM)(config).eval()


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, **kwargs).logits


@pytest.mark.parametrize(
    "option, value, choices",
    [
        ("position_embedding", "relative", "rope, sinusoidal, learned, alibi"),
        ("norm_position", "sandwich", "pre, post"),
        ("norm_type", "batchnorm", "rmsnorm, layernorm"),
        ("hidden_act", "tanh", "silu, gelu, gelu_new, relu"),
        ("classifier_pooling", "max", "first, mean, last"),
    ],
)
def test_architecture_option_outside_its_choices_is_refused(option, value, choices):
    from quill.model import QuillConfig

    with pytest.raises(ValueError, match=f"{option} must be one of {choices}; got '{value}'"):
        QuillConfig(depth=1, **{option: value})


@pytest.mark.parametrize(
    "act, module, intermediate",
    [
        ("silu", None, 128),
        ("gelu", "GELUActivation", 128),
        ("gelu_new", "NewGELUActivation", 128),
        ("relu", "ReLU", 128),
    ],
)
def test_hidden_act_picks_the_mlp(act, module, intermediate):
    mlp = quill(hidden_act=act).model.layers[0].mlp
    if act == "silu":  # SwiGLU: one fused gate/up projection, 8/3 * hidden rounded to 64
        assert type(mlp).__name__ == "QuillMLP" and mlp.gate_up_proj.out_features == 2 * intermediate
    else:  # plain: up -> act -> down, 4 * hidden
        assert type(mlp).__name__ == "QuillPlainMLP" and type(mlp.act_fn).__name__ == module
        assert mlp.up_proj.out_features == intermediate
    # The activation is what runs: the same weights under relu give other outputs than under gelu.
    if act == "gelu":
        relu = quill(hidden_act="relu")
        relu.load_state_dict(quill(hidden_act="gelu").state_dict())
        ids = torch.randint(1, 50, (1, 12))
        assert (logits(relu, ids) - logits(quill(hidden_act="gelu"), ids)).abs().max() > 1e-4


def test_norm_type_and_position_are_built_and_run():
    ln = quill(norm_type="layernorm")
    assert isinstance(ln.model.layers[0].input_layernorm, torch.nn.LayerNorm)
    assert isinstance(ln.model.layers[0].self_attn.q_norm, torch.nn.LayerNorm)  # QK-norm follows norm_type
    assert type(quill().model.layers[0].input_layernorm).__name__ == "QuillRMSNorm"
    pre, post = quill(), quill(norm_position="post")
    assert isinstance(post.model.norm, torch.nn.Identity)  # Add & Norm ends each block normalised: no final norm
    post.load_state_dict(pre.state_dict(), strict=False)  # same weights, other placement
    ids = torch.randint(1, 50, (1, 12))
    assert (logits(pre, ids) - logits(post, ids)).abs().max() > 1e-3
    # Post-norm: every layer's output is normalised (RMS 1 per token), pre-norm's residual stream is not.
    with torch.no_grad():
        states = post.model(ids, output_hidden_states=True).hidden_states[1:]
    assert all(torch.allclose(h.pow(2).mean(-1), torch.ones(1), atol=1e-3) for h in states)


@pytest.mark.parametrize("position", ["rope", "sinusoidal", "learned", "alibi"])
def test_position_embedding_is_honoured(position):
    """Absolute encodings (sinusoidal, learned) change when every position shifts by the same amount; relative ones
    (rope, alibi) do not. Without any position signal a bidirectional encoder would be blind to order: with each
    encoding, swapping two tokens changes more than their two outputs."""
    from quill.model import QuillForMaskedLM

    model = quill(position_embedding=position)
    ids = torch.randint(1, 50, (1, 12))
    shifted = logits(model, ids, position_ids=torch.arange(12)[None] + 5)
    moved = (shifted - logits(model, ids)).abs().max().item()
    assert moved > 1e-4 if position in ("sinusoidal", "learned") else moved < 1e-4
    assert hasattr(model.model, "embed_positions") == (position in ("sinusoidal", "learned"))
    assert (model.model.rotary_emb is not None) == (position == "rope")

    encoder = quill(QuillForMaskedLM, is_decoder=False, position_embedding=position)
    swapped = ids.clone()
    swapped[0, [2, 9]] = ids[0, [9, 2]]
    a, b = logits(encoder, ids), logits(encoder, swapped)
    others = [i for i in range(12) if i not in (2, 9)]
    assert (a[0, others] - b[0, others]).abs().max() > 1e-4


def test_alibi_refuses_backends_without_an_additive_bias():
    model = quill(position_embedding="alibi")
    model.config._attn_implementation = "flex_attention"  # set directly: flex needs no extra package here
    with pytest.raises(ValueError, match="alibi.*needs an additive attention bias"):
        model(torch.randint(1, 50, (1, 5)))


def test_learned_positions_past_the_table_are_refused():
    model = quill(position_embedding="learned", max_position_embeddings=16)
    with pytest.raises(ValueError, match="past the learned table"):
        model(torch.randint(1, 50, (1, 17)))
