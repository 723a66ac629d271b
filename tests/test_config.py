"""Stage configs (YAML + overrides -> dataclasses), their one-line errors, recipes and override routing.

Real stage modules are not needed: recipes here use tiny fake stages written into the recipe folder (`module:`).
"""

import dataclasses
import importlib
import json
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import transformers
import trl
from tiny_outputs import add_fake_stage

from quill import runner as runner_mod
from quill.arguments import DataArguments, ModelArguments, OutputArguments
from quill.errors import QuillError
from quill.options import build_stage_args, option_names, parse_stage_args
from quill.output import check_finished
from quill.output import mark_done as mark_stage_done
from quill.recipe import check_accelerate_config, load_recipe, plan_recipe, route_overrides
from quill.runner import run_recipe
from quill.stages import STAGES, stage_module


def read_stage_done(folder):
    return check_finished(folder)


def is_stage_done(folder):
    return check_finished(folder) is not None


REPO = Path(__file__).resolve().parent.parent
SFT_TYPES = (DataArguments, ModelArguments, trl.SFTConfig, OutputArguments)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(QuillError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    return message


# ---------------------------------------------------------------------------------------------------------------
# YAML + overrides -> TRL / transformers configs
# ---------------------------------------------------------------------------------------------------------------


def test_yaml_and_overrides_fill_sft_config(tmp_path, monkeypatch):
    monkeypatch.delenv("QUILL_TEST_VAR", raising=False)
    cfg = write(
        tmp_path / "sft.yaml",
        """
        model_name_or_path: outputs/tiny/pretrain
        learning_rate: 1e-3          # PyYAML reads this as text; the float field takes it
        eval_strategy: no            # YAML 1.1 reads `no` as false; the enum field takes it back
        use_cpu: true
        lr_scheduler_type: cosine
        lora_target_modules: [q_proj]
        dataset_mixture:
          - org/chat
          - {path: data/extra.jsonl, weight: 2}
        env: {QUILL_TEST_VAR: hello}
        """,
    )
    data, model, sft, output = parse_stage_args(
        SFT_TYPES,
        [
            "--config",
            str(cfg),
            "max_steps=5",
            "--per_device_train_batch_size",
            "4",
            "--bf16=false",
            "--use_peft",
            "--no-use_cpu",
            "use_cpu=true",
            "output_dir=/tmp/quill-x",
        ],
    )
    assert isinstance(sft, trl.SFTConfig)
    assert sft.learning_rate == pytest.approx(1e-3) and sft.max_steps == 5 and sft.per_device_train_batch_size == 4
    assert sft.eval_strategy == "no" and sft.lr_scheduler_type == "cosine" and sft.bf16 is False
    # TRL unwraps one-item lists into a string, which PEFT reads as a regex matching no module; Quill keeps the list.
    assert model.use_peft is True and model.lora_target_modules == ["q_proj"]
    assert model.model_name_or_path == "outputs/tiny/pretrain"
    assert data.dataset_mixture == [{"path": "org/chat"}, {"path": "data/extra.jsonl", "weight": 2}]
    assert data.names() == ["org/chat", "data/extra.jsonl"]
    # a key that two dataclasses share is set on both
    assert sft.output_dir == output.output_dir == "/tmp/quill-x"
    import os

    assert os.environ["QUILL_TEST_VAR"] == "hello"


def test_training_arguments_subclass_and_nested_override():
    @dataclass
    class PretrainConfig(transformers.TrainingArguments):
        max_length: int = 256

    data, model, args = build_stage_args(
        (DataArguments, ModelArguments, PretrainConfig),
        [
            "model_config={depth: 2, vocab_size: 512}",
            "model_config.depth=4",
            "max_length=128",
            "use_cpu=true",
            "num_train_epochs=2",
            "report_to=none",
            "dataset_mixture=[data/a.txt]",
        ],
    )
    assert model.model_config == {"depth": 4, "vocab_size": 512}
    assert args.max_length == 128 and args.num_train_epochs == 2.0 and args.report_to == []
    assert model.lora_target_modules == "all-linear" and model.merge_lora_on_save is False


def test_plain_text_options_keep_their_text():
    (model,) = build_stage_args(
        (ModelArguments,), ["model_name_or_path=org/m", "model_revision=0123", "tokenizer_name_or_path=null"]
    )
    assert model.model_revision == "0123"  # not YAML's octal 83
    assert model.tokenizer_name_or_path is None


def test_shared_keys_and_flags_reach_every_dataclass(tmp_path):
    # From the file (TrlParser's defaults) and from the command line (argparse's values) alike.
    cfg = write(tmp_path / "sft.yaml", "output_dir: /tmp/from-file\npush_to_hub: true\nhub_model_id: user/m\n")
    *_, sft, output = build_stage_args(SFT_TYPES, ["--config", str(cfg), "use_cpu=true"])
    assert sft.output_dir == output.output_dir == "/tmp/from-file"
    assert sft.push_to_hub is output.push_to_hub is True and sft.hub_model_id == output.hub_model_id == "user/m"
    cfg.write_text("push_to_hub: true\n")
    *_, sft, output = build_stage_args(SFT_TYPES, ["--config", str(cfg), "use_cpu=true", "--no_push_to_hub"])
    assert sft.push_to_hub is output.push_to_hub is False
    # A bare flag on an option that may be null, and --no-flag on one that defaults to false.
    *_, output = build_stage_args(SFT_TYPES, ["use_cpu=true", "--push_to_hub", "--hub_private_repo", "--no-overwrite"])
    assert output.hub_private_repo is True and output.overwrite is False


def test_command_line_forms():
    # `--key value` with a value argparse would read as an option (-1e-4), and `--key=value`, reach the range rules.
    message = error_of(build_stage_args, SFT_TYPES, ["use_cpu=true", "--learning_rate", "-1e-4"])
    assert message.startswith("argument '--learning_rate -1e-4': learning_rate must be > 0, found -0.0001")
    *_, sft, _ = build_stage_args(SFT_TYPES, ["use_cpu=true", "--learning-rate=2e-4", "--seed", "7"])
    assert sft.learning_rate == pytest.approx(2e-4) and sft.seed == 7
    # A whole `model_config=...` replaces the mapping, so the entries set before it no longer count; after, they do.
    _, model, *_ = build_stage_args(SFT_TYPES, ["use_cpu=true", "model_config.depth=4", "model_config={vocab_size: 8}"])
    assert model.model_config == {"vocab_size": 8}
    _, model, *_ = build_stage_args(SFT_TYPES, ["use_cpu=true", "model_config={vocab_size: 8}", "model_config.depth=4"])
    assert model.model_config == {"vocab_size": 8, "depth": 4}
    assert "'learning_rate' is not a mapping" in error_of(build_stage_args, SFT_TYPES, ["learning_rate.x=1"])


def test_bare_debug_is_quills_flag(monkeypatch):
    # setenv records the variable's state before the test, which teardown restores: the parser sets QUILL_DEBUG in
    # this process, and a leaked "1" would turn later tests' one-line errors into tracebacks.
    monkeypatch.setenv("QUILL_DEBUG", "0")
    *_, sft, _ = build_stage_args(SFT_TYPES, ["use_cpu=true", "--debug"])
    assert os.environ["QUILL_DEBUG"] == "1" and sft.debug == []  # Quill's traceback flag, not TrainingArguments'
    monkeypatch.setenv("QUILL_DEBUG", "0")
    *_, sft, _ = build_stage_args(SFT_TYPES, ["use_cpu=true", "--debug", "underflow_overflow"])
    assert os.environ["QUILL_DEBUG"] == "0" and [d.value for d in sft.debug] == ["underflow_overflow"]


STAGE_TYPES = {name: importlib.import_module(stage_module(name)).ARG_TYPES for name in STAGES}


@pytest.mark.parametrize("stage", sorted(STAGE_TYPES))
def test_no_options_gives_every_default(stage):
    """The parser adds nothing of its own: a parse without options builds what each dataclass builds by itself."""
    for dc in STAGE_TYPES[stage]:
        use_cpu = {"use_cpu": True} if "use_cpu" in {f.name for f in dataclasses.fields(dc)} else {}
        try:
            expected = dc(**use_cpu)
        except (QuillError, ValueError) as e:  # a dataclass with a required option refuses alike through the parser
            problem = e.problem if isinstance(e, QuillError) else str(e)
            assert problem in error_of(build_stage_args, (dc,), [f"{k}=true" for k in use_cpu]), dc.__name__
            continue
        assert build_stage_args((dc,), [f"{k}=true" for k in use_cpu]) == (expected,), dc.__name__


@pytest.mark.parametrize("stage", sorted(STAGE_TYPES))
def test_help_of_every_stage(stage, capsys):
    with pytest.raises(SystemExit) as info:
        parse_stage_args(STAGE_TYPES[stage], ["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--config FILE" in out and "--output_dir" in out


def test_option_names_cover_every_dataclass():
    names = option_names(SFT_TYPES)
    assert {"learning_rate", "dataset_mixture", "model_config", "overwrite", "lora_r"} <= names


def test_help_lists_options(capsys):
    with pytest.raises(SystemExit) as info:
        parse_stage_args((DataArguments, ModelArguments, OutputArguments), ["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "dataset_mixture" in out and "merge_lora_on_save" in out and "--config FILE" in out


# ---------------------------------------------------------------------------------------------------------------
# One-line errors
# ---------------------------------------------------------------------------------------------------------------


def test_unknown_key_in_file_names_line_and_suggests(tmp_path):
    cfg = write(tmp_path / "sft.yaml", "use_cpu: true\nlearning_rat: 1.0e-4\n")
    message = error_of(build_stage_args, SFT_TYPES, ["--config", str(cfg)])
    assert "sft.yaml line 2" in message and "unknown key 'learning_rat'" in message
    assert "did you mean 'learning_rate'?" in message


def test_unknown_key_on_command_line_suggests():
    message = error_of(build_stage_args, SFT_TYPES, ["lora_alpah=8"])
    assert "override 'lora_alpah=8'" in message and "did you mean 'lora_alpha'?" in message
    assert "did you mean 'per_device_train_batch_size'?" in error_of(
        build_stage_args, SFT_TYPES, ["--per-device-train-batch-sise", "2"]
    )


@pytest.mark.parametrize(
    "override, expected",
    [
        ("learning_rate=fast", "learning_rate: expected float, found 'fast'"),
        ("per_device_train_batch_size=2.5", "expected int, found 2.5"),
        ("use_peft=maybe", "use_peft: expected true or false, found 'maybe'"),
        ("lr_scheduler_type=cosin", "did you mean 'cosine'?"),
        ("lr_scheduler_type=cosin", "expected one of 'linear', 'cosine'"),
        ("dtype=float8", "expected one of 'auto', 'bfloat16', 'float16', 'float32'"),
        ("model_config=[1, 2]", "model_config: expected mapping or null"),
    ],
)
def test_type_errors(override, expected):
    assert expected in error_of(build_stage_args, SFT_TYPES, [override, "use_cpu=true"])


@pytest.mark.parametrize(
    "override, expected",
    [
        ("learning_rate=-1e-4", "learning_rate must be > 0, found -0.0001"),
        ("lora_dropout=1.5", "lora_dropout must be in [0, 1)"),
        ("max_steps=-5", "max_steps must be >= 1, or -1"),
        ("per_device_train_batch_size=0", "per_device_train_batch_size must be >= 1"),
        ("eval_size=-0.1", "eval_size must be >= 0"),
    ],
)
def test_range_errors(override, expected):
    assert expected in error_of(build_stage_args, SFT_TYPES, [override, "use_cpu=true"])


@pytest.mark.parametrize(
    "stage, override, expected",
    [
        ("rl", "reward_model_weight=0.5", "reward_model_weight must be in (0, 0.5)"),
        ("rl", "eval_samples=1", "eval_samples must be 0 (greedy only) or >= 2, found 1"),
        ("rl", "eval_batch_size=0", "eval_batch_size must be >= 1"),
        ("dpo", "pair_temperature=0", "pair_temperature must be > 0"),
        ("dpo", "pair_samples=-1", "pair_samples must be >= 0"),
        ("reward", "agreement_samples=1", "agreement_samples must be 0 (none) or >= 2"),
        ("reward", "agreement_prompts=0", "agreement_prompts must be >= 1"),
    ],
)
def test_quill_ranges_name_where_the_value_came_from(stage, override, expected):
    """Quill's own options have their ranges in the same table as the libraries' (quill.arguments.RANGE_RULES)."""
    message = error_of(build_stage_args, STAGE_TYPES[stage], [override, "use_cpu=true"])
    assert message.startswith(f"override '{override}': {expected}"), message


@pytest.mark.parametrize("samples", ["-1", "1"])
def test_learnable_prompt_samples_is_off_or_at_least_two(samples):
    from quill.stages.rl import ARG_TYPES as RL_TYPES

    message = error_of(build_stage_args, RL_TYPES, [f"learnable_prompt_samples={samples}", "use_cpu=true"])
    assert "learnable_prompt_samples must be 0 (off) or >= 2" in message and f"found {samples}" in message


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["fp16=true", "bf16=true"], "fp16 and bf16 are both true"),
        (["merge_lora_on_save=true"], "merge_lora_on_save is true but use_peft is false"),
        (["max_steps=0", "num_train_epochs=0"], "nothing to train"),
        (["model_name_or_path=a/b", "model_config={depth: 2}"], "model_config (a fresh model) and model_name_or_path"),
        (["eval_strategy=steps"], "eval_strategy is 'steps' but eval_size is 0"),
        (["load_in_4bit=true", "load_in_8bit=true"], "load_in_4bit and load_in_8bit are both true"),
    ],
)
def test_conflicts(overrides, expected):
    message = error_of(build_stage_args, SFT_TYPES, [*overrides, "use_cpu=true"])
    assert message.startswith("conflicting options") and expected in message and "fix:" in message


def test_training_arguments_value_errors_become_one_line(tmp_path):
    cfg = write(tmp_path / "sft.yaml", "use_cpu: true\neval_size: 0.1\n")
    message = error_of(
        build_stage_args,
        SFT_TYPES,
        ["--config", str(cfg), "eval_strategy=steps", "save_strategy=epoch", "load_best_model_at_end=true"],
    )
    assert "sft.yaml: invalid SFTConfig settings" in message and "save and eval strategy to match" in message
    assert "fix: set save_strategy" in message


def test_yaml_syntax_error_has_line_and_column(tmp_path):
    cfg = write(tmp_path / "sft.yaml", "learning_rate: 1e-4\nmax_steps: [1, 2\nbf16: false\n")
    message = error_of(build_stage_args, SFT_TYPES, ["--config", str(cfg)])
    assert "sft.yaml:3:" in message and "invalid YAML" in message


@pytest.mark.parametrize(
    "text, expected",
    [
        ("- a\n- b\n", "expected a mapping of option: value, found list"),
        ("learning_rate: 1\nlearning_rate: 2\n", "'learning_rate' is set twice (also on line 1)"),
        ("env: [A]\n", "env must be a mapping"),
    ],
)
def test_bad_config_shapes(tmp_path, text, expected):
    cfg = write(tmp_path / "c.yaml", text)
    assert expected in error_of(build_stage_args, SFT_TYPES, ["--config", str(cfg)])


def test_missing_config_file_suggests_neighbour(tmp_path):
    write(tmp_path / "sft.yaml", "{}\n")
    message = error_of(build_stage_args, SFT_TYPES, ["--config", str(tmp_path / "stf.yaml")])
    assert "not found" in message and "sft.yaml" in message


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["stray"], "unexpected argument 'stray'"),
        (["--learning_rate"], "needs a value"),
        (["--config"], "--config needs a file path"),
        (["--config", "a.yaml", "--config", "b.yaml"], "--config is given twice"),
    ],
)
def test_bad_command_lines(argv, expected):
    assert expected in error_of(build_stage_args, SFT_TYPES, argv)


@pytest.mark.parametrize(
    "mixture, expected",
    [
        ("[{path: a, wieght: 2}]", "dataset_mixture[0]: unknown key 'wieght'; fix: did you mean 'weight'?"),
        ("[{name: x}]", "dataset_mixture[0]: 'path' is missing"),
        ("[a, {path: b, weight: 0}]", "dataset_mixture[1]"),
        ("[[a, b]]", "expected list of mapping or str"),
    ],
)
def test_dataset_mixture_errors(mixture, expected):
    assert expected in error_of(build_stage_args, (DataArguments,), [f"dataset_mixture={mixture}"])


# ---------------------------------------------------------------------------------------------------------------
# Recipes with fake stages
# ---------------------------------------------------------------------------------------------------------------

FAKE_RL = """
from dataclasses import dataclass
from fake_stage import FakeArguments, ModelArguments, OutputArguments, parse_stage_args, train
from fake_stage import run_guarded


@dataclass
class RewardModelArguments:  # an RL stage's reward model, as quill.stages.rl's RLConfig has it
    reward_model_path: str | None = None

ARG_TYPES = (FakeArguments, ModelArguments, OutputArguments, RewardModelArguments)


def main(argv=None):
    run_guarded(lambda: train(*parse_stage_args(ARG_TYPES, argv)))


if __name__ == "__main__":
    main()
"""

FAKE_TOKENIZER = """
from dataclasses import dataclass
from fake_stage import OutputArguments, mark_stage_done, parse_stage_args, run_guarded


@dataclass
class TokenizerArguments:
    vocab_size: int = 512


ARG_TYPES = (TokenizerArguments, OutputArguments)


def train(tok, output):
    mark_stage_done(output.output_dir, {})
    return {}


def main(argv=None):
    run_guarded(lambda: train(*parse_stage_args(ARG_TYPES, argv)))


if __name__ == "__main__":
    main()
"""


def make_recipe(root: Path, recipe_yaml: str, configs: dict[str, str] | None = None) -> Path:
    folder = root / "rec"
    add_fake_stage(folder)
    write(folder / "fake_rl.py", FAKE_RL)
    write(folder / "fake_tokenizer.py", FAKE_TOKENIZER)
    write(folder / "recipe.yaml", recipe_yaml)
    for name, text in (configs or {}).items():
        write(folder / name, text)
    return folder


FULL_RECIPE = """
name: fake
description: a recipe of fake stages for the planner's tests
stages:
  - {name: tokenizer, module: fake_tokenizer, config: tok.yaml}
  - {name: pretrain,  module: fake_stage, config: pretrain.yaml}
  - {name: sft,       module: fake_stage, config: sft.yaml, from: pretrain}
  - {name: reward,    module: fake_stage, config: sft.yaml, from: sft}
  - {name: rl,        module: fake_rl,    config: rl.yaml,  from: sft, reward_model: reward}
"""
FULL_CONFIGS = {
    "tok.yaml": "vocab_size: 256\n",
    "pretrain.yaml": "learning_rate: 1.0e-3\n",
    "sft.yaml": "learning_rate: 1.0e-4\n",
    "rl.yaml": "model_name_or_path: some/explicit-model\n",  # explicit: the runner must not replace it
}


@pytest.fixture
def full_recipe(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = make_recipe(tmp_path, FULL_RECIPE, FULL_CONFIGS)
    yield folder
    for name in ("fake_stage", "fake_rl", "fake_tokenizer"):
        sys.modules.pop(name, None)


def argv_of(plans, name):
    return next(p.argv for p in plans if p.spec.name == name)


def test_plan_injects_paths_and_routes_overrides(full_recipe, tmp_path):
    recipe = load_recipe(full_recipe)
    out = tmp_path / "out"
    plans = plan_recipe(recipe, out, overrides=["learning_rate=0.5", "sft.learning_rate=0.25", "vocab_size=128"])
    assert [p.spec.name for p in plans] == ["tokenizer", "pretrain", "sft", "reward", "rl"]
    assert argv_of(plans, "tokenizer") == ["--config", "rec/tok.yaml", "output_dir=out/tokenizer", "vocab_size=128"]
    assert argv_of(plans, "pretrain") == [
        "--config",
        "rec/pretrain.yaml",
        "output_dir=out/pretrain",
        "tokenizer_name_or_path=out/tokenizer",
        "learning_rate=0.5",
    ]
    # scoped overrides come after unscoped ones, so they win
    assert argv_of(plans, "sft")[-2:] == ["learning_rate=0.5", "learning_rate=0.25"]
    assert "model_name_or_path=out/pretrain" in argv_of(plans, "sft")
    rl = argv_of(plans, "rl")
    assert "reward_model_path=out/reward" in rl and not any(a.startswith("model_name_or_path=") for a in rl)
    assert all(not p.skip for p in plans)


def hub_ids(argv):
    """The hub_model_id values in a stage's argv, in order (the last one wins)."""
    return [a.partition("=")[2] for a in argv if a.startswith("hub_model_id=")]


def test_unscoped_hub_model_id_gives_each_stage_its_own_repo(full_recipe, tmp_path):
    recipe = load_recipe(full_recipe)
    plans = plan_recipe(recipe, tmp_path / "out", overrides=["push_to_hub=true", "hub_model_id=user/x"])
    assert {p.spec.name: hub_ids(p.argv) for p in plans} == {
        name: [f"user/x-{name}"] for name in ("tokenizer", "pretrain", "sft", "reward", "rl")
    }
    # Scoped, the id is used as written, and wins over the unscoped one for that stage.
    plans = plan_recipe(recipe, tmp_path / "out", overrides=["push_to_hub=true", "sft.hub_model_id=user/x"])
    assert {p.spec.name: hub_ids(p.argv) for p in plans if hub_ids(p.argv)} == {"sft": ["user/x"]}
    overrides = ["push_to_hub=true", "hub_model_id=user/x", "sft.hub_model_id=user/exact"]
    plans = plan_recipe(recipe, tmp_path / "out", overrides=overrides)
    assert hub_ids(argv_of(plans, "sft")) == ["user/x-sft", "user/exact"]  # scoped comes later, so it wins
    assert hub_ids(argv_of(plans, "rl")) == ["user/x-rl"]
    *_, output = build_stage_args(sys.modules["fake_stage"].ARG_TYPES, argv_of(plans, "sft"))
    assert output.hub_model_id == "user/exact"
    # Unset stays unset; a stage name the Hub cannot take in an id is refused in one line.
    assert route_overrides(["hub_model_id=null"], ["sft"], {"sft": {"hub_model_id"}}) == {"sft": ["hub_model_id=null"]}
    message = error_of(route_overrides, ["hub_model_id=user/x"], ["my stage"], {"my stage": {"hub_model_id"}})
    assert "stage 'my stage' would push to 'user/x-my stage', which is not a Hub repo id" in message


def test_route_overrides_errors():
    accepted = {"sft": {"learning_rate", "lora_r"}, "dpo": {"learning_rate", "beta"}}
    names = ["sft", "dpo", "tokenizer"]
    routed = route_overrides(["beta=0.2", "learning_rate=1e-5", "tokenizer.vocab_size=8"], names, accepted)
    assert routed == {"sft": ["learning_rate=1e-5"], "dpo": ["beta=0.2", "learning_rate=1e-5"]}
    cases = {
        "learnig_rate=1": "no stage selected to run accepts 'learnig_rate'; fix: did you mean 'learning_rate'?",
        "sfft.lora_r=4": "'sfft' is not a stage of this recipe; fix: did you mean 'sft'?",
        "dpo.lora_r=4": "stage 'dpo': unknown key 'lora_r'",
        "output_dir=x": "output_dir is set by the recipe",
        "justtext": "is not key=value",
    }
    for override, expected in cases.items():
        assert expected in error_of(route_overrides, [override], names, accepted), override


def test_stage_config_errors_are_reported_up_front(full_recipe, tmp_path):
    write(full_recipe / "sft.yaml", "learning_rate: fast\n")
    message = error_of(plan_recipe, load_recipe(full_recipe), tmp_path / "out")
    assert message.startswith("stage 'sft': rec/sft.yaml line 1: learning_rate: expected float, found 'fast'")


def test_from_needs_finished_previous_stage(full_recipe, tmp_path):
    recipe = load_recipe(full_recipe)
    message = error_of(plan_recipe, recipe, tmp_path / "out", from_stage="sft")
    assert (
        "previous stage 'pretrain' has no finished output at out/pretrain; fix: run it first or drop --from" in message
    )
    for name in ("tokenizer", "pretrain"):
        mark_stage_done(tmp_path / "out" / name, {})
    plans = plan_recipe(recipe, tmp_path / "out", from_stage="sft", until_stage="reward")
    assert [p.spec.name for p in plans] == ["sft", "reward"]
    assert "did you mean 'reward'?" in error_of(plan_recipe, recipe, tmp_path / "out", until_stage="rewrd")


@pytest.mark.parametrize(
    "stages, expected",
    [
        (
            "[{name: sft, module: fake_stage, from: pretrain}, {name: pretrain, module: fake_stage}]",
            "from: 'pretrain' comes later in the recipe",
        ),
        ("[{name: sfft}]", "'sfft' is not a Quill stage"),
        ("[{name: a, module: fake_stage, config: nope.yaml}]", "config file rec/nope.yaml not found"),
        ("[{name: a, module: fake_stage}, {name: a, module: fake_stage}]", "the name is used twice"),
        ("[{name: a, module: fake_stage, form: b}]", "unknown key 'form'; fix: did you mean 'from'?"),
        ("[{name: sft, accelerate_config: bad.yaml}]", "accelerate config rec/bad.yaml is invalid"),
        ("[{name: sft, accelerate_config: cpu_dp}]", "did you mean 'cpu_ddp'?"),
    ],
)
def test_recipe_errors(tmp_path, monkeypatch, stages, expected):
    monkeypatch.chdir(tmp_path)
    folder = make_recipe(tmp_path, f"stages: {stages}\n", {"bad.yaml": "distributed_type: SIDEWAYS\n"})
    assert expected in error_of(load_recipe, folder)


def test_recipe_top_level_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert "unknown key 'stage'; fix: did you mean 'stages'?" in error_of(
        load_recipe, make_recipe(tmp_path, "stage: []\n")
    )
    assert "recipe folder nowhere not found" in error_of(load_recipe, "nowhere")


def test_missing_stage_module_is_clear(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = make_recipe(tmp_path, "stages: [{name: x, module: no_such_stage_module}]\n")
    message = error_of(plan_recipe, load_recipe(folder), tmp_path / "out")
    assert "stage module no_such_stage_module does not exist" in message


def test_output_dir_that_is_a_file(full_recipe, tmp_path):
    (tmp_path / "taken").write_text("")
    assert "output dir" in error_of(run_recipe, full_recipe, output_dir=tmp_path / "taken")


def test_run_recipe_skips_finished_stages_and_overwrites(full_recipe, tmp_path, monkeypatch, capsys):
    reports = []
    monkeypatch.setattr(runner_mod, "write_report", lambda out: reports.append(out) or out / "report.md")
    out = tmp_path / "out"
    results = run_recipe(full_recipe, output_dir=out, until_stage="sft", overrides=["sft.learning_rate=0.125"])
    assert [(r.name, r.status) for r in results] == [("tokenizer", "ran"), ("pretrain", "ran"), ("sft", "ran")]
    seen = json.loads((out / "sft" / "args.json").read_text())
    assert seen == {"learning_rate": 0.125, "model": "out/pretrain", "tokenizer": "out/tokenizer", "overwrite": False}
    assert read_stage_done(out / "sft")["seen"] == seen and reports == [out.resolve()]
    first = json.loads((out / "quill_run.json").read_text())
    assert [s["status"] for s in first["stages"]] == ["ran", "ran", "ran"]
    # The recipe's description is read: printed as the run starts and kept in the run record.
    assert first["description"] == "a recipe of fake stages for the planner's tests"
    assert "quill: a recipe of fake stages for the planner's tests" in capsys.readouterr().out

    results = run_recipe(full_recipe, output_dir=out, until_stage="sft")
    assert [r.status for r in results] == ["skipped"] * 3
    assert "skipped" in capsys.readouterr().out

    results = run_recipe(full_recipe, output_dir=out, from_stage="sft", until_stage="sft", overwrite=True)
    assert [r.status for r in results] == ["ran"]
    assert json.loads((out / "sft" / "args.json").read_text())["overwrite"] is True
    # The record still says how the stages this run left alone were made (skipped, or outside --from/--until):
    # the first run's entries, marked with that run.
    record = json.loads((out / "quill_run.json").read_text())
    assert [(s["name"], s["status"], s.get("earlier_run")) for s in record["stages"]] == [
        ("tokenizer", "ran", first["started_at"]),
        ("pretrain", "ran", first["started_at"]),
        ("sft", "ran", None),
    ]
    assert record["stages"][0]["command"] == first["stages"][0]["command"]


def test_failed_stage_is_one_line_and_resumable(full_recipe, tmp_path, monkeypatch):
    monkeypatch.setattr(runner_mod, "write_report", lambda out: out / "report.md")
    out = tmp_path / "out"
    message = error_of(
        run_recipe, full_recipe, output_dir=out, until_stage="pretrain", overrides=["pretrain.crash=true"]
    )
    assert "stage 'pretrain' failed (exit code 1)" in message
    assert is_stage_done(out / "tokenizer") and not is_stage_done(out / "pretrain")
    record = json.loads((out / "quill_run.json").read_text())
    assert [s["status"] for s in record["stages"]] == ["ran", "failed"]


def test_marker_is_atomic_and_shared_by_runner_and_stages(tmp_path):
    path = mark_stage_done(tmp_path / "stage", {"eval_loss": 1.5})
    assert json.loads(path.read_text())["done"] is True
    assert not list((tmp_path / "stage").glob(".quill_stage.json.*"))  # no temp file left behind
    assert is_stage_done(tmp_path / "stage") and not is_stage_done(tmp_path / "other")
    (tmp_path / "torn").mkdir()
    (tmp_path / "torn" / "quill_stage.json").write_text('{"done": tr')
    assert not is_stage_done(tmp_path / "torn")
    # One implementation: what a stage writes (quill.output, through quill.stages.common) is what the runner reads.
    import quill.output as output
    import quill.runner as runner
    import quill.stages.common as common

    assert runner.check_finished is output.check_finished and common.check_finished is output.check_finished
    assert (
        common.finish_folder is output.finish_folder
        and output.finish_folder.__globals__["mark_done"] is mark_stage_done
    )


# ---------------------------------------------------------------------------------------------------------------
# Accelerate configs
# ---------------------------------------------------------------------------------------------------------------

ACCELERATE_CONFIGS = sorted((REPO / "recipes" / "accelerate").glob("*.yaml"))


def test_all_accelerate_configs_are_present():
    names = {p.stem for p in ACCELERATE_CONFIGS}
    assert {
        "cpu",
        "cpu_ddp",
        "single_gpu",
        "multi_gpu",
        "fsdp2",
        "deepspeed_zero2",
        "deepspeed_zero3",
        "multi_node",
    } <= names


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.stem)
def test_accelerate_config_loads(path):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    config = load_config_from_file(str(path))
    parser = launch_command_parser()
    args = parser.parse_args(["--config_file", str(path), "-m", "quill.stages.sft"])
    args, _, _ = _validate_launch_command(args)
    assert args.num_processes == config.num_processes
    # accelerate copies nested keys onto the launch args and silently ignores unknown ones: catch typos here
    known = set(vars(parser.parse_args(["-m", "x"])))
    for section in ("fsdp_config", "deepspeed_config"):
        for key in getattr(config, section) or {}:
            assert key in known, f"{path.name}: {section}.{key} is not an accelerate option"
    path_used, use_cpu = check_accelerate_config(path.stem, REPO, None)
    assert path_used == path.resolve() and use_cpu == config.use_cpu


def test_cpu_ddp_launches_two_processes(tmp_path):
    import socket

    probe = write(
        tmp_path / "rank_probe.py",
        """
        from accelerate import Accelerator
        state = Accelerator().state
        print(f"rank={state.process_index} world={state.num_processes} type={state.distributed_type.value}", flush=True)
        """,
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **__import__("os").environ,
        "PYTHONPATH": str(probe.parent),
        "ACCELERATE_USE_CPU": "true",
        "OMP_NUM_THREADS": "1",
    }
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / "recipes" / "accelerate" / "cpu_ddp.yaml"),
        "--main_process_port",
        str(port),
        "-m",
        "rank_probe",
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    # Two processes share one stdout, so their lines can interleave: match the records, not the lines.
    records = sorted(re.findall(r"rank=\d+ world=\d+ type=[A-Z_]+", done.stdout))
    assert records == ["rank=0 world=2 type=MULTI_CPU", "rank=1 world=2 type=MULTI_CPU"]
