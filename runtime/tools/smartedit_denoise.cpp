// smartedit-denoise: the denoising loop of one SmartEdit edit from the C++ runtime, over safetensors files.
//   smartedit-denoise --unet OUT/aoti/unet.pt2 --inputs cond.safetensors --out latents.safetensors
//                     [--steps 100] [--seed 0] [--guidance-scale 7.5] [--image-guidance-scale 1.5] [--device cpu]
//   smartedit-denoise --print-schedule STEPS      (the EulerAncestral table as JSON, for checking against diffusers)
// cond.safetensors holds image_latents [B,4,h,w], prompt_embeds [B,77,D], null_text_embeds [1,77,D] and
// bim_residual [B,C0,16,16] (one dtype); the output holds latents [B,4,h,w]. Prints {"ms_per_step": ...}.
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <map>
#include <stdexcept>
#include <string>

#include "smartedit/denoiser.h"
#include "smartedit/euler_ancestral.h"
#include "smartedit/safetensors.h"

namespace {

const char* kUsage =
    "usage: smartedit-denoise --unet PKG.pt2 --inputs IN.safetensors --out OUT.safetensors [--steps N] [--seed S]\n"
    "                         [--guidance-scale G] [--image-guidance-scale G] [--device cpu|cuda|cuda:N]\n"
    "       smartedit-denoise --print-schedule STEPS\n";

int64_t parse_int(const std::string& flag, const std::string& v) {
  size_t used = 0;
  long long x = 0;
  try {
    x = std::stoll(v, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used != v.size()) throw std::invalid_argument(flag + " must be an integer, got '" + v + "'");
  return x;
}

double parse_double(const std::string& flag, const std::string& v) {
  size_t used = 0;
  double x = 0;
  try {
    x = std::stod(v, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used != v.size()) throw std::invalid_argument(flag + " must be a number, got '" + v + "'");
  return x;
}

at::Tensor take(std::map<std::string, at::Tensor>& m, const std::string& key, const std::string& path) {
  auto it = m.find(key);
  if (it == m.end()) throw std::invalid_argument(path + " has no tensor '" + key + "'");
  return it->second;
}

int run(int argc, char** argv) {
  std::map<std::string, std::string> a;
  for (int i = 1; i < argc; ++i) {
    std::string k = argv[i];
    if (k == "-h" || k == "--help") {
      std::cout << kUsage;
      return 0;
    }
    if (k.rfind("--", 0) != 0 || i + 1 >= argc) throw std::invalid_argument("unexpected argument '" + k + "'");
    a[k] = argv[++i];
  }
  if (a.count("--print-schedule")) {
    const auto s = smartedit::AncestralSchedule::build(parse_int("--print-schedule", a["--print-schedule"]));
    std::printf("{\"init_noise_sigma\": %.9g, \"table\": [", s.init_noise_sigma.item<float>());
    const auto t = s.table.accessor<float, 2>();
    for (int64_t i = 0; i < t.size(0); ++i)
      std::printf("%s[%.9g, %.9g, %.9g, %.9g]", i ? ", " : "", t[i][0], t[i][1], t[i][2], t[i][3]);
    std::printf("]}\n");
    return 0;
  }
  for (const char* req : {"--unet", "--inputs", "--out"})
    if (!a.count(req)) throw std::invalid_argument(std::string("missing ") + req);
  smartedit::DenoiseOptions o;
  if (a.count("--steps")) o.steps = parse_int("--steps", a["--steps"]);
  if (o.steps < 1) throw std::invalid_argument("--steps must be >= 1, got " + std::to_string(o.steps));
  if (a.count("--seed")) o.seed = static_cast<uint64_t>(parse_int("--seed", a["--seed"]));
  if (a.count("--guidance-scale")) o.guidance_scale = parse_double("--guidance-scale", a["--guidance-scale"]);
  if (a.count("--image-guidance-scale"))
    o.image_guidance_scale = parse_double("--image-guidance-scale", a["--image-guidance-scale"]);
  const c10::Device device(a.count("--device") ? a["--device"] : "cpu");

  const std::string in = a["--inputs"];
  auto tensors = smartedit::load_safetensors(in);
  smartedit::DenoiseInputs x{take(tensors, "image_latents", in), take(tensors, "prompt_embeds", in),
                             take(tensors, "null_text_embeds", in), take(tensors, "bim_residual", in)};
  smartedit::Denoiser denoiser(a["--unet"], device);
  double ms = 0;
  const at::Tensor latents = denoiser.run(x, o, &ms);
  smartedit::save_safetensors(a["--out"], {{"latents", latents}});
  std::printf("{\"ms_per_step\": %.4f, \"steps\": %lld}\n", ms, static_cast<long long>(o.steps));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::invalid_argument& e) {
    std::fprintf(stderr, "smartedit-denoise: error: %s\n%s", e.what(), kUsage);
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "smartedit-denoise: error: %s\n", e.what());
    return 1;
  }
}
