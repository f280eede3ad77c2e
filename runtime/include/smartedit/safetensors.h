// safetensors files (https://github.com/huggingface/safetensors: 8-byte little-endian header length, a JSON header
// {name: {dtype, shape, data_offsets}}, then the raw little-endian data): the runtime's tensor I/O, no pickle.
// Reading validates everything against the file (header length within the file, shapes whose element count cannot
// overflow, offsets in range and matching dtype size x count) and throws std::invalid_argument naming the bad value;
// writing goes to a unique temporary file beside the target, fsync'd and renamed into place, so a failed or
// interrupted (SIGINT/SIGTERM/SIGHUP) write leaves no partial file (std::runtime_error on a write failure).
#pragma once

#include <ATen/ATen.h>

#include <map>
#include <string>

namespace smartedit {

std::map<std::string, at::Tensor> load_safetensors(const std::string& path);
void save_safetensors(const std::string& path, const std::map<std::string, at::Tensor>& tensors);

}  // namespace smartedit
