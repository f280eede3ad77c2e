#include "smartedit/package.h"

#include <map>
#include <sstream>
#include <stdexcept>

namespace smartedit {

namespace {
constexpr const char* kPackageVersion = "2";  // export/aoti.py PACKAGE_VERSION

at::ScalarType dtype_named(const std::string& name, const std::string& path) {
  static const std::map<std::string, at::ScalarType> kDtypes = {
      {"float16", at::kHalf}, {"bfloat16", at::kBFloat16}, {"float32", at::kFloat}, {"int64", at::kLong}};
  const auto it = kDtypes.find(name);
  if (it == kDtypes.end()) throw std::runtime_error(path + ": unknown input dtype '" + name + "' in its metadata");
  return it->second;
}

std::unique_ptr<torch::inductor::AOTIModelPackageLoader> load(const std::string& path, const c10::Device& device) {
  try {
    return std::make_unique<torch::inductor::AOTIModelPackageLoader>(path, "model", false, 1,
                                                                     device.has_index() ? device.index() : -1);
  } catch (const c10::Error& e) {  // name the file, keep torch's first line, never its backtrace
    std::string why = e.what_without_backtrace();
    why = why.substr(0, why.find('\n'));
    if (why.find("zip archive") != std::string::npos)  // not a package at all: bad input, like a damaged artifact
      throw std::invalid_argument(path + " is not an AOTInductor package (" + why + ")");
    throw std::runtime_error(path + ": cannot load the package on " + device.str() + ": " + why);
  }
}
}  // namespace

Package::Package(const std::string& path, const c10::Device& device)
    : loader_(load(path, device)), path_(path), device_(device) {
  const auto meta = loader_->get_metadata();
  const auto version = meta.find("smartedit.package_version");
  const auto inputs = meta.find("smartedit.inputs");
  if (version == meta.end() || version->second != kPackageVersion || inputs == meta.end())
    throw std::runtime_error(path + " was compiled by an older smartedit-export (no input dtypes in its metadata): "
                                    "re-run smartedit-export --target aoti");
  graph_ = meta.count("smartedit.graph") ? meta.at("smartedit.graph") : path;
  std::stringstream list(inputs->second);
  for (std::string item; std::getline(list, item, ',');) {
    const auto colon = item.rfind(':');
    if (colon == std::string::npos) throw std::runtime_error(path + ": malformed input list '" + inputs->second + "'");
    inputs_.emplace_back(item.substr(0, colon), dtype_named(item.substr(colon + 1), path));
  }
}

std::vector<at::Tensor> Package::run(const std::vector<at::Tensor>& inputs) {
  if (inputs.size() != inputs_.size())
    throw std::invalid_argument(graph_ + " takes " + std::to_string(inputs_.size()) + " inputs, got " +
                                std::to_string(inputs.size()));
  std::vector<at::Tensor> ready;
  ready.reserve(inputs.size());
  for (size_t i = 0; i < inputs.size(); ++i) {
    if (!inputs[i].defined()) throw std::invalid_argument(graph_ + ": input " + inputs_[i].first + " is missing");
    ready.push_back(inputs[i].to(device_, inputs_[i].second).contiguous());
  }
  return loader_->run(ready);
}

}  // namespace smartedit
