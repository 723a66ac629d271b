"""A saved Quill checkpoint loads where the project is NOT importable (trust_remote_code), as transformers users
get it."""

import json
import subprocess
import sys
import textwrap

from tiny_model import save_checkpoint

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
