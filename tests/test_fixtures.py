import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

from fastunlearn.sampling import SamplerConfig, sample
from fastunlearn.testing import tiny_sd_pipeline, tiny_sdxl_pipeline


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_tiny_sd_round_trip(tiny_sd_path):
    pipe = DiffusionPipeline.from_pretrained(tiny_sd_path)
    assert isinstance(pipe, StableDiffusionPipeline)
    assert _same_weights(pipe.unet, tiny_sd_pipeline().unet)
    assert len(pipe.tokenizer) > 2


def test_tiny_sdxl_round_trip(tiny_sdxl_path):
    pipe = DiffusionPipeline.from_pretrained(tiny_sdxl_path)
    assert isinstance(pipe, StableDiffusionXLPipeline)
    assert pipe.text_encoder_2 is not None and pipe.unet.config.addition_embed_type == "text_time"
    assert _same_weights(pipe.unet, tiny_sdxl_pipeline().unet)
    images = sample(pipe, ["a photo of cat"], [0], SamplerConfig(2, 3.0), progress=False)
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()


@pytest.mark.parametrize("build", [tiny_sd_pipeline, tiny_sdxl_pipeline])
def test_v_prediction_fixture(build, tmp_path):
    build(prediction_type="v_prediction").save_pretrained(tmp_path)
    pipe = DiffusionPipeline.from_pretrained(tmp_path)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
