// smartedit-runtime: the C++ runtime from the command line, tensors in and out as safetensors.
//   smartedit-runtime edit --artifacts OUT --inputs in.safetensors --out image.safetensors [options]
//       in: pixel_values, prefix_ids, suffix_ids, image, null_text_embeds (SmartEditPipeline.runtime_inputs)
//       out: image [B,3,H,W] in [-1, 1]
//   smartedit-runtime denoise --unet OUT/aoti/unet.pt2 --inputs cond.safetensors --out latents.safetensors [options]
//       in: image_latents, prompt_embeds, null_text_embeds, bim_residual; out: latents
//   smartedit-runtime schedule STEPS [--sampler NAME] [--artifacts OUT]
//       a sampler's config and table as JSON, for checking against diffusers: built from the config OUT's manifest
//       records, or without --artifacts from SmartEdit's (smartedit/scheduler.py SAMPLERS), which needs no export
// options: --steps N --seed S --guidance-scale G --image-guidance-scale G (edit: the manifest's edit_defaults;
//          denoise, which reads no manifest: SmartEdit's 100, 0, 7.5, 1.5) --device cpu|cuda[:N]
//          --sampler NAME (edit: the manifest's; denoise: euler-ancestral) --guidance-interval START,END (0,1)
//          --text-only-guidance START,END (none)
//          --deepcache N (1): DeepCache, the whole UNet every N steps and its shallow path on the cached feature
//          between (edit: the export's unet_deep / unet_shallow; denoise: unet_deep.pt2 and unet_shallow.pt2 beside
//          --unet; both from smartedit-export --target aoti --deepcache [BRANCH]); 1 is the plain loop
// Prints one JSON line of timings. Errors are one line on stderr, "smartedit-runtime: error: ..." naming the value;
// exit status 2 for bad arguments or inputs (refused before any work where they can be), 1 for a failed run
// (smartedit/errors.py). The output never replaces an input (same file by path, symlink or hard link) and is written
// to a temporary file beside it, renamed into place: a failed run leaves no file.
#include <sys/stat.h>
#include <unistd.h>

#include <c10/util/Exception.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <map>
#include <new>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "smartedit/checks.h"
#include "smartedit/denoiser.h"
#include "smartedit/editor.h"
#include "smartedit/euler_ancestral.h"
#include "smartedit/manifest.h"
#include "smartedit/safetensors.h"
#include "smartedit/sampler.h"

namespace {

std::string usage() {
  const smartedit::EditDefaults d;  // what denoise runs, with no manifest to read
  std::ostringstream denoise;
  denoise << d.steps << ", " << d.seed << ", " << d.guidance_scale << ", " << d.image_guidance_scale;
  return
    "usage: smartedit-runtime edit --artifacts DIR --inputs IN.safetensors --out OUT.safetensors [options]\n"
    "       smartedit-runtime denoise --unet PKG.pt2 --inputs IN.safetensors --out OUT.safetensors [options]\n"
    "       smartedit-runtime schedule STEPS [--sampler NAME] [--artifacts DIR]\n"
    "         (the sampler's config and table: DIR's manifest's config, SmartEdit's without --artifacts)\n"
    "options: --steps N --seed S --guidance-scale G --image-guidance-scale G (default: edit, the manifest's\n"
    "           edit_defaults; denoise: " + denoise.str() + ") --device cpu|cuda|cuda:N\n"
    "         --sampler euler-ancestral|euler|ddim (edit: the manifest's) --guidance-interval START,END\n"
    "         --text-only-guidance START,END\n"
    "         --deepcache N (1..1000, default 1): DeepCache, the whole UNet every N steps, its shallow path on the\n"
    "           cached feature between; needs the export's DeepCache graphs (smartedit-export --target aoti\n"
    "           --deepcache [BRANCH]; denoise: unet_deep.pt2 and unet_shallow.pt2 beside --unet); 1: the plain loop\n";
}

// a mistake in the command line itself: its one line points at --help
struct UsageError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

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
  if constexpr (std::is_floating_point_v<T>) {
    if (!std::isfinite(x)) throw std::invalid_argument(flag + " must be a finite number, got '" + v + "'");
  }
  return x;
}
long long to_ll(const std::string& s, size_t* i, int base) { return std::stoll(s, i, base); }
double to_d(const std::string& s, size_t* i, int) { return std::stod(s, i); }

// "START,END" -> two finite numbers (their range is GuidanceSchedule::check's)
std::pair<double, double> parse_interval(const std::string& flag, const std::string& v) {
  const auto comma = v.find(',');
  if (comma == std::string::npos)
    throw std::invalid_argument(flag + " must be two fractions START,END in [0, 1], got '" + v + "'");
  return {parse<double>(flag, v.substr(0, comma), to_d, "two fractions START,END in [0, 1]"),
          parse<double>(flag, v.substr(comma + 1), to_d, "two fractions START,END in [0, 1]")};
}

at::Tensor take(std::map<std::string, at::Tensor>& m, const std::string& key, const std::string& path) {
  auto it = m.find(key);
  if (it == m.end()) throw std::invalid_argument(path + " has no tensor '" + key + "'");
  smartedit::check_finite_input(it->second, path + ": tensor '" + key + "'");
  return it->second;
}

std::string need(std::map<std::string, std::string>& a, const std::string& key) {
  if (!a.count(key)) throw UsageError("missing " + key);
  if (a[key].empty()) throw UsageError(key + " is empty");
  return a[key];
}

// --- the output never destroys an input ---------------------------------------------------------------------------
namespace fs = std::filesystem;

bool same_file(const std::string& a, const std::string& b) {
  struct stat sa, sb;  // stat follows symlinks: a link to the input is the input
  if (::stat(a.c_str(), &sa) == 0 && ::stat(b.c_str(), &sb) == 0)
    return sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
  std::error_code ea, eb;
  const fs::path ra = fs::weakly_canonical(fs::absolute(a), ea), rb = fs::weakly_canonical(fs::absolute(b), eb);
  return !ea && !eb && ra == rb;
}

// Refuses, before any work, an --out that is one of `inputs` or of the files in `input_dirs` (the artifacts folder:
// its manifest and packages), a folder, or a place that cannot be written.
void check_output(const std::string& out, const std::vector<std::string>& inputs,
                  const std::vector<std::string>& input_dirs) {
  std::error_code ec;
  if (fs::is_directory(out, ec)) throw std::invalid_argument("--out " + out + " is a folder; give a file name");
  for (const std::string& in : inputs)
    if (same_file(out, in))
      throw std::invalid_argument("--out " + out + " is the input " + in + ": refusing to overwrite an input");
  const fs::path resolved = fs::weakly_canonical(fs::absolute(out, ec), ec);
  for (const std::string& dir : input_dirs) {
    if (!fs::is_directory(dir, ec)) continue;
    size_t seen = 0;  // by path, symlink or hard link, from inside the folder or out of it
    for (auto it = fs::recursive_directory_iterator(dir, fs::directory_options::skip_permission_denied, ec);
         !ec && it != fs::recursive_directory_iterator() && ++seen < 100000; it.increment(ec))
      if (it->is_regular_file(ec) && same_file(out, it->path().string()))
        throw std::invalid_argument("--out " + out + " is " + it->path().string() +
                                    " of the artifacts folder: refusing to overwrite an input");
  }
  fs::path probe = resolved.parent_path();
  while (!probe.empty() && !fs::exists(probe, ec) && probe != probe.parent_path()) probe = probe.parent_path();
  if (!fs::is_directory(probe, ec))
    throw std::invalid_argument("--out " + out + ": " + probe.string() + " is not a folder");
  if (::access(probe.c_str(), W_OK) != 0)
    throw std::invalid_argument("--out " + out + ": cannot write into " + probe.string());
}

void write_output(const std::string& out, const std::map<std::string, at::Tensor>& tensors) {
  const fs::path parent = fs::absolute(out).parent_path();
  std::error_code ec;
  fs::create_directories(parent, ec);  // checked writable above; a failure shows as the write's error
  smartedit::save_safetensors(out, tensors);
}

int run(int argc, char** argv) {
  if (argc < 2) throw UsageError("no command given");
  if (std::string(argv[1]) == "-h" || std::string(argv[1]) == "--help") {
    std::cout << usage();
    return 0;
  }
  const std::string mode = argv[1];
  if (mode == "schedule") {
    std::map<std::string, std::string> a;
    for (int i = 3; i + 1 < argc && (std::string(argv[i]) == "--sampler" || std::string(argv[i]) == "--artifacts") &&
                    !a.count(argv[i]);
         i += 2)
      a[argv[i]] = argv[i + 1];
    if (argc < 3 || static_cast<size_t>(argc) != 3 + 2 * a.size())
      throw std::invalid_argument("schedule takes STEPS, then optionally --sampler NAME and --artifacts DIR");
    const long long steps = parse<long long>("STEPS", argv[2], to_ll, "an integer");
    std::string sampler = a.count("--sampler") ? a["--sampler"] : smartedit::kDefaultSampler;
    smartedit::SchedulerConfig config = smartedit::SchedulerConfig::smartedit(sampler);
    if (a.count("--artifacts")) {  // the manifest's sampler and config
      const smartedit::Manifest manifest = smartedit::Manifest::load(a["--artifacts"], "aoti");
      if (!a.count("--sampler")) sampler = manifest.sampler();
      smartedit::check_sampler(sampler, steps);
      config = manifest.scheduler_config(sampler);
    }
    const auto s = smartedit::Schedule::build(sampler, steps, config);
    std::printf("{\"sampler\": \"%s\", \"config\": %s, \"init_noise_sigma\": %.9g, \"columns\": [",
                s.sampler.c_str(), config.to_json().c_str(), s.init_noise_sigma.item<float>());
    for (size_t c = 0; c < s.columns.size(); ++c) std::printf("%s\"%s\"", c ? ", " : "", s.columns[c].c_str());
    std::printf("], \"table\": [");
    const auto t = s.table.accessor<float, 2>();
    for (int64_t i = 0; i < t.size(0); ++i) {
      std::printf("%s[", i ? ", " : "");
      for (int64_t c = 0; c < t.size(1); ++c) std::printf("%s%.9g", c ? ", " : "", t[i][c]);
      std::printf("]");
    }
    std::printf("]}\n");
    return 0;
  }
  if (mode != "edit" && mode != "denoise") throw UsageError("unknown command '" + mode + "'");
  const std::set<std::string> known = {mode == "edit" ? "--artifacts" : "--unet", "--inputs", "--out", "--steps",
                                       "--seed", "--guidance-scale", "--image-guidance-scale", "--device",
                                       "--sampler", "--guidance-interval", "--text-only-guidance",
                                       "--deepcache"};
  std::map<std::string, std::string> a;
  for (int i = 2; i < argc; ++i) {
    const std::string k = argv[i];
    if (k.rfind("--", 0) != 0) throw UsageError("unexpected argument '" + k + "'");
    if (!known.count(k)) throw UsageError("unknown option '" + k + "' for " + mode);
    if (i + 1 >= argc) throw UsageError(k + " needs a value");
    if (a.count(k)) throw UsageError(k + " given twice");
    a[k] = argv[++i];
  }
  smartedit::DenoiseOptions o;  // an edit's defaults: denoise, SmartEdit's; edit, the manifest's (below)
  if (a.count("--steps")) o.steps = parse<long long>("--steps", a["--steps"], to_ll, "an integer");
  if (o.steps < 1) throw std::invalid_argument("--steps must be >= 1, got " + std::to_string(o.steps));
  if (o.steps > smartedit::kMaxSteps)
    throw std::invalid_argument("--steps must be <= " + std::to_string(smartedit::kMaxSteps) + ", got " +
                                std::to_string(o.steps));
  if (a.count("--seed")) {
    const long long seed = parse<long long>("--seed", a["--seed"], to_ll, "an integer");
    if (seed < 0) throw std::invalid_argument("--seed must be >= 0, got " + std::to_string(seed));
    o.seed = static_cast<uint64_t>(seed);
  }
  if (a.count("--guidance-scale"))
    o.guidance_scale = parse<double>("--guidance-scale", a["--guidance-scale"], to_d, "a number");
  if (a.count("--image-guidance-scale"))
    o.image_guidance_scale = parse<double>("--image-guidance-scale", a["--image-guidance-scale"], to_d, "a number");
  if (a.count("--sampler")) o.sampler = a["--sampler"];
  if (!o.sampler.empty()) smartedit::check_sampler(o.sampler, o.steps);  // edit without one: the manifest's, below
  if (a.count("--guidance-interval"))
    std::tie(o.guidance.start, o.guidance.end) = parse_interval("--guidance-interval", a["--guidance-interval"]);
  if (a.count("--text-only-guidance")) {
    o.guidance.text_only = true;
    std::tie(o.guidance.text_only_start, o.guidance.text_only_end) =
        parse_interval("--text-only-guidance", a["--text-only-guidance"]);
  }
  o.guidance.check();
  if (a.count("--deepcache")) {
    const char* kInterval = "an integer in [1, 1000] (the whole UNet every N steps; 1: every step)";
    o.deepcache = parse<long long>("--deepcache", a["--deepcache"], to_ll, kInterval);
    if (o.deepcache < 1 || o.deepcache > smartedit::kMaxCacheInterval)
      throw std::invalid_argument(std::string("--deepcache must be ") + kInterval + ", got " +
                                  std::to_string(o.deepcache));
  }
  const std::string device_name = a.count("--device") ? a["--device"] : "cpu";
  const c10::Device device = [&] {
    try {
      const c10::Device d(device_name);
      if (d.is_cpu() || d.is_cuda()) return d;  // what the packages are compiled for (others, e.g. meta, crash)
    } catch (const c10::Error&) {
    }
    throw std::invalid_argument("--device must be cpu, cuda or cuda:N, got '" + device_name + "'");
  }();
  const std::string in = need(a, "--inputs"), out = need(a, "--out");
  const std::string source = mode == "edit" ? need(a, "--artifacts") : need(a, "--unet");
  // denoise with DeepCache: the pair beside the unet package, as smartedit-export --target aoti writes them
  std::string deep, shallow;
  if (mode == "denoise" && o.deepcache > 1) {
    const fs::path dir = fs::absolute(source).parent_path();
    deep = (dir / "unet_deep.pt2").string();
    shallow = (dir / "unet_shallow.pt2").string();
    std::error_code ec;
    for (const std::string& pkg : {deep, shallow})
      if (!fs::is_regular_file(pkg, ec))
        throw std::invalid_argument("--deepcache " + std::to_string(o.deepcache) + ": no " +
                                    fs::path(pkg).filename().string() + " beside --unet " + source +
                                    " (the DeepCache graphs: smartedit-export --target aoti --deepcache [BRANCH])");
  }
  if (mode == "edit")
    check_output(out, {in}, {source});
  else if (deep.empty())
    check_output(out, {in, source}, {});
  else
    check_output(out, {in, source, deep, shallow}, {});

  auto t = smartedit::load_safetensors(in);
  if (mode == "denoise") {
    smartedit::DenoiseInputs x{take(t, "image_latents", in), take(t, "prompt_embeds", in),
                               take(t, "null_text_embeds", in), take(t, "bim_residual", in)};
    smartedit::Denoiser denoiser(source, device);
    if (!deep.empty()) denoiser.load_deepcache(deep, shallow);
    double ms = 0;
    const at::Tensor latents = denoiser.run(x, o, &ms);
    write_output(out, {{"latents", latents}});
    std::printf("{\"ms_per_step\": %.4f, \"steps\": %lld, \"deepcache\": %lld}\n", ms,
                static_cast<long long>(o.steps), static_cast<long long>(o.deepcache));
    return 0;
  }
  smartedit::EditInputs x{take(t, "pixel_values", in), take(t, "prefix_ids", in), take(t, "suffix_ids", in),
                          take(t, "image", in), take(t, "null_text_embeds", in)};
  {  // the export's defaults where no flag is given; its sampler, config, DeepCache graphs: refused by name before
     // the (slow) package loads
    const smartedit::Manifest manifest = smartedit::Manifest::load(source, "aoti");
    const smartedit::EditDefaults& d = manifest.edit_defaults();
    if (!a.count("--steps")) o.steps = d.steps;
    if (!a.count("--seed")) o.seed = d.seed;
    if (!a.count("--guidance-scale")) o.guidance_scale = d.guidance_scale;
    if (!a.count("--image-guidance-scale")) o.image_guidance_scale = d.image_guidance_scale;
    const std::string sampler = o.sampler.empty() ? manifest.sampler() : o.sampler;
    smartedit::check_sampler(sampler, o.steps);
    manifest.scheduler_config(sampler);
    smartedit::check_deepcache(manifest, o.deepcache);
  }
  smartedit::Editor editor(source, device);
  std::map<std::string, double> ms;
  const at::Tensor image = editor.run(x, o, &ms);
  smartedit::check_finite_result(image, "the edited image");
  write_output(out, {{"image", image}});
  std::printf("{\"phase_ms\": {");
  bool first = true;
  for (const auto& [stage, v] : ms) std::printf("%s\"%s\": %.3f", first ? "" : ", ", stage.c_str(), v), first = false;
  std::printf("}, \"steps\": %lld, \"sampler\": \"%s\", \"deepcache\": %lld", static_cast<long long>(o.steps),
              (o.sampler.empty() ? editor.sampler() : o.sampler).c_str(), static_cast<long long>(o.deepcache));
  if (o.deepcache > 1) std::printf(", \"cache_branch\": %lld", static_cast<long long>(editor.cache_branch()));
  std::printf("}\n");
  return 0;
}

// One line, as smartedit/errors.py one_line: newlines folded, long messages cut; a c10::Error's backtrace (from
// "Exception raised from" on, or what() past its first line) is never printed.
std::string one_line(std::string text) {
  const auto frames = text.find("Exception raised from");
  if (frames != std::string::npos) text.erase(frames);
  while (!text.empty() && (text.back() == '\n' || text.back() == ' ')) text.pop_back();
  for (char& c : text)
    if (c == '\n' || c == '\r') c = ' ';
  if (text.empty()) text = "unknown error";
  return text.size() < 2000 ? text : text.substr(0, 2000) + " ...";
}

int fail(const std::string& message, int status) {
  std::fprintf(stderr, "smartedit-runtime: error: %s\n", one_line(message).c_str());
  return status;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const UsageError& e) {
    return fail(std::string(e.what()) + " (smartedit-runtime --help shows the usage)", 2);
  } catch (const std::invalid_argument& e) {
    return fail(e.what(), 2);
  } catch (const c10::Error& e) {  // escaped from libtorch: its message without the C++ backtrace
    const std::string text = e.what_without_backtrace();
    return fail(text.substr(0, text.find('\n')), 1);
  } catch (const std::bad_alloc&) {
    return fail("out of memory", 1);
  } catch (const std::exception& e) {
    return fail(e.what(), 1);
  } catch (...) {
    return fail("unknown error", 1);
  }
}
