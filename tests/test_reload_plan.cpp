// Reloads by plan (runtime/src/reload/reload_plan.h): a checkpoint laid out as the last recorded
// reload's (a trainer's next step, written the same way) replays that reload's writes without the
// validation pass or the loaders, also into the load format of modules that are rebuilt (online
// quantization), which are then processed as the full path processes them. Every result is compared with an independent reference: fresh
// loads of the same checkpoints, and a model that never recorded a plan given the same bad
// checkpoint, whose error the model with a plan must repeat word for word, its weights untouched.

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cstdlib>

#include "device_skip.h"
#include "loadkit/error.h"
#include "loadkit/runtime/engine.h"
#include "loadkit/runtime/tensor_files.h"
#include "model_checks.h"
#include "reload/update_plan.h"

namespace loadkit::test {
namespace {

struct Case {
  const char* fixture;
  const char* quant;
  const char* device;
  /// Every loader describes its writes: reloads go by plan.
  bool replays;
  /// Some modules are rebuilt (online quantization): reloads keep the stream order of the one before.
  bool rebuilds;
};

void PrintTo(const Case& c, std::ostream* os) { *os << c.fixture << " " << c.quant << " " << c.device; }  // not bytes

std::string case_name(const ::testing::TestParamInfo<Case>& info) {
  return std::string(info.param.fixture) + "_" + info.param.quant + "_" + info.param.device;
}

/// The fixture `a` loaded, and two next steps of it written the same way (one file, same names,
/// dtypes and shapes, other values): the first reload of either records the plan the others take.
class ReloadPlan : public ::testing::TestWithParam<Case> {
 protected:
  void SetUp() override {
    SKIP_WITHOUT(device);
    next1 = write_next_step(a, tmp / "next1", 7);
    next2 = write_next_step(a, tmp / "next2", 8);
  }
  std::unique_ptr<LoadedModel> load(const fs::path& dir) const { return load_model(dir.string(), device, quant); }

  const Fixture& a = fixture(GetParam().fixture);
  const std::string quant = GetParam().quant;
  const std::string device = GetParam().device;
  TempDir tmp;
  fs::path next1, next2;
};

// next1 (validated, plan recorded), then next2 and next1 again (by plan): each equals a fresh load
// of what it read, bit for bit, in the same storage, with the same counts as the full path.
TEST_P(ReloadPlan, RepeatedReloadsByPlanEqualFreshLoads) {
  auto model = load(a.dir);
  const auto ptrs = parameter_addresses(*model);
  const LoadReport first = model->reload(next1.string());
  EXPECT_FALSE(first.reload_by_plan);
  EXPECT_FALSE(first.reload_order_kept);
  expect_identical(kernel_state(*model), kernel_state(*load(next1)));
  for (const fs::path& dir : {next2, next1}) {
    SCOPED_TRACE(dir.string());
    const LoadReport r = model->reload(dir.string());
    EXPECT_EQ(r.reload_by_plan, GetParam().replays);
    EXPECT_EQ(r.reload_order_kept, GetParam().rebuilds);  // the order of the reload before
    EXPECT_TRUE(r.pointers_stable);
    EXPECT_EQ(r.layers_processed, first.layers_processed);
    EXPECT_EQ(r.untouched_modules, first.untouched_modules);
    expect_identical(kernel_state(*model), kernel_state(*load(dir)));
  }
  EXPECT_EQ(parameter_addresses(*model), ptrs);
}

// Other layouts take the full path. One tensor of another dtype (still a valid checkpoint: the
// loaders cast it) reloads as a fresh load of it does; one tensor missing fails with the error a
// model without a plan gives, word for word, and writes nothing.
TEST_P(ReloadPlan, OtherLayoutsAreValidatedAgain) {
  auto weights = read_checkpoint(next2);
  const std::string norm = "model.norm.weight";
  ASSERT_TRUE(weights.count(norm));
  const fs::path cast = tmp / "cast", missing = tmp / "missing";
  for (const fs::path& dir : {cast, missing}) {
    fs::create_directories(dir);
    fs::copy_file(next2 / "config.json", dir / "config.json");
  }
  std::vector<std::pair<std::string, at::Tensor>> cast_tensors, missing_tensors;
  for (auto& [name, t] : weights) {
    const bool is_norm = name == norm;
    cast_tensors.emplace_back(name, is_norm ? t.to(t.scalar_type() == at::kFloat ? at::kBFloat16 : at::kFloat) : t);
    if (!is_norm) missing_tensors.emplace_back(name, t);
  }
  save_tensors((cast / "model.safetensors").string(), cast_tensors);
  save_tensors((missing / "model.safetensors").string(), missing_tensors);

  auto model = load(a.dir);
  model->reload(next1.string());  // the plan of next1's layout
  EXPECT_EQ(model->reload(next2.string()).reload_by_plan, GetParam().replays);

  const std::string expected = error_of([&] { load(a.dir)->reload(missing.string()); });
  EXPECT_NE(expected.find(norm), std::string::npos) << expected;
  const auto before = kernel_state(*model);
  EXPECT_EQ(error_of([&] { model->reload(missing.string()); }), expected);
  expect_identical(kernel_state(*model), before);

  const LoadReport r = model->reload(cast.string());
  EXPECT_FALSE(r.reload_by_plan);
  EXPECT_FALSE(r.reload_order_kept);
  EXPECT_TRUE(r.pointers_stable);
  expect_identical(kernel_state(*model), kernel_state(*load(cast)));
}

// A reload by plan whose file changes half-way (the test hook of runtime/src/formats/change_hook.h
// truncates it after half its tensors): with a journal, every layer holds what it held before.
TEST_P(ReloadPlan, JournalUndoesAReloadByPlanThatFailsMidway) {
  auto model = load(a.dir);
  model->reload(next1.string());
  ASSERT_EQ(model->reload(next2.string()).reload_by_plan, GetParam().replays);
  const auto before = kernel_state(*model);
  const fs::path victim = next1 / "model.safetensors";
  const size_t half = read_checkpoint(next1).size() / 2;
  setenv("LOADKIT_TEST_CHANGE_FILE", ("truncate:" + std::to_string(half) + ":" + victim.string()).c_str(), 1);
  const std::string error = error_of([&] { model->reload(next1.string(), true, Rollback::Journal); });
  unsetenv("LOADKIT_TEST_CHANGE_FILE");
  EXPECT_NE(error.find(victim.string()), std::string::npos) << error;
  expect_identical(kernel_state(*model), before);
  EXPECT_TRUE(model->report().written_modules.empty());
}

// The same without a journal: the reload fails naming the file, every layer it names as written
// changed, each byte of theirs is either its previous one or what a fresh load of the checkpoint
// gives (a rebuilt module is processed whole or put back; a plain one written as tensors arrive),
// and every other layer kept its bytes.
TEST_P(ReloadPlan, WithoutAJournalAReloadByPlanThatFailsMidwayListsExactlyTheLayersItWrote) {
  auto model = load(a.dir);
  model->reload(next1.string());
  ASSERT_EQ(model->reload(next2.string()).reload_by_plan, GetParam().replays);
  const auto before = kernel_state(*model);
  const auto expected = kernel_state(*load(next1));  // what the reload reads, before the file is cut
  const fs::path victim = next1 / "model.safetensors";
  const size_t half = read_checkpoint(next1).size() / 2;
  setenv("LOADKIT_TEST_CHANGE_FILE", ("truncate:" + std::to_string(half) + ":" + victim.string()).c_str(), 1);
  const std::string error = error_of([&] { model->reload(next1.string()); });
  unsetenv("LOADKIT_TEST_CHANGE_FILE");
  EXPECT_NE(error.find(victim.string()), std::string::npos) << error;
  const std::vector<std::string> written = model->report().written_modules;
  EXPECT_FALSE(written.empty()) << "half the tensors came before the cut";
  expect_written_as_reported(before, kernel_state(*model), written, &expected);
}

INSTANTIATE_TEST_SUITE_P(
    Fixtures, ReloadPlan,
    ::testing::Values(Case{"llama_fp32_gqa_sharded", "none", "cpu", true, false},
                      Case{"deepseek_v2_bf16_qlora", "none", "cpu", true, false},
                      Case{"deepseek_v2_bf16_qlora", "fp8", "cpu", true, true},  // online fp8: modules rebuilt
                      Case{"qwen3_moe_bf16", "int8", "cpu", true, true},
                      Case{"llama_blockfp8", "auto", "cpu", true, false},
                      Case{"qwen3_moe_blockfp8", "auto", "cpu", true, false},
                      Case{"deepseek_v2_bf16_qlora", "none", "cuda", true, false},
                      Case{"deepseek_v2_bf16_qlora", "fp8", "cuda", true, true},
                      Case{"qwen3_moe_bf16", "fp8", "cuda", true, true},
                      Case{"llama_blockfp8", "auto", "cuda", true, false},
                      Case{"qwen3_moe_blockfp8", "auto", "cuda", true, false}),
    case_name);

// SmallCopies (runtime/src/reload/update_plan.h), which holds a reload by plan's small byte copies
// out of one staged allocation and issues them together. Its logic is the same on every device,
// and the CPU runs it here (a reload reaches it only on CUDA, where replayed copies are byte
// copies). Each destination is compared with its source's bytes, read before anything is issued.

/// A replayed byte copy of the whole of a `bytes`-long source into a fresh zeroed destination.
reload::PlanWrite byte_copy(at::ScalarType dtype, int64_t elements) {
  reload::PlanWrite pw;
  pw.dst = at::zeros({elements}, at::TensorOptions().dtype(dtype));
  pw.tensor = 0;
  pw.whole = true;
  pw.byte_copy = true;
  pw.nbytes = static_cast<int64_t>(pw.dst.nbytes());
  return pw;
}

/// `elements` of `dtype` at `offset` bytes into `storage` (a byte tensor), as a stream hands out
/// a member of an item.
at::Tensor member(const at::Tensor& storage, at::ScalarType dtype, int64_t offset, int64_t elements) {
  return storage.narrow(0, offset, elements * c10::elementSize(dtype)).view(dtype);
}

/// Bytes compared (random bytes viewed as floats hold NaNs, which equal() tells apart).
bool written(const reload::PlanWrite& pw, const at::Tensor& expected) {
  return pw.dst.view(at::kByte).equal(expected.view(at::kByte));
}

TEST(SmallCopies, HoldsOneStorageAndIssuesItBeforeAnythingElse) {
  at::manual_seed(5);
  auto bytes = [](int64_t n) { return at::randint(0, 256, {n}, at::TensorOptions().dtype(at::kByte)); };
  const at::Tensor a = bytes(4096), b = bytes(1 << 20), c = bytes(4096), huge = bytes(5 << 20);
  const at::Tensor a1 = member(a, at::kFloat, 0, 176), a2 = member(a, at::kBFloat16, 704, 64);
  const at::Tensor b1 = member(b, at::kFloat, 0, 176), b_large = member(b, at::kFloat, 1024, 32768);
  const at::Tensor c1 = member(c, at::kFloat, 512, 100), in_huge = member(huge, at::kFloat, 0, 16);
  // The references, before anything is issued.
  const at::Tensor ra1 = a1.clone(), ra2 = a2.clone(), rb1 = b1.clone(), rc1 = c1.clone();

  reload::SmallCopies held;
  reload::PlanWrite w1 = byte_copy(at::kFloat, 176), w2 = byte_copy(at::kBFloat16, 64);
  EXPECT_TRUE(held.hold(w1, a1, w1.dst));
  EXPECT_TRUE(held.hold(w2, a2, w2.dst));  // same storage, another dtype
  EXPECT_FALSE(written(w1, ra1));
  EXPECT_FALSE(written(w2, ra2));

  // A small write out of another storage: the first storage's writes are issued, this one held.
  reload::PlanWrite w3 = byte_copy(at::kFloat, 176);
  EXPECT_TRUE(held.hold(w3, b1, w3.dst));
  EXPECT_TRUE(written(w1, ra1));
  EXPECT_TRUE(written(w2, ra2));
  EXPECT_FALSE(written(w3, rb1));

  // Writes it does not hold: more than kSmallBytes, out of a storage over kHeldBytes, not a byte
  // copy. Each returns false with what was held issued first, and writes nothing of its own.
  reload::PlanWrite large = byte_copy(at::kFloat, 32768);
  ASSERT_GT(large.nbytes, reload::SmallCopies::kSmallBytes);
  EXPECT_FALSE(held.hold(large, b_large, large.dst));
  EXPECT_TRUE(written(w3, rb1));
  EXPECT_EQ(large.dst.count_nonzero().item<int64_t>(), 0);
  reload::PlanWrite from_huge = byte_copy(at::kFloat, 16);
  EXPECT_FALSE(held.hold(from_huge, in_huge, from_huge.dst));
  EXPECT_EQ(from_huge.dst.count_nonzero().item<int64_t>(), 0);
  reload::PlanWrite plain = byte_copy(at::kFloat, 100);
  plain.byte_copy = false;
  EXPECT_FALSE(held.hold(plain, c1, plain.dst));
  EXPECT_EQ(plain.dst.count_nonzero().item<int64_t>(), 0);

  // What is held at the end is issued by issue(), once.
  reload::PlanWrite w5 = byte_copy(at::kFloat, 100);
  EXPECT_TRUE(held.hold(w5, c1, w5.dst));
  EXPECT_FALSE(written(w5, rc1));
  held.issue();
  EXPECT_TRUE(written(w5, rc1));
  w5.dst.zero_();
  held.issue();  // nothing held any more
  EXPECT_EQ(w5.dst.count_nonzero().item<int64_t>(), 0);
}

// A replayed byte copy into a rebuilt module finds its destination by offset (PlanWrite::Into::
// bytes_of) instead of building the view: the same first byte as the view (as_strided, the
// independent path), and as_strided's bounds, checked before anything is written.
TEST(PlanWriteInto, BytesOfIsTheViewsFirstByteWithinTheViewsBounds) {
  const at::Tensor storage = at::zeros({256}, at::TensorOptions().dtype(at::kBFloat16));
  const at::Tensor param = storage.narrow(0, 16, 200).view({20, 10});  // a parameter at a storage offset
  reload::PlanWrite::Into into;
  into.offset = 30;  // rows 3 to 7
  into.sizes = {5, 10};
  into.strides = {10, 1};
  const at::Tensor view = into.view_of(param);
  EXPECT_EQ(into.bytes_of(param, static_cast<int64_t>(view.nbytes())), view.data_ptr());

  // The last element of the storage still fits; one past it, or a negative offset, does not.
  into.offset = 256 - 16 - 50;
  EXPECT_EQ(into.bytes_of(param, 100), into.view_of(param).data_ptr());
  into.offset += 1;
  EXPECT_THROW(into.view_of(param), c10::Error);
  EXPECT_THROW(into.bytes_of(param, 100), Error);
  into.offset = -17;
  EXPECT_THROW(into.bytes_of(param, 2), Error);
}

}  // namespace
}  // namespace loadkit::test
