"""Backend configuration: which Real-ISR model to load, from where, and how to run it.

Fields marked `runtime` (device, batch size, memory options) change how fast a stage runs, not what it
computes, so they are left out of stage fingerprints: moving a run from CPU to GPU does not invalidate it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

BackendKind = Literal["tiny", "sd2-controlnet", "flux-controlnet", "sd-x4-upscaler", "null"]


def runtime(**kwargs):
    """A pydantic Field that does not enter the fingerprint (see `dp2o.config.fingerprint`)."""
    extra = dict(kwargs.pop("json_schema_extra", None) or {})
    extra["runtime"] = True
    return Field(json_schema_extra=extra, **kwargs)


class BackendConfig(BaseModel):
    """Which generator to use. `model` is a hub id or a local folder loaded with `from_pretrained`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: BackendKind = Field("tiny", description="backend family")
    model: str | None = Field(
        None,
        description="hub id or local folder of the base model; for `tiny`, None means the bundled pretrained weights",
    )
    controlnet: str | None = Field(
        None, description="hub id, folder, or .safetensors state dict of the ControlNet (C-SD2 / C-FLUX)"
    )
    num_inference_steps: int | None = Field(None, ge=1, description="sampler steps; None = backend default")
    guidance_scale: float | None = Field(
        None, ge=0, description="classifier-free guidance; None = backend default"
    )
    prompt: str = Field(
        "", description="prompt used for every sample unless a per-sample prompt column exists"
    )
    negative_prompt: str | None = Field(None, description="None = backend default")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="auto = float32 on CPU, bfloat16 on GPU"
    )
    lora_rank: int = Field(
        0, ge=0, description="0 trains the full ControlNet; >0 trains LoRA adapters of this rank"
    )
    device: str = runtime(default="auto", description="auto = cuda if available else cpu")
    gradient_checkpointing: bool = runtime(default=False, description="trade compute for activation memory")
    enable_vae_tiling: bool = runtime(default=False, description="decode large images tile by tile")
    enable_vae_slicing: bool = runtime(default=False, description="decode a batch one image at a time")
    cpu_offload: bool = runtime(default=False, description="keep idle sub-models on the CPU (small GPUs)")
    compile: bool = runtime(default=False, description="torch.compile the denoiser (GPU)")
