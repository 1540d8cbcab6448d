"""fastunlearn: concept unlearning for diffusion models."""
__version__ = "0.1.0"

# The methods register their names and settings sections in the run's config (fastunlearn.config) when imported:
# importing them with the package makes the registry complete before any config is made, whatever is imported.
from . import methods as _methods  # noqa: E402, F401


def load_unlearned(base_pipeline, file_or_dir):
    """Apply an unlearned model (a `trained` export `unlearned.safetensors`, or a `unet`/pipeline run folder)
    to `base_pipeline`, the loaded original, and return it; names and shapes are checked first
    (fastunlearn.export.load_unlearned)."""
    from .export import load_unlearned as _load

    return _load(base_pipeline, file_or_dir)
