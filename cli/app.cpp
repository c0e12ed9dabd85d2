#include "cli/app.h"

#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <iostream>
#include <ostream>
#include <sstream>

#include "cli/command.h"

#ifndef RPOINT_VERSION
#define RPOINT_VERSION "unknown"
#endif

namespace rpoint::cli {

const std::vector<Command>& Commands() {
  static const std::vector<Command> table = [] {
    std::vector<Command> t;
    AddDiskCommands(t);
    AddVmCommands(t);
    AddRestorePointCommands(t);
    AddAccessCommands(t);
    AddOperationCommands(t);
    AddDaemonCommands(t);
    return t;
  }();
  return table;
}

bool Call(Context& ctx, const std::string& method, const std::string& path,
          const std::optional<nlohmann::ordered_json>& body, HttpReply* reply, int* exit_code) {
  auto r = ctx.client.request(method, path, body);
  if (!r.ok()) {
    ctx.err << "rpoint: " << r.status().message() << '\n';
    *exit_code = kExitUnreachable;
    return false;
  }
  *reply = std::move(r).value();
  if (reply->status >= 400) {
    if (ctx.output == OutputFormat::kJson && reply->json) PrintJson(ctx, *reply->json);
    ctx.err << "rpoint: " << reply->error_message() << " (" << reply->error_code() << ", HTTP "
            << reply->status << ")\n";
    *exit_code = kExitServerError;
    return false;
  }
  return true;
}

int UsageError(Context& ctx, const std::string& message) {
  ctx.err << "rpoint: " << message << '\n';
  return kExitUsage;
}

void PrintJson(Context& ctx, const nlohmann::ordered_json& j) {
  ctx.out << j.dump(2, ' ', false, nlohmann::ordered_json::error_handler_t::replace) << '\n';
}

std::string DefaultSocket() {
  struct stat st;
  if (::stat(kDefaultSocket, &st) == 0 && S_ISSOCK(st.st_mode)) return kDefaultSocket;
  return kSystemdSocket;
}

namespace {

po::options_description GlobalOptions() {
  po::options_description o("Global options", 100, 50);
  o.add_options()
      ("socket", po::value<std::string>()->value_name("PATH"),
       "rpointd's control socket (default: $RPOINT_SOCKET, else /var/lib/rpointd/control.sock "
       "if it exists, else /run/rpointd/control.sock)")
      ("output,o", po::value<std::string>()->value_name("FORMAT")->default_value("table"),
       "output format: table or json (the server's JSON)")
      ("help,h", "show help (for a command: rpoint NOUN VERB --help)")
      ("version", "print the version and exit");
  return o;
}

void PrintMainHelp(std::ostream& os) {
  os << "Usage: rpoint [OPTIONS] NOUN VERB [ARGS]\n\n"
        "Manages rpointd, the block-device snapshot daemon, through its control socket.\n\n"
        "Commands:\n";
  size_t w = 0;
  for (const auto& c : Commands()) w = std::max(w, c.noun.size() + c.verb.size() + 1);
  for (const auto& c : Commands()) {
    std::string n = c.noun + " " + c.verb;
    os << "  " << n << std::string(w - n.size() + 2, ' ') << c.summary << '\n';
  }
  os << '\n' << GlobalOptions() << '\n'
     << "Exit status: 0 success, 1 the daemon reported an error (or an awaited operation\n"
        "failed), 2 usage error, 3 the daemon could not be reached, 4 verify --wait found\n"
        "damage.\n";
}

void PrintNounHelp(std::ostream& os, const std::string& noun) {
  os << "Usage: rpoint " << noun << " VERB [ARGS]\n\nVerbs:\n";
  for (const auto& c : Commands()) {
    if (c.noun != noun) continue;
    os << "  rpoint " << c.noun << ' ' << c.verb << (c.usage.empty() ? "" : " " + c.usage) << "\n"
       << "      " << c.summary << '\n';
  }
}

void PrintCommandHelp(std::ostream& os, const Command& c, const po::options_description& visible) {
  os << "Usage: rpoint " << c.noun << ' ' << c.verb << (c.usage.empty() ? "" : " " + c.usage)
     << "\n\n"
     << c.summary << "\n";
  if (!visible.options().empty()) os << '\n' << visible;
  os << '\n' << GlobalOptions();
}

bool KnownNoun(const std::string& noun) {
  for (const auto& c : Commands()) {
    if (c.noun == noun) return true;
  }
  return false;
}

}  // namespace

int RunCli(const std::vector<std::string>& args, std::ostream& out, std::ostream& err) {
  // Pass 1: global options wherever they appear; the rest (noun, verb, the
  // command's own options and arguments) is kept in order for pass 2.
  po::options_description global = GlobalOptions();
  po::options_description words_opt;
  words_opt.add_options()("words", po::value<std::vector<std::string>>());
  po::options_description all;
  all.add(global).add(words_opt);
  po::positional_options_description words;
  words.add("words", -1);
  po::variables_map gvm;
  std::vector<std::string> rest;
  try {
    auto parsed =
        po::command_line_parser(args).options(all).positional(words).allow_unregistered().run();
    po::store(parsed, gvm);
    po::notify(gvm);
    rest = po::collect_unrecognized(parsed.options, po::include_positional);
  } catch (const po::error& e) {
    err << "rpoint: " << e.what() << "\n(see rpoint --help)\n";
    return kExitUsage;
  }
  if (gvm.count("version")) {
    out << "rpoint " << RPOINT_VERSION << '\n';
    return kExitOk;
  }
  bool help = gvm.count("help") > 0;
  std::string output = gvm["output"].as<std::string>();
  if (output != "table" && output != "json") {
    err << "rpoint: --output must be table or json, got '" << output << "'\n";
    return kExitUsage;
  }

  if (rest.empty() || rest[0].empty() || rest[0][0] == '-') {
    if (help && rest.empty()) {
      PrintMainHelp(out);
      return kExitOk;
    }
    err << (rest.empty() ? "rpoint: no command given\n\n"
                         : "rpoint: unknown option '" + rest[0] + "'\n\n");
    PrintMainHelp(err);
    return kExitUsage;
  }
  const std::string& noun = rest[0];
  if (!KnownNoun(noun)) {
    err << "rpoint: unknown command '" << noun << "'\n\n";
    PrintMainHelp(err);
    return kExitUsage;
  }
  const Command* cmd = nullptr;
  if (rest.size() >= 2) {
    for (const auto& c : Commands()) {
      if (c.noun == noun && c.verb == rest[1]) cmd = &c;
    }
  }
  if (cmd == nullptr) {
    if (help && rest.size() == 1) {
      PrintNounHelp(out, noun);
      return kExitOk;
    }
    if (rest.size() >= 2) err << "rpoint: unknown command '" << noun << ' ' << rest[1] << "'\n\n";
    else err << "rpoint: '" << noun << "' needs a verb\n\n";
    PrintNounHelp(err, noun);
    return kExitUsage;
  }

  po::options_description visible("Options", 100, 50);
  po::options_description hidden;
  po::positional_options_description positional;
  cmd->declare(visible, hidden, positional);
  if (help) {
    PrintCommandHelp(out, *cmd, visible);
    return kExitOk;
  }
  po::options_description cmd_all;
  cmd_all.add(visible).add(hidden);
  po::variables_map vm;
  try {
    std::vector<std::string> cmd_args(rest.begin() + 2, rest.end());
    po::store(po::command_line_parser(cmd_args).options(cmd_all).positional(positional).run(), vm);
    po::notify(vm);
  } catch (const po::error& e) {
    std::string what = e.what();
    // Boost names a missing hidden positional "--name"; say what the usage says.
    for (const auto& opt : hidden.options()) {
      if (what == "the option '--" + opt->long_name() + "' is required but missing") {
        what = "missing argument (" + opt->long_name() + ")";
        if (opt->long_name() == "name") what = "missing NAME";
      }
    }
    err << "rpoint " << noun << ' ' << cmd->verb << ": " << what << "\nUsage: rpoint " << noun
        << ' ' << cmd->verb << ' ' << cmd->usage << '\n';
    return kExitUsage;
  }

  std::string socket;
  if (gvm.count("socket")) {
    socket = gvm["socket"].as<std::string>();
  } else if (const char* env = std::getenv("RPOINT_SOCKET"); env && *env) {
    socket = env;
  } else {
    socket = DefaultSocket();
  }
  HttpClient client(socket);
  Context ctx{client, output == "json" ? OutputFormat::kJson : OutputFormat::kTable, out, err};
  // A progress bar only where a person watches it; logs and pipes get lines.
  ctx.err_is_tty = &err == &std::cerr && ::isatty(STDERR_FILENO);
  return cmd->run(ctx, vm);
}

}  // namespace rpoint::cli
