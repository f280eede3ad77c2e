"""The runtime stage interface: every backend runs the five graphs of the export contract by name.

    run(graph, {input name: tensor}) -> {output name: tensor}     (names and shapes: smartedit.export graph specs)

SmartEditPipeline drives any backend through it, so the same edit runs on eager PyTorch (the reference), ONNX Runtime
and, later, TensorRT, CUDA graphs and AOTInductor. `guided_eps` is the one composite: the 3-way CFG step, computed
from the plain `unet` graph here, or taken whole from a graph exported with the CFG folded in.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

GRAPHS = ("llava", "qformer_bim", "unet", "vae_encoder", "vae_decoder")


def read_manifest(artifacts: str | Path) -> tuple[Path, dict]:
    """An smartedit-export output folder -> (its path, its manifest.json), or a clear error if it is not one."""
    root = Path(artifacts)
    path = root / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {root} is not an smartedit-export output folder")
    return root, json.loads(path.read_text())


class StageBackend:
    name = "base"
    fold_cfg = False  # True when the `unet` graph takes latents + sigma + guidance and returns guided eps

    def run(self, graph: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def guided_eps(self, latents: torch.Tensor, image_latents: torch.Tensor, timestep: torch.Tensor,
                   sigma: torch.Tensor, prompt_embeds: torch.Tensor, null_text_embeds: torch.Tensor,
                   bim_residual: torch.Tensor, guidance_scale: float, image_guidance_scale: float) -> torch.Tensor:
        """One CFG step: latents [B,4,h,w] (unscaled) -> eps u + g_t (t - i) + g_i (i - u), [B,4,h,w]."""
        t = timestep.reshape(1).float()
        if self.fold_cfg:
            return self.run("unet", {
                "latents": latents, "image_latents": image_latents, "timestep": t,
                "sigma": sigma.reshape(1).float(), "prompt_embeds": prompt_embeds, "bim_residual": bim_residual,
                "guidance": torch.tensor([guidance_scale, image_guidance_scale], device=latents.device)})["eps"]
        b = latents.shape[0]
        x = latents / ((sigma**2 + 1) ** 0.5)  # EulerAncestral scale_model_input
        null = null_text_embeds.expand(b, -1, -1)
        sample = torch.cat([torch.cat([x, x, x]),
                            torch.cat([image_latents, image_latents, torch.zeros_like(image_latents)])], dim=1)
        eps = self.run("unet", {"sample": sample, "timestep": t, "prompt_embeds": torch.cat([prompt_embeds, null, null]),
                                "bim_residual": bim_residual})["eps"]
        e_text, e_image, e_uncond = eps.chunk(3)
        return e_uncond + guidance_scale * (e_text - e_image) + image_guidance_scale * (e_image - e_uncond)
