"""Finding, loading and saving GPT-2 checkpoints in Hugging Face layout."""

from .io import CheckpointError, load_model, save_model
from .resolve import (
                      BUNDLED_DEFAULT,
                      BUNDLED_MODELS,
                      DEFAULT_MODEL,
                      ModelNotFoundError,
                      ResolvedModel,
                      bundled_model_dir,
                      resolve_model,
)

__all__ = ["CheckpointError", "ModelNotFoundError", "ResolvedModel", "load_model", "save_model",
           "resolve_model", "bundled_model_dir", "DEFAULT_MODEL", "BUNDLED_DEFAULT",
           "BUNDLED_MODELS"]
