"""The shape of the package: every module imports on its own, no import cycles, one job per module (a docstring
that names it, a size budget), the README's layout table matches the tree, and the code passes ruff."""

import ast
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The folders pyproject maps into the `quill` import package (tool.setuptools.package-dir).
PACKAGE_DIRS = {
    REPO / "pipelines": "quill",
    REPO / "custom_models" / "quill": "quill.model",
    REPO / "recipes": "quill.recipes",
}
MODULES = sorted(p for folder in PACKAGE_DIRS for p in folder.rglob("*.py"))
MAX_MODULE_LINES = 450


def module_name(path: Path) -> str:
    folder = next(f for f in PACKAGE_DIRS if path.is_relative_to(f))
    parts = (*PACKAGE_DIRS[folder].split("."), *path.relative_to(folder).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_pyproject_maps_the_folders_this_test_reads():
    mapping = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    assert {REPO / folder: name for name, folder in mapping.items()} == PACKAGE_DIRS
    # Each folder that holds code or recipes is a listed package, or a wheel would leave it out.
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {p.parent for p in MODULES} | {p.parent for p in (REPO / "recipes").rglob("*.yaml")}
    assert {module_name(folder / "__init__.py") for folder in folders} == listed
    # No symlinks: they break in some checkouts, archives and on Windows (git marks them with mode 120000).
    tracked = subprocess.run(["git", "ls-files", "-s"], cwd=REPO, capture_output=True, text=True).stdout.splitlines()
    assert not [line for line in tracked if line.startswith("120000")], "the tree holds a symlink"


def quill_imports(path: Path) -> set[str]:
    """The quill modules `path` imports, at module level or inside functions (a lazy import is still a dependency)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "quill"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "quill":
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    names = {module_name(p) for p in MODULES}
    return {name for name in found if name in names} - {module_name(path)}


# Each module is imported in a fresh child forked from one interpreter that has loaded the heavy libraries (but no
# quill module): the child starts with no quill module loaded, which is what "on its own" checks, without paying
# torch's and transformers' import once per module.
IMPORT_EACH = """
import os, sys, traceback
import torch, transformers, trl, datasets, peft, accelerate
from transformers import Trainer
from trl import DPOTrainer, GRPOTrainer, RewardTrainer, SFTTrainer
assert not [m for m in sys.modules if m.split(".")[0] == "quill"]
for name in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:
        try:
            __import__(name)
        except BaseException:
            print(name, traceback.format_exc(limit=-3), file=sys.stderr)
            os._exit(1)
        os._exit(0)
    if os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) != 0:
        print("FAILED", name)
"""


def test_every_module_imports_on_its_own():
    names = [module_name(p) for p in MODULES]
    done = subprocess.run([sys.executable, "-c", IMPORT_EACH, *names], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout + done.stderr[-3000:]


def test_import_graph_has_no_cycles():
    graph = {module_name(p): quill_imports(p) for p in MODULES}
    # A package's __init__ is imported with every submodule; it must not import them back.
    for name, deps in graph.items():
        graph[name] = {d for d in deps if not name.startswith(d + ".")}
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                pytest.fail("import cycle: " + " -> ".join(path[path.index(dep) :] + [dep]))
            if dep not in state:
                visit(dep, path + [dep])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    # The exit policy lives in quill.errors: nothing imports the command dispatcher.
    assert not [name for name, deps in graph.items() if "quill.cli" in deps]


def test_each_module_says_its_job_and_stays_small():
    for path in MODULES:
        tree = ast.parse(path.read_text())
        if path.name != "__init__.py" or tree.body:
            assert ast.get_docstring(tree), f"{path.relative_to(REPO)} has no docstring naming its job"
        lines = len(path.read_text().splitlines())
        assert lines <= MAX_MODULE_LINES, f"{path.relative_to(REPO)}: {lines} lines"


def test_report_imports_no_model_library():
    code = (
        "import sys, quill.tools.report; print(sorted(m for m in ('torch', 'transformers', 'trl') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_readme_layout_table_matches_the_tree():
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    listed = set()
    for row in re.findall(r"^\| (.+?) \|", section, flags=re.M):
        for path in re.findall(r"`([^`]+)`", row):
            if "/" in path or path.endswith(".py"):
                listed.add(path.rstrip("/"))
    assert listed, "no paths in the layout table"
    for path in listed:
        assert (REPO / path).exists(), f"README layout lists {path}, which does not exist"
    # Every module and package of the tree is covered by a listed path (itself or a folder above it).
    for path in MODULES:
        rel = path.relative_to(REPO)
        if rel in (Path("pipelines/__init__.py"), Path("recipes/__init__.py")):
            continue
        covered = any(str(rel) == p or str(rel).startswith(p + "/") for p in listed)
        assert covered, f"{rel} is not in the README's layout table"


def test_ci_runs_the_readme_test_command_verbatim():
    quick_start = (REPO / "README.md").read_text().split("## Quick start", 1)[1].split("```bash\n", 1)[1]
    main_job, tests = (line.split("   #")[0].strip() for line in quick_start.splitlines()[:2])
    assert "quill run tiny" in main_job and "[dev]" not in main_job  # the main job installs only what it needs
    assert tests in (REPO / ".ci" / "run").read_text().splitlines()


LINTED = ["pipelines", "custom_models", "recipes", "tests", "bench"]


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is not installed (pip install -e '.[dev]')")
def test_ruff_check_and_format():
    for args in (["check", *LINTED], ["format", "--check", *LINTED]):
        done = subprocess.run(["ruff", *args], cwd=REPO, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-1000:]
