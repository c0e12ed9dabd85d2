#include "restore/hooks.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <vector>

#include "common/unique_fd.h"

extern char** environ;

namespace rpoint {

namespace {
constexpr size_t kTailBytes = 2048;
}

HookResult RunHook(const std::string& command, const std::map<std::string, std::string>& env,
                   unsigned timeout_seconds) {
  HookResult r;
  int pipefd[2];
  if (::pipe2(pipefd, O_CLOEXEC) != 0) {
    r.output_tail = std::string("pipe: ") + std::strerror(errno);
    return r;
  }
  UniqueFd rd(pipefd[0]), wr(pipefd[1]);

  // The environment: the daemon's, with ours replacing same-named entries.
  std::vector<std::string> vars;
  for (char** e = environ; e && *e; ++e) {
    std::string v = *e;
    std::string key = v.substr(0, v.find('='));
    if (!env.count(key)) vars.push_back(std::move(v));
  }
  for (const auto& [k, v] : env) vars.push_back(k + "=" + v);
  std::vector<char*> envp;
  for (auto& v : vars) envp.push_back(v.data());
  envp.push_back(nullptr);

  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_adddup2(&fa, wr.get(), 1);
  posix_spawn_file_actions_adddup2(&fa, wr.get(), 2);
  posix_spawnattr_t attr;
  posix_spawnattr_init(&attr);
  posix_spawnattr_setflags(&attr,
                           POSIX_SPAWN_SETPGROUP | POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);
  // The daemon ignores SIGPIPE; a hook's pipelines expect the default.
  sigset_t dflt;
  sigemptyset(&dflt);
  sigaddset(&dflt, SIGPIPE);
  posix_spawnattr_setsigdefault(&attr, &dflt);
  posix_spawnattr_setpgroup(&attr, 0);
  sigset_t none;
  sigemptyset(&none);
  posix_spawnattr_setsigmask(&attr, &none);

  std::string sh = "/bin/sh", dash_c = "-c", cmd = command;
  char* argv[] = {sh.data(), dash_c.data(), cmd.data(), nullptr};
  pid_t pid = -1;
  int rc = posix_spawn(&pid, "/bin/sh", &fa, &attr, argv, envp.data());
  posix_spawn_file_actions_destroy(&fa);
  posix_spawnattr_destroy(&attr);
  wr.reset();
  if (rc != 0) {
    r.output_tail = std::string("posix_spawn /bin/sh: ") + std::strerror(rc);
    return r;
  }
  r.ran = true;

  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(timeout_seconds);
  std::string out;
  char buf[4096];
  bool eof = false;
  while (!eof) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) {
      r.timed_out = true;
      break;
    }
    pollfd p{rd.get(), POLLIN, 0};
    int n = ::poll(&p, 1, static_cast<int>(std::min<int64_t>(left.count(), 1000)));
    if (n < 0 && errno != EINTR) break;
    if (n <= 0) continue;
    ssize_t got = ::read(rd.get(), buf, sizeof buf);
    if (got < 0 && (errno == EINTR || errno == EAGAIN)) continue;
    if (got <= 0) {
      eof = true;  // every writer (the shell and its children) closed its end
      break;
    }
    out.append(buf, static_cast<size_t>(got));
    if (out.size() > 4 * kTailBytes) out.erase(0, out.size() - kTailBytes);
  }
  if (r.timed_out) ::kill(-pid, SIGKILL);
  int status = 0;
  for (;;) {
    pid_t w = ::waitpid(pid, &status, 0);
    if (w == pid || (w < 0 && errno != EINTR)) break;
  }
  if (WIFEXITED(status)) {
    r.exit_status = WEXITSTATUS(status);
  } else if (WIFSIGNALED(status)) {
    r.exit_status = 128 + WTERMSIG(status);
  }
  if (out.size() > kTailBytes) out.erase(0, out.size() - kTailBytes);
  r.output_tail = std::move(out);
  return r;
}

std::string DescribeHookFailure(const std::string& phase, const std::string& command,
                                const HookResult& r) {
  std::string m = phase + " hook '" + command + "' ";
  if (!r.ran) {
    m += "could not start";
  } else if (r.timed_out) {
    m += "timed out (killed)";
  } else {
    m += "exited with status " + std::to_string(r.exit_status);
  }
  std::string tail = r.output_tail;
  while (!tail.empty() && (tail.back() == '\n' || tail.back() == ' ')) tail.pop_back();
  if (!tail.empty()) m += ": " + tail;
  return m;
}

}  // namespace rpoint
