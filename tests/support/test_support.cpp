#include "test_support.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <ftw.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <linux/capability.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>
#include <sstream>
#include <stdexcept>

namespace loadkit::test {

std::string cli_path() { return LOADKIT_TEST_CLI; }
std::string plugin_dir() { return LOADKIT_TEST_PLUGIN_DIR; }
std::string test_plugin_dir(const std::string& name) { return std::string(LOADKIT_TEST_BAD_PLUGINS_DIR) + "/" + name; }
std::string fixtures_dir() { return LOADKIT_TEST_FIXTURES_DIR; }

std::vector<std::string> CliResult::error_lines() const {
  std::vector<std::string> lines;
  std::istringstream in(err);
  for (std::string line; std::getline(in, line);)
    if (line.rfind("loadkit: error:", 0) == 0) lines.push_back(line);
  return lines;
}

namespace {

/// Starts `program` with `args` and `env` added, its stdout and stderr into files; `setup` runs in
/// the child just before exec.
pid_t spawn(const std::string& program, const std::vector<std::string>& args,
            const std::vector<std::pair<std::string, std::string>>& env, const std::string& out_path,
            const std::string& err_path, const ChildSetup& setup = {}) {
  pid_t pid = fork();
  if (pid < 0) throw std::runtime_error("fork failed");
  if (pid == 0) {
    for (const auto& [k, v] : env) setenv(k.c_str(), v.c_str(), 1);
    int out = open(out_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    int err = open(err_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    dup2(out, 1);
    dup2(err, 2);
    if (setup) setup();
    std::vector<std::string> argv_s{program};
    argv_s.insert(argv_s.end(), args.begin(), args.end());
    std::vector<char*> argv;
    for (auto& a : argv_s) argv.push_back(a.data());
    argv.push_back(nullptr);
    execv(argv[0], argv.data());
    _exit(127);
  }
  return pid;
}

int status_code(int status) { return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status); }

}  // namespace

CliResult run_cli(const std::vector<std::string>& args, const std::vector<std::pair<std::string, std::string>>& env,
                  const ChildSetup& setup) {
  TempDir tmp;
  const std::string out_path = (tmp / "out").string(), err_path = (tmp / "err").string();
  const pid_t pid = spawn(cli_path(), args, env, out_path, err_path, setup);
  int status = 0;
  struct rusage usage {};
  wait4(pid, &status, 0, &usage);
  CliResult r;
  r.code = status_code(status);
  r.peak_rss_bytes = static_cast<uint64_t>(usage.ru_maxrss) * 1024;  // Linux reports KiB
  r.out = read_bytes(out_path);
  r.err = read_bytes(err_path);
  return r;
}

void drop_root_file_access() {
  if (geteuid() != 0) return;
  // Root's permitted capabilities after exec are its bounding set.
  for (int cap : {CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH})
    if (prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0) {
      dprintf(2, "cannot drop root's file access: prctl(PR_CAPBSET_DROP, %d): %s\n", cap, std::strerror(errno));
      _exit(kChildSetupFailed);
    }
}

ChildSetup limit_address_space(uint64_t bytes) {
  return [bytes] {
    const struct rlimit limit {bytes, bytes};
    if (setrlimit(RLIMIT_AS, &limit) != 0) {
      dprintf(2, "cannot limit the address space: setrlimit(RLIMIT_AS): %s\n", std::strerror(errno));
      _exit(kChildSetupFailed);
    }
  };
}

ChildSetup with_deadline(unsigned seconds, ChildSetup then) {
  return [seconds, then = std::move(then)] {
    if (then) then();
    alarm(seconds);
  };
}

void expect_failure(const CliResult& r, int code, const std::vector<std::string>& fragments) {
  EXPECT_EQ(r.code, code) << r.err;
  const auto lines = r.error_lines();
  ASSERT_EQ(lines.size(), 1u) << r.err;
  for (const auto& f : fragments) EXPECT_NE(lines[0].find(f), std::string::npos) << "'" << f << "' not in: " << lines[0];
  for (const char* bad : {"Exception raised from", "terminate called", "Traceback", "frame #"})
    EXPECT_EQ(r.err.find(bad), std::string::npos) << r.err;
}

int free_port() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr);
  socklen_t len = sizeof addr;
  getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  close(fd);
  return ntohs(addr.sin_port);
}

std::vector<CliResult> run_ranks(const std::string& program, const std::vector<std::string>& args, int world,
                                 std::chrono::seconds timeout, bool& timed_out,
                                 const std::vector<std::pair<std::string, std::string>>& env) {
  TempDir tmp;
  const std::string port = std::to_string(free_port());
  std::vector<pid_t> pids;
  for (int r = 0; r < world; ++r) {
    auto rank_env = env;
    rank_env.insert(rank_env.end(), {{"RANK", std::to_string(r)},
                                     {"LOCAL_RANK", std::to_string(r)},
                                     {"WORLD_SIZE", std::to_string(world)},
                                     {"MASTER_ADDR", "127.0.0.1"},
                                     {"MASTER_PORT", port}});
    pids.push_back(spawn(program, args, rank_env, (tmp / ("out" + std::to_string(r))).string(),
                         (tmp / ("err" + std::to_string(r))).string()));
  }
  std::vector<CliResult> results(world);
  std::vector<bool> done(world, false);
  int left = world;
  timed_out = false;
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (left > 0) {
    for (int r = 0; r < world; ++r) {
      int status = 0;
      if (done[r] || waitpid(pids[r], &status, WNOHANG) != pids[r]) continue;
      done[r] = true;
      --left;
      results[r].code = status_code(status);
    }
    if (left == 0) break;
    if (std::chrono::steady_clock::now() > deadline) {
      timed_out = true;
      for (int r = 0; r < world; ++r)
        if (!done[r]) kill(pids[r], SIGKILL);
    }
    usleep(10000);
  }
  for (int r = 0; r < world; ++r) {
    results[r].out = read_bytes(tmp / ("out" + std::to_string(r)));
    results[r].err = read_bytes(tmp / ("err" + std::to_string(r)));
  }
  return results;
}

std::string Fixture::tokens_arg() const {
  std::string s;
  for (int64_t t : tokens) s += (s.empty() ? "" : ",") + std::to_string(t);
  return s;
}

const std::vector<Fixture>& fixtures() {
  static const std::vector<Fixture> all = [] {
    std::vector<Fixture> out;
    const std::string manifest = fixtures_dir() + "/fixtures.json";
    std::ifstream in(manifest);
    if (!in) throw std::runtime_error("fixture manifest missing: " + manifest + " (run the fixtures.generate test)");
    auto j = nlohmann::json::parse(in);
    for (const auto& f : j.at("fixtures")) {
      Fixture fx;
      fx.name = f.at("name");
      fx.dir = f.at("dir");
      fx.reference = f.at("reference");
      fx.dtype = f.at("dtype");
      fx.vocab_size = f.at("vocab_size");
      fx.tokens = f.at("tokens").get<std::vector<int64_t>>();
      fx.architecture = f.value("architecture", "");
      fx.reload_target = f.value("reload_target", "");
      out.push_back(std::move(fx));
    }
    return out;
  }();
  return all;
}

const Fixture& fixture(std::string_view name) {
  for (const auto& f : fixtures())
    if (f.name == name) return f;
  throw std::runtime_error("no fixture named " + std::string(name));
}

TempDir::TempDir() {
  std::random_device rd;
  const char* base = std::getenv("TMPDIR");
  for (;;) {
    path_ = fs::path(base ? base : "/tmp") / ("loadkit-test-" + std::to_string(rd()));
    if (fs::create_directory(path_)) break;
  }
}

TempDir::~TempDir() {
  // Plain POSIX on purpose: libtorch's wheels export an older copy of
  // std::filesystem whose remove_all crashed when it won symbol resolution.
  chmod(path_.c_str(), 0700);
  nftw(
      path_.c_str(),
      [](const char* p, const struct stat* st, int, struct FTW*) {
        if (S_ISDIR(st->st_mode)) chmod(p, 0700);
        ::remove(p);
        return 0;  // keep going: remove what can be removed
      },
      16, FTW_DEPTH | FTW_PHYS);
}

fs::path copy_fixture(const Fixture& fixture, const fs::path& dest) {
  fs::create_directories(dest);
  for (const auto& entry : fs::directory_iterator(fixture.dir))
    fs::copy_file(fs::canonical(entry.path()), dest / entry.path().filename(), fs::copy_options::overwrite_existing);
  return dest;
}

std::string read_bytes(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

void write_bytes(const fs::path& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

std::string safetensors_bytes(const std::string& header_text, const std::string& data) {
  std::string out(8, '\0');
  uint64_t n = header_text.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  return out + header_text + data;
}

RawSafetensors RawSafetensors::read(const fs::path& path) {
  std::string bytes = read_bytes(path);
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<uint8_t>(bytes[i]);
  RawSafetensors raw;
  raw.header = nlohmann::ordered_json::parse(bytes.substr(8, n));
  raw.data = bytes.substr(8 + n);
  return raw;
}

void RawSafetensors::write(const fs::path& path) const { write_bytes(path, safetensors_bytes(header_text(), data)); }

namespace {

/// The checkpoint's *.safetensors files, in name order.
std::vector<fs::path> shards(const fs::path& model) {
  std::vector<fs::path> files;
  for (const auto& e : fs::directory_iterator(model))
    if (e.path().extension() == ".safetensors") files.push_back(e.path());
  std::sort(files.begin(), files.end());
  return files;
}

}  // namespace

fs::path file_holding(const fs::path& dir, const std::string& tensor) {
  for (const auto& f : shards(dir))
    if (RawSafetensors::read(f).header.contains(tensor)) return f;
  throw std::runtime_error("no file in " + dir.string() + " holds " + tensor);
}

namespace {

using ojson = nlohmann::ordered_json;
const std::string kQ = "model.layers.1.self_attn.q_proj.weight";

fs::path index_of(const fs::path& model) { return model / "model.safetensors.index.json"; }

/// Edits the index's weight_map, where there is an index.
void edit_weight_map(const fs::path& model, const std::function<void(ojson&)>& edit) {
  if (!fs::exists(index_of(model))) return;
  ojson index = ojson::parse(read_bytes(index_of(model)));
  edit(index["weight_map"]);
  write_bytes(index_of(model), index.dump());
}

/// The tensor whose data comes last in the file.
std::string last_in_data(const RawSafetensors& raw) {
  std::string last;
  uint64_t begin = 0;
  for (auto& [k, v] : raw.header.items())
    if (k != "__metadata__" && (last.empty() || v["data_offsets"][0].get<uint64_t>() >= begin))
      last = k, begin = v["data_offsets"][0].get<uint64_t>();
  return last;
}

/// Rewrites a file without `tensor`, keeping the data contiguous, and drops it from the index.
void drop_tensor(const fs::path& model, const std::string& tensor) {
  fs::path shard = file_holding(model, tensor);
  auto raw = RawSafetensors::read(shard);
  ojson header = ojson::object();
  std::string data;
  for (auto& [k, v] : raw.header.items()) {
    if (k == "__metadata__" || k == tensor) continue;
    uint64_t b = v["data_offsets"][0], e = v["data_offsets"][1];
    ojson entry = v;
    entry["data_offsets"] = {data.size(), data.size() + (e - b)};
    data += raw.data.substr(b, e - b);
    header[k] = entry;
  }
  raw.header = header;
  raw.data = data;
  raw.write(shard);
  edit_weight_map(model, [&](ojson& map) { map.erase(tensor); });
}

}  // namespace

const std::vector<std::pair<Corruption, std::string>>& all_corruptions() {
  static const std::vector<std::pair<Corruption, std::string>> all = {
      {Corruption::ZeroByteFile, "ZeroByteFile"},
      {Corruption::HeaderLengthZero, "HeaderLengthZero"},
      {Corruption::HeaderLengthBeyondFile, "HeaderLengthBeyondFile"},
      {Corruption::HeaderNotJson, "HeaderNotJson"},
      {Corruption::DuplicateTensorName, "DuplicateTensorName"},
      {Corruption::MetadataOfWrongType, "MetadataOfWrongType"},
      {Corruption::UnknownDtype, "UnknownDtype"},
      {Corruption::NegativeDimension, "NegativeDimension"},
      {Corruption::NumelOverflow, "NumelOverflow"},
      {Corruption::HundredGigabyteTensor, "HundredGigabyteTensor"},
      {Corruption::ReversedOffsets, "ReversedOffsets"},
      {Corruption::OverlappingOffsets, "OverlappingOffsets"},
      {Corruption::OffsetsOutsideDataSection, "OffsetsOutsideDataSection"},
      {Corruption::GapBetweenTensors, "GapBetweenTensors"},
      {Corruption::NumelBytesMismatch, "NumelBytesMismatch"},
      {Corruption::TruncatedShard, "TruncatedShard"},
      {Corruption::IndexNamesMissingFile, "IndexNamesMissingFile"},
      {Corruption::IndexNamesTensorNotInFile, "IndexNamesTensorNotInFile"},
      {Corruption::TwoShardsDefineOneTensor, "TwoShardsDefineOneTensor"},
      {Corruption::UnexpectedTensorName, "UnexpectedTensorName"},
      {Corruption::MissingWeight, "MissingWeight"},
      {Corruption::WrongShape, "WrongShape"},
  };
  return all;
}

bool applies(const fs::path& model, Corruption kind) {
  const bool indexed = fs::exists(index_of(model));
  switch (kind) {
    case Corruption::IndexNamesMissingFile: return indexed;
    case Corruption::IndexNamesTensorNotInFile: return indexed && shards(model).size() > 1;
    case Corruption::TwoShardsDefineOneTensor: return !indexed || shards(model).size() > 1;
    default: return true;
  }
}

std::vector<std::string> corrupt(const fs::path& model, Corruption kind) {
  const fs::path shard = file_holding(model, kQ);
  auto edit = [&](const std::function<void(RawSafetensors&)>& change) {
    auto raw = RawSafetensors::read(shard);
    change(raw);
    raw.write(shard);
  };
  switch (kind) {
    case Corruption::ZeroByteFile:
      fs::resize_file(shard, 0);
      return {shard.string(), "empty file"};
    case Corruption::HeaderLengthZero: {
      std::string bytes = read_bytes(shard);
      std::fill(bytes.begin(), bytes.begin() + 8, '\0');
      write_bytes(shard, bytes);
      return {shard.string(), "header length is 0"};
    }
    case Corruption::HeaderLengthBeyondFile: {
      std::string bytes = read_bytes(shard);
      bytes[5] = '\x01';
      write_bytes(shard, bytes);
      return {shard.string(), "header length"};
    }
    case Corruption::HeaderNotJson: {
      auto raw = RawSafetensors::read(shard);
      std::string text = raw.header_text();
      text.back() = ',';  // `{...,` : the object never closes
      write_bytes(shard, safetensors_bytes(text, raw.data));
      return {shard.string(), "header is not valid JSON"};
    }
    case Corruption::DuplicateTensorName: {
      // Text surgery: a JSON object cannot hold the same key twice.
      auto raw = RawSafetensors::read(shard);
      const std::string text = raw.header_text();
      const std::string twice = "{" + ojson(kQ).dump() + ":" + raw.header[kQ].dump() + "," + text.substr(1);
      write_bytes(shard, safetensors_bytes(twice, raw.data));
      return {shard.string(), kQ, "defined twice"};
    }
    case Corruption::MetadataOfWrongType:
      edit([](RawSafetensors& raw) { raw.header["__metadata__"] = ojson::array({1, 2}); });
      return {shard.string(), "__metadata__"};
    case Corruption::UnknownDtype:
      edit([](RawSafetensors& raw) { raw.header[kQ]["dtype"] = "F12"; });
      return {shard.string(), kQ, "unknown dtype 'F12'"};
    case Corruption::NegativeDimension:
      edit([](RawSafetensors& raw) { raw.header[kQ]["shape"][0] = -raw.header[kQ]["shape"][0].get<int64_t>(); });
      return {shard.string(), kQ, "negative"};
    case Corruption::NumelOverflow:
      edit([](RawSafetensors& raw) { raw.header[kQ]["shape"] = {int64_t{1} << 40, int64_t{1} << 40}; });
      return {shard.string(), kQ, "overflows"};
    case Corruption::HundredGigabyteTensor:
      edit([](RawSafetensors& raw) {
        const uint64_t begin = raw.header[kQ]["data_offsets"][0];
        raw.header[kQ]["dtype"] = "F32";
        raw.header[kQ]["shape"] = {int64_t{25'000'000'000}};
        raw.header[kQ]["data_offsets"] = {begin, begin + uint64_t{100'000'000'000}};
      });
      return {shard.string(), kQ, "data section holds only"};
    case Corruption::ReversedOffsets:
      edit([](RawSafetensors& raw) {
        auto& offsets = raw.header[kQ]["data_offsets"];
        offsets = {offsets[1], offsets[0]};
      });
      return {shard.string(), kQ, "reversed"};
    case Corruption::OverlappingOffsets:
      edit([](RawSafetensors& raw) { raw.header["model.layers.1.extra.weight"] = raw.header[kQ]; });  // same bytes
      return {shard.string(), "overlap"};
    case Corruption::OffsetsOutsideDataSection:
      edit([](RawSafetensors& raw) {
        auto& offsets = raw.header[kQ]["data_offsets"];
        const uint64_t past = raw.data.size();
        offsets = {offsets[0].get<uint64_t>() + past, offsets[1].get<uint64_t>() + past};
      });
      return {shard.string(), kQ, "data section holds only"};
    case Corruption::GapBetweenTensors: {
      auto raw = RawSafetensors::read(shard);
      const std::string last = last_in_data(raw);
      auto& offsets = raw.header[last]["data_offsets"];
      offsets = {offsets[0].get<uint64_t>() + 8, offsets[1].get<uint64_t>() + 8};  // 8 unclaimed bytes before it
      raw.data += std::string(8, '\0');
      raw.write(shard);
      return {shard.string(), last, "gap"};
    }
    case Corruption::NumelBytesMismatch:
      edit([](RawSafetensors& raw) {
        auto shape = raw.header[kQ]["shape"];
        raw.header[kQ]["shape"] = {shape[0].get<int64_t>() - 1, shape[1]};
      });
      return {shard.string(), kQ, "bytes"};
    case Corruption::TruncatedShard:
      fs::resize_file(shard, fs::file_size(shard) - 7);
      return {shard.string(), "truncated"};
    case Corruption::IndexNamesMissingFile:
      fs::remove(shard);
      return {"model.safetensors.index.json", shard.filename().string(), "missing file"};
    case Corruption::IndexNamesTensorNotInFile: {
      const auto files = shards(model);
      const fs::path other = files[files[0] == shard ? 1 : 0];
      edit_weight_map(model, [&](ojson& map) { map[kQ] = other.filename().string(); });
      return {"model.safetensors.index.json", kQ, other.filename().string(), "does not contain it"};
    }
    case Corruption::TwoShardsDefineOneTensor: {
      // A copy of q_proj's bytes in a second file: an indexed file, or a new file where all of them are read.
      const auto files = shards(model);
      const fs::path other = fs::exists(index_of(model)) ? files[files[0] == shard ? 1 : 0] : model / "extra.safetensors";
      const auto from = RawSafetensors::read(shard);
      RawSafetensors to;
      if (fs::exists(other)) to = RawSafetensors::read(other);
      const uint64_t b = from.header[kQ]["data_offsets"][0], e = from.header[kQ]["data_offsets"][1];
      ojson entry = from.header[kQ];
      entry["data_offsets"] = {to.data.size(), to.data.size() + (e - b)};
      to.header[kQ] = entry;
      to.data += from.data.substr(b, e - b);
      to.write(other);
      return {kQ, "is also defined in", shard.filename().string(), other.filename().string()};
    }
    case Corruption::UnexpectedTensorName: {
      const std::string query = "model.layers.1.self_attn.query.weight";
      edit([&](RawSafetensors& raw) {
        ojson renamed = ojson::object();
        for (auto& [k, v] : raw.header.items()) renamed[k == kQ ? query : k] = v;
        raw.header = renamed;
      });
      edit_weight_map(model, [&](ojson& map) {
        map[query] = map[kQ];
        map.erase(kQ);
      });
      return {"There is no module or parameter named 'model.layers.1.self_attn.query' in LlamaAttention", shard.string()};
    }
    case Corruption::MissingWeight:
      drop_tensor(model, "model.norm.weight");
      return {"Some weights are not initialized from checkpoints: model.norm.weight"};
    case Corruption::WrongShape: {
      auto raw = RawSafetensors::read(shard);
      auto shape = raw.header[kQ]["shape"];
      const int64_t rows = shape[0], cols = shape[1];
      raw.header[kQ]["shape"] = {rows / 2, cols * 2};  // same bytes, wrong shape
      raw.write(shard);
      return {kQ, "[" + std::to_string(rows / 2) + ", " + std::to_string(cols * 2) + "]"};
    }
  }
  return {};
}

}  // namespace loadkit::test
