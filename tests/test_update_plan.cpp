// Updates by plan (runtime/src/reload/update_plan.h): a chunk with the names, shapes, strides,
// dtypes and devices of one applied before skips the validation pass and, where loaders describe
// their writes, the loaders: the writes are replayed as multi-tensor copies, those into a quantized
// module's load format once the module is complete.
// Every result is compared with an independent reference: a fresh load of the weights sent, and a
// fresh model (no plan) given the same bad chunk, whose error the planned path must repeat word
// for word while leaving the weights untouched. On the CPU: `_foreach_copy_` runs there too.

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <map>

#include "loadkit/causal_lm.h"
#include "loadkit/runtime/engine.h"
#include "loadkit/weight_writes.h"
#include "device_skip.h"
#include "model_checks.h"

namespace loadkit::test {
namespace {

/// A checkpoint's tensors as a trainer hands them over, in name order, on `device`.
std::vector<NamedWeight> weights_of(const fs::path& dir, const std::string& device = "cpu") {
  std::vector<NamedWeight> out;
  for (auto& [name, t] : read_checkpoint(dir)) out.push_back({name, t.to(device), "trainer"});
  return out;
}

/// Buckets of `per` consecutive tensors.
std::vector<std::vector<NamedWeight>> buckets(const std::vector<NamedWeight>& weights, size_t per) {
  std::vector<std::vector<NamedWeight>> out;
  for (size_t i = 0; i < weights.size(); i += per)
    out.emplace_back(weights.begin() + i, weights.begin() + std::min(weights.size(), i + per));
  return out;
}

/// One whole sync of `weights` in buckets of `per`; its report.
LoadReport sync(LoadedModel& model, const std::vector<NamedWeight>& weights, size_t per = 7) {
  model.begin_update();
  for (const auto& bucket : buckets(weights, per)) model.update(bucket);
  return model.finish_update();
}

struct Case {
  const char* fixture;
  const char* quant;
};

void PrintTo(const Case& c, std::ostream* os) { *os << c.fixture << " " << c.quant; }  // not bytes

/// Each case: its fixture `a`, the quantization, and a trainer's next step of `a` (same names and
/// shapes, other values) written to a temporary directory.
class UpdatePlan : public ::testing::TestWithParam<Case> {
 protected:
  const Fixture& a = fixture(GetParam().fixture);
  const std::string quant = GetParam().quant;
  TempDir tmp;
  const fs::path next = write_next_step(a, tmp / "next", 7);
};

// Three syncs in the same buckets: a's weights (validated, plans recorded), then a trainer's next
// step of them and a again (by plan). Each must equal a fresh load of what it sent, bit for bit,
// pointers kept.
TEST_P(UpdatePlan, RepeatedSyncsByPlanEqualFreshLoads) {
  auto model = load_model(a.dir, "cpu", quant);
  const auto ptrs = parameter_addresses(*model);
  const auto wa = weights_of(a.dir), wn = weights_of(next);
  const auto fresh_a = kernel_state(*load_model(a.dir, "cpu", quant));
  const auto fresh_n = kernel_state(*load_model(next.string(), "cpu", quant));
  const size_t chunks = buckets(wa, 7).size();

  LoadReport first = sync(*model, wa);
  EXPECT_EQ(first.chunks_by_plan, 0);
  expect_identical(kernel_state(*model), fresh_a);
  for (const auto* w : {&wn, &wa}) {
    LoadReport r = sync(*model, *w);
    EXPECT_EQ(r.chunks_by_plan, static_cast<int>(chunks));
    EXPECT_EQ(r.chunks_replayed, static_cast<int>(chunks));  // quantized modules' writes kept until complete
    EXPECT_TRUE(r.pointers_stable);
    EXPECT_EQ(r.layers_processed, first.layers_processed);
    expect_identical(kernel_state(*model), w == &wa ? fresh_a : fresh_n);
  }
  EXPECT_EQ(parameter_addresses(*model), ptrs);
}

// The same names and shapes in other strides (a transposed copy of every 2-D tensor): no plan
// matches, the chunks are validated again, and the bytes are still the fresh load's.
TEST_P(UpdatePlan, OtherStridesAreValidatedAgain) {
  auto model = load_model(a.dir, "cpu", quant);
  sync(*model, weights_of(a.dir));
  auto strided = weights_of(next);
  for (auto& w : strided)
    if (w.tensor.dim() == 2) w.tensor = w.tensor.t().contiguous().t();
  const LoadReport r = sync(*model, strided);
  EXPECT_EQ(r.chunks_by_plan, 0);
  expect_identical(kernel_state(*model), kernel_state(*load_model(next.string(), "cpu", quant)));
  EXPECT_EQ(sync(*model, weights_of(a.dir)).chunks_by_plan, static_cast<int>(buckets(strided, 7).size()));
}

// After a chunk's plan is kept, the same chunk given twice in one session and a chunk of its names
// with one tensor of another shape: each rejected with the error a model without any plan gives,
// word for word, and the rejected chunk writes nothing.
TEST_P(UpdatePlan, BadChunksAfterAPlanFailAsWithoutOne) {
  const auto wa = weights_of(a.dir);
  const auto bucket = buckets(wa, 7).front();
  auto planned = load_model(a.dir, "cpu", quant);
  sync(*planned, wa);  // every bucket's plan kept
  auto unplanned = load_model(a.dir, "cpu", quant);

  // Twice in one session: the second time every parameter of the bucket would be over-full.
  auto twice = [&](LoadedModel& m) {
    m.begin_update();
    m.update(bucket);
    const std::string msg = error_of([&] { m.update(bucket); });
    m.finish_update();
    return msg;
  };
  const std::string expected_twice = twice(*unplanned);
  EXPECT_NE(expected_twice.find("would receive more than"), std::string::npos) << expected_twice;
  EXPECT_EQ(twice(*planned), expected_twice);
  // The rejected second time wrote nothing: the model holds the first time's bytes, as the one
  // that validated it from scratch does.
  expect_identical(kernel_state(*planned), kernel_state(*unplanned));

  // One tensor of another shape under the same name (a new signature: validated, rejected).
  auto reshaped = bucket;
  for (auto& w : reshaped)
    if (w.tensor.dim() == 2) {
      w.tensor = w.tensor.narrow(0, 0, w.tensor.size(0) - 1).clone();
      break;
    }
  auto wrong_shape = [&](LoadedModel& m) {
    const auto before = kernel_state(m);
    m.begin_update();
    const std::string msg = error_of([&] { m.update(reshaped); });
    m.finish_update();
    expect_identical(kernel_state(m), before);
    return msg;
  };
  const std::string expected_shape = wrong_shape(*unplanned);
  EXPECT_NE(expected_shape.find("shape"), std::string::npos) << expected_shape;
  EXPECT_EQ(wrong_shape(*planned), expected_shape);
}

// A sync by plan under a journal rolls back to the bytes before it, in the same storage.
TEST_P(UpdatePlan, JournalUndoesASyncByPlan) {
  const auto wb = weights_of(next);
  auto model = load_model(a.dir, "cpu", quant);
  sync(*model, weights_of(a.dir));  // model holds a's weights; every plan kept
  const auto before = kernel_state(*model);
  const auto ptrs = parameter_addresses(*model);
  model->begin_update(Rollback::Journal);
  for (const auto& bucket : buckets(wb, 7)) model->update(bucket);
  const LoadReport& r = model->finish_update();
  EXPECT_GT(r.chunks_by_plan, 0);
  EXPECT_GT(r.journal_bytes, 0u);
  EXPECT_FALSE(identical(kernel_state(*model), before));
  model->rollback_update();
  expect_identical(kernel_state(*model), before);
  EXPECT_EQ(parameter_addresses(*model), ptrs);
}

INSTANTIATE_TEST_SUITE_P(Cpu, UpdatePlan,
                         ::testing::Values(Case{"llama_fp32_gqa_sharded", "none"}, Case{"llama_fp32_gqa_sharded", "fp8"},
                                           Case{"deepseek_v2_bf16_qlora", "none"}, Case{"deepseek_v2_bf16_qlora", "fp8"}),
                         [](const auto& info) {
                           std::string name = std::string(info.param.fixture) + "_" + info.param.quant;
                           return name;
                         });

// The same on the GPU: chunks on the device replayed as `_foreach_copy_` launches.
TEST(UpdatePlanGpu, RepeatedSyncsOfDeviceTensorsEqualFreshLoads) {
  SKIP_WITHOUT(std::string("cuda"));
  const Fixture& a = fixture("deepseek_v2_bf16_qlora");
  TempDir tmp;
  const fs::path next = write_next_step(a, tmp / "next", 7);
  for (const std::string quant : {"none", "fp8"}) {
    SCOPED_TRACE(quant);
    auto model = load_model(a.dir, "cuda", quant);
    const auto ptrs = parameter_addresses(*model);
    const auto wa = weights_of(a.dir, "cuda"), wn = weights_of(next, "cuda");
    sync(*model, wn);
    sync(*model, wa);
    const LoadReport r = sync(*model, wn);
    EXPECT_EQ(r.chunks_by_plan, static_cast<int>(buckets(wn, 7).size()));
    EXPECT_EQ(r.chunks_replayed, r.chunks_by_plan);  // fp8: kept until each module is complete
    EXPECT_TRUE(r.pointers_stable);
    EXPECT_EQ(parameter_addresses(*model), ptrs);
    expect_identical(kernel_state(*model), kernel_state(*load_model(next.string(), "cuda", quant)));
  }
}

// apply_writes() issues large contiguous device copies one by one and the rest as multi-tensor
// launches: the mix writes what copying each write by itself on the CPU writes.
TEST(UpdatePlanGpu, MixedWritesEqualCopiesOneByOne) {
  SKIP_WITHOUT(std::string("cuda"));
  at::manual_seed(3);
  const auto bf16 = at::TensorOptions().dtype(at::kBFloat16);
  at::Tensor param = at::randn({3 * 4096, 2048}, bf16.device(at::kCUDA));  // 48 MiB
  at::Tensor src_big = at::randn({2 * 4096, 2048}, bf16.device(at::kCUDA));   // 32 MiB, contiguous
  at::Tensor src_small = at::randn({4, 2048}, bf16.device(at::kCUDA));
  at::Tensor src_cols = at::randn({2048, 4096 - 8}, bf16.device(at::kCUDA)).t();  // 16 MiB, strided
  at::Tensor other = at::randn({8 << 20}, at::TensorOptions().dtype(at::kFloat).device(at::kCUDA));  // 32 MiB
  at::Tensor src_cast = at::randn({8 << 20}, bf16.device(at::kCUDA));  // other dtype: never a memcpy
  const std::vector<WeightWrite> writes = {
      {param.narrow(0, 0, 2 * 4096), src_big},
      {param.narrow(0, 2 * 4096, 4), src_small},
      {param.narrow(0, 2 * 4096 + 8, 4096 - 8), src_cols},
      {param.narrow(0, 2 * 4096 + 4, 4), at::Tensor()},
      {other, src_cast},
  };
  at::Tensor want = param.cpu(), want_other = other.cpu();
  for (const auto& w : writes) {
    at::Tensor dst = w.dst.data_ptr() == other.data_ptr()
                         ? want_other
                         : want.narrow(0, (static_cast<const char*>(w.dst.data_ptr()) -
                                           static_cast<const char*>(param.data_ptr())) / (2048 * 2),
                                       w.dst.size(0));
    if (w.src.defined()) dst.copy_(w.src.cpu());
    else dst.zero_();
  }
  apply_writes(writes);
  EXPECT_TRUE(at::equal(param.cpu().view(at::kShort), want.view(at::kShort)));
  EXPECT_TRUE(at::equal(other.cpu().view(at::kInt), want_other.view(at::kInt)));
}

}  // namespace
}  // namespace loadkit::test
