// Small JSON and naming helpers the commands share (cli/command.h).
#include <cctype>

#include "cli/command.h"

namespace rpoint::cli {

using json = nlohmann::ordered_json;

std::string Str(const json& j, const char* key) {
  if (!j.is_object()) return "";
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return "";
  return it->is_string() ? it->get<std::string>() : it->dump();
}

const json& Props(const json& resource) {
  static const json kEmpty = json::object();
  if (!resource.is_object()) return kEmpty;
  auto it = resource.find("properties");
  return it != resource.end() && it->is_object() ? *it : kEmpty;
}

// Names go in the URL: escape anything the server would not take literally,
// so a bad name gets the server's validation message, not a garbled path.
std::string Escape(const std::string& s) {
  static const char* kHex = "0123456789ABCDEF";
  std::string out;
  for (unsigned char c : s) {
    if (std::isalnum(c) || c == '-' || c == '_' || c == '.') {
      out.push_back(static_cast<char>(c));
    } else {
      out += '%';
      out += kHex[c >> 4];
      out += kHex[c & 15];
    }
  }
  return out;
}

bool SplitNames(const std::string& s, size_t parts, std::vector<std::string>* out) {
  out->clear();
  size_t start = 0;
  for (;;) {
    size_t slash = s.find('/', start);
    std::string part = s.substr(start, slash == std::string::npos ? slash : slash - start);
    if (part.empty()) return false;
    out->push_back(part);
    if (slash == std::string::npos) break;
    start = slash + 1;
  }
  return out->size() == parts;
}

std::string RestorePointPath(const std::string& collection, const std::string& point) {
  return "/restorePointCollections/" + Escape(collection) + "/restorePoints/" + Escape(point);
}

}  // namespace rpoint::cli
