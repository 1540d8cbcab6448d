"""Small exports of an unlearned model (`save_format`) and loading them back onto the original pipeline.

* `pipeline`: the whole diffusers pipeline (`DiffusionPipeline.from_pretrained(dir)`).
* `unet`: the UNet alone, `<dir>/unet/` (`UNet2DConditionModel.from_pretrained(dir, subfolder="unet")`).
* `trained`: only the trained parameters, one safetensors file `<dir>/unlearned.safetensors` (ESD-style),
  whose metadata names the base model, the method and the parameter subset. With LoRA these are the
  weights the merged adapter changed.

`load_unlearned(base_pipeline, file_or_dir)` applies a `trained` file or a `unet` (or pipeline) folder to a
loaded pipeline, checking every name and shape first; `load_run(dir, base)` loads any run folder as a pipeline.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .errors import FastUnlearnError

TRAINED_FILE = "unlearned.safetensors"
FORMAT = "fastunlearn.unlearned/1"


def trained_names(unet: torch.nn.Module, lora: bool = False) -> list[str]:
    """State-dict names of the parameters a run trains, as they appear in the saved (LoRA-merged) UNet."""
    names = [n for n, p in unet.named_parameters() if p.requires_grad]
    if lora:  # `...to_q.lora_A.default.weight` -> the merged base weight `...to_q.weight`
        names = list(dict.fromkeys(n.split(".lora_")[0] + ".weight" for n in names if ".lora_" in n))
    return names


def save_trained(unet: torch.nn.Module, names: list[str], path: Path, metadata: dict) -> None:
    """The values of `names` in `unet` as one safetensors file, with `metadata` (strings) in its header."""
    from safetensors.torch import save_file

    state = unet.state_dict()
    missing = [n for n in names if n not in state]
    if missing:
        raise FastUnlearnError(f"cannot export the trained parameters: {missing[0]} is not in the UNet's state dict")
    tensors = {n: state[n].detach().to("cpu").contiguous() for n in names}
    meta = {"format": FORMAT, **{k: str(v) for k, v in metadata.items()}, "tensors": str(len(tensors))}
    save_file(tensors, str(path), metadata=meta)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)  # as readable as the pipeline's own files (safetensors writes 0600)


def save_unlearned(folder: Path, cfg, pipe, unet, trained: list[str], steps: int, dtype) -> None:
    """The unlearned model into `folder` as `cfg.save_format` asks: the whole pipeline (save_pretrained), the UNet
    alone (unet/), or only the trained parameters (TRAINED_FILE). With LoRA (`cfg.lora.rank`), the adapter
    (pytorch_lora_weights.safetensors, for pipe.load_lora_weights) first, then the UNet with it merged.
    `trained`: the trained parameters' names as in the merged UNet (`trained_names`)."""
    from .sampling import with_unet

    if cfg.lora.rank:
        from .models import merge_lora, save_lora

        save_lora(pipe, unet, folder)
        unet = merge_lora(unet)
    if cfg.save_format == "pipeline":
        with_unet(pipe, unet).save_pretrained(str(folder), safe_serialization=True)
    elif cfg.save_format == "unet":
        unet.save_pretrained(str(folder / "unet"), safe_serialization=True)
    else:  # only the trained parameters: fastunlearn.load_unlearned(base_pipeline, dir) applies them
        save_trained(unet, trained, folder / TRAINED_FILE, {
            "base_model": str(Path(cfg.model).resolve()) if Path(cfg.model).is_dir() else cfg.model,
            "method": cfg.method, "params": cfg.params, "lora_rank": cfg.lora.rank,
            "steps": steps, "dtype": str(dtype).replace("torch.", "")})


def _read(source) -> tuple[dict, dict, bool, str]:
    """(state dict, metadata, whether it is a whole UNet, a name for messages) of a trained file or a folder."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    src = Path(source).expanduser()
    if src.is_dir():
        if (src / TRAINED_FILE).is_file():
            src = src / TRAINED_FILE
        else:
            unet_dir = src / "unet" if (src / "unet").is_dir() else src
            files = sorted(unet_dir.glob("*.safetensors"))
            if not files or not (unet_dir / "config.json").is_file():
                raise FastUnlearnError(f"{source} holds no {TRAINED_FILE} and no unet/ folder with safetensors "
                                       "weights: not an unlearned run of fastunlearn")
            state = {}
            for f in files:
                state.update(load_file(str(f)))
            return state, {}, True, str(unet_dir)
    if not src.is_file():
        raise FastUnlearnError(f"unlearned weights {source} do not exist")
    try:
        with safe_open(str(src), framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(src))
    except Exception as exc:
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise FastUnlearnError(f"unlearned weights {src} are not a readable safetensors file ({why})") from None
    return state, meta, False, str(src)


@torch.no_grad()
def load_unlearned(pipe, file_or_dir):
    """Apply an unlearned model to `pipe` (a loaded diffusers pipeline of the base model) and return it: a
    `trained` file (`unlearned.safetensors`, or a run folder holding it) replaces the trained parameters; a
    `unet` or pipeline run folder replaces every UNet weight. Every name and shape is checked before
    anything changes (one-line error on a mismatch); values keep the pipeline's dtype and device."""
    state, meta, whole, name = _read(file_or_dir)
    base = f" (trained from {meta['base_model']})" if meta.get("base_model") else ""
    if meta and meta.get("format", FORMAT) != FORMAT:
        raise FastUnlearnError(f"{name} is a {meta.get('format')} file, not fastunlearn's {FORMAT}")
    target = pipe.unet.state_dict()
    for key, value in state.items():
        if key not in target:
            raise FastUnlearnError(f"{name} does not fit this pipeline: its parameter {key} is not in the pipeline's "
                                   f"UNet{base}")
        if tuple(value.shape) != tuple(target[key].shape):
            raise FastUnlearnError(f"{name} does not fit this pipeline: {key} has shape {tuple(value.shape)} there and "
                                   f"{tuple(target[key].shape)} in the pipeline's UNet{base}")
    if whole:
        missing = [k for k in target if k not in state]
        if missing:
            raise FastUnlearnError(f"{name} does not fit this pipeline: it lacks {len(missing)} of the UNet's "
                                   f"parameters (e.g. {missing[0]})")
    for key, value in state.items():
        target[key].copy_(value.to(device=target[key].device, dtype=target[key].dtype))
    return pipe


def base_model_of(folder: Path) -> str | None:
    """The base model a run folder names: report.json's `model`, else the trained file's metadata."""
    folder = Path(folder)
    report = folder / "report.json"
    if report.is_file():
        try:
            model = json.loads(report.read_text()).get("model")
        except ValueError:
            model = None
        if model:
            return str(model)
    if (folder / TRAINED_FILE).is_file():
        _, meta, _, _ = _read(folder / TRAINED_FILE)
        return meta.get("base_model")
    return None


def is_partial_export(folder) -> bool:
    """A run folder saved with save_format unet or trained (it is not a whole pipeline)."""
    folder = Path(folder).expanduser()
    return (folder.is_dir() and not (folder / "model_index.json").is_file()
            and ((folder / TRAINED_FILE).is_file() or (folder / "unet").is_dir()))


def load_run(path, base: str | None = None, cache_dir=None, torch_dtype=None, what: str = "--unlearned"):
    """Any run folder as a pipeline: a pipeline folder (or hub id) as it is; a `unet`/`trained` export applied
    to its base model (`base`, else the one its report.json names)."""
    from .models import load_pipeline

    if not is_partial_export(path):
        return load_pipeline(str(path), torch_dtype=torch_dtype, cache_dir=cache_dir)
    kind = "trained parameters" if (Path(path) / TRAINED_FILE).is_file() else "UNet"
    source = "--base"
    if base is None:
        base, source = base_model_of(path), f"{Path(path) / 'report.json'}"
    if not base:
        raise FastUnlearnError(f"{what} {path} holds only the {kind} (save_format "
                               f"{'trained' if kind != 'UNet' else 'unet'}) and names no base model: give it with --base")
    try:
        pipe = load_pipeline(str(base), torch_dtype=torch_dtype, cache_dir=cache_dir)
    except FastUnlearnError as exc:
        raise FastUnlearnError(f"the base model of {path} (from {source}): {exc}; give it with --base") from None
    return load_unlearned(pipe, path)
