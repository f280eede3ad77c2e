#include "smartedit/json.h"

#include <cstdlib>
#include <stdexcept>

namespace smartedit {

namespace {

const char* kind_name(Json::Kind k) {
  switch (k) {
    case Json::Kind::kNull: return "null";
    case Json::Kind::kBool: return "a boolean";
    case Json::Kind::kNumber: return "a number";
    case Json::Kind::kString: return "a string";
    case Json::Kind::kArray: return "an array";
    case Json::Kind::kObject: return "an object";
  }
  return "?";
}

class Parser {
 public:
  Parser(const std::string& text, const std::string& where) : s_(text), where_(where) {}

  Json parse() {
    Json v = value(0);
    skip();
    if (i_ != s_.size()) error("trailing characters");
    return v;
  }

 private:
  void skip() {
    while (i_ < s_.size() && (s_[i_] == ' ' || s_[i_] == '\n' || s_[i_] == '\r' || s_[i_] == '\t')) ++i_;
  }
  [[noreturn]] void error(const std::string& what) {
    throw std::runtime_error(where_ + ": bad JSON at byte " + std::to_string(i_) + ": " + what);
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
  bool literal(const char* word) {
    const std::string w(word);
    if (s_.compare(i_, w.size(), w) != 0) return false;
    i_ += w.size();
    return true;
  }
  Json value(int depth) {
    if (depth > kMaxDepth) error("nested deeper than " + std::to_string(kMaxDepth) + " levels");
    const char c = peek();
    Json v;
    if (c == '{') return object(depth);
    if (c == '[') return array(depth);
    if (c == '"') {
      v.kind = Json::Kind::kString;
      v.string = string();
      return v;
    }
    if (c == '-' || (c >= '0' && c <= '9')) return number();
    if (literal("true") || literal("false")) {
      v.kind = Json::Kind::kBool;
      v.boolean = s_[i_ - 1] == 'e' && s_[i_ - 2] == 'u';
      return v;
    }
    if (literal("null")) return v;
    error(std::string("unexpected '") + c + "'");
  }
  std::string string() {
    expect('"');
    std::string out;
    while (i_ < s_.size() && s_[i_] != '"') {
      const char c = s_[i_];
      if (static_cast<unsigned char>(c) < 0x20) error("control character in a string");
      if (c == '\\') {
        if (++i_ >= s_.size()) break;
        const char e = s_[i_];
        if (e == '"' || e == '\\' || e == '/') out += e;
        else if (e == 'n') out += '\n';
        else if (e == 't') out += '\t';
        else if (e == 'r') out += '\r';
        else if (e == 'b') out += '\b';
        else if (e == 'f') out += '\f';
        else if (e == 'u') out += unicode();
        else error("unsupported escape \\" + std::string(1, e));
      } else {
        out += c;
      }
      ++i_;
    }
    if (i_ >= s_.size()) error("unterminated string");
    ++i_;
    return out;
  }
  std::string unicode() {  // \uXXXX (i_ on 'u'), as UTF-8; surrogate pairs are kept as two code points
    if (i_ + 4 >= s_.size()) error("short \\u escape");
    unsigned cp = 0;
    for (int k = 1; k <= 4; ++k) {
      const char h = s_[i_ + k];
      cp <<= 4;
      if (h >= '0' && h <= '9') cp |= h - '0';
      else if (h >= 'a' && h <= 'f') cp |= h - 'a' + 10;
      else if (h >= 'A' && h <= 'F') cp |= h - 'A' + 10;
      else error("bad \\u escape");
    }
    i_ += 4;
    std::string out;
    if (cp < 0x80) {
      out += static_cast<char>(cp);
    } else if (cp < 0x800) {
      out += static_cast<char>(0xC0 | (cp >> 6));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else {
      out += static_cast<char>(0xE0 | (cp >> 12));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    }
    return out;
  }
  Json number() {
    const size_t start = i_;
    if (s_[i_] == '-') ++i_;
    bool integral = s_[start] != '-';
    while (i_ < s_.size() && ((s_[i_] >= '0' && s_[i_] <= '9') || s_[i_] == '.' || s_[i_] == 'e' ||
                              s_[i_] == 'E' || s_[i_] == '+' || s_[i_] == '-')) {
      if (!(s_[i_] >= '0' && s_[i_] <= '9')) integral = false;
      ++i_;
    }
    const std::string text = s_.substr(start, i_ - start);
    Json v;
    v.kind = Json::Kind::kNumber;
    char* end = nullptr;
    v.number = std::strtod(text.c_str(), &end);
    if (text.empty() || end != text.c_str() + text.size()) error("bad number '" + text + "'");
    if (integral) {
      v.is_uint = true;
      for (char d : text) {
        const uint64_t digit = static_cast<uint64_t>(d - '0');
        if (v.uint > (UINT64_MAX - digit) / 10) error("integer " + text + " overflows 64 bits");
        v.uint = v.uint * 10 + digit;
      }
    }
    return v;
  }
  Json array(int depth) {
    Json v;
    v.kind = Json::Kind::kArray;
    expect('[');
    if (peek() == ']') return ++i_, v;
    for (;;) {
      v.array.push_back(value(depth + 1));
      if (peek() == ',') {
        ++i_;
        continue;
      }
      expect(']');
      return v;
    }
  }
  Json object(int depth) {
    Json v;
    v.kind = Json::Kind::kObject;
    expect('{');
    if (peek() == '}') return ++i_, v;
    for (;;) {
      if (peek() != '"') error("expected a key");
      std::string key = string();
      expect(':');
      v.object[key] = value(depth + 1);
      if (peek() == ',') {
        ++i_;
        continue;
      }
      expect('}');
      return v;
    }
  }

  const std::string& s_;
  const std::string& where_;
  size_t i_ = 0;
};

}  // namespace

const Json* Json::find(const std::string& key) const {
  if (kind != Kind::kObject) return nullptr;
  const auto it = object.find(key);
  return it == object.end() ? nullptr : &it->second;
}

const Json& Json::at(const std::string& key, Kind want, const std::string& where) const {
  const Json* v = find(key);
  if (!v) throw std::runtime_error(where + ": missing '" + key + "'");
  if (v->kind != want)
    throw std::runtime_error(where + ": '" + key + "' is " + kind_name(v->kind) + ", expected " + kind_name(want));
  return *v;
}

Json parse_json(const std::string& text, const std::string& where) { return Parser(text, where).parse(); }

}  // namespace smartedit
