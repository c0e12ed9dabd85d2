#include "common/logging.h"

#include <spdlog/pattern_formatter.h>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <sys/stat.h>

#include <cstdlib>
#include <memory>

namespace rpoint {

Status ParseLogLevel(const std::string& name, spdlog::level::level_enum* out) {
  static const char* const kNames[] = {"trace", "debug", "info", "warn", "error", "critical", "off"};
  for (int i = 0; i < 7; ++i) {
    if (name == kNames[i]) {
      *out = static_cast<spdlog::level::level_enum>(i);
      return Status::Ok();
    }
  }
  return Status::InvalidArgument("unknown log level '" + name +
                                 "' (expected trace, debug, info, warn, error, critical or off)");
}

bool UnderJournal() {
  // JOURNAL_STREAM is "dev:ino" of the journal stream; only trust it if stderr is that stream.
  const char* js = std::getenv("JOURNAL_STREAM");
  if (!js) return false;
  struct stat st {};
  if (fstat(2, &st) != 0) return false;
  unsigned long long dev = 0, ino = 0;
  if (std::sscanf(js, "%llu:%llu", &dev, &ino) != 2) return false;
  return st.st_dev == dev && st.st_ino == ino;
}

namespace {
// "<3>" style syslog priority so journald records the right level.
class SyslogPriorityFlag final : public spdlog::custom_flag_formatter {
 public:
  void format(const spdlog::details::log_msg& msg, const std::tm&, spdlog::memory_buf_t& dest) override {
    static const char* const kPrio[] = {"<7>", "<7>", "<6>", "<4>", "<3>", "<2>", "<6>"};
    const char* p = kPrio[static_cast<int>(msg.level)];
    dest.append(p, p + 3);
  }
  std::unique_ptr<custom_flag_formatter> clone() const override {
    return std::make_unique<SyslogPriorityFlag>();
  }
};
}  // namespace

void InitLogging(spdlog::level::level_enum level) {
  auto logger = spdlog::stderr_color_mt("rpointd");
  if (UnderJournal()) {
    auto f = std::make_unique<spdlog::pattern_formatter>();
    f->add_flag<SyslogPriorityFlag>('*').set_pattern("%*%v");
    logger->set_formatter(std::move(f));
  } else {
    logger->set_pattern("%Y-%m-%d %H:%M:%S.%e %^%-5l%$ [%t] %v");
  }
  logger->set_level(level);
  logger->flush_on(spdlog::level::warn);
  spdlog::set_default_logger(logger);
}

}  // namespace rpoint
