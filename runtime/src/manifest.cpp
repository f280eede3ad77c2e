#include "smartedit/manifest.h"

#include <openssl/evp.h>

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <vector>

#include "smartedit/json.h"
#include "smartedit/sampler.h"

namespace smartedit {

namespace {

constexpr uint64_t kManifestVersion = 4;  // smartedit/graphs/manifest.py MANIFEST_VERSION
constexpr int64_t kMaxDim = int64_t{1} << 40;

std::pair<int64_t, std::string> parse_dim(const Json& d, const std::string& where) {
  if (d.kind == Json::Kind::kNumber) {
    if (!d.is_uint || d.uint > static_cast<uint64_t>(kMaxDim)) throw std::runtime_error(where + ": bad dimension");
    return {static_cast<int64_t>(d.uint), ""};
  }
  if (d.kind != Json::Kind::kString || d.string.empty()) throw std::runtime_error(where + ": bad dimension");
  const auto star = d.string.find('*');
  if (star == std::string::npos) return {1, d.string};
  const std::string k = d.string.substr(0, star);
  if (k.empty() || k.size() > 6 || k.find_first_not_of("0123456789") != std::string::npos)
    throw std::runtime_error(where + ": bad dimension expression '" + d.string + "'");
  return {std::stoll(k), d.string.substr(star + 1)};
}

std::vector<TensorSpec> tensors(const Json& list, const std::string& where) {
  std::vector<TensorSpec> out;
  for (const Json& t : list.array) {
    TensorSpec s;
    s.name = t.at("name", Json::Kind::kString, where).string;
    s.dtype = t.at("dtype", Json::Kind::kString, where).string;
    for (const Json& d : t.at("shape", Json::Kind::kArray, where + " " + s.name).array)
      s.shape.push_back(parse_dim(d, where + " " + s.name));
    out.push_back(std::move(s));
  }
  return out;
}

std::string describe(const std::string& dim, int64_t v, const DimRange& r,
                     const std::map<std::string, DimMeaning>& meanings) {
  const auto m = meanings.find(dim);
  if (m != meanings.end() && m->second.px) {  // an image side, in image pixels (the manifest's pixels per unit)
    const int64_t px = m->second.px;
    return m->second.what + " " + std::to_string(v * px) + " px is outside the exported range " +
           std::to_string(r.min * px) + "-" + std::to_string(r.max * px) + " px (re-export with " + m->second.flag +
           ")";
  }
  return "dimension " + dim + " = " + std::to_string(v) + " is outside the exported profile [" +
         std::to_string(r.min) + ", " + std::to_string(r.max) + "]" +
         (m != meanings.end() ? " (re-export with " + m->second.flag + ")" : "");
}

std::string value_text(const Json& v) {
  switch (v.kind) {
    case Json::Kind::kNull: return "null";
    case Json::Kind::kBool: return v.boolean ? "true" : "false";
    case Json::Kind::kNumber: {
      std::ostringstream s;
      s.precision(17);
      s << v.number;
      return s.str();
    }
    case Json::Kind::kString: return "'" + v.string.substr(0, 100) + "'";
    case Json::Kind::kArray: return "a list";
    case Json::Kind::kObject: return "an object";
  }
  return "?";
}

// The keys of a diffusers scheduler config that SchedulerConfig does not hold, with the value under which they change
// nothing this runtime builds (diffusers' defaults: what they switch on is not built here). The last three are read
// only under thresholding / clip_sample.
bool neutral(const std::string& key, const Json& v) {
  static const std::set<std::string> kNull = {"trained_betas", "sigma_min", "sigma_max"};
  static const std::set<std::string> kFalse = {"rescale_betas_zero_snr", "clip_sample", "thresholding",
                                               "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"};
  static const std::map<std::string, std::string> kText = {
      {"interpolation_type", "linear"}, {"timestep_type", "discrete"}, {"final_sigmas_type", "zero"}};
  static const std::set<std::string> kUnread = {"dynamic_thresholding_ratio", "clip_sample_range",
                                                "sample_max_value"};
  if (kNull.count(key)) return v.kind == Json::Kind::kNull;
  if (kFalse.count(key)) return v.kind == Json::Kind::kBool && !v.boolean;
  if (const auto t = kText.find(key); t != kText.end()) return v.kind == Json::Kind::kString && v.string == t->second;
  return kUnread.count(key) > 0;
}

// The scheduler config a manifest records for `sampler` (smartedit/scheduler.py Sampler.record()["config"]); a key
// it leaves out keeps SmartEdit's value. `strict` (a sampler this runtime runs): every other key must be neutral.
SchedulerConfig scheduler_config_of(const Json& config, const std::string& sampler, bool strict,
                                    const std::string& where) {
  SchedulerConfig c = SchedulerConfig::smartedit(sampler);
  const auto bad = [&](const std::string& key, const Json& v, const std::string& why) {
    return std::runtime_error(where + ": sampler config " + key + " = " + value_text(v) + ": " + why);
  };
  for (const auto& [key, v] : config.object) {
    if (key.rfind('_', 0) == 0) continue;  // diffusers' bookkeeping (_class_name, _diffusers_version)
    if (key == "num_train_timesteps" || key == "steps_offset") {
      if (v.kind != Json::Kind::kNumber || !v.is_uint || v.uint > 100000)
        throw bad(key, v, "must be an integer in [0, 100000]");
      (key == "steps_offset" ? c.steps_offset : c.num_train_timesteps) = static_cast<int64_t>(v.uint);
    } else if (key == "beta_start" || key == "beta_end") {
      if (v.kind != Json::Kind::kNumber) throw bad(key, v, "must be a number");
      (key == "beta_start" ? c.beta_start : c.beta_end) = v.number;
    } else if (key == "beta_schedule" || key == "timestep_spacing" || key == "prediction_type") {
      if (v.kind != Json::Kind::kString) throw bad(key, v, "must be a string");
      (key == "beta_schedule" ? c.beta_schedule : key == "timestep_spacing" ? c.timestep_spacing : c.prediction_type) =
          v.string;
    } else if (key == "set_alpha_to_one") {
      if (v.kind != Json::Kind::kBool) throw bad(key, v, "must be true or false");
      c.set_alpha_to_one = v.boolean;
    } else if (strict && !neutral(key, v)) {
      throw bad(key, v, "the C++ runtime does not build it (it builds a schedule from num_train_timesteps, the "
                        "betas, timestep_spacing, steps_offset, prediction_type and set_alpha_to_one)");
    }
  }
  return c;
}

bool is_sha256(const std::string& s) {
  return s.size() == 64 && s.find_first_not_of("0123456789abcdef") == std::string::npos;
}

std::string shape_text(const at::Tensor& t) {
  std::ostringstream s;
  s << t.sizes();
  return s.str();
}

}  // namespace

std::map<std::string, int64_t> GraphSpec::check(const std::vector<at::Tensor>& xs) const {
  if (xs.size() != inputs.size())
    throw std::invalid_argument(name + " takes " + std::to_string(inputs.size()) + " inputs, got " +
                                std::to_string(xs.size()));
  std::map<std::string, int64_t> point;
  for (size_t i = 0; i < inputs.size(); ++i) {
    const TensorSpec& t = inputs[i];
    const at::Tensor& x = xs[i];
    const std::string who = name + "." + t.name;
    if (!x.defined()) throw std::invalid_argument(who + " is missing");
    if (static_cast<size_t>(x.dim()) != t.shape.size())
      throw std::invalid_argument(who + ": rank " + std::to_string(x.dim()) + ", expected " +
                                  std::to_string(t.shape.size()));
    for (size_t a = 0; a < t.shape.size(); ++a) {
      const auto& [k, dim] = t.shape[a];
      const int64_t size = x.size(static_cast<int64_t>(a));
      if (dim.empty()) {
        if (size != k)
          throw std::invalid_argument(who + ": shape " + shape_text(x) + ", axis " + std::to_string(a) +
                                      " must be " + std::to_string(k));
        continue;
      }
      if (size % k)
        throw std::invalid_argument(who + ": size " + std::to_string(size) + " of axis " + std::to_string(a) +
                                    " is not a multiple of " + std::to_string(k));
      const auto [it, fresh] = point.emplace(dim, size / k);
      if (!fresh && it->second != size / k)
        throw std::invalid_argument(who + ": axis " + std::to_string(a) + " gives " + dim + " = " +
                                    std::to_string(size / k) + ", another input gave " + std::to_string(it->second));
    }
  }
  for (const auto& [dim, v] : point) {
    const DimRange& r = dims.at(dim);
    if (v < r.min || v > r.max) throw std::invalid_argument(name + ": " + describe(dim, v, r, meanings));
  }
  return point;
}

Manifest Manifest::load(const std::string& artifacts_dir, const std::string& target) {
  try {
    return load_unchecked(artifacts_dir, target);
  } catch (const std::invalid_argument&) {
    throw;
  } catch (const std::runtime_error& e) {  // a folder that cannot be run as it is: bad input (ArtifactError, exit 2)
    throw std::invalid_argument(e.what());
  }
}

Manifest Manifest::load_unchecked(const std::string& artifacts_dir, const std::string& target) {
  namespace fs = std::filesystem;
  const fs::path dir(artifacts_dir), path = dir / "manifest.json";
  std::ifstream f(path, std::ios::binary | std::ios::ate);
  if (!f) throw std::runtime_error(path.string() + " not found: " + artifacts_dir +
                                   " is not an smartedit-export output folder");
  const auto size = static_cast<size_t>(f.tellg());
  if (size > (64u << 20)) throw std::runtime_error(path.string() + " is over 64 MB: not a manifest");
  std::string text(size, '\0');
  f.seekg(0);
  f.read(text.data(), static_cast<std::streamsize>(size));
  const std::string where = path.string();
  const Json root = parse_json(text, where);
  if (root.kind != Json::Kind::kObject) throw std::runtime_error(where + " is not a JSON object");
  const Json* version = root.find("manifest_version");
  if (!version || !version->is_uint || version->uint != kManifestVersion)
    throw std::runtime_error(where + ": not manifest version " + std::to_string(kManifestVersion) +
                             ": re-run smartedit-export into " + artifacts_dir);
  // every entry must come from the folder's own source: an entry copied in from another export runs another model
  const std::string& source = root.at("source", Json::Kind::kObject, where)
                                  .at("sha256", Json::Kind::kString, where + " source").string;
  const Json& arts = root.at("artifacts", Json::Kind::kObject, where);
  const Json* entries = arts.find(target);
  if (!entries || entries->kind != Json::Kind::kObject || entries->object.empty())
    throw std::runtime_error(artifacts_dir + " holds no " + target + " artifacts: run smartedit-export --target " +
                             target + " --out " + artifacts_dir);
  Manifest m;
  m.dir_ = artifacts_dir;
  m.target_ = target;
  if (const Json* sampler = root.find("sampler"); sampler && sampler->kind != Json::Kind::kNull) {
    m.sampler_ = sampler->at("name", Json::Kind::kString, where + " sampler").string;
    bool native = false;  // a sampler this runtime runs: its whole config must be one it builds
    for (const SamplerInfo& s : samplers()) native = native || (s.native && m.sampler_ == s.name);
    const Json* config = sampler->find("config");
    m.recorded_ = config && config->kind != Json::Kind::kNull
                      ? scheduler_config_of(sampler->at("config", Json::Kind::kObject, where + " sampler"),
                                            m.sampler_, native, where)
                      : SchedulerConfig::smartedit(m.sampler_);
  }
  if (const Json* d = root.find("edit_defaults"); d && d->kind != Json::Kind::kNull) {
    const std::string w = where + " edit_defaults";
    if (d->kind != Json::Kind::kObject) throw std::runtime_error(w + " must be a JSON object");
    EditDefaults& e = m.edit_defaults_;
    if (const Json* v = d->find("steps")) {
      if (v->kind != Json::Kind::kNumber || !v->is_uint || v->uint < 1 || v->uint > static_cast<uint64_t>(kMaxSteps))
        throw std::runtime_error(w + ": steps = " + value_text(*v) + ": must be an integer in [1, " +
                                 std::to_string(kMaxSteps) + "]");
      e.steps = static_cast<int64_t>(v->uint);
    }
    for (auto [key, field] : {std::pair{"guidance_scale", &e.guidance_scale},
                              std::pair{"image_guidance_scale", &e.image_guidance_scale}})
      if (const Json* v = d->find(key)) {
        if (v->kind != Json::Kind::kNumber || !std::isfinite(v->number))
          throw std::runtime_error(w + ": " + key + " = " + value_text(*v) + ": must be a finite number");
        *field = v->number;
      }
    if (const Json* v = d->find("seed")) {
      if (v->kind != Json::Kind::kNumber || !v->is_uint || v->uint > (uint64_t{1} << 63) - 1)
        throw std::runtime_error(w + ": seed = " + value_text(*v) + ": must be an integer in [0, 2^63-1]");
      e.seed = v->uint;
    }
  }
  std::map<std::string, DimMeaning> meanings;
  if (const Json* dims = root.find("dims"); dims && dims->kind != Json::Kind::kNull) {
    const std::string w = where + " dims";
    if (dims->kind != Json::Kind::kObject) throw std::runtime_error(w + " must be a JSON object");
    for (const auto& [dim, d] : dims->object) {
      DimMeaning meaning;
      meaning.what = d.at("what", Json::Kind::kString, w + " " + dim).string;
      meaning.flag = d.at("flag", Json::Kind::kString, w + " " + dim).string;
      const Json& px = d.at("px", Json::Kind::kNumber, w + " " + dim);
      if (!px.is_uint || px.uint > 4096)
        throw std::runtime_error(w + " " + dim + ": px = " + value_text(px) + ": must be an integer in [0, 4096] "
                                 "(image pixels per unit; 0: not an image side)");
      meaning.px = static_cast<int64_t>(px.uint);
      meanings[dim] = meaning;
    }
  }
  const fs::path root_dir = fs::weakly_canonical(dir);
  std::vector<std::string> unchecked;
  for (const auto& [graph, e] : entries->object) {
    const std::string w = where + " [" + target + "][" + graph + "]";
    if (e.at("source", Json::Kind::kString, w).string != source)
      throw std::runtime_error(w + " was exported from another source than this folder's (copied in from another "
                               "export?): re-run smartedit-export --target " + target + " --out " + artifacts_dir);
    // the export's check of the entry (smartedit/graphs/manifest.py): false = failed, never run; null = not checked
    const Json* verified = e.find("verified");
    if (verified && verified->kind != Json::Kind::kBool && verified->kind != Json::Kind::kNull)
      throw std::runtime_error(w + ": 'verified' must be true, false or null");
    if (verified && verified->kind == Json::Kind::kBool && !verified->boolean)
      throw std::runtime_error(target + "/" + graph + " failed its check at export (verified: false in " + where +
                               ", see report.json): it is not run; re-run smartedit-export --target " + target);
    if (!verified || verified->kind == Json::Kind::kNull) unchecked.push_back(target + "/" + graph);
    GraphArtifact g;
    g.graph = graph;
    const Json& options = e.at("options", Json::Kind::kObject, w);
    g.precision = options.at("precision", Json::Kind::kString, w + " options").string;
    const Json* fold = options.find("fold_cfg");
    g.fold_cfg = fold && fold->kind == Json::Kind::kBool && fold->boolean;
    if (const Json* branch = options.find("cache_branch"); branch && branch->kind != Json::Kind::kNull) {
      if (branch->kind != Json::Kind::kNumber || !branch->is_uint || branch->uint > 1000)
        throw std::runtime_error(w + ": options.cache_branch must be a skip branch (an integer >= 0)");
      g.cache_branch = static_cast<int64_t>(branch->uint);
    }
    const Json& spec = e.at("spec", Json::Kind::kObject, w);
    g.spec.name = spec.at("name", Json::Kind::kString, w + " spec").string;
    g.spec.meanings = meanings;
    g.spec.inputs = tensors(spec.at("inputs", Json::Kind::kArray, w + " spec"), w + " spec input");
    g.spec.outputs = tensors(spec.at("outputs", Json::Kind::kArray, w + " spec"), w + " spec output");
    for (const auto& [dim, r] : spec.at("dims", Json::Kind::kObject, w + " spec").object) {
      DimRange d;
      for (auto [key, field] : {std::pair{"min", &d.min}, std::pair{"opt", &d.opt}, std::pair{"max", &d.max}}) {
        const Json& v = r.at(key, Json::Kind::kNumber, w + " spec dims " + dim);
        if (!v.is_uint || v.uint < 1 || v.uint > static_cast<uint64_t>(kMaxDim))
          throw std::runtime_error(w + ": dimension " + dim + " has a bad " + key);
        *field = static_cast<int64_t>(v.uint);
      }
      g.spec.dims[dim] = d;
    }
    for (const TensorSpec& t : g.spec.inputs)
      for (const auto& [k, dim] : t.shape)
        if (!dim.empty() && !g.spec.dims.count(dim))
          throw std::runtime_error(w + ": input " + t.name + " uses dimension " + dim + " with no range");
    for (const auto& [rel, meta] : e.at("files", Json::Kind::kObject, w).object) {
      const fs::path file = fs::weakly_canonical(dir / rel);
      const auto [end, _] = std::mismatch(root_dir.begin(), root_dir.end(), file.begin(), file.end());
      if (end != root_dir.end()) throw std::runtime_error(w + " names '" + rel + "', outside " + artifacts_dir);
      const Json& bytes = meta.at("bytes", Json::Kind::kNumber, w + " " + rel);
      const std::string& sha256 = meta.at("sha256", Json::Kind::kString, w + " " + rel).string;
      if (!is_sha256(sha256)) throw std::runtime_error(w + " " + rel + ": sha256 is not 64 lowercase hex digits");
      std::error_code ec;
      const auto on_disk = fs::file_size(file, ec);
      if (ec || !bytes.is_uint || on_disk != bytes.uint)
        throw std::runtime_error(file.string() + " is missing or differs from the manifest: re-run the export");
      g.files.push_back({file.string(), sha256, bytes.uint});
      if (file.extension() == ".pt2") g.file = file.string();
    }
    if (g.file.empty()) throw std::runtime_error(w + ": no .pt2 file listed");
    m.graphs_[graph] = std::move(g);
  }
  if (!unchecked.empty()) {  // run, and said once: the export did not check them (smartedit-export --no-verify)
    std::string names;
    for (const std::string& n : unchecked) names += (names.empty() ? "" : ", ") + n;
    std::cerr << "warning: " << names << " not checked at export (smartedit-export --no-verify): smartedit-verify "
              << "checks them where they run\n";
  }
  return m;
}

SchedulerConfig Manifest::scheduler_config(const std::string& sampler) const {
  SchedulerConfig c = SchedulerConfig::smartedit(sampler);
  if (sampler == sampler_) {
    c = recorded_;
  } else {  // the recorded training schedule (SCHEDULER_CONFIG's keys), this sampler's own keys
    c.num_train_timesteps = recorded_.num_train_timesteps;
    c.beta_start = recorded_.beta_start;
    c.beta_end = recorded_.beta_end;
    c.beta_schedule = recorded_.beta_schedule;
    c.steps_offset = recorded_.steps_offset;
    c.prediction_type = recorded_.prediction_type;
  }
  try {
    c.check();
  } catch (const std::invalid_argument& e) {
    throw std::invalid_argument((std::filesystem::path(dir_) / "manifest.json").string() + ": " + e.what() +
                                " (sampler '" + sampler + "')");
  }
  return c;
}

const GraphArtifact& Manifest::graph(const std::string& name) const {
  const auto it = graphs_.find(name);
  if (it == graphs_.end())
    throw std::invalid_argument("the manifest in " + dir_ + " lists no " + target_ + " artifact for graph " + name +
                             ": run smartedit-export --target " + target_ + " --out " + dir_);
  return it->second;
}

const GraphArtifact& Manifest::open(const std::string& name) {
  const GraphArtifact& g = graph(name);
  for (const ArtifactFile& f : g.files) {
    if (hashed_.count(f.path)) continue;
    std::string actual;
    try {
      actual = sha256_file(f.path);
    } catch (const std::runtime_error& e) {  // unreadable: as missing, bad input (the Python side's ArtifactError)
      throw std::invalid_argument(std::string(e.what()) + ": re-run the export");
    }
    if (actual != f.sha256)
      throw std::invalid_argument(f.path + " does not match its manifest entry (sha256 " + f.sha256.substr(0, 12) +
                                  "... recorded, " + actual.substr(0, 12) + "... on disk): re-run the export");
    hashed_.insert(f.path);
  }
  return g;
}

std::string sha256_file(const std::string& path) {
  // chunks of 4 MiB: constant memory for files of many GB, few enough reads that the hash is the cost
  std::unique_ptr<std::FILE, int (*)(std::FILE*)> f(std::fopen(path.c_str(), "rb"), &std::fclose);
  if (!f) throw std::runtime_error(path + ": cannot open (" + std::strerror(errno) + ")");
  std::unique_ptr<EVP_MD_CTX, void (*)(EVP_MD_CTX*)> ctx(EVP_MD_CTX_new(), &EVP_MD_CTX_free);
  if (!ctx || EVP_DigestInit_ex(ctx.get(), EVP_sha256(), nullptr) != 1)
    throw std::runtime_error(path + ": cannot start a sha256 (OpenSSL)");
  std::vector<unsigned char> buf(size_t{4} << 20);
  for (;;) {
    const size_t n = std::fread(buf.data(), 1, buf.size(), f.get());
    if (n && EVP_DigestUpdate(ctx.get(), buf.data(), n) != 1)
      throw std::runtime_error(path + ": sha256 failed (OpenSSL)");
    if (n < buf.size()) break;
  }
  if (std::ferror(f.get())) throw std::runtime_error(path + ": cannot be read to its end (" + std::strerror(errno) + ")");
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  if (EVP_DigestFinal_ex(ctx.get(), md, &len) != 1) throw std::runtime_error(path + ": sha256 failed (OpenSSL)");
  static const char* kHex = "0123456789abcdef";
  std::string hex;
  for (unsigned int i = 0; i < len; ++i) hex += {kHex[md[i] >> 4], kHex[md[i] & 15]};
  return hex;
}

}  // namespace smartedit
