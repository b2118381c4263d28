"""Weighted Diffusion-DPO: the pair losses (`losses`), pair image access (`data`) and the training loop (`loop`)."""
