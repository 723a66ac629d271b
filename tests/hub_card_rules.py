"""The Hub's rules for the YAML front matter of a README.md (model and dataset cards), as the loopback Hub applies
them on `POST /api/validate-yaml` and on every commit that adds a README.md.

Written down from the Hub's documentation, so that a test push fails where the real Hub would refuse it:
- https://huggingface.co/docs/hub/model-cards#model-card-metadata and the annotated spec it links
  (https://github.com/huggingface/hub-docs/blob/main/modelcard.md): `base_model` is a model id or a list of them,
  `datasets` a list of dataset ids, `license` one of the Hub's license identifiers or `other` (then with
  `license_name`), `pipeline_tag` one of the Hub's tasks, `tags` / `metrics` lists of strings, `library_name` a
  string, `language` ISO 639 codes, `base_model_relation` one of adapter, merge, quantized, finetune.
- https://huggingface.co/docs/hub/datasets-cards and https://huggingface.co/docs/hub/datasets-manual-configuration:
  `configs` is a list of {config_name, data_files, ...}, `license`, `language`, `tags`, `task_categories` as above.
- Repo ids follow huggingface_hub's `validate_repo_id`: `name` or `namespace/name`, letters, digits, `-`, `_`, `.`,
  at most 96 characters, no `--` or `..`, not starting or ending with `-` or `.`. A local path ("/home/me/model",
  "./data", "quill:default/x") is not one.
- The Hub answers 400 with `{"errors": [{"message": ...}]}` for a card that breaks a rule; unknown keys are kept as
  they are (free-form metadata is allowed); a card without front matter gets a warning, not an error.
"""

from __future__ import annotations

import re

import yaml

# https://huggingface.co/docs/hub/repositories-licenses (the identifiers the license picker offers)
LICENSES = frozenset(
    [
        "apache-2.0",
        "mit",
        "openrail",
        "bigscience-openrail-m",
        "creativeml-openrail-m",
        "bigscience-bloom-rail-1.0",
        "bigcode-openrail-m",
        "afl-3.0",
        "artistic-2.0",
        "bsl-1.0",
        "bsd",
        "bsd-2-clause",
        "bsd-3-clause",
        "bsd-3-clause-clear",
        "c-uda",
        "cc",
        "cc0-1.0",
        "cc-by-2.0",
        "cc-by-2.5",
        "cc-by-3.0",
        "cc-by-4.0",
        "cc-by-sa-3.0",
        "cc-by-sa-4.0",
        "cc-by-nc-2.0",
        "cc-by-nc-3.0",
        "cc-by-nc-4.0",
        "cc-by-nd-4.0",
        "cc-by-nc-nd-3.0",
        "cc-by-nc-nd-4.0",
        "cc-by-nc-sa-2.0",
        "cc-by-nc-sa-3.0",
        "cc-by-nc-sa-4.0",
        "cdla-sharing-1.0",
        "cdla-permissive-1.0",
        "cdla-permissive-2.0",
        "wtfpl",
        "ecl-2.0",
        "epl-1.0",
        "epl-2.0",
        "etalab-2.0",
        "eupl-1.1",
        "eupl-1.2",
        "agpl-3.0",
        "gfdl",
        "gpl",
        "gpl-2.0",
        "gpl-3.0",
        "lgpl",
        "lgpl-2.1",
        "lgpl-3.0",
        "isc",
        "h-research",
        "intel-research",
        "lppl-1.3c",
        "ms-pl",
        "apple-ascl",
        "apple-amlr",
        "mpl-2.0",
        "odc-by",
        "odbl",
        "openrail++",
        "osl-3.0",
        "postgresql",
        "ofl-1.1",
        "ncsa",
        "unlicense",
        "zlib",
        "pddl",
        "lgpl-lr",
        "deepfloyd-if-license",
        "fair-noncommercial-research-license",
        "llama2",
        "llama3",
        "llama3.1",
        "llama3.2",
        "llama3.3",
        "llama4",
        "gemma",
        "unknown",
        "other",
    ]
)

# The Hub's tasks (huggingface.js, packages/tasks/src/pipelines.ts): the values `pipeline_tag` may take.
PIPELINE_TAGS = frozenset(
    [
        "text-classification",
        "token-classification",
        "table-question-answering",
        "question-answering",
        "zero-shot-classification",
        "translation",
        "summarization",
        "feature-extraction",
        "text-generation",
        "fill-mask",
        "sentence-similarity",
        "text-to-speech",
        "text-to-audio",
        "automatic-speech-recognition",
        "audio-to-audio",
        "audio-classification",
        "audio-text-to-text",
        "voice-activity-detection",
        "depth-estimation",
        "image-classification",
        "object-detection",
        "image-segmentation",
        "text-to-image",
        "image-to-text",
        "image-to-image",
        "image-to-video",
        "unconditional-image-generation",
        "video-classification",
        "reinforcement-learning",
        "robotics",
        "tabular-classification",
        "tabular-regression",
        "tabular-to-text",
        "table-to-text",
        "multiple-choice",
        "text-ranking",
        "text-retrieval",
        "time-series-forecasting",
        "text-to-video",
        "image-text-to-text",
        "image-text-to-image",
        "image-text-to-video",
        "visual-question-answering",
        "document-question-answering",
        "zero-shot-image-classification",
        "graph-ml",
        "mask-generation",
        "zero-shot-object-detection",
        "text-to-3d",
        "image-to-3d",
        "image-feature-extraction",
        "video-text-to-text",
        "keypoint-detection",
        "visual-document-retrieval",
        "any-to-any",
        "video-to-video",
        "other",
    ]
)
BASE_MODEL_RELATIONS = frozenset({"adapter", "merge", "quantized", "finetune"})
_REPO_ID = re.compile(r"^(\b[\w\-.]+\b/)?\b[\w\-.]{1,96}\b$")
_LANGUAGE = re.compile(r"^[a-z]{2,3}(-[A-Za-z0-9]{2,8})*$")


def is_repo_id(value) -> bool:
    """huggingface_hub's validate_repo_id, as a predicate."""
    return (
        isinstance(value, str)
        and bool(_REPO_ID.match(value))
        and "--" not in value
        and ".." not in value
        and not value.endswith(".git")
    )


def front_matter(content: str) -> dict | None:
    """The YAML between the leading `---` lines, parsed; None when the card has none. Raises ValueError."""
    lines = content.lstrip("\ufeff").splitlines()
    if not lines or lines[0].strip() != "---":
        return None
    try:
        end = next(i for i, line in enumerate(lines[1:], 1) if line.strip() == "---")
    except StopIteration:
        raise ValueError("the YAML front matter is not closed by a '---' line") from None
    try:
        data = yaml.safe_load("\n".join(lines[1:end]))
    except yaml.YAMLError as err:
        raise ValueError(f"the YAML front matter does not parse: {' '.join(str(err).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError("the YAML front matter must be a mapping")
    return data


def _strings(value, key: str, errors: list[str], check=None, what: str = "") -> None:
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        errors.append(f'"{key}" must be a string or a list of strings')
        return
    for v in values:
        if check is not None and not check(v):
            errors.append(f'"{key}" with value "{v}" is not {what}')


def validate(content: str, repo_type: str = "model") -> tuple[list[str], list[str]]:
    """(errors, warnings) for a README.md by the Hub's metadata rules."""
    try:
        meta = front_matter(content)
    except ValueError as err:
        return [str(err)], []
    if not meta:
        return [], ["empty or missing yaml metadata in repo card"]
    errors: list[str] = []
    if "license" in meta:
        license_ = meta["license"]
        if not isinstance(license_, str) or license_ not in LICENSES:
            errors.append(f'"license" with value "{license_}" is not one of the Hub\'s licenses (or "other")')
        elif license_ == "other" and not isinstance(meta.get("license_name"), str):
            errors.append('"license: other" needs a "license_name"')
    if "language" in meta:
        _strings(meta["language"], "language", errors, _LANGUAGE.match, "an ISO 639 language code")
    for key in ("tags", "metrics", "task_categories", "task_ids"):
        if key in meta:
            _strings(meta[key], key, errors)
    if "library_name" in meta and not isinstance(meta["library_name"], str):
        errors.append('"library_name" must be a string')
    if "datasets" in meta:
        _strings(meta["datasets"], "datasets", errors, is_repo_id, "a valid dataset id")
    if repo_type == "model":
        if "base_model" in meta:
            _strings(meta["base_model"], "base_model", errors, is_repo_id, "a valid model id")
        if "new_version" in meta and not is_repo_id(meta["new_version"]):
            errors.append(f'"new_version" with value "{meta["new_version"]}" is not a valid model id')
        if "pipeline_tag" in meta and meta["pipeline_tag"] not in PIPELINE_TAGS:
            errors.append(f'"pipeline_tag" with value "{meta["pipeline_tag"]}" is not one of the Hub\'s tasks')
        relation = meta.get("base_model_relation")
        if relation is not None and relation not in BASE_MODEL_RELATIONS:
            errors.append(f'"base_model_relation" must be one of {sorted(BASE_MODEL_RELATIONS)}')
        if "model-index" in meta and not isinstance(meta["model-index"], list):
            errors.append('"model-index" must be a list')
    if repo_type == "dataset" and "configs" in meta:
        configs = meta["configs"]
        if not isinstance(configs, list) or not all(isinstance(c, dict) and c.get("config_name") for c in configs):
            errors.append('"configs" must be a list of mappings, each with a "config_name"')
    return errors, []
