// A small JSON reader for the runtime's two JSON inputs: safetensors headers and smartedit-export's manifest.json.
// RFC 8259 values; numbers keep their text's integer value exactly when they are non-negative integers (offsets and
// sizes past 2^53). Nesting is bounded (kMaxDepth) so a hostile file cannot exhaust the stack, and every error names
// the file and the byte offset.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace smartedit {

struct Json {
  enum class Kind { kNull, kBool, kNumber, kString, kArray, kObject };
  Kind kind = Kind::kNull;
  bool boolean = false;
  double number = 0;
  bool is_uint = false;  // a non-negative integer literal: `uint` holds it exactly
  uint64_t uint = 0;
  std::string string;
  std::vector<Json> array;
  std::map<std::string, Json> object;

  // the member `key` of an object, of kind `kind`, or an error naming `where` and the key
  const Json& at(const std::string& key, Kind kind, const std::string& where) const;
  const Json* find(const std::string& key) const;
};

constexpr int kMaxDepth = 64;

Json parse_json(const std::string& text, const std::string& where);

}  // namespace smartedit
