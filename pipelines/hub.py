"""The Hub side of a finished folder: its model card, and the push.

The card's front matter follows the Hub's metadata rules, which the Hub checks on every commit that touches
README.md: `base_model` and `datasets` hold Hub ids only (a local path is refused, and would publish the user's
home folder), `pipeline_tag` is one of the Hub's tasks. Local sources are described without their paths.
The push retries what can pass on a retry (network errors, 429, 5xx) and fails at once, in one line, otherwise.
A retry, or a later push of the same folder (re-running a finished stage with push_to_hub), sends only what the Hub
lacks: huggingface_hub re-sends a cut-off LFS upload itself, its LFS batch call skips objects already uploaded, and
create_commit leaves out files whose remote oid matches and makes no empty commit, so a commit that went through but
whose answer was lost is not repeated (tests/test_push_interrupted.py drops connections to check each case).
"""

import time
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

from quill.errors import QuillError, one_line

PUSH_IGNORE = ["checkpoints/*", ".*", "quill_stage.json"]


def is_hub_id(name: str | None) -> bool:
    """Whether `name` can only be a Hub repo id: huggingface_hub's id rules, and no local file or folder of that name
    (which the library cannot know, and which loading would pick first)."""
    if not isinstance(name, str):  # validate_repo_id lets None through: an id is optional to it
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return not Path(name).expanduser().exists()


def model_card(
    *,
    stage: str,
    base_model: str | None,
    datasets: list[str],
    metrics: dict,
    hub_model_id: str | None = None,
    classifier: bool = False,
) -> str:
    """A Hub model card: what this checkpoint is, where it came from, what it scored, and how to load it."""
    hub_base = base_model if is_hub_id(base_model) else None
    hub_datasets = [d for d in datasets if is_hub_id(d)]
    task = "text-classification" if classifier else "text-generation"
    # huggingface_hub writes the front matter: quoting (a stage named `a: b`) and key names are its job, not ours.
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag=task,
        tags=["quill", stage],
        base_model=hub_base,
        datasets=hub_datasets or None,  # None leaves the key out; [] would write `datasets: []`
    )
    origin = hub_base or ("trained from scratch" if not base_model else "a local model (its path is not published)")
    shown = [d if is_hub_id(d) or d.startswith("quill:") else "a local dataset" for d in datasets]
    rows = "\n".join(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items())
    repo = hub_model_id or "path/to/this/folder"
    example = "[{'role': 'user', 'content': 'What is 3 + 4?'}]" + (", max_new_tokens=32" if not classifier else "")
    body = f"""
# Quill — {stage} stage

A Quill decoder-only language model after the **{stage}** stage of a Quill pipeline run.

- Base model: {origin}
- Data: {", ".join(dict.fromkeys(shown)) or "n/a"}

## Metrics (held-out)

| metric | value |
|---|---|
{rows}

## Use

Quill's modeling code ships in this folder, so loading runs it as remote code (`trust_remote_code=True`);
with Quill installed, `import quill.model` first and it loads with the installed code, no flag needed.

```python
from transformers import pipeline
pipe = pipeline("{task}", model="{repo}", trust_remote_code=True)
print(pipe({example}))
```
"""
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{body}"))


def _status(err: Exception) -> int | None:
    response = getattr(err, "response", None)
    return getattr(response, "status_code", None)


def _retryable(err: Exception) -> bool:
    """A retry can pass: the Hub is busy (429) or failing (5xx), or the network dropped (no answer at all). Any
    other error (4xx, a card the Hub's metadata check refuses, a bad argument) fails the same way every time."""
    status = _status(err)
    if status is not None:
        return status == 429 or status >= 500
    # huggingface_hub's HTTP client (httpx, or its fork httpx2) raises a TransportError subclass for network failures.
    network = any(cls.__name__ == "TransportError" for cls in type(err).__mro__)
    return network or isinstance(err, (ConnectionError, TimeoutError))


def push_folder(
    folder: Path,
    repo_id: str,
    private: bool | None = None,
    revision: str | None = None,
    attempts: int = 3,
    wait: float = 2.0,
) -> str:
    """Upload a finished folder (not its checkpoints or markers) to `repo_id`, on branch `revision` if given.

    The token comes from the environment (HF_TOKEN) or `hf auth login`'s file, never from an argument."""
    from huggingface_hub import HfApi

    api = HfApi()
    for attempt in range(1, attempts + 1):
        try:
            # A name without a namespace is created under the user's: push to the id the Hub gives back.
            repo_id = api.create_repo(repo_id, exist_ok=True, private=bool(private)).repo_id
            if private and not api.model_info(repo_id).private:  # create_repo leaves an existing repo as it is
                raise QuillError(
                    f"the Hub repo '{repo_id}' exists and is public, so hub_private_repo: true would not keep this "
                    "push private",
                    f"make the repo private on the Hub first, or push to a new repo; the local folder {folder} is "
                    "complete",
                )
            if revision:
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            info = api.upload_folder(
                folder_path=str(folder),
                repo_id=repo_id,
                revision=revision,
                ignore_patterns=PUSH_IGNORE,
                commit_message="Upload Quill checkpoint",
            )
            return getattr(info, "commit_url", repo_id)
        except QuillError:
            raise
        except Exception as err:  # network and HTTP errors differ across huggingface_hub versions
            if attempt == attempts or not _retryable(err):
                status = _status(err)
                why = f"HTTP {status}, not retried" if status else "not retried"
                raise QuillError(
                    f"push to the Hub repo '{repo_id}' failed"
                    + (f" after {attempts} attempts" if _retryable(err) else f" ({why})")
                    + f" ({type(err).__name__}: {one_line(err, 200)})",
                    f"the local folder {folder} is complete; check the repo id, your token (HF_TOKEN or "
                    "`hf auth login`) and the network, then push it with `hf upload`",
                ) from None
            time.sleep(wait * attempt)
    raise AssertionError("unreachable")
