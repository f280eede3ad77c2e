#include "smartedit/safetensors.h"

#include "smartedit/json.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <vector>

namespace smartedit {

namespace {

// a file that cannot be read as safetensors is bad input (smartedit/errors.py InputError: exit status 2)
[[noreturn]] void fail(const std::string& path, const std::string& what) {
  throw std::invalid_argument(path + ": " + what);
}

// writing: the disk, not the input (exit status 1)
[[noreturn]] void fail_write(const std::string& path, const std::string& what) {
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
  throw std::invalid_argument(std::string("cannot store dtype ") + c10::toString(t) + " in safetensors");
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

// The one temporary file being written; a signal handler removes it (unlink is async-signal-safe) and re-raises.
char g_temp_path[4096];
volatile std::sig_atomic_t g_temp_live = 0;

extern "C" void remove_temp_and_reraise(int sig) {
  if (g_temp_live) ::unlink(g_temp_path);
  std::signal(sig, SIG_DFL);
  std::raise(sig);
}

class TempFile {
 public:
  explicit TempFile(const std::string& dst) : dst_(dst), path_(dst + ".tmp-XXXXXX") {
    if (path_.size() >= sizeof(g_temp_path)) fail_write(dst, "path too long");
    std::snprintf(g_temp_path, sizeof(g_temp_path), "%s", path_.c_str());
    for (int i = 0; i < 3; ++i) ::sigaction(kSignals[i], nullptr, &saved_[i]);
    struct sigaction sa {};
    sa.sa_handler = remove_temp_and_reraise;
    sigemptyset(&sa.sa_mask);
    for (int i = 0; i < 3; ++i)
      if (saved_[i].sa_handler == SIG_DFL) ::sigaction(kSignals[i], &sa, nullptr);
    fd_ = ::mkstemp(g_temp_path);  // O_EXCL, mode 0600
    if (fd_ < 0) {
      restore();
      fail_write(dst, std::string("cannot create a temporary file beside it: ") + std::strerror(errno));
    }
    path_ = g_temp_path;
    g_temp_live = 1;
    const mode_t mask = ::umask(0);
    ::umask(mask);
    ::fchmod(fd_, 0666 & ~mask);  // the mode a plain create would give
  }
  TempFile(const TempFile&) = delete;
  TempFile& operator=(const TempFile&) = delete;
  ~TempFile() {
    if (fd_ >= 0) ::close(fd_);
    if (g_temp_live) ::unlink(path_.c_str());
    g_temp_live = 0;
    restore();
  }

  void write(const void* data, size_t n) {
    const char* p = static_cast<const char*>(data);
    while (n) {
      const ssize_t w = ::write(fd_, p, n);
      if (w < 0 && errno == EINTR) continue;
      if (w <= 0) fail_write(dst_, std::string("write failed: ") + std::strerror(w < 0 ? errno : EIO));
      p += w;
      n -= static_cast<size_t>(w);
    }
  }

  void commit() {  // on disk, then into place
    if (::fsync(fd_) != 0) fail_write(dst_, std::string("write failed: ") + std::strerror(errno));
    const int fd = fd_;
    fd_ = -1;
    if (::close(fd) != 0) fail_write(dst_, std::string("write failed: ") + std::strerror(errno));
    if (std::rename(path_.c_str(), dst_.c_str()) != 0)
      fail_write(dst_, std::string("cannot move the written file into place: ") + std::strerror(errno));
    g_temp_live = 0;
  }

 private:
  void restore() {
    for (int i = 0; i < 3; ++i)
      if (saved_[i].sa_handler == SIG_DFL) ::sigaction(kSignals[i], &saved_[i], nullptr);
  }

  static constexpr int kSignals[3] = {SIGINT, SIGTERM, SIGHUP};
  std::string dst_, path_;
  int fd_ = -1;
  struct sigaction saved_[3] {};
};

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
  if (!f) fail(path, "read failed in the header");
  Json root;
  try {
    root = parse_json(header, path + " (header)");
  } catch (const std::runtime_error& e) {
    throw std::invalid_argument(e.what());
  }
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
  // a temporary file beside the output (same file system: the rename is atomic), unique so that no other file, an
  // input named OUT.tmp included, is ever truncated; removed on any failure and on SIGINT/SIGTERM/SIGHUP meanwhile
  TempFile tmp(path);
  unsigned char len_bytes[8];
  const uint64_t len = h.size();
  for (int i = 0; i < 8; ++i) len_bytes[i] = static_cast<unsigned char>(len >> (8 * i));
  tmp.write(len_bytes, 8);
  tmp.write(h.data(), h.size());
  for (const at::Tensor& t : blobs) tmp.write(t.data_ptr(), static_cast<size_t>(t.numel() * t.element_size()));
  tmp.commit();
}

}  // namespace smartedit
