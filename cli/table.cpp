#include "cli/table.h"

#include <algorithm>

namespace rpoint::cli {

void Table::print(std::ostream& os) const {
  std::vector<size_t> width;
  for (const auto& row : rows_) {
    if (width.size() < row.size()) width.resize(row.size(), 0);
    for (size_t i = 0; i < row.size(); ++i) width[i] = std::max(width[i], row[i].size());
  }
  for (const auto& row : rows_) {
    std::string line;
    for (size_t i = 0; i < row.size(); ++i) {
      line += row[i];
      if (i + 1 < row.size()) line += std::string(width[i] - row[i].size() + 2, ' ');
    }
    os << line << '\n';
  }
}

void PrintFields(std::ostream& os, const std::vector<std::pair<std::string, std::string>>& fields) {
  size_t w = 0;
  for (const auto& [k, v] : fields) w = std::max(w, k.size() + 1);
  for (const auto& [k, v] : fields) {
    os << k << ':' << std::string(w - k.size() - 1 + 2, ' ') << v << '\n';
  }
}

}  // namespace rpoint::cli
