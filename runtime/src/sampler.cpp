#include "smartedit/sampler.h"

#include <cmath>
#include <sstream>
#include <stdexcept>

#include "smartedit/euler_ancestral.h"

namespace smartedit {

namespace {
std::string number(double v) {
  std::ostringstream s;
  s << v;
  return s.str();
}

// DDIM, eta 0, no clipping (diffusers DDIMScheduler; SmartEdit's config: "leading" spacing, steps_offset 1,
// set_alpha_to_one false): timestep, sigma 0, sqrt(1 - a_t), sqrt(a_t), sqrt(a_prev), sqrt(1 - a_prev - std^2), each
// by the tensor expression diffusers' step evaluates
at::Tensor ddim_table(const SchedulerConfig& c, int64_t steps) {
  const int64_t n = c.num_train_timesteps;
  const at::Tensor alphas_cumprod = train_alphas_cumprod(c);
  const int64_t ratio = n / steps;  // the step's prev_timestep = t - n // steps, whatever the spacing
  const at::Tensor final_alpha = c.set_alpha_to_one ? at::scalar_tensor(1.0, at::kFloat) : alphas_cumprod[0];
  // set_timesteps' int64 timesteps, spacing by spacing (numpy float64, rounded half to even)
  std::vector<int64_t> timesteps(steps);
  for (int64_t i = 0; i < steps; ++i) {
    if (c.timestep_spacing == "linspace") {
      const double step = steps > 1 ? static_cast<double>(n - 1) / static_cast<double>(steps - 1) : 0.0;
      const int64_t j = steps - 1 - i;
      const double y = (steps > 1 && j == steps - 1) ? static_cast<double>(n - 1) : static_cast<double>(j) * step;
      timesteps[i] = static_cast<int64_t>(std::nearbyint(y));
    } else if (c.timestep_spacing == "leading") {
      timesteps[i] = (steps - 1 - i) * ratio + c.steps_offset;
    } else {  // trailing
      const double r = static_cast<double>(n) / static_cast<double>(steps);
      timesteps[i] = static_cast<int64_t>(std::nearbyint(static_cast<double>(n) - static_cast<double>(i) * r)) - 1;
    }
    if (timesteps[i] < 0 || timesteps[i] >= n)
      throw std::invalid_argument("steps " + std::to_string(steps) + " of ddim with timestep_spacing '" +
                                  c.timestep_spacing + "' and steps_offset " + std::to_string(c.steps_offset) +
                                  " read timestep " + std::to_string(timesteps[i]) + ", outside the " +
                                  std::to_string(n) + " training timesteps: take fewer steps");
  }
  std::vector<at::Tensor> rows;
  for (int64_t i = 0; i < steps; ++i) {
    const int64_t t = timesteps[i], prev = t - ratio;
    const at::Tensor alpha_t = alphas_cumprod[t], alpha_prev = prev >= 0 ? alphas_cumprod[prev] : final_alpha;
    const at::Tensor beta_t = at::rsub(alpha_t, 1), beta_prev = at::rsub(alpha_prev, 1);
    const at::Tensor variance = (beta_prev / beta_t) * at::rsub(alpha_t / alpha_prev, 1);
    const at::Tensor std_dev = 0.0 * variance.pow(0.5);
    rows.push_back(at::stack({at::scalar_tensor(static_cast<double>(t), at::kFloat), at::scalar_tensor(0.0, at::kFloat),
                              beta_t.pow(0.5), alpha_t.pow(0.5), alpha_prev.pow(0.5),
                              (at::rsub(alpha_prev, 1) - std_dev.pow(2)).pow(0.5)}));
  }
  return at::stack(rows).contiguous();
}

// Euler (no churn): timestep, sigma, dt = sigma_next - sigma * (0 + 1)
at::Tensor euler_table(const SchedulerConfig& c, int64_t steps, at::Tensor* init_noise_sigma) {
  std::vector<float> timesteps;
  const at::Tensor s = euler_sigmas(c, steps, &timesteps, init_noise_sigma);
  const at::Tensor sigma = s.slice(0, 0, steps);
  return at::stack({at::tensor(timesteps), sigma, s.slice(0, 1, steps + 1) - sigma * (0.0 + 1)}, 1).contiguous();
}
}  // namespace

const std::vector<SamplerInfo>& samplers() {
  static const std::vector<SamplerInfo> all = {
      {"euler-ancestral", kMaxSteps, true}, {"euler", kMaxSteps, true}, {"ddim", kMaxSteps - 1, true},
      {"dpm-solver++", kMaxSteps - 1, false}, {"unipc", kMaxSteps - 1, false}};
  return all;
}

void check_sampler(const std::string& sampler, int64_t steps) {
  std::string names;
  for (const SamplerInfo& s : samplers()) {
    names += (names.empty() ? "" : ", ") + std::string(s.name);
    if (sampler != s.name) continue;
    if (!s.native) {
      std::string native;
      for (const SamplerInfo& n : samplers())
        if (n.native) native += (native.empty() ? "" : ", ") + std::string(n.name);
      throw std::invalid_argument("sampler '" + sampler + "' is not run by the C++ runtime (it runs " + native +
                                  "): choose one of those with --sampler, or run this sampler from Python");
    }
    if (steps < 1 || steps > s.max_steps)
      throw std::invalid_argument("steps must be an integer from 1 to " + std::to_string(s.max_steps) + ", got " +
                                  std::to_string(steps) + " (sampler '" + sampler + "')");
    return;
  }
  throw std::invalid_argument("sampler must be one of " + names + ", got '" + sampler + "'");
}

Schedule Schedule::build(const std::string& sampler, int64_t steps, const SchedulerConfig& config) {
  check_sampler(sampler, steps);
  config.check();
  Schedule out;
  out.sampler = sampler;
  if (sampler == "euler-ancestral") {
    const AncestralSchedule a = AncestralSchedule::build(config, steps);
    out.columns = {"timestep", "sigma", "sigma_up", "dt = sigma_down - sigma"};
    out.table = a.table;
    out.init_noise_sigma = a.init_noise_sigma;
    out.noise = true;
  } else if (sampler == "euler") {
    out.columns = {"timestep", "sigma", "dt"};
    out.table = euler_table(config, steps, &out.init_noise_sigma);
  } else {  // ddim
    out.columns = {"timestep", "sigma", "sqrt_beta_t", "sqrt_alpha_t", "sqrt_alpha_prev", "direction"};
    out.table = ddim_table(config, steps);
    out.init_noise_sigma = at::scalar_tensor(1.0, at::kFloat);
  }
  return out;
}

at::Tensor sampler_step(const Schedule& schedule, const at::Tensor& latents, const at::Tensor& eps,
                        const at::Tensor& row, const at::Tensor& noise) {
  if (schedule.sampler == "euler-ancestral") return ancestral_step(latents, eps, row, noise);
  if (schedule.sampler == "euler") {  // smartedit/scheduler.py euler_step: in fp32, cast back
    const at::Tensor sigma = row[1], dt = row[2];
    const at::Tensor sample = latents.to(at::kFloat);
    const at::Tensor pred_original = sample - sigma * eps;
    const at::Tensor derivative = (sample - pred_original) / sigma;
    return (sample + derivative * dt).to(eps.scalar_type());
  }
  // ddim_step: in the latents' dtype (0-dim fp32 constants do not promote)
  const at::Tensor pred_original = (latents - row[2] * eps) / row[3];
  const at::Tensor direction = row[5] * eps;
  return row[4] * pred_original + direction;
}

void GuidanceSchedule::check() const {
  for (const auto& [name, a, b, on] : {std::tuple{"guidance interval", start, end, true},
                                       std::tuple{"text-only guidance interval", text_only_start, text_only_end,
                                                  text_only}})
    if (on && !(std::isfinite(a) && std::isfinite(b) && 0.0 <= a && a <= b && b <= 1.0))
      throw std::invalid_argument(std::string(name) + " must satisfy 0 <= start <= end <= 1, got [" + number(a) +
                                  ", " + number(b) + "]");
}

std::vector<int> GuidanceSchedule::branches(int64_t steps) const {
  std::vector<int> out;
  for (int64_t i = 0; i < steps; ++i) {
    const double f = steps > 1 ? static_cast<double>(i) / static_cast<double>(steps - 1) : 0.0;
    if (!(start <= f && f <= end))
      out.push_back(1);
    else if (text_only && text_only_start <= f && f <= text_only_end)
      out.push_back(2);
    else
      out.push_back(3);
  }
  return out;
}

}  // namespace smartedit
