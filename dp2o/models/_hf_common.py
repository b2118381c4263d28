"""Shared plumbing of the diffusers-based backends (C-SD2, C-FLUX, SD x4 upscaler).

What lives here: resolving device/dtype, loading components with errors that name the config field, per-row
random generators, the prompt-embedding cache, and the trainable module with its frozen reference.

The design choice a reader would miss: every random draw of a sampled row (initial latents, VAE posterior
samples, DDPM step noise) comes from that row's own CPU `torch.Generator`, handed to diffusers as a *list* of
generators. diffusers then draws each row separately on the CPU and moves it to the device, so a candidate
depends only on its (LR, seed, prompt) — never on which other rows share its batch — and reproduces the
diffusers pipeline called with `generator=torch.Generator().manual_seed(seed)` for that row alone.
"""

from __future__ import annotations

import contextlib
import copy
import json
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from dp2o import devices
from dp2o.models.base import Backend, BackendError
from dp2o.models.config import BackendConfig
from dp2o.seeding import torch_generator

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_OFFLINE_HINT = (
    "if it is a hub id, this machine needs network access or a pre-filled Hugging Face cache "
    "(HF_HOME; see docs/backends.md) — with HF_HUB_OFFLINE=1 only cached files are used"
)
_LORA_FILE = "adapter_model.safetensors"
_LORA_META = "adapter_config.json"
_FULL_FILE = "diffusion_pytorch_model.safetensors"


# ---- device and precision ------------------------------------------------------------------------------
def resolve_device(cfg: BackendConfig) -> torch.device:
    """`auto` → cuda when available, else cpu."""
    return devices.resolve_device(cfg.device)


def resolve_dtype(cfg: BackendConfig, device: torch.device) -> torch.dtype:
    """`auto` → float32 on CPU (half-precision convs are slow and inexact there), bfloat16 elsewhere."""
    if cfg.dtype == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    return getattr(torch, cfg.dtype)


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed precision when running in half precision: lets fp32 trainable weights meet bf16/fp16 activations."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# ---- loading -------------------------------------------------------------------------------------------
def check_source(source: str | None, field: str, what: str) -> str:
    """Return `source` if it is an existing local path or looks like a hub id ("owner/name"); else raise."""
    if source is None:
        raise BackendError(f"`{field}` is not set: give a hub id or a local folder of {what}")
    if Path(source).expanduser().exists():
        return str(Path(source).expanduser())
    if _HUB_ID.match(source) and not source.startswith("."):
        return source
    raise BackendError(
        f"`{field}`: {source!r} does not exist; give an existing local folder or a hub id of {what}"
    )


def read_json(source: str, filename: str, *, field: str, subfolder: str | None = None) -> dict | None:
    """Read `[subfolder/]filename` of a local folder or hub repo; None if the repo has no such file."""
    rel = f"{subfolder}/{filename}" if subfolder else filename
    if Path(source).exists():
        path = Path(source) / rel
        return json.loads(path.read_text()) if path.is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        path = hf_hub_download(source, filename, subfolder=subfolder)
    except LocalEntryNotFoundError as exc:
        raise BackendError(
            f"`{field}`: {source!r} is neither a local folder nor a hub repo in the local cache, and the hub is "
            f"unreachable; {_OFFLINE_HINT}"
        ) from exc
    except EntryNotFoundError:
        return None
    except Exception as exc:  # offline, unknown repo, auth: all mean "cannot reach it", said once here
        raise BackendError(
            f"`{field}`: cannot read {rel} from {source!r} ({type(exc).__name__}); {_OFFLINE_HINT}"
        ) from exc
    return json.loads(Path(path).read_text())


def check_pipeline_class(source: str, *, field: str, allowed: Sequence[str], what: str) -> None:
    """Fail early when `model` points at a different kind of diffusers pipeline (from its model_index.json)."""
    index = read_json(source, "model_index.json", field=field)
    if index is None:
        raise BackendError(
            f"`{field}`: {source!r} has no model_index.json; it must be a diffusers folder of {what}"
        )
    name = index.get("_class_name")
    if name not in allowed:
        raise BackendError(
            f"`{field}`: {source!r} is a {name} folder, but this backend needs {what} ({' or '.join(allowed)}); "
            "check `kind` and `model`"
        )


def load_scheduler(source: str, *, field: str, subfolder: str, cls=None):
    """The scheduler stored in `subfolder`, as its own class, or as `cls` built from its config (same betas)."""
    import diffusers

    config = read_json(source, "scheduler_config.json", field=field, subfolder=subfolder)
    if config is None:
        raise BackendError(
            f"`{field}`: {source!r} has no {subfolder}/scheduler_config.json; is it a diffusers folder?"
        )
    if cls is None:
        cls = getattr(diffusers, str(config.get("_class_name")), None)
        if cls is None:
            raise BackendError(
                f"`{field}`: {subfolder} names an unknown scheduler {config.get('_class_name')!r}"
            )
    return cls.from_config(config)


def load_component(cls, source: str, *, field: str, subfolder: str | None = None, **kwargs):
    """`cls.from_pretrained(source, subfolder=...)` after checking the stored class name matches `cls`.

    diffusers loads a mismatched folder with a warning and randomly initialised layers, which would silently
    sample noise; checking `_class_name` (diffusers) or `architectures` (transformers) turns that into an error.
    """
    rel = f"{source}/{subfolder}" if subfolder else source
    config = read_json(source, "config.json", field=field, subfolder=subfolder)
    if config is None and subfolder is not None and cls.__name__.endswith(("Tokenizer", "TokenizerFast")):
        config = {}
    if config is None:
        raise BackendError(
            f"`{field}`: {rel!r} has no config for a {cls.__name__}; is `{field}` the right folder?"
        )
    stored = config.get("_class_name") or (config.get("architectures") or [None])[0]
    if stored is not None and stored != cls.__name__:
        raise BackendError(f"`{field}`: {rel!r} holds a {stored}, expected a {cls.__name__}")
    try:
        return cls.from_pretrained(source, subfolder=subfolder, **kwargs)
    except (OSError, ValueError) as exc:
        raise BackendError(
            f"`{field}`: could not load {cls.__name__} from {rel!r} ({exc}); {_OFFLINE_HINT}"
        ) from exc


# ---- per-row randomness and prompts --------------------------------------------------------------------
def row_generators(seeds: Sequence[int], batch: int) -> list[torch.Generator]:
    """One CPU generator per row; CPU so that the same seed gives the same noise on any device."""
    if len(seeds) != batch:
        raise ValueError(f"got {len(seeds)} seeds for {batch} LR rows; pass one seed per row")
    return [torch_generator(int(s)) for s in seeds]


def row_prompts(prompts: Sequence[str] | None, default: str, batch: int) -> list[str]:
    if prompts is None:
        return [default] * batch
    if len(prompts) != batch:
        raise ValueError(f"got {len(prompts)} prompts for {batch} LR rows; pass one prompt per row or None")
    return [str(p) for p in prompts]


class PromptCache:
    """Text embeddings computed once per distinct prompt string (encoders are slow; prompts repeat a lot)."""

    def __init__(self, encode: Callable[[str], tuple[torch.Tensor, ...]]):
        self._encode = encode
        self._cache: dict[str, tuple[torch.Tensor, ...]] = {}

    def __call__(self, prompts: Sequence[str]) -> tuple[torch.Tensor, ...]:
        """Batch the cached per-prompt tensors (each [1, ...]) row by row → tuple of [B, ...]."""
        for p in prompts:
            if p not in self._cache:
                with torch.no_grad():
                    self._cache[p] = tuple(t.detach() for t in self._encode(p))
        parts = [self._cache[p] for p in prompts]
        return tuple(torch.cat(col) for col in zip(*parts, strict=True))

    def __len__(self) -> int:
        return len(self._cache)


def check_lr(lr: torch.Tensor, multiple: int, scale: int) -> None:
    """lr: [B, 3, h, w] float in [0, 1]; scale·h and scale·w must be multiples of the latent grid `multiple`."""
    if lr.ndim != 4 or lr.shape[1] != 3 or not lr.is_floating_point():
        raise ValueError(
            f"lr must be a float tensor [B, 3, h, w] in [0, 1], got {tuple(lr.shape)} {lr.dtype}"
        )
    h, w = lr.shape[-2:]
    if (scale * h) % multiple or (scale * w) % multiple:
        raise ValueError(
            f"LR size {h}x{w} gives an output of {scale * h}x{scale * w}, which must be a multiple of {multiple}; "
            "crop the LR so that scale·h and scale·w are multiples of it"
        )


def upsample(lr: torch.Tensor, scale: int) -> torch.Tensor:
    """lr: [B, 3, h, w] in [0, 1] → bicubic ×scale [B, 3, scale·h, scale·w], clamped to [0, 1] (bicubic overshoots)."""
    up = torch.nn.functional.interpolate(lr.float(), scale_factor=scale, mode="bicubic", align_corners=False)
    return up.clamp(0, 1)


# ---- the trainable module and its reference ------------------------------------------------------------
class TrainableModule:
    """The policy's trainable module (a ControlNet or UNet) and the frozen reference it is compared against.

    Full training keeps a frozen deep copy as the reference, made the first time training touches the
    backend (sampling-only runs never pay for it) and always before `load` overwrites the policy. With LoRA
    the reference is the same module with adapters disabled, so no second copy exists.
    """

    def __init__(self, module: torch.nn.Module, *, lora_rank: int, lora_targets: Sequence[str]):
        self.module = module
        self.lora_rank = lora_rank
        self.reference: torch.nn.Module | None = None
        #: what the policy forward goes through; `accelerate_prepare` swaps in the DDP-wrapped module
        self.policy = module
        module.requires_grad_(False)
        if lora_rank > 0:
            from peft import LoraConfig

            module.add_adapter(
                LoraConfig(
                    r=lora_rank,
                    lora_alpha=lora_rank,
                    init_lora_weights="gaussian",
                    target_modules=list(lora_targets),
                )
            )
            for name, p in module.named_parameters():
                p.requires_grad_("lora_" in name)
        else:
            module.requires_grad_(True)

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    def ensure_reference(self) -> None:
        if self.lora_rank == 0 and self.reference is None:
            self.reference = copy.deepcopy(self.module).requires_grad_(False).eval()

    @contextlib.contextmanager
    def as_reference(self) -> Iterator[torch.nn.Module]:
        """The frozen reference, under no_grad; with LoRA, the policy module with adapters switched off."""
        self.ensure_reference()
        with torch.no_grad():
            if self.lora_rank == 0:
                yield self.reference
                return
            self.module.disable_adapters()
            try:
                yield self.module
            finally:
                self.module.enable_adapters()

    def upcast(self) -> None:
        """Trainable weights in float32: Adam updates of ~1e-5 relative vanish in bf16 (8-bit mantissa)."""
        self.ensure_reference()
        for p in self.parameters():
            p.data = p.data.float()

    def save(self, folder: str | Path) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if self.lora_rank == 0:
            self.module.save_pretrained(folder, safe_serialization=True)
            return
        from peft.utils import get_peft_model_state_dict

        state = {k: v.detach().contiguous().cpu() for k, v in get_peft_model_state_dict(self.module).items()}
        save_file(state, str(folder / _LORA_FILE))
        (folder / _LORA_META).write_text(json.dumps({"lora_rank": self.lora_rank}))

    def load(self, folder: str | Path) -> None:
        from safetensors.torch import load_file

        self.ensure_reference()
        folder = Path(folder)
        if (folder / _LORA_META).is_file():
            saved_rank = json.loads((folder / _LORA_META).read_text())["lora_rank"]
        else:
            saved_rank = 0 if (folder / _FULL_FILE).is_file() else self.lora_rank
        if saved_rank != self.lora_rank:
            raise BackendError(
                f"{folder} was saved with lora_rank={saved_rank}; set `lora_rank: {saved_rank}`"
            )
        name = _FULL_FILE if self.lora_rank == 0 else _LORA_FILE
        path = folder / name
        if not path.is_file():
            kind = "full weights" if self.lora_rank == 0 else f"LoRA rank-{self.lora_rank} adapters"
            raise BackendError(
                f"{folder}: no {name}; expected {kind} written by save_trainable (check `lora_rank`)"
            )
        state = load_file(str(path))
        if self.lora_rank == 0:
            missing, unexpected = self.module.load_state_dict(state, strict=False)
            check_keys(missing, unexpected, path)
            return
        from peft.utils import set_peft_model_state_dict

        expected = {k for k, _ in self.module.named_parameters() if "lora_" in k}
        result = set_peft_model_state_dict(self.module, state)
        unexpected = list(getattr(result, "unexpected_keys", []))
        if unexpected or len(state) != len(expected):
            raise BackendError(
                f"{path}: LoRA weights do not match this model ({len(state)} tensors for {len(expected)} adapter "
                f"parameters, unexpected {unexpected[:3]}); was it saved with the same `lora_rank` and model?"
            )


def check_keys(missing: Sequence[str], unexpected: Sequence[str], path: str | Path) -> None:
    """Raise naming the file when a state dict does not fit its module exactly."""
    if missing or unexpected:
        raise BackendError(
            f"{path}: state dict does not match the model: {len(missing)} missing (e.g. {list(missing)[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {list(unexpected)[:3]}); is it the right file for this base model?"
        )


class DiffusersBackend(Backend):
    """What the three diffusers backends share: device/dtype, trainable module, save/load, train/eval."""

    _trainable: TrainableModule
    _device: torch.device
    _dtype: torch.dtype

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The policy's trainable weights, in float32 from this call on (the reference keeps the load dtype).

        Upcasting here rather than in `train()` matters: an optimiser built over these parameters, or an
        optimiser state loaded into them on resume, must see the dtype the updates will run in.
        """
        self._trainable.upcast()
        return self._trainable.parameters()

    def save_trainable(self, folder: str | Path) -> None:
        self._trainable.save(folder)

    def load_trainable(self, folder: str | Path) -> None:
        self._trainable.load(folder)

    def train(self) -> None:
        self._trainable.upcast()
        self._trainable.module.train()

    def eval(self) -> None:
        self._trainable.module.eval()

    def accelerate_prepare(self, accelerator) -> None:
        """Route the policy forward through `accelerator.prepare(module)` (DDP across GPUs).

        The training loop calls this once, then prepares its optimiser over `trainable_parameters()`; the
        reference path keeps using the unwrapped module, so DDP only synchronises the policy's gradients.
        """
        self._trainable.policy = accelerator.prepare(self._trainable.module)


def configure_memory(vae, cfg: BackendConfig) -> None:
    """Honour the VAE memory options (tiling for large outputs, slicing for large batches)."""
    if cfg.enable_vae_tiling:
        vae.enable_tiling()
    if cfg.enable_vae_slicing:
        vae.enable_slicing()


def check_target(target: torch.Tensor, lr: torch.Tensor, scale: int) -> None:
    """Training targets must be the ×scale size of their LR inputs, one per row."""
    if target.shape[0] != lr.shape[0] or tuple(target.shape[-2:]) != tuple(scale * s for s in lr.shape[-2:]):
        raise ValueError(f"target {tuple(target.shape)} must be the ×{scale} size of lr {tuple(lr.shape)}")
