// A checkpoint that changes while it is read: truncated (`cp`, `safetensors.save_file` over it),
// rewritten in place (same size, other bytes) or replaced by a file renamed over it. No signal
// ever; a load fails with exit 3 naming the file; a reload either reads one consistent version
// or fails naming the file, and then either puts everything back (a journal) or says the weights
// are mixed and lists the layers it wrote — checked here against the model's own tensors.
//
// Deterministic: the test-only hook of runtime/src/formats/change_hook.h changes the named file
// after a chosen number of its tensors were read, instead of racing a writer.

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cstdlib>
#include <set>

#include "device_skip.h"
#include "loadkit/causal_lm.h"
#include "loadkit/error.h"
#include "loadkit/module.h"
#include "loadkit/runtime/engine.h"
#include "loadkit/runtime/tensor_files.h"
#include "model_checks.h"
#include "test_support.h"

namespace loadkit::test {
namespace {

constexpr unsigned kDeadlineSeconds = 300;
const char* const kHook = "LOADKIT_TEST_CHANGE_FILE";
constexpr const char* kChanged = "changed while it was read";
constexpr const char* kMixed = "the weights are now mixed";

/// The model loaded first, and the checkpoint of the same shapes (other weights) reloaded from.
const Fixture& model_fixture() { return fixture("llama_fp32_gqa_sharded"); }
const Fixture& target_fixture() { return fixture(model_fixture().reload_target); }

std::string hook(const std::string& how, size_t after, const fs::path& file) {
  return how + ":" + std::to_string(after) + ":" + file.string();
}

/// Sets the hook for an in-process call; unset again at the end of the scope.
class HookScope {
 public:
  explicit HookScope(const std::string& value) { setenv(kHook, value.c_str(), 1); }
  ~HookScope() { unsetenv(kHook); }
};

/// The checkpoint's safetensors files, sorted, and how many tensors one holds (read raw).
std::vector<fs::path> shards(const fs::path& dir) {
  std::vector<fs::path> out;
  for (const auto& e : fs::directory_iterator(dir))
    if (e.path().extension() == ".safetensors") out.push_back(e.path());
  std::sort(out.begin(), out.end());
  return out;
}
size_t tensors_in(const fs::path& file) {
  const auto raw = RawSafetensors::read(file);
  return raw.header.size() - (raw.header.contains("__metadata__") ? 1 : 0);
}

/// A copy of `f` under `tmp/name`, and the file of it the hook changes: the second of several
/// (or the only one), after half of its tensors.
struct Victim {
  fs::path dir, file;
  size_t half = 0;
};
Victim copy_with_victim(const Fixture& f, const TempDir& tmp, const std::string& name) {
  Victim v;
  v.dir = copy_fixture(f, tmp / name);
  const auto files = shards(v.dir);
  v.file = files.size() > 1 ? files[1] : files[0];
  v.half = std::max<size_t>(1, tensors_in(v.file) / 2);
  return v;
}

/// The layer (module) a kernel tensor's dotted name belongs to.
// ------------------------------------------------------------------ the C++ API, in process

using Param = std::tuple<std::string /*device*/, std::string /*quant*/>;

class ChangingCheckpointReload : public ::testing::TestWithParam<Param> {
 protected:
  std::string device() const { return std::get<0>(GetParam()); }
  std::string quant() const { return std::get<1>(GetParam()); }
  std::unique_ptr<LoadedModel> load(const std::string& dir) const { return load_model(dir, device(), quant()); }

  /// Reloads `from` with the hook set; returns the error's message ("" if it succeeded).
  std::string reload_with(LoadedModel& m, const std::string& value, const fs::path& from, Rollback rollback,
                          bool process = true) {
    HookScope scope(value);
    try {
      m.reload(from.string(), process, rollback);
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::Input) << e.what();
      return e.what();
    }
    return {};
  }

  /// The model loaded, its kernel tensors, and the error of a reload from a copy of the target
  /// whose victim file changed (`how`) after half of its tensors were read: an Input error
  /// naming the file and the change.
  struct Midway {
    std::unique_ptr<LoadedModel> model;
    std::map<std::string, at::Tensor> before;
    std::string error;
  };
  Midway reload_changed_midway(const std::string& how, Rollback rollback, const TempDir& tmp) {
    Midway m;
    m.model = load(model_fixture().dir);
    m.before = kernel_state(*m.model);
    const Victim v = copy_with_victim(target_fixture(), tmp, "b");
    m.error = reload_with(*m.model, hook(how, v.half, v.file), v.dir, rollback);
    EXPECT_FALSE(m.error.empty()) << "the reload succeeded although " << v.file << " changed";
    EXPECT_NE(m.error.find(v.file.string()), std::string::npos) << m.error;
    EXPECT_NE(m.error.find(kChanged), std::string::npos) << m.error;
    return m;
  }
};

TEST_P(ChangingCheckpointReload, AReloadOfAFileChangedMidwayFailsAndListsExactlyTheLayersItWrote) {
  SKIP_WITHOUT(device());
  for (const std::string how : {"truncate", "rewrite"}) {
    SCOPED_TRACE(how);
    TempDir tmp;
    const Midway m = reload_changed_midway(how, Rollback::None, tmp);
    const LoadReport& r = m.model->report();
    if (quant() == "none") {
      EXPECT_FALSE(r.written_modules.empty()) << "plain layers are written as they are read";
    }
    EXPECT_EQ(m.error.find(kMixed) != std::string::npos, !r.written_modules.empty()) << m.error;
    EXPECT_EQ(r.error, m.error);
    expect_written_as_reported(m.before, kernel_state(*m.model), r.written_modules);
    // The model still works: a reload of an unchanged checkpoint completes it.
    m.model->reload(target_fixture().dir);
    expect_identical(kernel_state(*m.model), kernel_state(*load(target_fixture().dir)));
  }
}

TEST_P(ChangingCheckpointReload, WithAJournalAFailedReloadLeavesTheModelBitIdentical) {
  SKIP_WITHOUT(device());
  for (const std::string how : {"truncate", "rewrite"}) {
    SCOPED_TRACE(how);
    TempDir tmp;
    const Midway m = reload_changed_midway(how, Rollback::Journal, tmp);
    EXPECT_EQ(m.error.find(kMixed), std::string::npos) << m.error;
    EXPECT_TRUE(m.model->report().written_modules.empty());
    expect_identical(kernel_state(*m.model), m.before);
  }
}

TEST_P(ChangingCheckpointReload, AFileRenamedOverMidwayIsReadAsTheVersionThatWasOpened) {
  SKIP_WITHOUT(device());
  TempDir tmp;
  auto model = load(model_fixture().dir);
  const Victim v = copy_with_victim(target_fixture(), tmp, "b");
  const std::string original = read_bytes(v.file);
  EXPECT_EQ(reload_with(*model, hook("rename", v.half, v.file), v.dir, Rollback::None), "");
  EXPECT_NE(read_bytes(v.file), original) << "the hook did not replace the file";
  expect_identical(kernel_state(*model), kernel_state(*load(target_fixture().dir)));
  EXPECT_TRUE(model->report().written_modules.empty());
}

TEST_P(ChangingCheckpointReload, AKernelFormatCopyOfAChangedFileFailsAndWithAJournalPutsEverythingBack) {
  SKIP_WITHOUT(device());
  TempDir tmp;
  auto model = load(model_fixture().dir);
  // The target's kernel format, as the model holds it after a reload (split over two files).
  model->reload(target_fixture().dir);
  std::vector<std::pair<std::string, at::Tensor>> kernel[2];
  size_t i = 0;
  for (auto& [name, t] : kernel_state(*model)) kernel[i++ % 2].emplace_back(name, t);
  fs::create_directories(tmp / "kernel");
  model = load(model_fixture().dir);
  const auto before = kernel_state(*model);
  // Only the parameters: buffers are not part of a kernel-format checkpoint.
  std::set<std::string> params;
  for (auto& [name, p] : model->model().named_parameters()) params.insert(name);
  for (int f = 0; f < 2; ++f) {
    std::erase_if(kernel[f], [&](const auto& e) { return !params.count(e.first); });
    save_tensors((tmp / "kernel" / ("part-" + std::to_string(f) + ".safetensors")).string(), kernel[f]);
  }
  const fs::path file = tmp / "kernel" / "part-1.safetensors";
  const size_t half = std::max<size_t>(1, tensors_in(file) / 2);

  std::string error = reload_with(*model, hook("rewrite", half, file), tmp / "kernel", Rollback::Journal, false);
  EXPECT_NE(error.find(kChanged), std::string::npos) << error;
  EXPECT_EQ(error.find(kMixed), std::string::npos) << error;
  expect_identical(kernel_state(*model), before);

  save_tensors(file.string(), kernel[1]);  // the file as it was
  error = reload_with(*model, hook("rewrite", half, file), tmp / "kernel", Rollback::None, false);
  EXPECT_NE(error.find(file.string()), std::string::npos) << error;
  EXPECT_NE(error.find(kChanged), std::string::npos) << error;
  const LoadReport& r = model->report();
  EXPECT_EQ(error.find(kMixed) != std::string::npos, !r.written_modules.empty()) << error;
  expect_written_as_reported(before, kernel_state(*model), r.written_modules);
}

INSTANTIATE_TEST_SUITE_P(Devices, ChangingCheckpointReload,
                         ::testing::Combine(::testing::Values("cpu", "cuda"), ::testing::Values("none", "int8")),
                         [](const auto& info) { return std::get<0>(info.param) + "_" + std::get<1>(info.param); });

// ------------------------------------------------------------------ the CLI

class ChangingCheckpointCli : public ::testing::TestWithParam<std::string> {
 protected:
  CliResult cli(std::vector<std::string> args, const std::string& value) const {
    args.insert(args.end(), {"--device", GetParam(), "--plugin-dir", plugin_dir()});
    return run_cli(args, {{kHook, value}}, with_deadline(kDeadlineSeconds));
  }
};

TEST_P(ChangingCheckpointCli, ALoadOfAFileTruncatedOrRewrittenAfterValidationIsExit3NamingIt) {
  SKIP_WITHOUT(GetParam());
  for (const std::string how : {"truncate", "rewrite"})
    for (const bool at_once : {true, false}) {
      SCOPED_TRACE(how + (at_once ? " right after validation" : " midway"));
      TempDir tmp;
      const Victim v = copy_with_victim(model_fixture(), tmp, "m");
      const CliResult r = cli({"load", "--model", v.dir.string()}, hook(how, at_once ? 0 : v.half, v.file));
      expect_failure(r, 3, {v.file.string(), kChanged});
    }
}

TEST_P(ChangingCheckpointCli, ALoadOfAFileRenamedOverMidwayReadsTheOpenedVersion) {
  SKIP_WITHOUT(GetParam());
  TempDir tmp;
  const Fixture& f = model_fixture();
  const Victim v = copy_with_victim(f, tmp, "m");
  const std::string original = read_bytes(v.file);
  const CliResult r = cli({"logits", "--model", v.dir.string(), "--tokens", f.tokens_arg(), "--out",
                           (tmp / "logits.safetensors").string()},
                          hook("rename", v.half, v.file));
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(read_bytes(v.file), original) << "the hook did not replace the file";
  expect_close(load_tensors((tmp / "logits.safetensors").string()).at(0).second, reference_logits(f), f.dtype);
}

TEST_P(ChangingCheckpointCli, AReloadOfAChangedFileIsExit3AndItsReportListsWhatItWrote) {
  SKIP_WITHOUT(GetParam());
  for (const bool journal : {false, true}) {
    SCOPED_TRACE(journal ? "--journal" : "no journal");
    TempDir tmp;
    const Victim v = copy_with_victim(target_fixture(), tmp, "b");
    std::vector<std::string> args = {"reload", "--model", model_fixture().dir, "--from", v.dir.string(), "--report",
                                     (tmp / "report.json").string()};
    if (journal) args.push_back("--journal");
    const CliResult r = cli(args, hook("rewrite", v.half, v.file));
    expect_failure(r, 3, {v.file.string(), kChanged});
    const auto report = nlohmann::json::parse(read_bytes(tmp / "report.json"));
    const auto written = report.at("written_modules").get<std::vector<std::string>>();
    EXPECT_NE(report.at("error").get<std::string>().find(kChanged), std::string::npos);
    if (journal) {
      EXPECT_TRUE(written.empty());
      EXPECT_EQ(r.err.find(kMixed), std::string::npos) << r.err;
    } else {
      EXPECT_FALSE(written.empty()) << "plain layers are written as they are read";
      EXPECT_NE(r.err.find(kMixed), std::string::npos) << r.err;
    }
  }
}

TEST_P(ChangingCheckpointCli, AReloadOfAFileTruncatedBeforeAnyWriteSaysNothingWasWritten) {
  SKIP_WITHOUT(GetParam());
  TempDir tmp;
  // The first file: a plain reload reads the files in order (the staging plan keeps the order of
  // a model without transformed layers), so its first read is the first thing that fails.
  const fs::path dir = copy_fixture(target_fixture(), tmp / "b");
  const fs::path first = shards(dir).front();
  const CliResult r = cli({"reload", "--model", model_fixture().dir, "--from", dir.string()}, hook("truncate", 0, first));
  expect_failure(r, 3, {first.string(), kChanged});
  EXPECT_EQ(r.err.find(kMixed), std::string::npos) << r.err;
}

TEST_P(ChangingCheckpointCli, AReloadOfAFileRenamedOverMidwayReadsTheOpenedVersion) {
  SKIP_WITHOUT(GetParam());
  TempDir tmp;
  const Fixture& b = target_fixture();
  const Victim v = copy_with_victim(b, tmp, "b");
  const CliResult r = cli({"reload", "--model", model_fixture().dir, "--from", v.dir.string(), "--tokens",
                           b.tokens_arg(), "--out", (tmp / "logits.safetensors").string()},
                          hook("rename", v.half, v.file));
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.out.find("pointers stable"), std::string::npos) << r.out;
  expect_close(load_tensors((tmp / "logits.safetensors").string()).at(0).second, reference_logits(b), b.dtype);
}

INSTANTIATE_TEST_SUITE_P(Devices, ChangingCheckpointCli, ::testing::Values("cpu", "cuda"));

}  // namespace
}  // namespace loadkit::test
