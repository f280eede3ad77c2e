#include "smartedit/safetensors.h"

#include "smartedit/json.h"

#include <cstdint>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <vector>

namespace smartedit {

namespace {

[[noreturn]] void fail(const std::string& path, const std::string& what) {
  throw std::runtime_error(path + ": " + what);
}

struct DtypeInfo {
  const char* name;
  at::ScalarType type;
};
constexpr DtypeInfo kDtypes[] = {{"F64", at::kDouble}, {"F32", at::kFloat}, {"F16", at::kHalf},
                                 {"BF16", at::kBFloat16}, {"I64", at::kLong}, {"I32", at::kInt},
                                 {"I16", at::kShort}, {"I8", at::kChar}, {"U8", at::kByte}, {"BOOL", at::kBool}};

at::ScalarType dtype_of(const std::string& name, const std::string& path, const std::string& tensor) {
  for (const auto& d : kDtypes)
    if (name == d.name) return d.type;
  fail(path, "tensor '" + tensor + "' has unsupported dtype '" + name + "'");
}

const char* name_of(at::ScalarType t) {
  for (const auto& d : kDtypes)
    if (t == d.type) return d.name;
  throw std::runtime_error(std::string("cannot store dtype ") + c10::toString(t) + " in safetensors");
}

const Json& field(const Json& entry, const char* key, Json::Kind kind, const std::string& path,
                  const std::string& tensor) {
  const Json* v = entry.find(key);
  if (!v || v->kind != kind) fail(path, "tensor '" + tensor + "': missing or malformed '" + key + "'");
  return *v;
}

std::string escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == '"' || c == '\\') out += '\\';
    out += c;
  }
  return out;
}

}  // namespace

std::map<std::string, at::Tensor> load_safetensors(const std::string& path) {
  std::ifstream f(path, std::ios::binary | std::ios::ate);
  if (!f) fail(path, "cannot open");
  const uint64_t file_size = static_cast<uint64_t>(f.tellg());
  f.seekg(0);
  unsigned char len_bytes[8];
  if (file_size < 8 || !f.read(reinterpret_cast<char*>(len_bytes), 8))
    fail(path, "shorter than the 8-byte header length");
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | len_bytes[i];
  if (header_len > file_size - 8 || header_len > (100u << 20))
    fail(path, "header length " + std::to_string(header_len) + " exceeds the file (" + std::to_string(file_size) +
                   " bytes) or 100 MB");
  std::string header(header_len, '\0');
  f.read(header.data(), static_cast<std::streamsize>(header_len));
  const Json root = parse_json(header, path + " (header)");
  if (root.kind != Json::Kind::kObject) fail(path, "header is not a JSON object");
  const uint64_t data_start = 8 + header_len, data_size = file_size - data_start;

  std::map<std::string, at::Tensor> out;
  for (const auto& [name, entry] : root.object) {
    if (name == "__metadata__") continue;
    if (out.size() > 100000) fail(path, "more than 100000 tensors");
    if (entry.kind != Json::Kind::kObject) fail(path, "tensor '" + name + "' is not an object");
    const at::ScalarType type =
        dtype_of(field(entry, "dtype", Json::Kind::kString, path, name).string, path, name);
    std::vector<int64_t> shape;
    uint64_t numel = 1;
    for (const Json& d : field(entry, "shape", Json::Kind::kArray, path, name).array) {
      if (!d.is_uint || d.uint > (1ull << 40)) fail(path, "tensor '" + name + "': bad shape entry");
      shape.push_back(static_cast<int64_t>(d.uint));
      if (__builtin_mul_overflow(numel, d.uint, &numel) || numel > data_size)
        fail(path, "tensor '" + name + "': its shape holds more elements than the file has bytes");
    }
    const Json& offsets = field(entry, "data_offsets", Json::Kind::kArray, path, name);
    if (offsets.array.size() != 2 || !offsets.array[0].is_uint || !offsets.array[1].is_uint)
      fail(path, "tensor '" + name + "': data_offsets must hold 2 non-negative integers");
    const uint64_t begin = offsets.array[0].uint, end = offsets.array[1].uint;
    const uint64_t nbytes = numel * c10::elementSize(type);  // numel <= data_size: no overflow
    if (begin > end || end > data_size || end - begin != nbytes)
      fail(path, "tensor '" + name + "': data_offsets [" + std::to_string(begin) + ", " + std::to_string(end) +
                     "] do not hold " + std::to_string(nbytes) + " bytes within the " + std::to_string(data_size) +
                     "-byte data section");
    at::Tensor t = at::empty(shape, at::TensorOptions(type));
    f.seekg(static_cast<std::streamoff>(data_start + begin));
    if (nbytes && !f.read(static_cast<char*>(t.data_ptr()), static_cast<std::streamsize>(nbytes)))
      fail(path, "tensor '" + name + "': read failed");
    out.emplace(name, std::move(t));
  }
  return out;
}

void save_safetensors(const std::string& path, const std::map<std::string, at::Tensor>& tensors) {
  std::ostringstream header;
  std::vector<at::Tensor> blobs;
  uint64_t offset = 0;
  header << "{";
  bool first = true;
  for (const auto& [name, tensor] : tensors) {
    at::Tensor t = tensor.detach().to(at::kCPU).contiguous();
    const uint64_t nbytes = t.numel() * t.element_size();
    header << (first ? "" : ",") << "\"" << escape(name) << "\":{\"dtype\":\"" << name_of(t.scalar_type())
           << "\",\"shape\":[";
    for (int64_t i = 0; i < t.dim(); ++i) header << (i ? "," : "") << t.size(i);
    header << "],\"data_offsets\":[" << offset << "," << offset + nbytes << "]}";
    offset += nbytes;
    blobs.push_back(t);
    first = false;
  }
  header << "}";
  std::string h = header.str();
  h.append((8 - h.size() % 8) % 8, ' ');  // the data section starts 8-byte aligned
  const std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    if (!f) fail(tmp, "cannot open for writing");
    unsigned char len_bytes[8];
    uint64_t len = h.size();
    for (int i = 0; i < 8; ++i) len_bytes[i] = static_cast<unsigned char>(len >> (8 * i));
    f.write(reinterpret_cast<const char*>(len_bytes), 8);
    f.write(h.data(), static_cast<std::streamsize>(h.size()));
    for (const at::Tensor& t : blobs)
      f.write(static_cast<const char*>(t.data_ptr()), static_cast<std::streamsize>(t.numel() * t.element_size()));
    if (!f.flush()) {
      std::remove(tmp.c_str());
      fail(tmp, "write failed");
    }
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    fail(path, "cannot move the written file into place");
  }
}

}  // namespace smartedit
