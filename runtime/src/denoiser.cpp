#include "smartedit/denoiser.h"

#include <ATen/CPUGeneratorImpl.h>

#include <chrono>
#include <cmath>
#include <sstream>
#include <stdexcept>
#include <tuple>
#include <vector>

#include "smartedit/checks.h"
#include "smartedit/euler_ancestral.h"

namespace smartedit {

namespace {
std::string shape_of(const at::Tensor& t) {
  std::ostringstream s;
  s << t.sizes();
  return s.str();
}

std::string number(double v) {
  std::ostringstream s;
  s << v;
  return s.str();
}

void check_options(const DenoiseOptions& o) {
  check_sampler(o.sampler.empty() ? kDefaultSampler : o.sampler, o.steps);
  if (o.scheduler) o.scheduler->check();
  o.guidance.check();
  check_deepcache_interval(o.deepcache);
  for (const auto& [name, v] : {std::pair{"guidance_scale", o.guidance_scale},
                                std::pair{"image_guidance_scale", o.image_guidance_scale}})
    if (!std::isfinite(v)) throw std::invalid_argument(std::string(name) + " must be a finite number, got " + number(v));
}

void check_inputs(const DenoiseInputs& x) {
  const auto& l = x.image_latents;
  if (!l.defined() || l.dim() != 4 || l.size(1) != 4)
    throw std::invalid_argument("image_latents must be [B,4,h,w], got " + (l.defined() ? shape_of(l) : "nothing"));
  // the unet graph's sample is [3B,8,8*h8,8*w8] (smartedit/graphs/unet.py): a bare package carries no spec to say so
  if (l.size(2) % 8 || l.size(3) % 8 || l.size(2) == 0 || l.size(3) == 0)
    throw std::invalid_argument("image_latents must be [B,4,h,w] with h and w positive multiples of 8 (images of a "
                                "multiple of 64 px), got " + shape_of(l));
  const int64_t b = l.size(0);
  const auto& p = x.prompt_embeds;
  if (!p.defined() || p.dim() != 3 || p.size(0) != b)
    throw std::invalid_argument("prompt_embeds must be [" + std::to_string(b) + ",77,D], got " +
                                (p.defined() ? shape_of(p) : "nothing"));
  const auto& n = x.null_text_embeds;
  if (!n.defined() || n.dim() != 3 || n.size(0) != 1 || n.size(1) != p.size(1) || n.size(2) != p.size(2))
    throw std::invalid_argument("null_text_embeds must be [1," + std::to_string(p.size(1)) + "," +
                                std::to_string(p.size(2)) + "], got " + (n.defined() ? shape_of(n) : "nothing"));
  const auto& r = x.bim_residual;
  if (!r.defined() || r.dim() != 4 || r.size(0) != b)
    throw std::invalid_argument("bim_residual must be [" + std::to_string(b) + ",C0,16,16], got " +
                                (r.defined() ? shape_of(r) : "nothing"));
  check_finite_input(l, "image_latents");
  check_finite_input(p, "prompt_embeds");
  check_finite_input(n, "null_text_embeds");
  check_finite_input(r, "bim_residual");
}
}  // namespace

void check_deepcache_interval(int64_t n) {
  if (n < 1 || n > kMaxCacheInterval)
    throw std::invalid_argument("DeepCache interval must be an integer in [1, " + std::to_string(kMaxCacheInterval) +
                                "] (the whole UNet every N steps; 1: every step), got " + std::to_string(n));
}

std::vector<bool> deepcache_whole_steps(int64_t interval, const std::vector<int>& branches) {
  check_deepcache_interval(interval);
  std::vector<bool> out;
  int cached = 0;  // the branches of the batch the feature was cached for (0: none yet)
  for (size_t i = 0; i < branches.size(); ++i) {
    const bool whole = static_cast<int64_t>(i) % interval == 0 || branches[i] > cached;
    if (whole) cached = branches[i];
    out.push_back(whole);
  }
  return out;
}

Denoiser::Denoiser(const std::string& unet_package, const c10::Device& device)
    : unet_(unet_package, device), device_(device) {
  if (unet_.graph() != "unet")
    throw std::invalid_argument(unet_package + " holds the " + unet_.graph() + " graph, not unet");
  folded_ = unet_.input_name(0) == "latents";  // the --fold-cfg graph's first input (smartedit/graphs/unet.py)
}

void Denoiser::load_deepcache(const std::string& deep_package, const std::string& shallow_package) {
  auto deep = std::make_unique<Package>(deep_package, device_);
  auto shallow = std::make_unique<Package>(shallow_package, device_);
  for (const auto& [path, package, graph] : {std::tuple{&deep_package, deep.get(), "unet_deep"},
                                             std::tuple{&shallow_package, shallow.get(), "unet_shallow"}}) {
    if (package->graph() != graph)
      throw std::invalid_argument(*path + " holds the " + package->graph() + " graph, not " + graph);
    if (package->input_dtype(0) != unet_.input_dtype(0))  // the loop runs in the unet's dtype: one export's packages
      throw std::invalid_argument(*path + " runs in " + std::string(c10::toString(package->input_dtype(0))) +
                                  ", the unet package in " + c10::toString(unet_.input_dtype(0)) +
                                  ": use the packages of one export");
  }
  deep_ = std::move(deep);
  shallow_ = std::move(shallow);
}

at::Tensor Denoiser::run(const DenoiseInputs& x, const DenoiseOptions& o, double* ms_per_step) {
  check_options(o);
  if (o.deepcache > 1 && !has_deepcache())
    throw std::invalid_argument("DeepCache interval " + std::to_string(o.deepcache) + " needs the unet_deep and "
                                "unet_shallow packages (smartedit-export --target aoti --deepcache [BRANCH]), and "
                                "this Denoiser has none loaded (Denoiser::load_deepcache)");
  check_inputs(x);
  const at::ScalarType dtype = unet_.input_dtype(0);  // the package's precision: the loop runs in it
  const auto on_device = [&](const at::Tensor& t) { return t.to(device_, dtype).contiguous(); };
  const at::Tensor img = on_device(x.image_latents), prompt = on_device(x.prompt_embeds);
  const at::Tensor null = on_device(x.null_text_embeds), residual = on_device(x.bim_residual);
  const int64_t b = img.size(0);

  const std::string sampler = o.sampler.empty() ? kDefaultSampler : o.sampler;
  const Schedule schedule =
      Schedule::build(sampler, o.steps, o.scheduler ? *o.scheduler : SchedulerConfig::smartedit(sampler));
  const at::Tensor table = schedule.table.to(device_);
  const std::vector<int> branches = o.guidance.branches(o.steps);
  const bool deepcache = o.deepcache > 1;  // 1: the plain loop on the unet package, as without DeepCache
  const std::vector<bool> whole = deepcache_whole_steps(o.deepcache, branches);
  // noise exactly as SmartEditPipeline.denoise + diffusers draw it: initial fp32, then (an ancestral sampler) one
  // tensor per step in the eps dtype, all from one CPU generator (the same mt19937 stream as
  // torch.Generator().manual_seed(seed))
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(o.seed);
  const at::Tensor initial = at::randn(img.sizes(), gen, at::TensorOptions(at::kFloat));
  std::vector<at::Tensor> noise;
  for (int64_t i = 0; schedule.noise && i < o.steps; ++i)
    noise.push_back(at::randn(img.sizes(), gen, at::TensorOptions(dtype)));
  const at::Tensor step_noise = schedule.noise ? at::stack(noise).to(device_) : at::Tensor();  // [steps,B,4,h,w]

  at::Tensor latents = initial.to(device_, dtype) * schedule.init_noise_sigma;
  const at::Tensor null3 = null.expand({b, -1, -1});
  const at::Tensor embeds = at::cat({prompt, null3, null3}).contiguous();                   // [3B,77,D]
  const at::Tensor image_part = at::cat({img, img, at::zeros_like(img)});                   // [3B,4,h,w]
  // one flag per step, reduced on the device without a sync: a non-finite result names the step it first appeared at
  std::vector<at::Tensor> finite;
  finite.reserve(o.steps);
  at::Tensor feature;  // DeepCache: [3B,C,h,w], the cached feature of the last whole step
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < o.steps; ++i) {
    const at::Tensor row = table[i];
    const at::Tensor t = row[kTimestep].reshape({1}).contiguous();
    if (folded_ && !deepcache) {  // the graph scales, batches and combines: the scales that reduce its 3-way
                                  // combine to the step's, as SmartEditPipeline.guided_eps gives them
      const double g_text = branches[i] == 1 ? 1.0 : o.guidance_scale;
      const double g_image = branches[i] == 3 ? o.image_guidance_scale : 1.0;
      const at::Tensor guidance = at::tensor({static_cast<float>(g_text), static_cast<float>(g_image)});
      const at::Tensor guided =
          unet_.run({latents, img, t, row[kSigma].reshape({1}), prompt, residual, guidance})[0].to(dtype);
      latents = sampler_step(schedule, latents, guided, row, schedule.noise ? step_noise[i] : at::Tensor());
      finite.push_back(at::isfinite(latents).all());
      continue;
    }
    const at::Tensor x = latents / (row[kSigma].pow(2) + 1).pow(0.5);  // scale_model_input (sigma 0: x / 1)
    const at::Tensor sample = at::cat({at::cat({x, x, x}), image_part}, 1).contiguous();   // [3B,8,h,w]
    at::Tensor eps;                                                                           // [3B,4,h,w]
    if (!deepcache) {
      eps = unet_.run({sample, t, embeds, residual})[0];
    } else if (whole[i]) {  // the whole UNet, and the feature the steps until the next whole one reuse
      auto out = deep_->run({sample, t, embeds, residual});
      eps = out[0];
      feature = out[1];
    } else {  // the shallow path on the cached feature (3-way, as cached: the graphs take no other batch)
      eps = shallow_->run({sample, t, embeds, residual, feature})[0];
    }
    // smartedit.model.cfg_combine, written again here (no Python in this process): u + g_t (t - i) + g_i (i - u) in
    // fp32 (g_t amplifies fp16 rounding), then cast; a cheaper step of the guidance schedule: i + g_t (t - i)
    // (text-only), or t (the conditional branch alone). It stays for the plain graph, which returns the batch's eps,
    // and for the DeepCache pair, which takes the 3-way batch whatever --fold-cfg says; the --fold-cfg graph runs
    // Python's combine inside it (above). tests/test_cpp_runtime.py checks both loops against the pipeline's.
    const auto parts = eps.to(at::kFloat).chunk(3);
    const at::Tensor guided =
        (branches[i] == 3 ? parts[2] + o.guidance_scale * (parts[0] - parts[1]) +
                                o.image_guidance_scale * (parts[1] - parts[2])
         : branches[i] == 2 ? parts[1] + o.guidance_scale * (parts[0] - parts[1])
                            : parts[0]).to(dtype);
    latents = sampler_step(schedule, latents, guided, row, schedule.noise ? step_noise[i] : at::Tensor());
    finite.push_back(at::isfinite(latents).all());
  }
  if (ms_per_step) {
    if (device_.is_cuda()) latents.cpu();  // wait for the device before reading the clock
    const std::chrono::duration<double, std::milli> ms = std::chrono::steady_clock::now() - t0;
    *ms_per_step = ms.count() / static_cast<double>(o.steps);
  }
  const at::Tensor ok = at::stack(finite).cpu();
  const auto flags = ok.accessor<bool, 1>();
  for (int64_t i = 0; i < o.steps; ++i)
    if (!flags[i])
      throw std::runtime_error("the denoising loop produced non-finite latents at step " + std::to_string(i + 1) +
                               " of " + std::to_string(o.steps) + " (" + non_finite_summary(latents) +
                               " at the end; guidance_scale " + number(o.guidance_scale) + ", image_guidance_scale " +
                               number(o.image_guidance_scale) + "): no image written");
  return latents;
}

}  // namespace smartedit
