// The samplers of the denoising loop and its guidance schedule, as smartedit/scheduler.py and smartedit/guidance.py
// define them: each sampler a table built up front (row i: every constant step i reads, the same fp32 values as
// diffusers' scheduler computes) and a step on one row. This runtime runs euler-ancestral (the official sampler),
// euler and ddim; the multistep solvers (dpm-solver++, unipc) are refused by name. tests/test_cpp_runtime.py checks
// every table against Python's bit for bit, the names and step bounds against smartedit/scheduler.py SAMPLERS, and
// the loops against the Python pipeline's.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <vector>

#include "smartedit/euler_ancestral.h"

namespace smartedit {

// Every sampler smartedit/scheduler.py knows, in its order, with its step bound; `native`: this runtime runs it.
struct SamplerInfo {
  const char* name;
  int64_t max_steps;
  bool native;
};
const std::vector<SamplerInfo>& samplers();
constexpr const char* kDefaultSampler = "euler-ancestral";

// std::invalid_argument naming the value: an unknown sampler, one this runtime does not run, steps outside its bound.
void check_sampler(const std::string& sampler, int64_t steps);

struct Schedule {
  std::string sampler;
  std::vector<std::string> columns;  // the table's columns (the first two: timestep, sigma; sigma 0: input unscaled)
  at::Tensor table;                  // [steps, K] fp32 (CPU)
  at::Tensor init_noise_sigma;       // 0-dim fp32
  bool noise = false;                // draws one noise tensor per step (ancestral)

  // check_sampler, then `config` (SchedulerConfig::check; also steps whose timesteps fall outside the training
  // schedule, naming them)
  static Schedule build(const std::string& sampler, int64_t steps, const SchedulerConfig& config);
};

// One update: latents [B,4,h,w], eps [B,4,h,w] (guided), row [K] (one table row), noise [B,4,h,w] (an ancestral
// sampler; undefined otherwise) -> latents in eps's dtype, with diffusers' dtype promotions.
at::Tensor sampler_step(const Schedule& schedule, const at::Tensor& latents, const at::Tensor& eps,
                        const at::Tensor& row, const at::Tensor& noise);

// Which CFG batch each step runs (smartedit/guidance.py GuidanceSchedule): step i of n sits at f = i / (n - 1) (0 for
// n = 1); steps with f in [start, end] are guided, 2-way text-only where f is also in the text-only range, 3-way
// otherwise; the others run the conditional branch alone.
struct GuidanceSchedule {
  double start = 0.0, end = 1.0;
  bool text_only = false;
  double text_only_start = 0.0, text_only_end = 1.0;

  void check() const;  // 0 <= start <= end <= 1 for both ranges (std::invalid_argument naming the values)
  std::vector<int> branches(int64_t steps) const;  // 3, 2 or 1 per step
  bool is_default() const { return start == 0.0 && end == 1.0 && !text_only; }
};

}  // namespace smartedit
