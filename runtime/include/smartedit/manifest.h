// The artifacts of one target in an smartedit-export folder, read from its manifest.json (the schema of
// smartedit/graphs/manifest.py): each graph's file, resolved and kept inside the folder, and its input contract
// (names, shapes as dimension expressions such as "3*B" or "8*h8", the exported range of every named dimension).
// Every file the manifest names must resolve (symlinks followed) inside the folder and have its recorded size when
// the manifest is loaded, and its recorded sha256 when its graph is first opened (Manifest::open, before the package
// reaches libtorch's loader), as smartedit/engines/artifacts.py does: what runs is what was exported and verified.
// The runtime checks its inputs against these specs, as the Python runtimes do (GraphSpec.check_inputs), instead
// of hard-coding shapes.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "smartedit/euler_ancestral.h"

namespace smartedit {

struct TensorSpec {
  std::string name;
  std::string dtype;                                    // "float" (the graph's precision), "float32", "int64"
  std::vector<std::pair<int64_t, std::string>> shape;  // per axis: k and a dimension name (k * X), or k alone
};

struct DimRange {
  int64_t min = 1, opt = 1, max = 1;
};

// What a named dimension means (the manifest's "dims", smartedit/graphs/spec.py DIM_MEANINGS): "image height" with
// 64 image pixels per unit for h8, the smartedit-export flag that sets its range. px 0: not an image side.
struct DimMeaning {
  std::string what, flag;
  int64_t px = 0;
};

struct GraphSpec {
  std::string name;
  std::vector<TensorSpec> inputs, outputs;
  std::map<std::string, DimRange> dims;
  std::map<std::string, DimMeaning> meanings;  // the manifest's; empty for a manifest that records none

  // The named dimensions of `inputs` (in spec order); std::invalid_argument naming the input, the dimension and its
  // exported range when they do not fit.
  std::map<std::string, int64_t> check(const std::vector<at::Tensor>& inputs) const;
};

struct ArtifactFile {
  std::string path;    // absolute, symlinks resolved, inside the artifacts folder
  std::string sha256;  // as recorded: 64 lowercase hex digits
  uint64_t bytes = 0;
};

struct GraphArtifact {
  std::string graph;
  std::string file;  // the .pt2 package: absolute, inside the artifacts folder
  std::vector<ArtifactFile> files;  // every file of the entry (the package among them)
  std::string precision;
  bool fold_cfg = false;
  int64_t cache_branch = -1;  // a DeepCache graph (unet_deep, unet_shallow): options.cache_branch; -1 for the others
  GraphSpec spec;
};

// An edit's defaults, as the export recorded them (the manifest's "edit_defaults", smartedit/config.py); these
// initial values stand for a manifest that records none (and for `denoise`, which reads no manifest).
struct EditDefaults {
  int64_t steps = 100;
  double guidance_scale = 7.5;        // text
  double image_guidance_scale = 1.5;  // image
  uint64_t seed = 0;
};

class Manifest {
 public:
  // OUT/manifest.json's entries for `target` (e.g. "aoti"); std::invalid_argument (bad input, like the Python
  // side's ArtifactError) naming what is missing or malformed
  static Manifest load(const std::string& artifacts_dir, const std::string& target);

  // The graph's entry, as read (shapes, paths); its files are not hashed here.
  const GraphArtifact& graph(const std::string& name) const;
  // The graph's entry for loading: its files are checked against their recorded sha256 the first time (once per
  // Manifest per file), std::invalid_argument "<path> does not match its manifest entry (sha256 ...)" otherwise.
  // Call it before handing the files to a loader. The check is by path: a file replaced between the hash and the
  // load is not caught (the folder is trusted not to change under a running process, as on the Python side).
  const GraphArtifact& open(const std::string& name);
  const std::string& dir() const { return dir_; }
  // The sampler the export recorded (the model folder's; smartedit/graphs/manifest.py "sampler"), by name;
  // "euler-ancestral" for a manifest that records none.
  const std::string& sampler() const { return sampler_; }
  // The scheduler config `sampler` runs with: the recorded sampler, the config the manifest records with it (a key it
  // leaves out: SmartEdit's); another sampler, SmartEdit's config of that sampler on the recorded training schedule
  // (num_train_timesteps, betas, steps_offset, prediction_type: smartedit/config.py SCHEDULER_CONFIG's keys, every
  // sampler's). std::invalid_argument naming the manifest, the key and the value when it cannot be built.
  SchedulerConfig scheduler_config(const std::string& sampler) const;
  // The manifest's edit defaults (EditDefaults' own where it records none).
  const EditDefaults& edit_defaults() const { return edit_defaults_; }

 private:
  static Manifest load_unchecked(const std::string& artifacts_dir, const std::string& target);

  std::string dir_, target_, sampler_ = "euler-ancestral";
  SchedulerConfig recorded_ = SchedulerConfig::smartedit("euler-ancestral");  // the recorded sampler's
  EditDefaults edit_defaults_;
  std::map<std::string, GraphArtifact> graphs_;
  std::set<std::string> hashed_;  // files already found to match
};

// The sha256 of a file, 64 lowercase hex digits, read in chunks (OpenSSL EVP); std::runtime_error naming the file
// when it cannot be read. Costs about 1.7 GB/s on one core of a current x86 server CPU with SHA-NI (`openssl speed
// -evp sha256` measured 1.4 GB/s on a busy EPYC core): ~8 s for the 13.8 GB unet of the 7b model, once per process,
// against minutes of loading; milliseconds for the tiny preset's packages.
std::string sha256_file(const std::string& path);

}  // namespace smartedit
