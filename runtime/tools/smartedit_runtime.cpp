// smartedit-runtime: the C++ runtime from the command line, tensors in and out as safetensors.
//   smartedit-runtime edit --artifacts OUT --inputs in.safetensors --out image.safetensors [options]
//       in: pixel_values, prefix_ids, suffix_ids, image, null_text_embeds (SmartEditPipeline.runtime_inputs)
//       out: image [B,3,H,W] in [-1, 1]
//   smartedit-runtime denoise --unet OUT/aoti/unet.pt2 --inputs cond.safetensors --out latents.safetensors [options]
//       in: image_latents, prompt_embeds, null_text_embeds, bim_residual; out: latents
//   smartedit-runtime schedule STEPS    (the EulerAncestral table as JSON, for checking against diffusers)
// options: --steps N (100) --seed S (0) --guidance-scale G (7.5) --image-guidance-scale G (1.5) --device cpu|cuda[:N]
// Prints one JSON line of timings. Exit status 2 for bad arguments or inputs, 1 for other failures.
#include <cstdio>
#include <iostream>
#include <map>
#include <stdexcept>
#include <string>

#include "smartedit/denoiser.h"
#include "smartedit/editor.h"
#include "smartedit/euler_ancestral.h"
#include "smartedit/safetensors.h"

namespace {

const char* kUsage =
    "usage: smartedit-runtime edit --artifacts DIR --inputs IN.safetensors --out OUT.safetensors [options]\n"
    "       smartedit-runtime denoise --unet PKG.pt2 --inputs IN.safetensors --out OUT.safetensors [options]\n"
    "       smartedit-runtime schedule STEPS\n"
    "options: --steps N --seed S --guidance-scale G --image-guidance-scale G --device cpu|cuda|cuda:N\n";

template <typename T>
T parse(const std::string& flag, const std::string& v, T (*convert)(const std::string&, size_t*, int),
        const char* kind) {
  size_t used = 0;
  T x{};
  try {
    x = convert(v, &used, 10);
  } catch (const std::exception&) {
    used = 0;
  }
  if (v.empty() || used != v.size()) throw std::invalid_argument(flag + " must be " + kind + ", got '" + v + "'");
  return x;
}
long long to_ll(const std::string& s, size_t* i, int base) { return std::stoll(s, i, base); }
double to_d(const std::string& s, size_t* i, int) { return std::stod(s, i); }

at::Tensor take(std::map<std::string, at::Tensor>& m, const std::string& key, const std::string& path) {
  auto it = m.find(key);
  if (it == m.end()) throw std::invalid_argument(path + " has no tensor '" + key + "'");
  return it->second;
}

std::string need(std::map<std::string, std::string>& a, const std::string& key) {
  if (!a.count(key)) throw std::invalid_argument("missing " + key);
  return a[key];
}

int run(int argc, char** argv) {
  if (argc < 2 || std::string(argv[1]) == "-h" || std::string(argv[1]) == "--help") {
    std::cout << kUsage;
    return argc < 2 ? 2 : 0;
  }
  const std::string mode = argv[1];
  if (mode == "schedule") {
    if (argc != 3) throw std::invalid_argument("schedule takes one argument, STEPS");
    const auto s = smartedit::AncestralSchedule::build(parse<long long>("STEPS", argv[2], to_ll, "an integer"));
    std::printf("{\"init_noise_sigma\": %.9g, \"columns\": [\"timestep\", \"sigma\", \"sigma_up\", "
                "\"dt = sigma_down - sigma\"], \"table\": [", s.init_noise_sigma.item<float>());
    const auto t = s.table.accessor<float, 2>();
    for (int64_t i = 0; i < t.size(0); ++i)
      std::printf("%s[%.9g, %.9g, %.9g, %.9g]", i ? ", " : "", t[i][0], t[i][1], t[i][2], t[i][3]);
    std::printf("]}\n");
    return 0;
  }
  if (mode != "edit" && mode != "denoise") throw std::invalid_argument("unknown command '" + mode + "'");
  std::map<std::string, std::string> a;
  for (int i = 2; i < argc; ++i) {
    const std::string k = argv[i];
    if (k.rfind("--", 0) != 0 || i + 1 >= argc) throw std::invalid_argument("unexpected argument '" + k + "'");
    a[k] = argv[++i];
  }
  smartedit::DenoiseOptions o;
  if (a.count("--steps")) o.steps = parse<long long>("--steps", a["--steps"], to_ll, "an integer");
  if (o.steps < 1) throw std::invalid_argument("--steps must be >= 1, got " + std::to_string(o.steps));
  if (a.count("--seed")) o.seed = static_cast<uint64_t>(parse<long long>("--seed", a["--seed"], to_ll, "an integer"));
  if (a.count("--guidance-scale"))
    o.guidance_scale = parse<double>("--guidance-scale", a["--guidance-scale"], to_d, "a number");
  if (a.count("--image-guidance-scale"))
    o.image_guidance_scale = parse<double>("--image-guidance-scale", a["--image-guidance-scale"], to_d, "a number");
  const c10::Device device(a.count("--device") ? a["--device"] : "cpu");
  const std::string in = need(a, "--inputs"), out = need(a, "--out");
  const std::string source = mode == "edit" ? need(a, "--artifacts") : need(a, "--unet");

  auto t = smartedit::load_safetensors(in);
  if (mode == "denoise") {
    smartedit::DenoiseInputs x{take(t, "image_latents", in), take(t, "prompt_embeds", in),
                               take(t, "null_text_embeds", in), take(t, "bim_residual", in)};
    smartedit::Denoiser denoiser(source, device);
    double ms = 0;
    const at::Tensor latents = denoiser.run(x, o, &ms);
    smartedit::save_safetensors(out, {{"latents", latents}});
    std::printf("{\"ms_per_step\": %.4f, \"steps\": %lld}\n", ms, static_cast<long long>(o.steps));
    return 0;
  }
  smartedit::EditInputs x{take(t, "pixel_values", in), take(t, "prefix_ids", in), take(t, "suffix_ids", in),
                          take(t, "image", in), take(t, "null_text_embeds", in)};
  smartedit::Editor editor(source, device);
  std::map<std::string, double> ms;
  const at::Tensor image = editor.run(x, o, &ms);
  smartedit::save_safetensors(out, {{"image", image}});
  std::printf("{\"stage_ms\": {");
  bool first = true;
  for (const auto& [stage, v] : ms) std::printf("%s\"%s\": %.3f", first ? "" : ", ", stage.c_str(), v), first = false;
  std::printf("}, \"steps\": %lld}\n", static_cast<long long>(o.steps));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::invalid_argument& e) {
    std::fprintf(stderr, "smartedit-runtime: error: %s\n%s", e.what(), kUsage);
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "smartedit-runtime: error: %s\n", e.what());
    return 1;
  }
}
