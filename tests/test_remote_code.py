"""A saved Quill checkpoint loads where the project is NOT importable (trust_remote_code), as transformers users
get it."""

import itertools
import json
import subprocess
import sys
import textwrap

import torch
from tiny_model import save_checkpoint

from quill.model import QuillConfig, QuillForCausalLM, QuillForMaskedLM, QuillForSequenceClassification
from quill.model.configuration_quill import NORM_POSITIONS, NORM_TYPES, POSITION_EMBEDDINGS

# Runs first in the child: any import of the project's packages fails, as on a machine without Quill installed.
BLOCK_PROJECT = textwrap.dedent("""
    import importlib.abc, sys
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "quill":
                raise ImportError(f"{name} is blocked: the project is not importable here")
    sys.meta_path.insert(0, Block())
""")


def run_isolated(code: str, tmp_path) -> dict:
    script = BLOCK_PROJECT + textwrap.dedent(code)
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path), "HF_HOME": str(tmp_path / "hf")},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_checkpoint_has_full_auto_map_and_code(tmp_path):
    save_checkpoint(tmp_path)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert set(auto_map) == {"AutoConfig", "AutoModel", "AutoModelForCausalLM", "AutoModelForSequenceClassification"}
    assert (tmp_path / "modeling_quill.py").exists() and (tmp_path / "configuration_quill.py").exists()
    # An encoder saved as a classifier (a class of modeling_quill.py) still carries the files of every head it lists.
    encoder = tmp_path / "encoder"
    save_checkpoint(encoder, cls=QuillForSequenceClassification, is_decoder=False, num_labels=2)
    auto_map = json.loads((encoder / "config.json").read_text())["auto_map"]
    heads = ("MaskedLM", "SequenceClassification", "TokenClassification", "QuestionAnswering")
    assert set(auto_map) == {"AutoConfig", "AutoModel", *(f"AutoModelFor{h}" for h in heads)}
    files = {f"{name.split('.')[0]}.py" for name in auto_map.values()} | {"kernels_quill.py", "pipeline_quill.py"}
    assert files <= {p.name for p in encoder.glob("*.py")}


def test_pipeline_and_reward_model_load_without_the_project(tmp_path):
    ckpt = tmp_path / "ckpt"
    model, tokenizer = save_checkpoint(ckpt)
    prompt = "the quick brown"
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    expected = tokenizer.decode(
        model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None)[0, ids.shape[1] :]
    )
    result = run_isolated(
        f"""
        import json
        try:
            import quill
            raise SystemExit("the project is importable: the test would prove nothing")
        except ImportError:
            pass
        from transformers import pipeline, AutoModelForSequenceClassification
        pipe = pipeline("text-generation", model={str(ckpt)!r}, trust_remote_code=True)
        out = pipe({prompt!r}, max_new_tokens=6, do_sample=False, eos_token_id=None, return_full_text=False)
        text = out[0]["generated_text"]
        chat = pipe([{{"role": "user", "content": "what is two plus two?"}}], max_new_tokens=5, do_sample=False)
        reply = chat[0]["generated_text"][-1]
        rm = AutoModelForSequenceClassification.from_pretrained({str(ckpt)!r}, num_labels=1, trust_remote_code=True)
        score = rm(**pipe.tokenizer(["a b", "c"], return_tensors="pt", padding=True)).logits
        print(json.dumps({{"text": text, "reply_role": reply["role"], "module": type(pipe.model).__module__,
                          "rm_class": type(rm).__name__, "rm_shape": list(score.shape),
                          "attn": [pipe.model.config._attn_implementation, rm.config._attn_implementation]}}))
    """,
        tmp_path,
    )
    assert result["text"] == expected
    assert result["reply_role"] == "assistant"
    assert result["module"].startswith("transformers_modules.")  # the copied code, not the project
    assert result["rm_class"] == "QuillForSequenceClassification" and result["rm_shape"] == [2, 1]
    assert result["attn"] == ["sdpa", "sdpa"]  # transformers' default name, as for its own models


def test_every_architecture_loads_without_the_project(tmp_path):
    """Each option combination the config allows, as a decoder and as an encoder, saved and loaded with only
    trust_remote_code=True in one fresh interpreter: the same logits as the model that was saved."""
    x = torch.randint(1, 50, (2, 11))
    expected = {}
    for is_decoder, p, n, t, a in itertools.product(
        (True, False), POSITION_EMBEDDINGS, NORM_POSITIONS, NORM_TYPES, ("silu", "gelu")
    ):
        name = f"{'decoder' if is_decoder else 'encoder'}-{p}-{n}-{t}-{a}"
        options = dict(position_embedding=p, norm_position=n, norm_type=t, hidden_act=a, is_decoder=is_decoder)
        torch.manual_seed(0)
        config = QuillConfig(depth=1, hidden_size=32, num_attention_heads=2, vocab_size=50, **options)
        model = (QuillForCausalLM if is_decoder else QuillForMaskedLM)(config).eval()
        model.save_pretrained(tmp_path / name)
        with torch.no_grad():
            expected[name] = model(x).logits
    result = run_isolated(
        f"""
        import json, torch
        from transformers import AutoModelForCausalLM, AutoModelForMaskedLM
        x = torch.tensor({x.tolist()})
        out = {{}}
        for name in {sorted(expected)!r}:
            auto = AutoModelForCausalLM if name.startswith("decoder") else AutoModelForMaskedLM
            model = auto.from_pretrained({str(tmp_path)!r} + "/" + name, trust_remote_code=True).eval()
            assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
            with torch.no_grad():
                out[name] = model(x).logits.tolist()
        print(json.dumps(out))
    """,
        tmp_path,
    )
    assert sorted(result) == sorted(expected) and len(result) == 64
    for name, logits in result.items():
        assert torch.allclose(torch.tensor(logits), expected[name], atol=1e-5), name
