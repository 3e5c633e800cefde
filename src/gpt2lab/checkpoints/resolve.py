"""Turn a model reference into a checkpoint directory.

Order: a local directory; a model bundled inside gpt2lab (by its registered name); a Hugging Face Hub
id (its cache first, ``HF_HUB_OFFLINE`` honoured, only the files GPT-2 needs, safetensors preferred;
a sharded checkpoint brings its index and every shard it names).
When no model is asked for and the default (``gpt2``) cannot be had, the bundled default stands in and
one line on stderr says so; a model named explicitly never falls back.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..readers import read_json
from .io import CONFIG_FILE, TOKENIZER_FILES, WEIGHT_FILES, CheckpointError, weight_files

DEFAULT_MODEL = "gpt2"
# name -> folder under gpt2lab/assets; the first entry is the offline stand-in for DEFAULT_MODEL
BUNDLED_MODELS: dict[str, str] = {"shakespeare-gpt2": "shakespeare-gpt2"}
BUNDLED_DEFAULT = "shakespeare-gpt2"
_BUNDLED_PREFIX = "gpt2lab/"  # "gpt2lab/shakespeare-gpt2" is accepted as well


class ModelNotFoundError(CheckpointError):
    """The reference is neither a local checkpoint, a bundled model, nor reachable on the Hub."""

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason or message  # the short why, for the offline fallback notice


@dataclass(frozen=True)
class ResolvedModel:
    name: str  # what to show and record: the reference as given, or the bundled name
    path: Path
    source: str  # "local", "bundled" or "hub"


def bundled_model_dir(name: str) -> Path | None:
    """The folder of a bundled model, or None when ``name`` is not one (or it is not installed)."""
    folder = BUNDLED_MODELS.get(name.removeprefix(_BUNDLED_PREFIX))
    if folder is None:
        return None
    path = Path(str(resources.files("gpt2lab") / "assets" / folder))
    return path if (path / CONFIG_FILE).is_file() else None


def _hub_cache_dir(repo_id: str) -> Path:
    """Where huggingface_hub caches a model repo (its documented ``models--org--name`` layout)."""
    from huggingface_hub import constants  # light: the download machinery is not imported

    return Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"


# what a cached snapshot may hold of the weights: single files, indexes and transformers' shard names
_WEIGHT_PATTERNS = [*WEIGHT_FILES, "model-*-of-*.safetensors", "pytorch_model-*-of-*.bin"]


def _has_weights(path: Path) -> bool:
    try:
        weight_files(path)  # an index counts only with all its shards
    except CheckpointError:
        return False
    return (path / CONFIG_FILE).is_file()


def choose_weight_file(files: set[str] | list[str]) -> str | None:
    """Of a repo's file names, the weights to fetch: ``model.safetensors``, its index, ``pytorch_model.bin``,
    its index (the order :func:`~gpt2lab.checkpoints.io.weight_files` prefers); None when there are none."""
    return next((name for name in WEIGHT_FILES if name in files), None)


def _hub_download(repo_id: str, offline: bool) -> Path:
    """Config, weights (safetensors, else .bin; an index and its shards) and tokenizer files of a Hub repo;
    the snapshot folder."""
    if offline and not _hub_cache_dir(repo_id).is_dir():
        # the offline default-model fallback runs on every start of a fresh install: answering here
        # skips importing the HTTP stack (about 0.4 s)
        raise FileNotFoundError(f"{repo_id} is not in the Hugging Face cache")
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download

    patterns = [CONFIG_FILE, *TOKENIZER_FILES, *_WEIGHT_PATTERNS]
    try:  # the cache first: no network needed for a model used before
        path = Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
        if _has_weights(path):
            return path
        if offline:
            raise FileNotFoundError(f"{repo_id}: the cached snapshot has no complete weights")
    except Exception:  # noqa: BLE001 - not cached
        if offline:
            raise
    # model_info makes one request without retries, so no network fails within a second or two
    files = {s.rfilename for s in (HfApi().model_info(repo_id).siblings or [])}
    if CONFIG_FILE not in files:
        raise FileNotFoundError(f"{repo_id} has no {CONFIG_FILE}")
    weights = choose_weight_file(files)
    if weights is None:
        raise FileNotFoundError(f"{repo_id} has no GPT-2 weights ({', '.join(WEIGHT_FILES)})")
    wanted = [CONFIG_FILE, weights, *(f for f in TOKENIZER_FILES if f in files)]
    if weights.endswith(".index.json"):  # the shards are the ones its weight_map names
        index = read_json(hf_hub_download(repo_id, weights), expect=dict)
        wanted += sorted(set(index.get("weight_map", {}).values()))
    return Path(snapshot_download(repo_id, allow_patterns=wanted))


def _from_hub(repo_id: str) -> Path:
    from huggingface_hub.errors import HFValidationError

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}
    try:
        return _hub_download(repo_id, offline)
    except HFValidationError as exc:
        raise ModelNotFoundError(f"model {repo_id!r}: not a local directory, a bundled model "
                                 f"({', '.join(BUNDLED_MODELS)}) or a valid Hub id") from exc
    except Exception as exc:  # noqa: BLE001 - network, auth and cache errors all mean "not available"
        why = "not in the local Hugging Face cache and HF_HUB_OFFLINE=1 is set" if offline else \
            f"not in the local cache and the Hugging Face Hub is unreachable ({type(exc).__name__})"
        raise ModelNotFoundError(
            f"model {repo_id!r}: {why}. To get it, download it once with network access "
            f"(`hf download {repo_id}`; `huggingface-cli download` before huggingface_hub 1.0; or any gpt2lab "
            f"command without HF_HUB_OFFLINE=1), "
            f"or pass a local checkpoint folder or a bundled model ({', '.join(BUNDLED_MODELS)}).",
            reason=why) from exc


def resolve_model(ref: str | os.PathLike[str] | None = None, *, quiet: bool = False) -> ResolvedModel:
    """Find the checkpoint directory for ``ref``.

    ``ref=None`` (nothing asked for) means ``gpt2``, or the bundled model when ``gpt2`` cannot be had;
    a reference given explicitly (``"gpt2"`` included) resolves to itself or raises
    :class:`ModelNotFoundError` saying how to get it.
    """
    implicit = ref is None
    ref = DEFAULT_MODEL if ref is None else ref
    path = Path(ref).expanduser()
    if path.is_dir():
        return ResolvedModel(name=str(ref), path=path, source="local")
    name = str(ref)
    if isinstance(ref, os.PathLike) or name.startswith((".", "/", "~")) or path.suffix:
        raise ModelNotFoundError(f"model {name!r}: no such directory")
    bundled = bundled_model_dir(name)
    if bundled is not None:
        return ResolvedModel(name=name.removeprefix(_BUNDLED_PREFIX), path=bundled, source="bundled")
    if name.removeprefix(_BUNDLED_PREFIX) in BUNDLED_MODELS:
        raise ModelNotFoundError(f"bundled model {name!r} is not installed with this copy of gpt2lab")
    try:
        return ResolvedModel(name=name, path=_from_hub(name), source="hub")
    except ModelNotFoundError as exc:
        fallback = bundled_model_dir(BUNDLED_DEFAULT)
        if not implicit or fallback is None:
            raise
        if not quiet:
            print(f"gpt2lab: model '{DEFAULT_MODEL}' is {exc.reason}; using the bundled model "
                  f"'{BUNDLED_DEFAULT}' instead (choose another with --model DIR_OR_HUB_ID, in Python "
                  "gpt2lab.load(DIR_OR_HUB_ID)).", file=sys.stderr)
        return ResolvedModel(name=BUNDLED_DEFAULT, path=fallback, source="bundled")
