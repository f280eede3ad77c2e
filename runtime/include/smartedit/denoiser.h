// The denoising loop of a SmartEdit edit around an AOTInductor UNet package (smartedit-export --target aoti):
// 3-way CFG batch [cond; null+img; null+zero-img] -> eps = u + g_t (t - i) + g_i (i - u) -> the sampler
// (EulerAncestral by default; euler, ddim), `steps` times. The initial and ancestral noise come from a CPU generator
// seeded like SmartEditPipeline's (torch.Generator().manual_seed(seed)), drawn in diffusers' order, so the same seed
// gives the same latents. A guidance schedule's cheaper steps combine fewer branches (2-way text-only:
// i + g_t (t - i); conditional alone: t), as the Python pipeline does; the exported unet graph takes the 3-way batch
// only, so every step still evaluates 3 branches here (the same latents as Python's, no evaluation saved).
#pragma once

#include <ATen/ATen.h>

#include <memory>
#include <string>

#include "smartedit/euler_ancestral.h"
#include "smartedit/package.h"
#include "smartedit/sampler.h"

namespace smartedit {

struct DenoiseInputs {
  at::Tensor image_latents;     // [B,4,h,w]  VAE latents of the input image (mode, already scaled)
  at::Tensor prompt_embeds;     // [B,77,D]   from the qformer_bim graph
  at::Tensor null_text_embeds;  // [1,77,D]   the checkpoint's null-text embedding
  at::Tensor bim_residual;      // [B,C0,16,16] from the qformer_bim graph
};

struct DenoiseOptions {
  int64_t steps = 100;
  double guidance_scale = 7.5;        // text
  double image_guidance_scale = 1.5;  // image
  uint64_t seed = 0;
  std::string sampler;         // empty: the artifacts' (Editor), euler-ancestral (Denoiser)
  GuidanceSchedule guidance;   // default: 3-way on every step
};

class Denoiser {
 public:
  // `unet_package`: OUT/aoti/unet.pt2 (the plain unet graph, not --fold-cfg); `device` as it was compiled for.
  Denoiser(const std::string& unet_package, const c10::Device& device);

  // -> latents [B,4,h,w] ready for the vae_decoder graph, in the package's dtype (the loop runs in it). Inputs may
  // live anywhere and have any float dtype: they are moved to the device and cast. Bad options or inputs (shapes,
  // NaN/inf, non-finite guidance scales, a sampler it does not run, steps outside the sampler's bound, a guidance
  // schedule out of [0, 1]) are std::invalid_argument before any work;
  // latents that turn non-finite are std::runtime_error naming the first step where they did.
  at::Tensor run(const DenoiseInputs& inputs, const DenoiseOptions& options, double* ms_per_step = nullptr);

 private:
  Package unet_;
  c10::Device device_;
};

}  // namespace smartedit
