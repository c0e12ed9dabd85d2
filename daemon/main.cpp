// rpointd: the block-device snapshot daemon's entry point.
//
// Everything that can be wrong with the command line or the configuration is
// found here, before anything starts (exit status 2); RunDaemon does the rest.
#include <signal.h>
#include <unistd.h>

#include <cstdio>
#include <iostream>

#include "common/logging.h"
#include "config/config.h"
#include "daemon/daemon.h"
#include "daemon/flags.h"

#ifndef RPOINTD_VERSION
#define RPOINTD_VERSION "unknown"
#endif

namespace {
constexpr int kExitUsage = 2;
}

int main(int argc, char** argv) {
  // Before any thread exists, so every thread inherits the mask and the
  // signals are only ever taken by sigwait in RunDaemon.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGHUP);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  // A client that hangs up must cost an EPIPE, not the daemon.
  signal(SIGPIPE, SIG_IGN);

  rpoint::Result<rpoint::Flags> flags = rpoint::ParseFlags(argc, argv);
  if (!flags.ok()) {
    std::cerr << "rpointd: " << flags.status().message() << "\nTry 'rpointd --help'.\n";
    return kExitUsage;
  }
  if (flags->help) {
    std::cout << rpoint::FlagsHelp();
    return 0;
  }
  if (flags->version) {
    std::cout << "rpointd " << RPOINTD_VERSION << "\n";
    return 0;
  }

  rpoint::DaemonOptions options;
  options.version = RPOINTD_VERSION;
  options.config_path = flags->config_path;
  options.state_dir_flag = flags->state_dir;
  options.log_level_flag = flags->log_level;
  rpoint::Result<rpoint::Config> config = rpoint::BuildConfig(options);
  if (!config.ok()) {
    std::cerr << "rpointd: bad configuration: " << config.status().message() << "\n";
    return kExitUsage;
  }
  if (flags->check_config) {
    std::cout << rpoint::ConfigToYaml(config.value());
    std::cerr << "rpointd: configuration OK\n";
    return 0;
  }

  spdlog::level::level_enum level = spdlog::level::info;
  (void)rpoint::ParseLogLevel(config->log_level, &level);  // validated by FinalizeConfig
  rpoint::InitLogging(level);
  return rpoint::RunDaemon(config.value(), options);
}
