#include "smartedit/euler_ancestral.h"

#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

namespace smartedit {

namespace {
constexpr double kBetaStart = 0.00085, kBetaEnd = 0.012;

// numpy.linspace(0, stop, n) in float64 (y_i = i * step, the last point exactly `stop`), cast to float32
std::vector<float> linspace_f32(double stop, int64_t n) {
  std::vector<float> out(n);
  const double step = n > 1 ? stop / static_cast<double>(n - 1) : 0.0;
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(static_cast<double>(i) * step);
  if (n > 1) out[n - 1] = static_cast<float>(stop);
  return out;
}

// numpy.interp(x, arange(len(fp)), fp) in float64, as numpy computes it
double interp_unit_grid(double x, const float* fp, int64_t n) {
  if (x <= 0.0) return fp[0];
  if (x >= static_cast<double>(n - 1)) return fp[n - 1];
  const auto j = static_cast<int64_t>(std::floor(x));
  if (static_cast<double>(j) == x) return fp[j];
  const double slope = (static_cast<double>(fp[j + 1]) - fp[j]) / 1.0;
  return slope * (x - static_cast<double>(j)) + fp[j];
}
}  // namespace

at::Tensor train_alphas_cumprod() {
  // training schedule, in torch fp32 as diffusers builds it (pow(x, 0.5): what Python's x ** 0.5 calls)
  const at::Tensor betas = at::linspace(std::pow(kBetaStart, 0.5), std::pow(kBetaEnd, 0.5), kTrainSteps,
                                        at::TensorOptions(at::kFloat)).pow(2);
  return at::cumprod(1.0 - betas, 0);  // [1000] fp32
}

at::Tensor linspace_sigmas(int64_t steps, std::vector<float>* timesteps) {
  const at::Tensor alphas_cumprod = train_alphas_cumprod();
  const at::Tensor train_sigmas = ((1 - alphas_cumprod) / alphas_cumprod).pow(0.5).contiguous();  // [1000] fp32

  // "linspace" spacing: timesteps 999 .. 0, sigmas interpolated at them, then a final 0
  std::vector<float> t = linspace_f32(static_cast<double>(kTrainSteps - 1), steps);
  timesteps->assign(t.rbegin(), t.rend());
  std::vector<float> sigmas(steps + 1, 0.0f);
  const float* fp = train_sigmas.data_ptr<float>();
  for (int64_t i = 0; i < steps; ++i)
    sigmas[i] = static_cast<float>(interp_unit_grid((*timesteps)[i], fp, kTrainSteps));
  return at::tensor(sigmas);  // [steps + 1] fp32
}

AncestralSchedule AncestralSchedule::build(int64_t steps) {
  if (steps < 1 || steps > kMaxSteps)
    throw std::invalid_argument("steps must be an integer from 1 to " + std::to_string(kMaxSteps) + ", got " +
                                std::to_string(steps));
  std::vector<float> timesteps;
  const at::Tensor s = linspace_sigmas(steps, &timesteps);  // [steps + 1] fp32
  const at::Tensor sigma_from = s.slice(0, 0, steps), sigma_to = s.slice(0, 1, steps + 1);
  const at::Tensor sigma_up = (sigma_to.pow(2) * (sigma_from.pow(2) - sigma_to.pow(2)) / sigma_from.pow(2)).pow(0.5);
  const at::Tensor sigma_down = (sigma_to.pow(2) - sigma_up.pow(2)).pow(0.5);
  AncestralSchedule out;
  out.table = at::stack({at::tensor(timesteps), sigma_from, sigma_up, sigma_down - sigma_from}, 1).contiguous();
  out.init_noise_sigma = s.max();
  return out;
}

at::Tensor ancestral_step(const at::Tensor& latents, const at::Tensor& eps, const at::Tensor& row,
                          const at::Tensor& noise) {
  const at::Tensor sigma = row[kSigma], sigma_up = row[kSigmaUp], dt = row[kDt];  // 0-dim fp32
  const at::Tensor sample = latents.to(at::kFloat);
  const at::Tensor pred_original = sample - sigma * eps;
  const at::Tensor derivative = (sample - pred_original) / sigma;
  at::Tensor prev = sample + derivative * dt;
  prev = prev + noise * sigma_up;
  return prev.to(eps.scalar_type());
}

}  // namespace smartedit
