#include "smartedit/safetensors.h"

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

// The JSON subset a safetensors header uses: objects, arrays, strings, non-negative integers.
struct Json {
  enum Kind { kObject, kArray, kString, kNumber } kind = kNumber;
  std::map<std::string, Json> object;
  std::vector<Json> array;
  std::string string;
  uint64_t number = 0;
};

class Parser {
 public:
  Parser(const std::string& text, const std::string& path) : s_(text), path_(path) {}

  Json parse() {
    Json v = value();
    skip();
    if (i_ != s_.size()) error("trailing characters");
    return v;
  }

 private:
  void skip() {
    while (i_ < s_.size() && (s_[i_] == ' ' || s_[i_] == '\n' || s_[i_] == '\r' || s_[i_] == '\t')) ++i_;
  }
  [[noreturn]] void error(const std::string& what) {
    fail(path_, "bad header JSON at byte " + std::to_string(i_) + ": " + what);
  }
  char peek() {
    skip();
    if (i_ >= s_.size()) error("unexpected end");
    return s_[i_];
  }
  void expect(char c) {
    if (peek() != c) error(std::string("expected '") + c + "'");
    ++i_;
  }
  Json value() {
    const char c = peek();
    if (c == '{') return object();
    if (c == '[') return array();
    if (c == '"') {
      Json v;
      v.kind = Json::kString;
      v.string = string();
      return v;
    }
    if (c >= '0' && c <= '9') return number();
    error(std::string("unexpected '") + c + "'");
  }
  std::string string() {
    expect('"');
    std::string out;
    while (i_ < s_.size() && s_[i_] != '"') {
      if (s_[i_] == '\\') {
        if (++i_ >= s_.size()) break;
        const char e = s_[i_];
        if (e == '"' || e == '\\' || e == '/') out += e;
        else if (e == 'n') out += '\n';
        else if (e == 't') out += '\t';
        else error("unsupported escape \\" + std::string(1, e));
      } else {
        out += s_[i_];
      }
      ++i_;
    }
    if (i_ >= s_.size()) error("unterminated string");
    ++i_;
    return out;
  }
  Json number() {
    Json v;
    while (i_ < s_.size() && s_[i_] >= '0' && s_[i_] <= '9') {
      const uint64_t d = static_cast<uint64_t>(s_[i_++] - '0');
      if (v.number > (UINT64_MAX - d) / 10) error("integer overflow");
      v.number = v.number * 10 + d;
    }
    if (i_ < s_.size() && (s_[i_] == '.' || s_[i_] == 'e' || s_[i_] == 'E' || s_[i_] == '-')) error("not an integer");
    return v;
  }
  Json array() {
    Json v;
    v.kind = Json::kArray;
    expect('[');
    if (peek() == ']') return ++i_, v;
    for (;;) {
      v.array.push_back(value());
      if (peek() == ',') { ++i_; continue; }
      expect(']');
      return v;
    }
  }
  Json object() {
    Json v;
    v.kind = Json::kObject;
    expect('{');
    if (peek() == '}') return ++i_, v;
    for (;;) {
      if (peek() != '"') error("expected a key");
      std::string key = string();
      expect(':');
      v.object[key] = value();
      if (peek() == ',') { ++i_; continue; }
      expect('}');
      return v;
    }
  }

  const std::string& s_;
  const std::string& path_;
  size_t i_ = 0;
};

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
  auto it = entry.object.find(key);
  if (it == entry.object.end() || it->second.kind != kind)
    fail(path, "tensor '" + tensor + "': missing or malformed '" + key + "'");
  return it->second;
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
  const Json root = Parser(header, path).parse();
  if (root.kind != Json::kObject) fail(path, "header is not a JSON object");
  const uint64_t data_start = 8 + header_len, data_size = file_size - data_start;

  std::map<std::string, at::Tensor> out;
  for (const auto& [name, entry] : root.object) {
    if (name == "__metadata__") continue;
    if (entry.kind != Json::kObject) fail(path, "tensor '" + name + "' is not an object");
    const at::ScalarType type = dtype_of(field(entry, "dtype", Json::kString, path, name).string, path, name);
    std::vector<int64_t> shape;
    uint64_t numel = 1;
    for (const Json& d : field(entry, "shape", Json::kArray, path, name).array) {
      if (d.kind != Json::kNumber || d.number > (1ull << 40)) fail(path, "tensor '" + name + "': bad shape entry");
      shape.push_back(static_cast<int64_t>(d.number));
      numel *= d.number;
    }
    const Json& offsets = field(entry, "data_offsets", Json::kArray, path, name);
    if (offsets.array.size() != 2) fail(path, "tensor '" + name + "': data_offsets must hold 2 numbers");
    const uint64_t begin = offsets.array[0].number, end = offsets.array[1].number;
    const uint64_t nbytes = numel * c10::elementSize(type);
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
