// The schedule every sampler of this runtime is built from, and EulerAncestral (diffusers
// EulerAncestralDiscreteScheduler) as a table built up front. The schedule comes from a diffusers scheduler config:
// an export's manifest records the one its sampler runs with (smartedit/scheduler.py Sampler.record), and the edit
// builds from that; the commands that read no manifest (denoise, schedule) build from SmartEdit's (SchedulerConfig's
// defaults: smartedit/config.py SCHEDULER_CONFIG with the diffusers defaults of each sampler's class). The same ops in
// the same dtypes as diffusers (and smartedit/scheduler.py), so for the same seed the latents agree bit for bit on
// the CPU: tests/test_cpp_runtime.py checks the tables and the loop against Python.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <vector>

namespace smartedit {

constexpr int64_t kMaxSteps = 1000;  // smartedit/scheduler.py MAX_STEPS: the training timesteps (more would repeat them)

// What this runtime reads of a diffusers scheduler config: the keys its tables depend on. check() refuses, naming
// the key and its value, a config it cannot build (a beta_schedule other than linear / scaled_linear, a spacing other
// than linspace / leading / trailing, a prediction_type other than epsilon, betas out of (0, 1)).
struct SchedulerConfig {
  int64_t num_train_timesteps = 1000;
  double beta_start = 0.00085, beta_end = 0.012;
  std::string beta_schedule = "scaled_linear";
  std::string timestep_spacing = "linspace";  // "leading" for ddim (SmartEdit(sampler))
  int64_t steps_offset = 1;
  std::string prediction_type = "epsilon";
  bool set_alpha_to_one = false;  // ddim: the last step's alpha_prev is 1 (true) or alphas_cumprod[0] (false)

  // SmartEdit's config of `sampler` (smartedit/scheduler.py SAMPLERS[sampler].record()["config"]).
  static SchedulerConfig smartedit(const std::string& sampler);
  void check() const;
  bool operator==(const SchedulerConfig& o) const;
  std::string to_json() const;  // {"num_train_timesteps": ..., ...}: the keys above, as diffusers names them
};

// The training schedule's alphas_cumprod [num_train_timesteps] fp32, as diffusers builds it.
at::Tensor train_alphas_cumprod(const SchedulerConfig& config);
// The Euler samplers' timesteps (fp32, as diffusers' set_timesteps computes them for the config's spacing) and
// sigmas [steps + 1] fp32 ending with 0; `init_noise_sigma` gets the initial noise's scale (the largest sigma;
// sqrt(max^2 + 1) for "leading" spacing).
at::Tensor euler_sigmas(const SchedulerConfig& config, int64_t steps, std::vector<float>* timesteps,
                        at::Tensor* init_noise_sigma);

enum Column : int64_t { kTimestep = 0, kSigma = 1, kSigmaUp = 2, kDt = 3 };

struct AncestralSchedule {
  at::Tensor table;             // [steps, 4] fp32 (CPU): timestep, sigma, sigma_up, dt = sigma_down - sigma
  at::Tensor init_noise_sigma;  // 0-dim fp32

  // steps in [1, kMaxSteps], else std::invalid_argument; config.check() first
  static AncestralSchedule build(const SchedulerConfig& config, int64_t steps);
};

// One update: latents [B,4,h,w], eps [B,4,h,w] (guided), row [4] (one table row), noise [B,4,h,w]
// -> latents in eps's dtype. The update runs in fp32; 0-dim fp32 sigmas do not promote fp16 tensors.
at::Tensor ancestral_step(const at::Tensor& latents, const at::Tensor& eps, const at::Tensor& row,
                          const at::Tensor& noise);

}  // namespace smartedit
