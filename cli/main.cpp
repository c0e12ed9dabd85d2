// rpoint: the command-line client of rpointd's control API.
#include <iostream>
#include <string>
#include <vector>

#include "cli/app.h"

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  int rc = rpoint::cli::RunCli(args, std::cout, std::cerr);
  std::cout.flush();
  return rc;
}
