// `--tp-size N` without torchrun: start N ranks of the same command, host
// their store, and turn the first failure into one error for the whole job.

#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <chrono>
#include <cstring>
#include <fstream>
#include <iterator>
#include <string_view>
#include <thread>

#include "loadkit/error.h"
#include "loadkit/runtime/distributed.h"
#include "loadkit/runtime/log.h"

namespace loadkit {

namespace {

/// This process's own argv, as the kernel has it.
std::vector<std::string> own_arguments() {
  std::ifstream in("/proc/self/cmdline", std::ios::binary);
  const std::string all((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::vector<std::string> args;
  size_t start = 0;
  while (start < all.size()) {
    const size_t end = all.find('\0', start);
    args.push_back(all.substr(start, end - start));
    if (end == std::string::npos) break;
    start = end + 1;
  }
  if (args.empty()) fail(ErrorKind::Other, "cannot read this process's arguments from /proc/self/cmdline");
  return args;
}

std::string describe_exit(int rank, int status) {
  if (WIFSIGNALED(status)) return cat("rank ", rank, " was killed by signal ", WTERMSIG(status), " (", strsignal(WTERMSIG(status)), ")");
  return cat("rank ", rank, " exited with code ", WEXITSTATUS(status));
}

/// The variables this launcher sets for each rank (an outer torchrun's are replaced).
bool is_rank_variable(std::string_view var) {
  for (const char* name : {"RANK=", "WORLD_SIZE=", "LOCAL_RANK=", "LOCAL_WORLD_SIZE=", "MASTER_ADDR=", "MASTER_PORT=",
                           "TORCHELASTIC_USE_AGENT_STORE=", "LOADKIT_TP_LAUNCHED="})
    if (var.rfind(name, 0) == 0) return true;
  return false;
}

}  // namespace

int launch_local_ranks(int n) {
  c10d::TCPStoreOptions options;
  options.port = 0;  // the kernel picks a free port: no race with other jobs
  options.isServer = true;
  options.waitWorkers = false;
  options.timeout = collective_timeout();
  c10::intrusive_ptr<c10d::TCPStore> store;
  try {
    store = c10::make_intrusive<c10d::TCPStore>("127.0.0.1", options);
  } catch (const std::exception& e) {
    fail(ErrorKind::Other, "cannot start the rank store on 127.0.0.1: ", e.what());
  }
  const int port = store->getPort();
  const auto args = own_arguments();

  // Everything the children need is prepared before fork: the child only execs.
  std::vector<std::vector<std::string>> envs(n);
  for (int r = 0; r < n; ++r) {
    for (char** e = environ; *e; ++e)
      if (!is_rank_variable(*e)) envs[r].emplace_back(*e);
    for (auto [name, value] : {std::pair<const char*, std::string>{"RANK", std::to_string(r)},
                               {"WORLD_SIZE", std::to_string(n)},
                               {"LOCAL_RANK", std::to_string(r)},
                               {"LOCAL_WORLD_SIZE", std::to_string(n)},
                               {"MASTER_ADDR", "127.0.0.1"},
                               {"MASTER_PORT", std::to_string(port)},
                               {"TORCHELASTIC_USE_AGENT_STORE", "True"},
                               {"LOADKIT_TP_LAUNCHED", "1"}})
      envs[r].push_back(cat(name, "=", value));
  }
  auto pointers = [](std::vector<std::string>& strings) {
    std::vector<char*> out;
    for (auto& s : strings) out.push_back(s.data());
    out.push_back(nullptr);
    return out;
  };
  std::vector<std::string> argv_strings = args;
  std::vector<char*> argv = pointers(argv_strings);

  std::vector<pid_t> pids(n, -1);
  std::vector<bool> running(n, false);
  auto kill_all = [&] {
    for (int r = 0; r < n; ++r)
      if (running[r]) kill(pids[r], SIGKILL);
  };
  for (int r = 0; r < n; ++r) {
    std::vector<char*> envp = pointers(envs[r]);
    const pid_t pid = fork();
    if (pid < 0) {
      kill_all();
      fail(ErrorKind::Other, "cannot start rank ", r, ": ", std::strerror(errno));
    }
    if (pid == 0) {
      prctl(PR_SET_PDEATHSIG, SIGKILL);  // a launcher that dies takes its ranks with it
      if (r > 0) {  // rank 0 writes the outputs
        const int null = open("/dev/null", O_WRONLY);
        if (null >= 0) dup2(null, STDOUT_FILENO);
      }
      execve("/proc/self/exe", argv.data(), envp.data());
      _exit(127);
    }
    pids[r] = pid;
    running[r] = true;
  }
  log::debug(cat("started ", n, " ranks, store on 127.0.0.1:", port));

  std::vector<int> status(n, 0);
  int first_failed = -1, alive = n;
  while (alive > 0) {
    bool reaped = false;
    for (int r = 0; r < n; ++r) {
      if (!running[r]) continue;
      const pid_t got = waitpid(pids[r], &status[r], WNOHANG);
      if (got == 0) continue;
      running[r] = false;
      --alive;
      reaped = true;
      const bool ok = got == pids[r] && WIFEXITED(status[r]) && WEXITSTATUS(status[r]) == 0;
      if (!ok && first_failed < 0) {
        first_failed = r;
        kill_all();  // the others could only wait for it
      }
    }
    if (!reaped) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  if (first_failed < 0) return 0;

  // A rank's own failure, as it published it, wins over a rank that could not join the group
  // (a consequence when a peer failed while it was connecting), which wins over "exited with code …".
  for (const char* kind : {"loadkit/failed/", "loadkit/join_failed/"})
    for (int r = 0; r < n; ++r) {
      const std::string key = cat(kind, r);
      if (!store->check({key})) continue;
      const auto bytes = store->get(key);
      const std::string value(bytes.begin(), bytes.end());
      const size_t nl = value.find('\n');
      const int code = std::atoi(value.substr(0, nl).c_str());
      throw Error(error_kind(code), value.substr(nl + 1));
    }
  const int code = WIFEXITED(status[first_failed]) ? WEXITSTATUS(status[first_failed]) : 1;
  throw Error(error_kind(code), describe_exit(first_failed, status[first_failed]));
}

}  // namespace loadkit
