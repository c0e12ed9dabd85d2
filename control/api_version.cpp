#include "control/api_version.h"

#include <algorithm>

namespace rpoint {

const std::vector<std::string>& SupportedApiVersions() {
  static const std::vector<std::string> kVersions = {"2026-11-01"};
  return kVersions;
}

const std::string& LatestApiVersion() { return SupportedApiVersions().back(); }

Result<std::string> ResolveApiVersion(const std::string* requested) {
  if (requested == nullptr) return LatestApiVersion();
  const auto& all = SupportedApiVersions();
  if (std::find(all.begin(), all.end(), *requested) != all.end()) return *requested;
  std::string list;
  for (const auto& v : all) list += (list.empty() ? "" : ", ") + v;
  return Status::InvalidArgument("api-version '" + *requested +
                                 "' is not supported; supported versions: " + list);
}

}  // namespace rpoint
