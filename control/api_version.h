// API versions, Azure style: every request may carry ?api-version=YYYY-MM-DD.
// Omitted means the newest version; an unknown one is refused with the list of
// supported versions. A version, once released, keeps its request and
// response shapes: changes that could break a client get a new date.
//
// Thread-safety: pure functions over constants.
#pragma once

#include <string>
#include <vector>

#include "common/status.h"

namespace rpoint {

// Oldest first.
const std::vector<std::string>& SupportedApiVersions();
const std::string& LatestApiVersion();

// The version a request asked for (nullptr: none given -> latest), or
// InvalidArgument naming the supported versions.
Result<std::string> ResolveApiVersion(const std::string* requested);

}  // namespace rpoint
