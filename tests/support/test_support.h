#pragma once
/// \file
/// Test helpers (torch-free): running the CLI, the fixture manifest, temporary
/// directories, and raw safetensors surgery written independently of the
/// reader under test.

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace loadkit::test {

namespace fs = std::filesystem;

// Paths baked in by tests/CMakeLists.txt.
std::string cli_path();
std::string plugin_dir();      ///< the build tree's plugin directory
std::string test_plugin_dir(const std::string& name);  ///< a directory holding one test plugin
std::string fixtures_dir();

struct CliResult {
  int code = -1;
  std::string out, err;
  uint64_t peak_rss_bytes = 0;  ///< the CLI process's maximum resident set (getrusage of the child)
  /// Lines of stderr that carry an error (start with "loadkit: error:").
  std::vector<std::string> error_lines() const;
};

/// Runs in the CLI's process between fork and exec (resource limits, privileges).
/// It may only make system calls; on failure it writes a line to stderr and
/// calls _exit(kChildSetupFailed).
using ChildSetup = std::function<void()>;
constexpr int kChildSetupFailed = 125;

/// Runs the loadkit CLI with `args` (plugin dir not added), capturing both streams.
CliResult run_cli(const std::vector<std::string>& args,
                  const std::vector<std::pair<std::string, std::string>>& env = {}, const ChildSetup& setup = {});

/// A ChildSetup: as root, drops the capabilities that let root ignore file
/// modes (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH) from the bounding set, so that
/// after exec a mode of 000 refuses the CLI as it would refuse any user. (Root
/// stays root otherwise: the CLI still reaches torch under a 0700 home, which
/// switching to `nobody` would not.) Does nothing for other users.
void drop_root_file_access();

/// A ChildSetup: caps the CLI's address space (RLIMIT_AS) at `bytes`.
ChildSetup limit_address_space(uint64_t bytes);

/// A ChildSetup: the CLI gets SIGALRM (and dies, exit code 128 + 14) after
/// `seconds`, so that a hang is a failing test, not a stuck suite; `then` runs
/// after (another limit). A pending alarm survives exec.
ChildSetup with_deadline(unsigned seconds, ChildSetup then = {});
constexpr int kKilledByDeadline = 128 + 14;

/// Expects exit code `code` and exactly one error line on stderr naming every fragment, no crash
/// or trace (GoogleTest assertions).
void expect_failure(const CliResult& r, int code, const std::vector<std::string>& fragments);

/// A free TCP port on the loopback (for a test's own torchrun-style launch).
int free_port();

/// `world` processes of `program` with `args`, each a rank as torchrun starts it (RANK,
/// WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT on a free port) plus `env`, in rank order.
/// Waits for all of them up to `timeout`; past it kills them and sets `timed_out`.
/// CliResult::code is the exit code, or 128 + the signal that ended the process.
std::vector<CliResult> run_ranks(const std::string& program, const std::vector<std::string>& args, int world,
                                 std::chrono::seconds timeout, bool& timed_out,
                                 const std::vector<std::pair<std::string, std::string>>& env = {});

struct Fixture {
  std::string name, dir, reference, dtype;
  std::string architecture;   ///< config.json's architectures[0]
  std::string reload_target;  ///< a fixture of the same shapes with other weights, or ""
  int64_t vocab_size = 0;
  std::vector<int64_t> tokens;
  std::string tokens_arg() const;  ///< "1,2,3"
};
const std::vector<Fixture>& fixtures();
const Fixture& fixture(std::string_view name);

class TempDir {
 public:
  TempDir();
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const fs::path& path() const { return path_; }
  fs::path operator/(const std::string& name) const { return path_ / name; }

 private:
  fs::path path_;
};

/// Copies a fixture directory (following symlinks) to `dest` and returns it.
fs::path copy_fixture(const Fixture& fixture, const fs::path& dest);

/// A safetensors file as header JSON + raw data bytes, edited and written back
/// byte for byte by the test, never through loadkit's reader or writer.
struct RawSafetensors {
  nlohmann::ordered_json header;
  std::string data;
  static RawSafetensors read(const fs::path& path);
  void write(const fs::path& path) const;
  /// Header text, as written (no padding).
  std::string header_text() const { return header.dump(); }
};

void write_bytes(const fs::path& path, const std::string& bytes);
std::string read_bytes(const fs::path& path);
/// 8-byte little-endian length + header text + data.
std::string safetensors_bytes(const std::string& header_text, const std::string& data);

/// The first safetensors file of a checkpoint directory that holds `tensor`.
fs::path file_holding(const fs::path& dir, const std::string& tensor);

/// Ways to break a Llama checkpoint (a copy), each still a set of files a
/// careless reader might accept: the rows of docs/reliability.md's matrix.
/// The file edited is the one holding layer 1's q_proj.
enum class Corruption {
  ZeroByteFile,
  HeaderLengthZero,
  HeaderLengthBeyondFile,
  HeaderNotJson,
  DuplicateTensorName,
  MetadataOfWrongType,
  UnknownDtype,
  NegativeDimension,
  NumelOverflow,
  HundredGigabyteTensor,  ///< a 100 GB tensor claimed by a file of a few KB
  ReversedOffsets,
  OverlappingOffsets,
  OffsetsOutsideDataSection,
  GapBetweenTensors,
  NumelBytesMismatch,
  TruncatedShard,
  IndexNamesMissingFile,      ///< needs an index
  IndexNamesTensorNotInFile,  ///< needs an index of two files or more
  TwoShardsDefineOneTensor,   ///< needs two files or more
  UnexpectedTensorName,
  MissingWeight,
  WrongShape,
};
const std::vector<std::pair<Corruption, std::string>>& all_corruptions();  ///< with a test-name suffix each
/// Whether `kind` can be made in the checkpoint `model` (some need an index or several files).
bool applies(const fs::path& model, Corruption kind);
/// Breaks the checkpoint in `model`; returns fragments its error message must contain.
std::vector<std::string> corrupt(const fs::path& model, Corruption kind);

}  // namespace loadkit::test
