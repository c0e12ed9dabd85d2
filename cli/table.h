// Table: left-aligned text columns for the CLI's human output.
// Thread-safety: a plain value.
#pragma once

#include <ostream>
#include <string>
#include <utility>
#include <vector>

namespace rpoint::cli {

class Table {
 public:
  explicit Table(std::vector<std::string> header) { rows_.push_back(std::move(header)); }
  void add(std::vector<std::string> row) { rows_.push_back(std::move(row)); }
  // Columns separated by two spaces; the last column is not padded.
  void print(std::ostream& os) const;

 private:
  std::vector<std::vector<std::string>> rows_;
};

// "Key:   value" lines with the values aligned.
void PrintFields(std::ostream& os, const std::vector<std::pair<std::string, std::string>>& fields);

}  // namespace rpoint::cli
