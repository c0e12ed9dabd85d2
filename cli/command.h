// The CLI's command table: every "rpoint NOUN VERB ..." is one Command entry,
// so later nouns (restore-point, collection, ...) are added by appending
// entries (see AddDiskCommands) without touching argument dispatch.
//
// Thread-safety: the table is built once at start-up and then only read.
#pragma once

#include <boost/program_options.hpp>

#include <functional>
#include <iosfwd>
#include <optional>
#include <string>
#include <vector>

#include "cli/http_client.h"

namespace rpoint::cli {

namespace po = boost::program_options;

enum ExitCode : int {
  kExitOk = 0,
  kExitServerError = 1,  // the daemon answered with an error
  kExitUsage = 2,        // bad command line
  kExitUnreachable = 3,  // the daemon could not be reached (or hung up)
};

enum class OutputFormat { kTable, kJson };

struct Context {
  HttpClient& client;
  OutputFormat output;
  std::ostream& out;
  std::ostream& err;
};

struct Command {
  std::string noun;
  std::string verb;
  std::string usage;    // what follows "rpoint NOUN VERB", e.g. "NAME --size SIZE"
  std::string summary;  // one line, for the command list
  // Declares the command's options (visible in --help), its positional
  // arguments (hidden options mapped by `positional`).
  std::function<void(po::options_description& visible, po::options_description& hidden,
                     po::positional_options_description& positional)>
      declare;
  // Runs it; returns an ExitCode. Usage problems it finds itself: UsageError().
  std::function<int(Context&, const po::variables_map&)> run;
};

// Every command, in help order.
const std::vector<Command>& Commands();

// Registration, one function per noun.
void AddDiskCommands(std::vector<Command>& table);
void AddDaemonCommands(std::vector<Command>& table);

// Shared by the commands:
// Sends a request; on a transport failure prints why and returns false with
// *exit_code = kExitUnreachable; on an HTTP error prints the server's message
// (and, with -o json, its JSON body on stdout) and returns false with
// *exit_code = kExitServerError.
bool Call(Context& ctx, const std::string& method, const std::string& path,
          const std::optional<nlohmann::ordered_json>& body, HttpReply* reply, int* exit_code);
// Prints "rpoint: MESSAGE" on stderr and returns kExitUsage.
int UsageError(Context& ctx, const std::string& message);
// Prints the JSON as the -o json output.
void PrintJson(Context& ctx, const nlohmann::ordered_json& j);

}  // namespace rpoint::cli
