// The denoising loop of a SmartEdit edit around an AOTInductor UNet package (smartedit-export --target aoti):
// 3-way CFG batch [cond; null+img; null+zero-img] -> eps = u + g_t (t - i) + g_i (i - u) -> the sampler
// (EulerAncestral by default; euler, ddim), `steps` times. The --fold-cfg unet package (smartedit-export --target aoti
// --fold-cfg: latents, sigma and the guidance scales in, the guided eps out) holds the input scaling, the batch and
// smartedit.model.cfg_combine itself: the loop then only steps the sampler on its output, giving each step of a
// guidance schedule the scales that reduce the 3-way combine to its own ((g_t, 1) text-only, (1, 1) conditional
// alone), as SmartEditPipeline.guided_eps does. The initial and ancestral noise come from a CPU generator
// seeded like SmartEditPipeline's (torch.Generator().manual_seed(seed)), drawn in diffusers' order, so the same seed
// gives the same latents. A guidance schedule's cheaper steps combine fewer branches (2-way text-only:
// i + g_t (t - i); conditional alone: t), as the Python pipeline does; the exported unet graph takes the 3-way batch
// only, so every step still evaluates 3 branches here (the same latents as Python's, no evaluation saved).
//
// DeepCache (smartedit/deepcache.py; DenoiseOptions::deepcache = N > 1, the packages of `smartedit-export --target
// aoti --deepcache [BRANCH]` given to load_deepcache): step i runs the whole UNet (the unet_deep package: eps and the
// feature cached at the export's skip branch) when i is a multiple of N, or when its CFG batch has more branches than
// the batch the feature was cached for (deepcache_whole_steps, Python's DeepCache.whole_steps rule for rule); the
// steps between run the unet_shallow package (conv_in, the branch's down layers, the last up layers) on the last
// whole step's feature. Both packages take the 3-way batch, like the unet graph: every step evaluates 3 branches and
// the feature is [3B,C,h,w]; the guidance schedule's branches still decide the whole steps, so the latents are the
// Python pipeline's on the same packages. N = 1 is the plain loop on the unet package, byte for byte.
#pragma once

#include <ATen/ATen.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "smartedit/euler_ancestral.h"
#include "smartedit/manifest.h"
#include "smartedit/package.h"
#include "smartedit/sampler.h"

namespace smartedit {

constexpr int64_t kMaxCacheInterval = 1000;  // smartedit/deepcache.py MAX_CACHE_INTERVAL: the samplers' largest steps

// std::invalid_argument naming the value when a DeepCache interval is outside [1, kMaxCacheInterval].
void check_deepcache_interval(int64_t interval);

// smartedit.deepcache.DeepCache(interval).whole_steps(branches): per step (its CFG branches, 3, 2 or 1), whether the
// whole UNet runs: i a multiple of `interval`, or more branches than the last whole step's. Interval 1: all true.
std::vector<bool> deepcache_whole_steps(int64_t interval, const std::vector<int>& branches);

struct DenoiseInputs {
  at::Tensor image_latents;     // [B,4,h,w]  VAE latents of the input image (mode, already scaled)
  at::Tensor prompt_embeds;     // [B,77,D]   from the qformer_bim graph
  at::Tensor null_text_embeds;  // [1,77,D]   the checkpoint's null-text embedding
  at::Tensor bim_residual;      // [B,C0,16,16] from the qformer_bim graph
};

struct DenoiseOptions {
  int64_t steps = EditDefaults().steps;  // an edit's defaults: the manifest's (Editor's caller), SmartEdit's here
  double guidance_scale = EditDefaults().guidance_scale;              // text
  double image_guidance_scale = EditDefaults().image_guidance_scale;  // image
  uint64_t seed = EditDefaults().seed;
  std::string sampler;         // empty: the artifacts' (Editor), euler-ancestral (Denoiser)
  // the schedule's config: empty, the manifest's for the sampler (Editor), SmartEdit's (Denoiser)
  std::optional<SchedulerConfig> scheduler;
  GuidanceSchedule guidance;   // default: 3-way on every step
  int64_t deepcache = 1;       // DeepCache interval N in [1, 1000]: the whole UNet every N steps (1: the plain loop)
};

class Denoiser {
 public:
  // `unet_package`: OUT/aoti/unet.pt2 (the plain unet graph, or the --fold-cfg one: told apart by its inputs);
  // `device` as it was compiled for.
  Denoiser(const std::string& unet_package, const c10::Device& device);

  // The DeepCache pair of one export (OUT/aoti/unet_deep.pt2 and unet_shallow.pt2, `smartedit-export --target aoti
  // --deepcache [BRANCH]`), which run() needs for options.deepcache > 1; std::invalid_argument when a package holds
  // another graph, or runs in another precision than the unet package.
  void load_deepcache(const std::string& deep_package, const std::string& shallow_package);
  bool has_deepcache() const { return deep_ != nullptr; }

  // -> latents [B,4,h,w] ready for the vae_decoder graph, in the package's dtype (the loop runs in it). Inputs may
  // live anywhere and have any float dtype: they are moved to the device and cast. Bad options or inputs (shapes,
  // NaN/inf, non-finite guidance scales, a sampler it does not run, steps outside the sampler's bound, a guidance
  // schedule out of [0, 1], a DeepCache interval outside [1, 1000] or above 1 without load_deepcache) are
  // std::invalid_argument before any work;
  // latents that turn non-finite are std::runtime_error naming the first step where they did.
  at::Tensor run(const DenoiseInputs& inputs, const DenoiseOptions& options, double* ms_per_step = nullptr);

 private:
  Package unet_;
  bool folded_ = false;  // the --fold-cfg unet graph: guided eps from unscaled latents, no batch or combine here
  std::unique_ptr<Package> deep_, shallow_;  // DeepCache (load_deepcache): unet_deep, unet_shallow
  c10::Device device_;
};

}  // namespace smartedit
