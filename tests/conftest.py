import os

# No network here: make every hub lookup fail fast instead of retrying for minutes.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_sd_path(tmp_path_factory):
    """A tiny SD 1.x-style pipeline saved with save_pretrained (random weights)."""
    from fastunlearn.testing import tiny_sd_pipeline

    path = tmp_path_factory.mktemp("tiny-sd")
    tiny_sd_pipeline().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_sdxl_path(tmp_path_factory):
    """A tiny SDXL-style pipeline (two text encoders, text_time conditioning) saved with save_pretrained."""
    from fastunlearn.testing import tiny_sdxl_pipeline

    path = tmp_path_factory.mktemp("tiny-sdxl")
    tiny_sdxl_pipeline().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def digits_world():
    """The real digits world from the cache ($FASTUNLEARN_CACHE), built on first use (minutes)."""
    from fastunlearn.worlds.digits import load_world

    return load_world()


# Settings that make a run on the tiny fixtures take seconds (tests import them from fastunlearn.testing, never
# from conftest: a full run resolves `conftest` to tests/kernels/conftest.py)
from fastunlearn.testing import SMALL  # noqa: E402


@pytest.fixture()
def base_args(tiny_sd_path, tmp_path):
    """Command-line arguments of a tiny run: the tiny SD fixture, two forget and two retain prompts."""
    (tmp_path / "forget.txt").write_text("a photo of cat\na painting of cat\n")
    (tmp_path / "retain.txt").write_text("a photo of dog\na photo of car\n")
    return ["--model", str(tiny_sd_path), "--forget-prompts", str(tmp_path / "forget.txt"),
            "--retain-prompts", str(tmp_path / "retain.txt"), *SMALL]
