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
  kExitServerError = 1,  // the daemon answered with an error (or an awaited operation failed)
  kExitUsage = 2,        // bad command line
  kExitUnreachable = 3,  // the daemon could not be reached (or hung up)
  kExitDamage = 4,       // verify --wait: the restore point is damaged
};

enum class OutputFormat { kTable, kJson };

struct Context {
  HttpClient& client;
  OutputFormat output;
  std::ostream& out;
  std::ostream& err;
  bool err_is_tty = false;  // --wait draws a progress bar on err only then
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
void AddVmCommands(std::vector<Command>& table);
void AddRestorePointCommands(std::vector<Command>& table);  // collection, restore-point, region
void AddAccessCommands(std::vector<Command>& table);        // access grant|revoke
void AddOperationCommands(std::vector<Command>& table);
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

// `rpoint NOUN list` (cli/list_command.cpp): GET path; -o json prints the
// reply; else `none` on stderr when "value" is empty (nullptr: the bare
// header), or a table of row(item) for each item of "value".
int ListResources(
    Context& ctx, const std::string& path, const char* none,
    const std::vector<std::string>& headers,
    const std::function<std::vector<std::string>(const nlohmann::ordered_json&)>& row);

// ---- JSON and names (cli/resource_text.cpp) ----
// A member as text: strings as they are, other values as JSON, absent as "".
std::string Str(const nlohmann::ordered_json& j, const char* key);
// j["properties"], or an empty object.
const nlohmann::ordered_json& Props(const nlohmann::ordered_json& resource);
// A name for a URL path segment (percent-encodes all but [A-Za-z0-9._-]).
std::string Escape(const std::string& s);
// Splits "a/b/c" into exactly `parts` non-empty names; false otherwise.
bool SplitNames(const std::string& s, size_t parts, std::vector<std::string>* out);
// "/restorePointCollections/C/restorePoints/RP" from {C, RP}.
std::string RestorePointPath(const std::string& collection, const std::string& point);

// ---- long-running operations (cli/operation_commands.cpp) ----
// The operation a 201/202 started (from its Azure-AsyncOperation header), or "".
std::string OperationIdOf(const HttpReply& reply);
// Polls /operations/ID until it is no longer InProgress, showing progress on
// ctx.err (a bar on a terminal, a line per step otherwise). Returns kExitOk
// when it Succeeded (with *operation set to its final JSON), kExitServerError
// after printing the error when it Failed, or the exit code of a failed call.
int WaitForOperation(Context& ctx, const std::string& id, const std::string& label,
                     nlohmann::ordered_json* operation);
// For a PUT --wait that started no operation (the resource already existed):
// polls GET path until its provisioningState is no longer Creating. Returns
// kExitOk when it is Succeeded (with *resource set to its final JSON),
// kExitServerError after printing its error when it is Failed (or gone: a
// failed restore removes its disk), or the exit code of a failed call.
int WaitForProvisioning(Context& ctx, const std::string& path, const std::string& label,
                        nlohmann::ordered_json* resource);
// For a create/action without --wait: "operation ID started (rpoint operation show ID)".
void PrintOperationHint(Context& ctx, const std::string& id);

}  // namespace rpoint::cli
