"""BasicSR 1.4.2 as a reference for dp2o.degrade: import it if available and drive its code paths.

Used only by the degradation benchmarks and the (skippable) fidelity test; basicsr is never a dependency of
dp2o. Put a `pip install --target` folder holding basicsr==1.4.2 on `PYTHONPATH`, or install it into a
separate environment. BasicSR 1.4.2 imports `torchvision.transforms.functional_tensor`, which current
torchvision renamed to `_functional_tensor`; we alias it before importing.

Two reference paths are offered:
- `basicsr_chain_with_params`: BasicSR's ops (filter2D, F.interpolate, add_*_noise_pt, DiffJPEG, USMSharp)
  composed in Real-ESRGAN's order but driven by *our* explicit parameters (and our noise seeds via torch's
  global RNG), for like-for-like comparison of the deterministic chain.
- `BasicSRChain`: the genuine `RealESRGANDataset.__getitem__` (kernel sampling) + `RealESRGANModel.feed_data`
  (degradation) with BasicSR's own global-RNG sampling, for distribution comparison and speed.
"""

from __future__ import annotations

import importlib
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dp2o.degrade.config import DegradationConfig
from dp2o.degrade.ingest import ImageRejected, list_sources, load_hr
from dp2o.degrade.params import DegradationParams, KernelParams
from dp2o.seeding import numpy_rng


def import_basicsr() -> types.SimpleNamespace | None:
    """The BasicSR pieces we compare against, or None if basicsr is not importable."""
    import torchvision.transforms._functional_tensor as functional_tensor

    sys.modules.setdefault("torchvision.transforms.functional_tensor", functional_tensor)
    try:
        degradations = importlib.import_module("basicsr.data.degradations")
        img_process = importlib.import_module("basicsr.utils.img_process_util")
        diffjpeg = importlib.import_module("basicsr.utils.diffjpeg")
        dataset = importlib.import_module("basicsr.data.realesrgan_dataset")
        model = importlib.import_module("basicsr.models.realesrgan_model")
        basicsr = importlib.import_module("basicsr")
    except ImportError:
        return None
    return types.SimpleNamespace(
        version=getattr(basicsr, "__version__", "?"),
        degradations=degradations,
        filter2D=img_process.filter2D,
        USMSharp=img_process.USMSharp,
        DiffJPEG=diffjpeg.DiffJPEG,
        RealESRGANDataset=dataset.RealESRGANDataset,
        RealESRGANModel=model.RealESRGANModel,
    )


SKIP_MESSAGE = (
    "basicsr is not importable: install basicsr==1.4.2 outside the project "
    "(pip install --no-deps --target DIR basicsr==1.4.2) and run with PYTHONPATH=DIR"
)


def crops(n: int, size: int, seed: int, source: str = "bundled://all") -> torch.Tensor:
    """n random size×size crops (random horizontal flips) of the photos at `source` that are large enough,
    uint8 [n, 3, size, size]."""
    images = []
    for ref in list_sources(source):
        try:
            images.append(load_hr(ref, min_size=size))
        except ImageRejected:
            continue
    if not images:
        raise ValueError(f"no image under {source!r} is at least {size}x{size}")
    rng = numpy_rng(seed)
    out = []
    for _ in range(n):
        img = images[int(rng.integers(len(images)))]
        y = int(rng.integers(img.shape[0] - size + 1))
        x = int(rng.integers(img.shape[1] - size + 1))
        c = img[y : y + size, x : x + size]
        if rng.uniform() < 0.5:
            c = c[:, ::-1]
        out.append(torch.from_numpy(np.ascontiguousarray(c)).permute(2, 0, 1))
    return torch.stack(out)


def basicsr_kernel(bs, k: KernelParams, pad_to: int = 21) -> np.ndarray:
    """BasicSR's kernel for explicit parameters, zero-padded to pad_to×pad_to as RealESRGANDataset does."""
    d = bs.degradations
    if k.kind == "sinc":
        kern = d.circular_lowpass_kernel(k.omega, k.size, pad_to=False)
    elif k.kind in ("iso", "aniso"):
        kern = d.bivariate_Gaussian(k.size, k.sigma_x, k.sigma_y, k.theta, isotropic=k.kind == "iso")
    elif k.kind.startswith("generalized"):
        kern = d.bivariate_generalized_Gaussian(
            k.size, k.sigma_x, k.sigma_y, k.theta, k.beta, isotropic=k.kind == "generalized_iso"
        )
    else:
        kern = d.bivariate_plateau(
            k.size, k.sigma_x, k.sigma_y, k.theta, k.beta, isotropic=k.kind == "plateau_iso"
        )
    pad = (pad_to - k.size) // 2
    return np.pad(kern, ((pad, pad), (pad, pad)))


def _bs_noise(bs, out: torch.Tensor, rp) -> torch.Tensor:
    torch.manual_seed(rp.noise_seed)
    gray = float(rp.noise_gray)
    if rp.noise == "gaussian":
        return bs.degradations.add_gaussian_noise_pt(
            out, sigma=rp.noise_sigma, gray_noise=gray, clip=True, rounds=False
        )
    return bs.degradations.add_poisson_noise_pt(
        out, scale=rp.poisson_scale, gray_noise=gray, clip=True, rounds=False
    )


def basicsr_chain_with_params(
    bs, hr: torch.Tensor, p: DegradationParams, cfg: DegradationConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """BasicSR's ops in Real-ESRGAN's order with our parameters: hr uint8 [1, 3, H, W] → (target, LR) uint8."""
    usm, jpeger = bs.USMSharp(radius=cfg.usm.radius), bs.DiffJPEG(differentiable=False)
    gt = hr.float() / 255.0
    ori_h, ori_w = gt.shape[-2:]
    gt_usm = usm(gt, weight=cfg.usm.weight, threshold=cfg.usm.threshold)
    out = gt_usm if cfg.usm_sharpen_input else gt
    rounds = [(cfg.first, p.first)] + ([(cfg.second, p.second)] if p.second else [])
    for i, (rc, rp) in enumerate(rounds):
        if rp.blur is not None:
            out = bs.filter2D(out, torch.FloatTensor(basicsr_kernel(bs, rp.blur))[None])
        if rc.resize_reference == "input":
            out = F.interpolate(out, scale_factor=rp.resize_scale, mode=rp.resize_mode)
        else:
            size = (int(ori_h / cfg.scale * rp.resize_scale), int(ori_w / cfg.scale * rp.resize_scale))
            out = F.interpolate(out, size=size, mode=rp.resize_mode)
        out = _bs_noise(bs, out, rp)
        if i < len(rounds) - 1:
            out = jpeger(torch.clamp(out, 0, 1), quality=torch.tensor([rp.jpeg_quality]))
    quality = torch.tensor([rounds[-1][1].jpeg_quality])
    sinc = torch.FloatTensor(basicsr_kernel(bs, p.final_sinc)) if p.final_sinc else None
    lr_size = (ori_h // cfg.scale, ori_w // cfg.scale)
    if not p.final_jpeg_last:
        out = jpeger(torch.clamp(out, 0, 1), quality=quality)
    out = F.interpolate(out, size=lr_size, mode=p.final_resize_mode)
    if sinc is not None:
        out = bs.filter2D(out, sinc[None])
    if p.final_jpeg_last:
        out = jpeger(torch.clamp(out, 0, 1), quality=quality)
    lr = torch.clamp((out * 255.0).round(), 0, 255).to(torch.uint8)
    target = torch.clamp((gt_usm * 255.0).round(), 0, 255).to(torch.uint8) if cfg.usm_sharpen_hr else hr
    return target, lr


#: Real-ESRGAN x4plus training options (train_realesrgan_x4plus.yml), as BasicSR's code reads them
REALESRGAN_DATASET_OPT = {
    "blur_kernel_size": 21,
    "kernel_list": ["iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso"],
    "kernel_prob": [0.45, 0.25, 0.12, 0.03, 0.12, 0.03],
    "sinc_prob": 0.1,
    "blur_sigma": [0.2, 3],
    "betag_range": [0.5, 4],
    "betap_range": [1, 2],
    "blur_kernel_size2": 21,
    "kernel_list2": ["iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso"],
    "kernel_prob2": [0.45, 0.25, 0.12, 0.03, 0.12, 0.03],
    "sinc_prob2": 0.1,
    "blur_sigma2": [0.2, 1.5],
    "betag_range2": [0.5, 4],
    "betap_range2": [1, 2],
    "final_sinc_prob": 0.8,
    "use_hflip": False,
    "use_rot": False,
}
REALESRGAN_MODEL_OPT = {
    "scale": 4,
    "resize_prob": [0.2, 0.7, 0.1],
    "resize_range": [0.15, 1.5],
    "gaussian_noise_prob": 0.5,
    "noise_range": [1, 30],
    "poisson_scale_range": [0.05, 3],
    "gray_noise_prob": 0.4,
    "jpeg_range": [30, 95],
    "second_blur_prob": 0.8,
    "resize_prob2": [0.3, 0.4, 0.3],
    "resize_range2": [0.3, 1.2],
    "gaussian_noise_prob2": 0.5,
    "noise_range2": [1, 25],
    "poisson_scale_range2": [0.05, 2.5],
    "gray_noise_prob2": 0.4,
    "jpeg_range2": [30, 95],
}


class BasicSRChain:
    """The genuine Real-ESRGAN synthesis: RealESRGANDataset's kernel sampling and RealESRGANModel.feed_data.

    The model is built without networks (only the attributes feed_data uses), its training-pair pool is
    disabled (it would swap samples between batches) and gt_size is the crop size (so its final random crop
    is the identity). Sampling uses BasicSR's global RNGs (random, numpy, torch), seeded per call.
    """

    def __init__(self, bs, crop: int, device: str = "cpu"):
        self.bs = bs
        self.device = torch.device(device)
        self._tmp = tempfile.TemporaryDirectory()
        dummy = Path(self._tmp.name) / "dummy.png"
        import cv2

        cv2.imwrite(str(dummy), np.zeros((400, 400, 3), np.uint8))
        meta = Path(self._tmp.name) / "meta.txt"
        meta.write_text("dummy.png\n")
        opt = dict(
            REALESRGAN_DATASET_OPT,
            dataroot_gt=self._tmp.name,
            meta_info=str(meta),
            io_backend={"type": "disk"},
        )
        self.dataset = bs.RealESRGANDataset(opt)
        model = bs.RealESRGANModel.__new__(bs.RealESRGANModel)
        model.opt = dict(REALESRGAN_MODEL_OPT, gt_size=crop)
        model.is_train = True
        model.device = self.device
        model.usm_sharpener = bs.USMSharp().to(self.device)
        jpeger = bs.DiffJPEG(differentiable=False).to(self.device)
        # DiffJPEG returns a channels-last view; with current torch, F.interpolate keeps that layout and
        # filter2D's .view() then fails. Making it contiguous changes no value.
        model.jpeger = lambda x, quality: jpeger(x, quality=quality).contiguous()
        model._dequeue_and_enqueue = lambda: None
        self.model = model

    def kernels(self, batch: int) -> dict[str, torch.Tensor]:
        items = [self.dataset[0] for _ in range(batch)]
        return {k: torch.stack([it[k] for it in items]) for k in ("kernel1", "kernel2", "sinc_kernel")}

    def degrade(
        self, gt: torch.Tensor, kernels: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """gt float [B, 3, H, W] in [0, 1] → (gt_usm, lq) float in [0, 1] via feed_data."""
        self.model.feed_data({"gt": gt, **kernels})
        return self.model.gt_usm, self.model.lq

    def __call__(self, hr: torch.Tensor, seed: int) -> torch.Tensor:
        """hr uint8 [B, 3, H, W] → LR uint8 [B, 3, H/4, W/4], BasicSR's RNGs seeded from `seed`."""
        import random

        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        kernels = self.kernels(hr.shape[0])
        _, lq = self.degrade(
            hr.float().div(255).to(self.device), {k: v.to(self.device) for k, v in kernels.items()}
        )
        return (lq * 255).round().clamp(0, 255).to(torch.uint8).cpu()
