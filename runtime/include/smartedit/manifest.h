// The artifacts of one target in an smartedit-export folder, read from its manifest.json (the schema of
// smartedit/graphs/manifest.py): each graph's file, resolved and kept inside the folder, and its input contract
// (names, shapes as dimension expressions such as "3*B" or "8*h8", the exported range of every named dimension).
// The runtime checks its inputs against these specs, as the Python runtimes do (GraphSpec.check_inputs), instead
// of hard-coding shapes.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace smartedit {

struct TensorSpec {
  std::string name;
  std::string dtype;                                    // "float" (the graph's precision), "float32", "int64"
  std::vector<std::pair<int64_t, std::string>> shape;  // per axis: k and a dimension name (k * X), or k alone
};

struct DimRange {
  int64_t min = 1, opt = 1, max = 1;
};

struct GraphSpec {
  std::string name;
  std::vector<TensorSpec> inputs, outputs;
  std::map<std::string, DimRange> dims;

  // The named dimensions of `inputs` (in spec order); std::invalid_argument naming the input, the dimension and its
  // exported range when they do not fit.
  std::map<std::string, int64_t> check(const std::vector<at::Tensor>& inputs) const;
};

struct GraphArtifact {
  std::string graph;
  std::string file;  // absolute, inside the artifacts folder
  std::string precision;
  bool fold_cfg = false;
  GraphSpec spec;
};

class Manifest {
 public:
  // OUT/manifest.json's entries for `target` (e.g. "aoti"); std::invalid_argument (bad input, like the Python
  // side's ArtifactError) naming what is missing or malformed
  static Manifest load(const std::string& artifacts_dir, const std::string& target);

  const GraphArtifact& graph(const std::string& name) const;
  const std::string& dir() const { return dir_; }

 private:
  static Manifest load_unchecked(const std::string& artifacts_dir, const std::string& target);

  std::string dir_, target_;
  std::map<std::string, GraphArtifact> graphs_;
};

}  // namespace smartedit
