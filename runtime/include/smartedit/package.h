// One AOTInductor package of `smartedit-export --target aoti`, with the contract its metadata declares (written by
// export/aoti.py: "smartedit.inputs" = "name:dtype,..." in call order). run() casts each input to the package's dtype
// and makes it contiguous on the package's device: the compiled code trusts both (it checks dtypes only under
// AOTI_RUNTIME_CHECK_INPUTS=1, and never strides), so an fp32 tensor handed to an fp16 package would be read as
// garbage.
#pragma once

#include <ATen/ATen.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace smartedit {

class Package {
 public:
  Package(const std::string& path, const c10::Device& device);

  std::vector<at::Tensor> run(const std::vector<at::Tensor>& inputs);
  at::ScalarType input_dtype(size_t i) const { return inputs_.at(i).second; }
  const std::string& input_name(size_t i) const { return inputs_.at(i).first; }
  const std::string& graph() const { return graph_; }

 private:
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> loader_;
  std::vector<std::pair<std::string, at::ScalarType>> inputs_;  // name, dtype, in call order
  std::string path_, graph_;
  c10::Device device_;
};

}  // namespace smartedit
