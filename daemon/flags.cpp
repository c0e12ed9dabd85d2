#include "daemon/flags.h"

#include <boost/program_options.hpp>

#include <sstream>

namespace rpoint {
namespace po = boost::program_options;

namespace {

po::options_description Options() {
  po::options_description desc("Options");
  desc.add_options()
      ("config,c", po::value<std::string>()->value_name("FILE"),
       "read the configuration from FILE (YAML; see rpointd(8)); without it, built-in defaults")
      ("state-dir,s", po::value<std::string>()->value_name("DIR"),
       "keep state in DIR (overrides state_dir in the config; sockets, database and disks "
       "default to places under it)")
      ("log-level,l", po::value<std::string>()->value_name("LEVEL"),
       "trace, debug, info, warn, error, critical or off (overrides log.level)")
      ("check-config", "validate the configuration, print it with every default filled in, "
       "and exit (0: valid, 2: not)")
      ("version,V", "print the version and exit")
      ("help,h", "print this help and exit");
  return desc;
}

}  // namespace

std::string FlagsHelp() {
  std::ostringstream out;
  out << "Usage: rpointd [--config FILE] [--state-dir DIR] [--log-level LEVEL] [--check-config]\n"
         "\n"
         "rpointd serves VM disks over NBD and manages them through an HTTP/JSON\n"
         "API on a Unix socket. It runs in the foreground and logs to stderr.\n"
         "\n"
      << Options()
      << "\n"
         "Exit status: 0 after a clean shutdown (SIGTERM/SIGINT), 1 when the daemon\n"
         "cannot start or fails, 2 for a bad flag or configuration.\n"
         "Signals: SIGTERM/SIGINT stop (draining in-flight I/O), SIGHUP re-reads log.level and the TLS files.\n"
         "See rpointd(8) (docs/rpointd.8.md) and docs/config.md.\n";
  return out.str();
}

Result<Flags> ParseFlags(int argc, const char* const* argv) {
  po::variables_map vm;
  try {
    // No positional arguments: a stray word is an error, not silently ignored.
    po::store(po::command_line_parser(argc, argv).options(Options()).positional({}).run(), vm);
    po::notify(vm);
  } catch (const po::error& e) {
    return Status::InvalidArgument(e.what());
  }
  Flags f;
  auto get = [&](const char* name) -> std::optional<std::string> {
    if (!vm.count(name)) return std::nullopt;
    return vm[name].as<std::string>();
  };
  f.config_path = get("config");
  f.state_dir = get("state-dir");
  f.log_level = get("log-level");
  f.check_config = vm.count("check-config") > 0;
  f.help = vm.count("help") > 0;
  f.version = vm.count("version") > 0;
  if (f.state_dir && f.state_dir->empty()) return Status::InvalidArgument("--state-dir must not be empty");
  if (f.config_path && f.config_path->empty()) return Status::InvalidArgument("--config must not be empty");
  return f;
}

}  // namespace rpoint
