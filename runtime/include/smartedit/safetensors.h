// safetensors files (https://github.com/huggingface/safetensors: 8-byte little-endian header length, a JSON header
// {name: {dtype, shape, data_offsets}}, then the raw little-endian data): the runtime's tensor I/O, no pickle.
// Reading validates everything against the file (offsets in range, sizes matching dtype x shape) and names the bad
// value; writing goes to a temporary file renamed into place, so a failed write leaves no partial file.
#pragma once

#include <ATen/ATen.h>

#include <map>
#include <string>

namespace smartedit {

std::map<std::string, at::Tensor> load_safetensors(const std::string& path);
void save_safetensors(const std::string& path, const std::map<std::string, at::Tensor>& tensors);

}  // namespace smartedit
