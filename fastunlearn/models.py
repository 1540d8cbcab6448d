"""Loading diffusers pipelines (SD 1.x/2.x, SDXL) and turning prompts into UNet conditioning.

`Conditioner` encodes every prompt once (the text encoders are frozen) and hands out batched
UNet keyword arguments, `encoder_hidden_states` and, for SDXL, `added_cond_kwargs`.
The empty prompt "" is the unconditional branch exactly as the pipeline's own sampler builds
it (SDXL's `force_zeros_for_empty_prompt` included), so training and sampling agree.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from .errors import FastUnlearnError


def quiet_diffusers() -> None:
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.disable_progress_bar()
    dlog.set_verbosity_error()
    tlog.disable_progress_bar()
    tlog.set_verbosity_error()


def load_pipeline(model: str, torch_dtype=None, cache_dir=None):
    """A diffusers SD/SDXL pipeline from a local folder, a cached hub id, or an embedded world's name."""
    from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    from . import worlds

    quiet_diffusers()
    world = worlds.get(model, cache_dir)
    if world is not None:
        model = str(world.pipeline_path())
    path = Path(model).expanduser()
    looks_local = path.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1  # else a hub id
    if looks_local:
        if not path.is_dir():
            raise FastUnlearnError(f"model path {model} does not exist")
        check_local_pipeline(path)
    kwargs = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
    try:
        pipe = DiffusionPipeline.from_pretrained(str(path) if looks_local else model, use_safetensors=True, **kwargs)
    except Exception as exc:  # a one-line cause instead of the loader's traceback
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
        if not looks_local and isinstance(exc, OSError) and offline:
            first = "not a local folder, and offline (HF_HUB_OFFLINE=1) with no copy of that hub id in the local cache"
        raise FastUnlearnError(f"cannot load model {model!r}: {first}") from None
    if not isinstance(pipe, (StableDiffusionPipeline, StableDiffusionXLPipeline)):
        raise FastUnlearnError(f"model {model!r} is a {type(pipe).__name__}; fastunlearn supports Stable Diffusion "
                               "1.x/2.x (StableDiffusionPipeline) and SDXL (StableDiffusionXLPipeline)")
    tok = pipe.tokenizer
    if tok is not None and len(tok) <= 2:
        raise FastUnlearnError(f"model {model!r} has a tokenizer without vocabulary ({len(tok)} tokens)")
    pipe.set_progress_bar_config(disable=True)
    return pipe


_NO_WEIGHTS = ("Scheduler", "Tokenizer", "TokenizerFast", "ImageProcessor", "FeatureExtractor", "Processor")


def check_local_pipeline(path: Path) -> None:
    """Name what is wrong with a local pipeline folder before diffusers tries it: a missing or broken
    model_index.json, a component folder that is missing, weights only in pickle (.bin) form, or a
    safetensors file that is truncated or corrupt (its header is read; nothing is unpickled)."""
    from safetensors import safe_open

    index = path / "model_index.json"
    if not index.is_file():
        raise FastUnlearnError(f"model path {path} is not a diffusers pipeline (no model_index.json)")
    try:
        components = json.loads(index.read_text())
    except (ValueError, OSError) as exc:
        raise FastUnlearnError(f"model path {path}: model_index.json is not valid JSON ({exc})") from None
    if not isinstance(components, dict):
        raise FastUnlearnError(f"model path {path}: model_index.json must be a JSON object")
    for name, spec in components.items():
        if name.startswith("_") or not (isinstance(spec, list) and len(spec) == 2 and spec[1]):
            continue  # settings, or an optional component that is absent (null)
        folder = path / name
        if not folder.is_dir():
            raise FastUnlearnError(f"model path {path} is incomplete: model_index.json lists {name} ({spec[1]}) "
                                   f"but there is no {name}/ folder")
        if str(spec[1]).endswith(_NO_WEIGHTS):
            continue
        if not (folder / "config.json").is_file():
            raise FastUnlearnError(f"model path {path} is incomplete: {name}/config.json is missing")
        shards = sorted(folder.glob("*.safetensors"))
        if not shards:
            pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.ckpt"))
            if pickles:
                raise FastUnlearnError(
                    f"model path {path}: {name}/ has weights only as {pickles[0]} (a pickle), and fastunlearn loads "
                    "safetensors only: convert it, e.g. load it once and save_pretrained(..., safe_serialization=True)")
            raise FastUnlearnError(f"model path {path} is incomplete: {name}/ has no weights file (*.safetensors)")
        for shard in shards:
            try:
                with safe_open(str(shard), framework="pt"):
                    pass
            except Exception as exc:
                why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise FastUnlearnError(f"model path {path}: {name}/{shard.name} is truncated or corrupt ({why}); "
                                       "copy or download it again") from None


def prompt_overflow(pipe, prompts) -> list[str]:
    """One warning per prompt longer than a text encoder takes, naming how many tokens are dropped
    (diffusers truncates such prompts silently once its logging is quiet)."""
    out = []
    for tok in (getattr(pipe, "tokenizer", None), getattr(pipe, "tokenizer_2", None)):
        if tok is None:
            continue
        limit = tok.model_max_length
        for p in dict.fromkeys(prompts):
            n = len(tok(p, truncation=False).input_ids)
            msg = (f"prompt {p[:60] + ('...' if len(p) > 60 else '')!r} is {n} tokens long but the text encoder takes "
                   f"{limit}: the last {n - limit} token(s) are dropped")
            if n > limit and msg not in out:
                out.append(msg)
    return out


def encoders(pipe) -> list[tuple]:
    """(tokenizer, text encoder) pairs: one for SD 1.x/2.x, two for SDXL."""
    pairs = [(pipe.tokenizer, pipe.text_encoder), (getattr(pipe, "tokenizer_2", None), getattr(pipe, "text_encoder_2", None))]
    return [(tok, enc) for tok, enc in pairs if tok is not None and enc is not None]


def is_sdxl(pipe) -> bool:
    return getattr(pipe, "text_encoder_2", None) is not None or pipe.unet.config.addition_embed_type == "text_time"


def fingerprint(modules, extra: dict | None = None) -> str:
    """A short hash of one or more modules' weights (and optional settings): the key of teacher caches.
    Large tensors contribute a strided sample of their values and their exact float64 sum, so even
    SDXL fingerprints in about a second."""
    h = hashlib.sha256()
    for module in modules if isinstance(modules, (list, tuple)) else [modules]:
        if module is None:
            continue
        for name, t in sorted(module.state_dict().items()):
            t = t.detach()
            h.update(name.encode() + str(tuple(t.shape)).encode() + str(t.dtype).encode())
            flat = t.reshape(-1)
            sample = flat[:: max(1, flat.numel() // 4096)]
            h.update(sample.float().cpu().contiguous().numpy().tobytes())
            h.update(repr(float(flat.sum(dtype=torch.float64))).encode())
    if extra:
        h.update(json.dumps(extra, sort_keys=True).encode())
    return h.hexdigest()[:16]


class Conditioner:
    """Encodes prompts once; `kwargs(indices)` gives the UNet conditioning for a batch of prompt indices."""

    def __init__(self, pipe, prompts, device, dtype):
        self.prompts = list(dict.fromkeys([""] + list(prompts)))  # index 0 is the unconditional prompt
        self.index = {p: i for i, p in enumerate(self.prompts)}
        self.sdxl = is_sdxl(pipe)
        with torch.no_grad():
            if self.sdxl:
                pe, _, pooled, _ = pipe.encode_prompt(self.prompts[1:] or [" "], device="cpu",
                                                      do_classifier_free_guidance=False)
                _, npe, _, npooled = pipe.encode_prompt(" ", device="cpu", do_classifier_free_guidance=True)
                self.hidden = torch.cat([npe, pe[: len(self.prompts) - 1]])
                self.pooled = torch.cat([npooled, pooled[: len(self.prompts) - 1]])
                size = pipe.unet.config.sample_size * pipe.vae_scale_factor
                self.time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32)
            else:
                pe, npe = pipe.encode_prompt(self.prompts[1:] or [" "], device="cpu", num_images_per_prompt=1,
                                             do_classifier_free_guidance=True)
                self.hidden = torch.cat([npe[:1], pe[: len(self.prompts) - 1]])
        self.hidden = self.hidden.to(device, dtype)
        if self.sdxl:
            self.pooled = self.pooled.to(device, dtype)
            self.time_ids = self.time_ids.to(device, dtype)

    def ids(self, prompts) -> torch.Tensor:
        return torch.tensor([self.index[p] for p in prompts], dtype=torch.long)

    def set_extra(self, hidden: torch.Tensor, pooled: torch.Tensor | None = None) -> None:
        """Conditioning computed elsewhere as the rows after the prompts' own (ids len(prompts), ...): the
        adversarial forget prompts of fastunlearn.robust. Replaces the extra rows set before."""
        n = len(self.prompts)
        self.hidden = torch.cat([self.hidden[:n], hidden.to(self.hidden)])
        if self.sdxl:
            self.pooled = torch.cat([self.pooled[:n], pooled.to(self.pooled)])

    def kwargs(self, idx: torch.Tensor) -> dict:
        idx = idx.to(self.hidden.device)
        out = {"encoder_hidden_states": self.hidden[idx]}
        if self.sdxl:
            out["added_cond_kwargs"] = {"text_embeds": self.pooled[idx],
                                        "time_ids": self.time_ids.expand(len(idx), -1)}
        return out


def param_subset(unet: torch.nn.Module, subset: str) -> list[str]:
    """Names of the parameters a subset trains: `full`, `attn2` (cross-attention), `non-attn2`."""
    names = [n for n, _ in unet.named_parameters()]
    if subset == "full":
        return names
    if subset == "attn2":
        return [n for n in names if ".attn2." in n]
    if subset == "non-attn2":
        return [n for n in names if ".attn2." not in n]
    raise FastUnlearnError(f"unknown parameter subset {subset!r}; choose one of full, attn2, non-attn2")


class SharedTeacher(torch.nn.Module):
    """The original model without a second copy of its frozen weights: the student's module run with
    the original values of only the trained parameters substituted (`torch.func.functional_call`),
    always without gradients. For `params: attn2` that is 168 MB of SD 1.5's 3.28 GB (fp32) instead
    of all of it. Attributes a pipeline reads (config, dtype, add_embedding, ...) come from the student.
    Not for ZeRO-3, whose parameters are partitioned across ranks."""

    def __init__(self, student: torch.nn.Module, trained: set[str]):
        super().__init__()
        object.__setattr__(self, "_student", student)  # not a submodule: no duplicate parameters
        object.__setattr__(self, "originals", {n: p.detach().clone() for n, p in student.named_parameters()
                                              if n in trained})

    def forward(self, *args, **kwargs):
        from torch.func import functional_call

        with torch.no_grad():
            return functional_call(self._student, self.originals, args, kwargs, strict=False)

    def state_dict(self, *args, **kwargs):  # the original weights, e.g. for fingerprints
        return {**self._student.state_dict(*args, **kwargs), **self.originals}

    def extra_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.originals.values())

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._student, name)


# LoRA (PEFT) adapters: the attention projections of the trained subset, unless lora.target_modules says
LORA_TARGETS = {"full": r".*attn[12]\.(to_q|to_k|to_v|to_out\.0)$", "attn2": r".*attn2\.(to_q|to_k|to_v|to_out\.0)$",
                "non-attn2": r".*attn1\.(to_q|to_k|to_v|to_out\.0)$"}


def add_lora(unet: torch.nn.Module, rank: int, alpha: float | None, target_modules: str | None, subset: str) -> list[str]:
    """Add a PEFT LoRA adapter (A Gaussian, B zero: the student starts equal to the original) and return
    the names of its parameters, the only ones trained."""
    try:
        from peft import LoraConfig
    except ImportError:
        raise FastUnlearnError("LoRA (lora.rank > 0) needs the peft package: pip install 'fastunlearn[lora]'") from None
    targets = target_modules or LORA_TARGETS[subset]
    if isinstance(targets, str) and "," in targets:
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    try:
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian",
                                    target_modules=targets))
    except ValueError as exc:
        raise FastUnlearnError(f"lora.target_modules {targets!r}: {str(exc).splitlines()[0]}") from None
    return [n for n, _ in unet.named_parameters() if ".lora_" in n]


class AdapterTeacher(torch.nn.Module):
    """The original model as the student itself with its LoRA adapters switched off: no weights of its
    own, so the teacher costs no memory. Always without gradients. Attributes a pipeline reads come
    from the student; `state_dict` gives the base weights under their original names."""

    def __init__(self, student: torch.nn.Module):
        super().__init__()
        object.__setattr__(self, "_student", student)  # not a submodule: no duplicate parameters

    def forward(self, *args, **kwargs):
        with torch.no_grad():
            self._student.disable_adapters()
            try:
                return self._student(*args, **kwargs)
            finally:
                self._student.enable_adapters()

    def state_dict(self, *args, **kwargs):
        return {k.replace(".base_layer.", "."): v for k, v in self._student.state_dict(*args, **kwargs).items()
                if ".lora_" not in k}

    def extra_bytes(self) -> int:
        return 0

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._student, name)


def save_lora(pipe, unet: torch.nn.Module, folder) -> None:
    """The adapter as `pytorch_lora_weights.safetensors`, the file `pipe.load_lora_weights(folder)` reads."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    type(pipe).save_lora_weights(str(folder), unet_lora_layers=convert_state_dict_to_diffusers(
        get_peft_model_state_dict(unet)), safe_serialization=True)


def merge_lora(unet: torch.nn.Module) -> torch.nn.Module:
    """Fold the adapter into the base weights and remove it, in place (the UNet saves as a plain one)."""
    unet.fuse_lora()
    unet.unload_lora()
    return unet


def set_attention(unet: torch.nn.Module, kind: str) -> None:
    """`sdpa`: diffusers' AttnProcessor2_0 (torch's scaled_dot_product_attention) on every attention layer;
    `xformers`: xformers' memory-efficient attention (a one-line error if it is not installed)."""
    if kind == "xformers":
        try:
            import xformers  # noqa: F401
        except ImportError:
            raise FastUnlearnError("attention: xformers needs the xformers package (pip install 'fastunlearn[xformers]'), "
                                   "or use attention: sdpa") from None
        unet.enable_xformers_memory_efficient_attention()
        return
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet.set_attn_processor(AttnProcessor2_0())


def teacher_and_student(pipe, cfg, edited: list[str] | None = None):
    """The teacher (the original model) and the student (`pipe.unet`, trained in place), made before DeepSpeed
    sees the student. With LoRA the teacher is the student with its adapters off (no memory cost); with a
    parameter subset it shares every frozen weight with the student (SharedTeacher); else a frozen copy in the
    working dtype. Only the trained parameters require grad. `edited`: the parameters a closed-form method
    changes (fastunlearn.uce), which stand for the subset (no DeepSpeed: shared whatever the ZeRO stage).
    Returns (teacher, student)."""
    import copy

    student = pipe.unet
    set_attention(student, cfg.attention)  # the trainer's and the sampler's UNet calls alike
    if cfg.lora.rank:
        trained = set(add_lora(student, cfg.lora.rank, cfg.lora.alpha, cfg.lora.target_modules, cfg.params))
        teacher = AdapterTeacher(student)
    else:
        trained = set(param_subset(student, cfg.params) if edited is None else edited)
        share = cfg.teacher == "shared" or (cfg.teacher == "auto" and (
            edited is not None or (cfg.params != "full" and cfg.zero_stage < 3)))
        teacher = SharedTeacher(student, trained) if share else copy.deepcopy(pipe.unet).eval().requires_grad_(False)
    for name, p in student.named_parameters():
        p.requires_grad_(name in trained)
    if cfg.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    student.train()
    return teacher, student


def teacher_facts(cfg, teacher, student) -> dict:
    """What a run's report says of its teacher and student: the teacher's kind and extra memory, LoRA, sizes."""
    shared = hasattr(teacher, "extra_bytes")  # SharedTeacher, or AdapterTeacher (LoRA)
    return {
        "teacher": "adapters off" if cfg.lora.rank else "shared" if shared else "copy",
        "lora": {"rank": cfg.lora.rank, "alpha": cfg.lora.alpha or cfg.lora.rank,
                 "trained_parameters": sum(p.numel() for p in student.parameters() if p.requires_grad)}
        if cfg.lora.rank else None,
        "teacher_extra_bytes": (teacher.extra_bytes() if shared else
                                sum(p.numel() * p.element_size() for p in teacher.parameters())),
        "unet_bytes": sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in student.parameters()),
    }
