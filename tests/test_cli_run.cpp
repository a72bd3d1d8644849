// loadkit run JOB.yaml end to end: the steps run in order against real
// fixtures, results are checked independently of the job's own verify step,
// and a failing step stops the job with its exit code, naming the step.

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <fstream>

#include "test_support.h"

namespace loadkit::test {
namespace {

/// Tensor `name` of a float32 safetensors file, read byte for byte (not through loadkit).
std::vector<float> read_f32(const fs::path& path, const std::string& name) {
  auto raw = RawSafetensors::read(path);
  const auto& info = raw.header.at(name);
  EXPECT_EQ(info.at("dtype"), "F32");
  const size_t begin = info.at("data_offsets")[0], end = info.at("data_offsets")[1];
  std::vector<float> out((end - begin) / sizeof(float));
  std::memcpy(out.data(), raw.data.data() + begin, end - begin);
  return out;
}

double max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
  EXPECT_EQ(a.size(), b.size());
  double m = 0;
  for (size_t i = 0; i < std::min(a.size(), b.size()); ++i) m = std::max(m, std::abs(double(a[i]) - double(b[i])));
  return m;
}

std::string reference(const std::string& fixture_name) {
  return fixtures_dir() + "/references/" + fixture_name + ".safetensors";
}

void expect_contains(const std::string& text, const std::vector<std::string>& parts) {
  for (const auto& p : parts) EXPECT_NE(text.find(p), std::string::npos) << "missing '" << p << "' in: " << text;
}

class CliRun : public ::testing::Test {
 protected:
  TempDir tmp;
  std::vector<std::pair<std::string, std::string>> env() const {
    return {{"LOADKIT_FIXTURES", fixtures_dir()}, {"LOADKIT_OUT", tmp.path().string()},
            {"LOADKIT_PLUGINS", plugin_dir()}};
  }
  fs::path write_job(const std::string& text) {
    const fs::path path = tmp / "job.yaml";
    write_bytes(path, text);
    return path;
  }
};

TEST_F(CliRun, DemoJobLoadsVerifiesReloadsAndReports) {
  auto r = run_cli({"run", LOADKIT_TEST_CONFIGS_DIR "/demo.yaml", "--log-level", "warn"}, env());
  ASSERT_EQ(r.code, 0) << r.err << r.out;
  expect_contains(r.out, {"[1/7] load", "[7/7] report", "job done: 7 steps ok"});
  // Independently of the job's verify steps: logits before and after the reload equal transformers'.
  EXPECT_LE(max_abs_diff(read_f32(tmp / "logits.safetensors", "logits"),
                         read_f32(reference("llama_fp32_gqa_sharded"), "logits")), 1e-4);
  EXPECT_LE(max_abs_diff(read_f32(tmp / "logits_reloaded.safetensors", "logits"),
                         read_f32(reference("llama_fp32_gqa_b"), "logits")), 1e-4);
  auto report = nlohmann::json::parse(read_bytes(tmp / "reload_report.json"));
  EXPECT_EQ(report["architecture"], "LlamaForCausalLM");
  EXPECT_EQ(report["pointers_stable"], true);
  EXPECT_GT(report["bytes"].get<uint64_t>(), 0u);
  for (const char* key : {"seconds", "gb_per_s", "peak_extra_device_bytes", "layers_processed", "layers_delayed"})
    EXPECT_TRUE(report.contains(key)) << key;
}

TEST_F(CliRun, InlineTokensAndJobRelativePaths) {
  const auto& f = fixture("llama_bf16_mqa");
  std::string tokens;
  for (auto t : f.tokens) tokens += (tokens.empty() ? "" : ", ") + std::to_string(t);
  write_job("model: {path: '" + f.dir + "'}\nsteps:\n  - load\n  - logits: {tokens: [" + tokens +
            "], out: sub/l.safetensors}\n  - verify: {logits: sub/l.safetensors, reference: '" + f.reference +
            "', min_cosine: 0.999, argmax: true}\n");
  auto r = run_cli({"run", (tmp / "job.yaml").string(), "--log-level", "warn"}, env());
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_TRUE(fs::exists(tmp / "sub" / "l.safetensors"));  // next to the job file, not in the working folder
}

TEST_F(CliRun, VerifyOutsideBoundFailsWithExit1NamingStepAndStopsTheJob) {
  const auto job = write_job(R"(model: {path: "${LOADKIT_FIXTURES}/llama_fp32_gqa_sharded"}
steps:
  - load
  - logits: {tokens_from: "${LOADKIT_FIXTURES}/references/llama_fp32_gqa_sharded.safetensors", out: a.safetensors}
  - verify: {logits: a.safetensors, reference: "${LOADKIT_FIXTURES}/references/llama_fp32_gqa_b.safetensors", max_abs_diff: 1.0e-4}
  - report: {path: report.json}
)");
  auto r = run_cli({"run", job.string(), "--log-level", "warn"}, env());
  EXPECT_EQ(r.code, 1) << r.err;
  ASSERT_EQ(r.error_lines().size(), 1u) << r.err;
  expect_contains(r.error_lines()[0], {job.string() + ":5:5", "step 3/4 'verify' failed", "exceeds max_abs_diff"});
  EXPECT_FALSE(fs::exists(tmp / "report.json")) << "steps after the failing one ran";
}

TEST_F(CliRun, FailingReloadStopsTheJobWithExit3NamingTheStep) {
  const auto job = write_job(R"(model: {path: "${LOADKIT_FIXTURES}/llama_fp32_gqa_sharded"}
steps:
  - load
  - reload: {from: no_such_checkpoint}
  - report: {path: report.json}
)");
  auto r = run_cli({"run", job.string(), "--log-level", "warn"}, env());
  EXPECT_EQ(r.code, 3) << r.err;
  ASSERT_EQ(r.error_lines().size(), 1u) << r.err;
  expect_contains(r.error_lines()[0], {job.string() + ":4:5", "step 2/3 'reload' failed", "no_such_checkpoint"});
  EXPECT_FALSE(fs::exists(tmp / "report.json"));
}

TEST_F(CliRun, BadJobIsExit2WithFileLineColumnBeforeAnythingRuns) {
  const auto job = write_job(R"(model: {path: "${LOADKIT_FIXTURES}/llama_fp32_gqa_sharded"}
steps:
  - load
  - report: {path: report.json}
  - reload: {form: elsewhere}
)");
  auto r = run_cli({"run", job.string()}, env());
  EXPECT_EQ(r.code, 2) << r.err;
  ASSERT_EQ(r.error_lines().size(), 1u) << r.err;
  EXPECT_EQ(r.error_lines()[0], "loadkit: error: " + job.string() +
                                    ":5:14: unknown key 'form' in step 'reload' (expected one of: from, "
                                    "process_weights_after_loading)");
  EXPECT_FALSE(fs::exists(tmp / "report.json")) << "a step ran before the whole job was checked";
}

TEST_F(CliRun, ArchitectureOnlyABrokenPluginCouldServeIsExit4) {
  const fs::path model = copy_fixture(fixture("llama_fp32_gqa_sharded"), tmp / "model");
  auto config = nlohmann::json::parse(read_bytes(model / "config.json"));
  config["architectures"] = {"ThrowingForCausalLM"};
  write_bytes(model / "config.json", config.dump());
  const auto job = write_job("model: {path: model}\nplugin_dirs: ['" + test_plugin_dir("throwing") +
                             "']\nsteps: [load]\n");
  auto r = run_cli({"run", job.string(), "--log-level", "error"}, env());
  EXPECT_EQ(r.code, 4) << r.err;
  ASSERT_EQ(r.error_lines().size(), 1u) << r.err;
  expect_contains(r.error_lines()[0], {"step 1/1 'load' failed", "'ThrowingForCausalLM'",
                                       "throwing.so is broken: registration failed"});
}

TEST_F(CliRun, Qwen3JobThroughAPluginDirectory) {
  auto r = run_cli({"run", LOADKIT_TEST_CONFIGS_DIR "/qwen3_plugin.yaml", "--log-level", "warn"}, env());
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_LE(max_abs_diff(read_f32(tmp / "qwen3_logits.safetensors", "logits"),
                         read_f32(reference("qwen3_fp32_gqa"), "logits")), 1e-4);
}

TEST(CliRunUsage, MissingJobFileIsExit2) {
  auto r = run_cli({"run"});
  EXPECT_EQ(r.code, 2) << r.err;
  auto r2 = run_cli({"run", "/nonexistent/job.yaml"});
  EXPECT_EQ(r2.code, 2);
  EXPECT_NE(r2.err.find("/nonexistent/job.yaml: cannot read the job file"), std::string::npos) << r2.err;
}

}  // namespace
}  // namespace loadkit::test
