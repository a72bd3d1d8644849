// What a path may name besides a regular file, for every file the CLI reads:
// a FIFO (opening it for reading waits for a writer for ever) or a device such
// as /dev/zero (never ends). Each is refused at once with one line naming the
// file, exit 3 for checkpoints and data files, exit 2 for the job file (its
// contract: README "Jobs"). And names that are not UTF-8: `inspect --json` and
// `plugins list --json` stay valid JSON. Every CLI run has a deadline, so a
// hang fails the test instead of stalling the suite.

#include <gtest/gtest.h>
#include <sys/stat.h>

#include <functional>

#include "test_support.h"

namespace loadkit::test {
namespace {

constexpr unsigned kDeadlineSeconds = 60;

void make_fifo(const fs::path& path) {
  fs::remove(path);
  ASSERT_EQ(mkfifo(path.c_str(), 0644), 0) << path;
}

void make_dev_zero(const fs::path& path) {
  fs::remove(path);
  fs::create_symlink("/dev/zero", path);
}

struct Invocation {
  std::vector<std::string> args;
  int code = 3;
  std::vector<std::string> fragments;
};

/// A case builds its files under `tmp` and says how to run the CLI and what it must say.
struct KindCase {
  const char* name;
  std::function<Invocation(const TempDir& tmp)> setup;
};

/// A job that loads the Llama fixture, then `steps` (YAML list items).
fs::path write_job(const TempDir& tmp, const std::string& steps) {
  const fs::path job = tmp / "job.yaml";
  write_bytes(job, "model: {path: " + fixture("llama_fp32_gqa_sharded").dir + "}\nsteps:\n  - load\n" + steps);
  return job;
}

const std::string kFifo = "not a regular file (a FIFO)";
const std::string kDevice = "not a regular file (a character device)";

const KindCase kCases[] = {
    {"ConfigJsonIsAFifo",
     [](const TempDir& tmp) {
       const fs::path m = copy_fixture(fixture("llama_bf16_mqa"), tmp / "m");
       make_fifo(m / "config.json");
       return Invocation{{"load", "--model", m.string()}, 3, {(m / "config.json").string(), "not a regular file"}};
     }},
    {"ConfigJsonIsDevZero",
     [](const TempDir& tmp) {
       const fs::path m = copy_fixture(fixture("llama_bf16_mqa"), tmp / "m");
       make_dev_zero(m / "config.json");
       return Invocation{{"load", "--model", m.string()}, 3, {(m / "config.json").string(), "not a regular file"}};
     }},
    {"InspectedConfigJsonIsAFifo",
     [](const TempDir& tmp) {
       const fs::path m = copy_fixture(fixture("llama_bf16_mqa"), tmp / "m");
       make_fifo(m / "config.json");
       return Invocation{{"inspect", "--model", m.string()}, 3, {(m / "config.json").string(), "not a regular file"}};
     }},
    {"IndexIsAFifo",
     [](const TempDir& tmp) {
       const fs::path m = copy_fixture(fixture("llama_fp32_gqa_sharded"), tmp / "m");
       make_fifo(m / "model.safetensors.index.json");
       return Invocation{{"load", "--model", m.string()}, 3, {(m / "model.safetensors.index.json").string(), kFifo}};
     }},
    {"IndexedShardIsAFifo",
     [](const TempDir& tmp) {
       const fs::path m = copy_fixture(fixture("llama_fp32_gqa_sharded"), tmp / "m");
       make_fifo(m / "model-00002-of-00017.safetensors");
       return Invocation{{"load", "--model", m.string()}, 3, {(m / "model-00002-of-00017.safetensors").string(), kFifo}};
     }},
    {"SingleFileIsDevZero",
     [](const TempDir& tmp) {
       const fs::path m = copy_fixture(fixture("llama_bf16_mqa"), tmp / "m");
       make_dev_zero(m / "model.safetensors");
       return Invocation{{"load", "--model", m.string()}, 3, {(m / "model.safetensors").string(), kDevice}};
     }},
    {"ReloadSourceShardIsAFifo",
     [](const TempDir& tmp) {
       const fs::path m = copy_fixture(fixture("llama_fp32_gqa_b"), tmp / "m");
       make_fifo(m / "model-00003-of-00003.safetensors");
       return Invocation{{"reload", "--model", fixture("llama_fp32_gqa_sharded").dir, "--from", m.string()},
                    3,
                    {(m / "model-00003-of-00003.safetensors").string(), kFifo}};
     }},
    {"JobFileIsAFifo",
     [](const TempDir& tmp) {
       make_fifo(tmp / "job.yaml");
       return Invocation{{"run", (tmp / "job.yaml").string()}, 2, {(tmp / "job.yaml").string(), "cannot read the job file", kFifo}};
     }},
    {"JobFileIsDevZero",
     [](const TempDir& tmp) {
       make_dev_zero(tmp / "job.yaml");
       return Invocation{{"run", (tmp / "job.yaml").string()}, 2, {(tmp / "job.yaml").string(), kDevice}};
     }},
    {"TokensFromIsAFifo",
     [](const TempDir& tmp) {
       make_fifo(tmp / "tokens.safetensors");
       const fs::path job = write_job(tmp, "  - logits: {tokens_from: tokens.safetensors, out: logits.safetensors}\n");
       return Invocation{{"run", job.string()}, 3, {"step 2/2 'logits' failed", (tmp / "tokens.safetensors").string(), kFifo}};
     }},
    {"TokensFromIsDevZero",
     [](const TempDir& tmp) {
       make_dev_zero(tmp / "tokens.safetensors");
       const fs::path job = write_job(tmp, "  - logits: {tokens_from: tokens.safetensors, out: logits.safetensors}\n");
       return Invocation{{"run", job.string()}, 3, {(tmp / "tokens.safetensors").string(), kDevice}};
     }},
    {"VerifyReferenceIsAFifo",
     [](const TempDir& tmp) {
       make_fifo(tmp / "reference.safetensors");
       const fs::path job = write_job(tmp,
                                      "  - logits: {tokens: [1, 2, 3], out: logits.safetensors}\n"
                                      "  - verify: {logits: logits.safetensors, reference: reference.safetensors, "
                                      "max_abs_diff: 1.0e-4}\n");
       return Invocation{{"run", job.string()}, 3, {"step 3/3 'verify' failed", (tmp / "reference.safetensors").string(), kFifo}};
     }},
    {"VerifyLogitsIsDevZero",
     [](const TempDir& tmp) {
       const fs::path job = write_job(tmp,
                                      "  - verify: {logits: /dev/zero, reference: " +
                                          fixtures_dir() + "/references/llama_fp32_gqa_sharded.safetensors, argmax: true}\n");
       return Invocation{{"run", job.string()}, 3, {"/dev/zero", kDevice}};
     }},
};
void PrintTo(const KindCase& c, std::ostream* os) { *os << c.name; }

class NotARegularFile : public ::testing::TestWithParam<KindCase> {};

TEST_P(NotARegularFile, IsRefusedAtOnceNamingIt) {
  TempDir tmp;
  const Invocation s = GetParam().setup(tmp);
  auto r = run_cli(s.args, {}, with_deadline(kDeadlineSeconds));
  ASSERT_NE(r.code, kKilledByDeadline) << "the CLI hung on " << GetParam().name << "; stderr: " << r.err;
  expect_failure(r, s.code, s.fragments);
}

INSTANTIATE_TEST_SUITE_P(Inputs, NotARegularFile, ::testing::ValuesIn(kCases),
                         [](const auto& info) { return std::string(info.param.name); });

// A FIFO named like a plugin is listed broken; the scan goes on.
TEST(NotARegularFilePlugin, FifoNamedSoIsListedBroken) {
  TempDir tmp;
  fs::create_directories(tmp / "drop");
  make_fifo(tmp / "drop" / "pipe.so");
  auto r = run_cli({"plugins", "list", "--json", "--plugin-dir", (tmp / "drop").string(), "--plugin-dir", plugin_dir()},
                   {}, with_deadline(kDeadlineSeconds));
  ASSERT_EQ(r.code, 0) << r.err;
  bool listed = false;
  const auto parsed = nlohmann::json::parse(r.out);
  for (const auto& p : parsed["plugins"])
    if (p["file"] == (tmp / "drop" / "pipe.so").string()) {
      listed = true;
      EXPECT_EQ(p["status"].get<std::string>().rfind("broken: ", 0), 0u) << p;
    }
  EXPECT_TRUE(listed) << r.out;
}

// Names are bytes: a model directory, a stray shard and a plugin directory whose names are not
// UTF-8 still give JSON that a strict parser reads, the bad bytes as U+FFFD.
TEST(NonUtf8Names, InspectJsonStaysValid) {
  TempDir tmp;
  const fs::path m = copy_fixture(fixture("llama_bf16_mqa"), tmp / "model-\xff\xfe");
  fs::copy_file(m / "model.safetensors", m / "stray-\xc3.safetensors");  // ignored: model.safetensors is read alone
  auto r = run_cli({"inspect", "--json", "--model", m.string()}, {}, with_deadline(kDeadlineSeconds));
  ASSERT_EQ(r.code, 0) << r.err;
  nlohmann::json j;
  ASSERT_NO_THROW(j = nlohmann::json::parse(r.out)) << r.out;
  const std::string replacement = "\xef\xbf\xbd";  // U+FFFD
  EXPECT_EQ(j["model"], (tmp / ("model-" + replacement + replacement)).string());
  EXPECT_EQ(j["ignored_files"], nlohmann::json::array({"stray-" + replacement + ".safetensors"}));
  EXPECT_EQ(j["architecture"], "LlamaForCausalLM");
  EXPECT_GT(j["tensors"].get<int>(), 0);
}

TEST(NonUtf8Names, PluginsListJsonStaysValid) {
  TempDir tmp;
  const fs::path dir = tmp / "plugins-\x80";
  fs::create_directories(dir);
  fs::copy_file(plugin_dir() + "/llama.so", dir / "llama.so");
  write_bytes(dir / "notes-\xff.so", "not a library\n");
  auto r = run_cli({"plugins", "list", "--json", "--plugin-dir", dir.string()}, {}, with_deadline(kDeadlineSeconds));
  ASSERT_EQ(r.code, 0) << r.err;
  nlohmann::json j;
  ASSERT_NO_THROW(j = nlohmann::json::parse(r.out)) << r.out;
  const std::string shown_dir = (tmp / "plugins-\xef\xbf\xbd").string();
  EXPECT_EQ(j["search_path"][0], shown_dir);
  std::map<std::string, std::string> status;
  for (const auto& p : j["plugins"]) status[p["file"]] = p["status"];
  EXPECT_EQ(status[shown_dir + "/llama.so"], "ok");
  EXPECT_EQ(status[shown_dir + "/notes-\xef\xbf\xbd.so"].rfind("broken: cannot open: ", 0), 0u);
}

TEST(NonUtf8Names, ReportJsonStaysValid) {
  TempDir tmp;
  const fs::path dir = tmp / "plugins-\xfd";
  fs::create_directories(dir);
  fs::copy_file(plugin_dir() + "/llama.so", dir / "llama.so");
  const fs::path m = copy_fixture(fixture("llama_bf16_mqa"), tmp / "model-\xff");
  const fs::path report = tmp / "report.json";
  auto r = run_cli({"reload", "--model", m.string(), "--from", m.string(), "--report", report.string(), "--plugin-dir",
                    dir.string()},
                   {}, with_deadline(kDeadlineSeconds));
  ASSERT_EQ(r.code, 0) << r.err;
  nlohmann::json j;
  ASSERT_NO_THROW(j = nlohmann::json::parse(read_bytes(report))) << read_bytes(report);
  EXPECT_EQ(j["plugin"], (tmp / "plugins-\xef\xbf\xbd" / "llama.so").string());
  EXPECT_EQ(j["architecture"], "LlamaForCausalLM");
}

}  // namespace
}  // namespace loadkit::test
