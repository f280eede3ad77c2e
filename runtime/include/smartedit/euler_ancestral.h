// EulerAncestral with SmartEdit's scheduler config (diffusers EulerAncestralDiscreteScheduler: 1000 train steps,
// scaled_linear betas 0.00085..0.012, "linspace" timestep spacing, epsilon prediction), as a table built up front.
// The same ops in the same dtypes as diffusers (and smartedit/scheduler.py), so for the same seed the latents
// agree bit for bit on the CPU: tests/test_cpp_runtime.py checks the table and the loop against Python.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace smartedit {

constexpr int64_t kMaxSteps = 1000;  // smartedit/scheduler.py MAX_STEPS: the training timesteps (more would repeat them)
constexpr int64_t kTrainSteps = 1000;

// The training schedule's alphas_cumprod [1000] fp32, as diffusers builds it (scaled_linear 0.00085..0.012).
at::Tensor train_alphas_cumprod();
// The Euler samplers' sigmas for `steps` ("linspace" spacing): [steps + 1] fp32 ending with 0; `timesteps` gets the
// steps' timesteps (999 .. 0, fp32).
at::Tensor linspace_sigmas(int64_t steps, std::vector<float>* timesteps);

enum Column : int64_t { kTimestep = 0, kSigma = 1, kSigmaUp = 2, kDt = 3 };

struct AncestralSchedule {
  at::Tensor table;             // [steps, 4] fp32 (CPU): timestep, sigma, sigma_up, dt = sigma_down - sigma
  at::Tensor init_noise_sigma;  // 0-dim fp32: the largest sigma (the initial noise's scale with linspace spacing)

  static AncestralSchedule build(int64_t steps);  // steps in [1, kMaxSteps], else std::invalid_argument
};

// One update: latents [B,4,h,w], eps [B,4,h,w] (guided), row [4] (one table row), noise [B,4,h,w]
// -> latents in eps's dtype. The update runs in fp32; 0-dim fp32 sigmas do not promote fp16 tensors.
at::Tensor ancestral_step(const at::Tensor& latents, const at::Tensor& eps, const at::Tensor& row,
                          const at::Tensor& noise);

}  // namespace smartedit
