"""fastunlearn: concept unlearning for diffusion models."""
__version__ = "0.1.0"


def load_unlearned(base_pipeline, file_or_dir):
    """Apply an unlearned model (a `trained` export `unlearned.safetensors`, or a `unet`/pipeline run folder)
    to `base_pipeline`, the loaded original, and return it; names and shapes are checked first
    (fastunlearn.export.load_unlearned)."""
    from .export import load_unlearned as _load

    return _load(base_pipeline, file_or_dir)
