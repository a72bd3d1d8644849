// loadkit command line: dispatch and the one place that turns errors into exit codes.

#include <cerrno>
#include <csignal>
#include <cstring>
#include <iostream>
#include <string>
#include <vector>

#include "commands.h"
#include "device.h"
#include "loadkit/error.h"
#include "loadkit/runtime/failure.h"

namespace {

constexpr const char* kUsage =
    "usage: loadkit <command> [options]\n"
    "  plugins list   [--plugin-dir D]... [--json]\n"
    "  inspect        --model DIR [--json]\n"
    "  load           --model DIR [common] [--report R.json]\n"
    "  logits         --model DIR --tokens 1,2,3 --out F.safetensors [common]\n"
    "  reload         --model DIR --from DIR2 [--tokens ... --out F.safetensors] [--no-process] [common]\n"
    "                 [--report R.json]\n"
    "  run            JOB.yaml   (steps: load, logits, reload, verify, save_sharded, report; see configs/)\n"
    "  save-sharded   --model DIR --out DIR2 [--max-part-size BYTES] [common]\n"
    "common: --plugin-dir D --device cpu|cuda|cuda:N --dtype float32|bfloat16|float16\n"
    "        --quantization auto|none|fp8|int8 --tp-size N --load-format auto|safetensors|sharded|dummy\n"
    "        --log-level trace|debug|info|warn|error --sharded-pattern P (default model-rank-{rank}-part-{part}.safetensors)\n";

int report(const loadkit::Failure& failure) {
  std::cerr << "loadkit: error: " << failure.message << std::endl;
  return loadkit::exit_code(failure.kind);
}

/// Exit 0 promises that everything the command printed was written: a failed write to standard
/// output (a closed pipe, a full disk) is an Other error, as coreutils treat it.
void check_stdout() {
  errno = 0;
  std::cout.flush();
  if (std::cout) return;
  const int error = errno;
  loadkit::fail(loadkit::ErrorKind::Other, "standard output: write failed",
                error != 0 ? std::string(": ") + std::strerror(error) : std::string(), "; what was printed is incomplete");
}

int dispatch(const std::vector<std::string>& argv) {
  using namespace loadkit;
  if (argv.empty() || argv[0] == "--help" || argv[0] == "-h" || argv[0] == "help") {
    std::cout << kUsage;
    return argv.empty() ? exit_code(ErrorKind::Usage) : 0;
  }
  const std::string& command = argv[0];
  std::vector<std::string> rest(argv.begin() + 1, argv.end());
  if (command == "plugins") {
    if (rest.empty() || rest[0] != "list") fail(ErrorKind::Usage, "plugins: expected 'plugins list'");
    return cli::plugins_list({rest.begin() + 1, rest.end()});
  }
  if (command == "inspect") return cli::inspect(rest);
  if (command == "load") return cli::load(rest);
  if (command == "logits") return cli::logits(rest);
  if (command == "reload") return cli::reload(rest);
  if (command == "run") return cli::run(rest);
  if (command == "save-sharded") return cli::save_sharded(rest);
  fail(ErrorKind::Usage, "unknown command '", command, "' (run 'loadkit --help')");
}

}  // namespace

int main(int argc, char** argv) {
  // A file-size limit (ulimit -f) ends a process that writes past it with SIGXFSZ: no message,
  // a *.tmp left behind. Ignored, the write fails with EFBIG instead, and the writer reports it
  // as one line naming the file and removes its temporary (formats/safetensors_writer.cpp).
  std::signal(SIGXFSZ, SIG_IGN);
  // A reader that stops early (`loadkit inspect … | head -1`) ends a process that writes on with
  // SIGPIPE, as would a write to the socket of a rank that has died, from any library that does
  // not pass MSG_NOSIGNAL. Ignored, such a write fails with EPIPE instead: a socket's failure is
  // the error of the step that wrote to it, and standard output is checked before a command that
  // succeeded says so (below).
  std::signal(SIGPIPE, SIG_IGN);
  loadkit::device::reproducible_cpu_math();
  try {
    const int code = dispatch(std::vector<std::string>(argv + 1, argv + argc));
    if (code == 0) check_stdout();
    return code;
  } catch (...) {
    return report(loadkit::current_failure());
  }
}
