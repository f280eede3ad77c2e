#include "smartedit/euler_ancestral.h"

#include <cmath>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace smartedit {

namespace {
std::string number(double v) {
  std::ostringstream s;
  s.precision(17);
  s << v;
  return s.str();
}

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

SchedulerConfig SchedulerConfig::smartedit(const std::string& sampler) {
  SchedulerConfig c;
  if (sampler == "ddim") c.timestep_spacing = "leading";  // DDIMScheduler's default; the Euler classes': linspace
  return c;
}

void SchedulerConfig::check() const {
  const auto bad = [](const std::string& key, const std::string& value, const std::string& why) {
    return std::invalid_argument("sampler config " + key + " = " + value + ": " + why);
  };
  if (num_train_timesteps < 2 || num_train_timesteps > 100000)
    throw bad("num_train_timesteps", std::to_string(num_train_timesteps), "must be an integer in [2, 100000]");
  for (const auto& [key, v] : {std::pair{"beta_start", beta_start}, std::pair{"beta_end", beta_end}})
    if (!std::isfinite(v) || v <= 0.0 || v >= 1.0) throw bad(key, number(v), "must be a number in (0, 1)");
  if (beta_schedule != "linear" && beta_schedule != "scaled_linear")
    throw bad("beta_schedule", "'" + beta_schedule + "'",
              "the C++ runtime builds 'linear' and 'scaled_linear' betas only");
  if (timestep_spacing != "linspace" && timestep_spacing != "leading" && timestep_spacing != "trailing")
    throw bad("timestep_spacing", "'" + timestep_spacing + "'", "must be 'linspace', 'leading' or 'trailing'");
  if (steps_offset < 0 || steps_offset >= num_train_timesteps)
    throw bad("steps_offset", std::to_string(steps_offset), "must be an integer in [0, num_train_timesteps)");
  if (prediction_type != "epsilon")
    throw bad("prediction_type", "'" + prediction_type + "'", "the C++ runtime runs epsilon prediction only");
}

bool SchedulerConfig::operator==(const SchedulerConfig& o) const {
  return num_train_timesteps == o.num_train_timesteps && beta_start == o.beta_start && beta_end == o.beta_end &&
         beta_schedule == o.beta_schedule && timestep_spacing == o.timestep_spacing &&
         steps_offset == o.steps_offset && prediction_type == o.prediction_type &&
         set_alpha_to_one == o.set_alpha_to_one;
}

std::string SchedulerConfig::to_json() const {
  return "{\"num_train_timesteps\": " + std::to_string(num_train_timesteps) + ", \"beta_start\": " +
         number(beta_start) + ", \"beta_end\": " + number(beta_end) + ", \"beta_schedule\": \"" + beta_schedule +
         "\", \"timestep_spacing\": \"" + timestep_spacing + "\", \"steps_offset\": " + std::to_string(steps_offset) +
         ", \"prediction_type\": \"" + prediction_type + "\", \"set_alpha_to_one\": " +
         (set_alpha_to_one ? "true" : "false") + "}";
}

at::Tensor train_alphas_cumprod(const SchedulerConfig& c) {
  // the training schedule, in torch fp32 as diffusers builds it (pow(x, 0.5): what Python's x ** 0.5 calls)
  const auto f32 = at::TensorOptions(at::kFloat);
  const at::Tensor betas =
      c.beta_schedule == "linear"
          ? at::linspace(c.beta_start, c.beta_end, c.num_train_timesteps, f32)
          : at::linspace(std::pow(c.beta_start, 0.5), std::pow(c.beta_end, 0.5), c.num_train_timesteps, f32).pow(2);
  return at::cumprod(1.0 - betas, 0);  // [num_train_timesteps] fp32
}

at::Tensor euler_sigmas(const SchedulerConfig& c, int64_t steps, std::vector<float>* timesteps,
                        at::Tensor* init_noise_sigma) {
  const int64_t n = c.num_train_timesteps;
  const at::Tensor alphas_cumprod = train_alphas_cumprod(c);
  const at::Tensor train_sigmas = ((1 - alphas_cumprod) / alphas_cumprod).pow(0.5).contiguous();  // [n] fp32

  // diffusers' set_timesteps, spacing by spacing (numpy float64, cast to float32)
  timesteps->assign(steps, 0.0f);
  if (c.timestep_spacing == "linspace") {  // n - 1 .. 0
    const std::vector<float> t = linspace_f32(static_cast<double>(n - 1), steps);
    timesteps->assign(t.rbegin(), t.rend());
  } else if (c.timestep_spacing == "leading") {  // (steps - 1 - i) * (n // steps), rounded, + steps_offset
    const int64_t ratio = n / steps;
    for (int64_t i = 0; i < steps; ++i)
      (*timesteps)[i] = static_cast<float>((steps - 1 - i) * ratio) + static_cast<float>(c.steps_offset);
  } else {  // trailing: round(arange(n, 0, -n / steps)) - 1
    const double ratio = static_cast<double>(n) / static_cast<double>(steps);
    for (int64_t i = 0; i < steps; ++i)
      (*timesteps)[i] = static_cast<float>(std::nearbyint(static_cast<double>(n) - static_cast<double>(i) * ratio)) - 1.0f;
  }
  std::vector<float> sigmas(steps + 1, 0.0f);
  const float* fp = train_sigmas.data_ptr<float>();
  for (int64_t i = 0; i < steps; ++i) sigmas[i] = static_cast<float>(interp_unit_grid((*timesteps)[i], fp, n));
  const at::Tensor s = at::tensor(sigmas);  // [steps + 1] fp32
  *init_noise_sigma = c.timestep_spacing == "leading" ? (s.max().pow(2) + 1).pow(0.5) : s.max();
  return s;
}

AncestralSchedule AncestralSchedule::build(const SchedulerConfig& config, int64_t steps) {
  config.check();
  if (steps < 1 || steps > kMaxSteps)
    throw std::invalid_argument("steps must be an integer from 1 to " + std::to_string(kMaxSteps) + ", got " +
                                std::to_string(steps));
  std::vector<float> timesteps;
  AncestralSchedule out;
  const at::Tensor s = euler_sigmas(config, steps, &timesteps, &out.init_noise_sigma);  // [steps + 1] fp32
  const at::Tensor sigma_from = s.slice(0, 0, steps), sigma_to = s.slice(0, 1, steps + 1);
  const at::Tensor sigma_up = (sigma_to.pow(2) * (sigma_from.pow(2) - sigma_to.pow(2)) / sigma_from.pow(2)).pow(0.5);
  const at::Tensor sigma_down = (sigma_to.pow(2) - sigma_up.pow(2)).pow(0.5);
  out.table = at::stack({at::tensor(timesteps), sigma_from, sigma_up, sigma_down - sigma_from}, 1).contiguous();
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
