// Reloading in place: a reload equals a fresh load of the new weights, keeps
// every kernel tensor's storage, touches nothing when the source is bad, and
// works for plain, fp8 and int8 weights on the CPU and (GPU machine) CUDA.

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <random>

#include "loadkit/causal_lm.h"
#include "loadkit/error.h"
#include "loadkit/layers/linear.h"
#include "loadkit/quant_method.h"
#include "loadkit/runtime/engine.h"
#include "loadkit/runtime/registry.h"
#include "tensor_io.h"
#include "device.h"
#include "device_skip.h"
#include "model_checks.h"
#include "test_support.h"

#if LOADKIT_CUDA
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace loadkit::test {
namespace {

Registry& registry() { return build_registry(); }
using test::load_model;
std::unique_ptr<LoadedModel> load(const std::string& dir, const std::string& device = "cpu",
                                  const std::string& quant = "none") {
  return load_model(dir, device, quant);
}

struct Facts {
  const void* ptr;
  std::vector<int64_t> sizes, strides;
  at::ScalarType dtype;
  bool operator==(const Facts&) const = default;
};
std::map<std::string, Facts> storage_facts(LoadedModel& m) {
  std::map<std::string, Facts> out;
  for (auto& [name, module] : m.model().named_modules())
    for (auto& [p, param] : module->parameters())
      out[name + "." + p] = {param->data.data_ptr(), param->data.sizes().vec(), param->data.strides().vec(),
                             param->data.scalar_type()};
  return out;
}

// ------------------------------------------------------------------ matrix

using Param = std::tuple<std::string /*pair*/, std::string /*quant*/, std::string /*device*/>;

class Reload : public ::testing::TestWithParam<Param> {
 protected:
  const Fixture& a() const { return fixture(std::get<0>(GetParam())); }
  const Fixture& b() const { return fixture(std::get<0>(GetParam()) == "llama_fp32_gqa_sharded" ? "llama_fp32_gqa_b" : "llama_bf16_gqa_tied_b"); }
  const std::string& quant() const { return std::get<1>(GetParam()); }
  const std::string& device() const { return std::get<2>(GetParam()); }
};

TEST_P(Reload, EqualsFreshLoadAndBack) {
  SKIP_WITHOUT(device());
  auto model = load(a().dir, device(), quant());
  const auto fresh_a = kernel_state(*model);
  const auto logits_a = model->logits(a().tokens);
  const auto before = storage_facts(*model);

  const LoadReport& r = model->reload(b().dir);
  EXPECT_TRUE(r.pointers_stable);
  EXPECT_EQ(storage_facts(*model), before);
  auto fresh_b = load(b().dir, device(), quant());
  expect_identical(kernel_state(*model), kernel_state(*fresh_b));
  EXPECT_TRUE(at::equal(model->logits(b().tokens), fresh_b->logits(b().tokens)));

  model->reload(a().dir);
  expect_identical(kernel_state(*model), fresh_a);
  EXPECT_TRUE(at::equal(model->logits(a().tokens), logits_a));
  EXPECT_EQ(storage_facts(*model), before);
}

TEST_P(Reload, StreamedOutOfOrderInChunksEqualsFreshLoad) {
  SKIP_WITHOUT(device());
  auto model = load(a().dir, device(), quant());
  const auto before = storage_facts(*model);
  std::vector<NamedWeight> weights;
  for (const auto& e : fs::directory_iterator(b().dir))
    if (e.path().extension() == ".safetensors")
      for (auto& [name, t] : load_tensors(e.path().string())) weights.push_back({name, t, e.path().string()});
  std::shuffle(weights.begin(), weights.end(), std::mt19937(7));
  model->begin_update();
  const size_t third = weights.size() / 3 + 1;
  for (size_t i = 0; i < weights.size(); i += third)
    model->update({weights.begin() + i, weights.begin() + std::min(weights.size(), i + third)});
  const LoadReport& r = model->finish_update();
  EXPECT_TRUE(r.pointers_stable);
  EXPECT_TRUE(r.untouched_modules.empty());
  EXPECT_EQ(storage_facts(*model), before);
  auto fresh_b = load(b().dir, device(), quant());
  expect_identical(kernel_state(*model), kernel_state(*fresh_b));
}

TEST_P(Reload, BadSourceLeavesEveryTensorUntouched) {
  SKIP_WITHOUT(device());
  auto model = load(a().dir, device(), quant());
  const auto original = kernel_state(*model);
  const auto before = storage_facts(*model);
  int tried = 0;
  for (const auto& [kind, label] : all_corruptions()) {
    TempDir tmp;
    fs::path bad = copy_fixture(b(), tmp / "b");
    if (!applies(bad, kind)) continue;  // e.g. index rows on a single-file checkpoint
    ++tried;
    auto fragments = corrupt(bad, kind);
    try {
      model->reload(bad.string());
      ADD_FAILURE() << label << ": accepted";
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::Input) << label << ": " << e.what();
      for (const auto& f : fragments) EXPECT_NE(std::string(e.what()).find(f), std::string::npos) << label << ": " << e.what();
    }
    expect_identical(kernel_state(*model), original);
    EXPECT_EQ(storage_facts(*model), before) << label;
  }
  EXPECT_GE(tried, static_cast<int>(all_corruptions().size()) - 3);
  // A path that is no directory at all (ENOTDIR): refused the same way.
  try {
    model->reload((fs::path(b().dir) / "config.json" / "b").string());
    ADD_FAILURE() << "accepted a path under a file";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::Input) << e.what();
    EXPECT_NE(std::string(e.what()).find("Not a directory"), std::string::npos) << e.what();
  }
  expect_identical(kernel_state(*model), original);
  // Still fully usable afterwards.
  model->reload(b().dir);
  auto fresh_b = load(b().dir, device(), quant());
  expect_identical(kernel_state(*model), kernel_state(*fresh_b));
}

INSTANTIATE_TEST_SUITE_P(Matrix, Reload,
                         ::testing::Combine(::testing::Values("llama_fp32_gqa_sharded", "llama_bf16_gqa_tied"),
                                            ::testing::Values("none", "fp8", "int8"), ::testing::Values("cpu", "cuda")),
                         [](const auto& info) {
                           return std::get<0>(info.param) + "_" + std::get<1>(info.param) + "_" + std::get<2>(info.param);
                         });

// ------------------------------------------------------ streaming details

std::vector<NamedWeight> checkpoint_weights(const Fixture& f) {
  std::vector<NamedWeight> out;
  for (const auto& e : fs::directory_iterator(f.dir))
    if (e.path().extension() == ".safetensors")
      for (auto& [name, t] : load_tensors(e.path().string())) out.push_back({name, t, e.path().string()});
  return out;
}

TEST(ReloadUpdate, PartialUpdateTouchesOnlyWhatItGets) {
  auto model = load(fixture("llama_fp32_gqa_sharded").dir, "cpu", "fp8");
  const auto before = kernel_state(*model);
  std::vector<NamedWeight> layer0;
  for (auto& w : checkpoint_weights(fixture("llama_fp32_gqa_b")))
    if (w.name.rfind("model.layers.0.", 0) == 0) layer0.push_back(w);
  model->begin_update();
  model->update(layer0);
  const LoadReport& r = model->finish_update();
  auto after = kernel_state(*model);
  auto fresh_b = kernel_state(*load(fixture("llama_fp32_gqa_b").dir, "cpu", "fp8"));
  for (const auto& [name, t] : after) {
    const bool in_layer0 = name.rfind("model.layers.0.", 0) == 0 && name.find("rotary") == std::string::npos;
    const auto& expected = in_layer0 ? fresh_b.at(name) : before.at(name);
    EXPECT_TRUE(at::equal(t.view(at::kByte), expected.view(at::kByte))) << name;
  }
  EXPECT_NE(std::find(r.untouched_modules.begin(), r.untouched_modules.end(), "model.layers.1.self_attn.qkv_proj"),
            r.untouched_modules.end());
  EXPECT_EQ(std::find(r.untouched_modules.begin(), r.untouched_modules.end(), "model.layers.0.self_attn.qkv_proj"),
            r.untouched_modules.end());
}

TEST(ReloadUpdate, WeightAfterItsModuleCompletedIsAnErrorNamingIt) {
  auto weights = checkpoint_weights(fixture("llama_fp32_gqa_b"));
  std::vector<NamedWeight> qkv, again;
  for (auto& w : weights)
    if (w.name.rfind("model.layers.0.self_attn.", 0) == 0 && w.name.find("o_proj") == std::string::npos) qkv.push_back(w);
  for (auto& w : qkv)
    if (w.name.find("k_proj") != std::string::npos) again.push_back(w);
  // What the good chunk alone produces.
  auto expected = load(fixture("llama_fp32_gqa_sharded").dir, "cpu", "fp8");
  expected->begin_update();
  expected->update(qkv);
  expected->finish_update();

  auto model = load(fixture("llama_fp32_gqa_sharded").dir, "cpu", "fp8");
  model->begin_update();
  model->update(qkv);  // completes model.layers.0.self_attn.qkv_proj
  try {
    model->update(again);
    ADD_FAILURE() << "accepted a weight after its module was complete";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::Input);
    EXPECT_NE(std::string(e.what()).find("model.layers.0.self_attn.k_proj.weight"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("model.layers.0.self_attn.qkv_proj.weight"), std::string::npos) << e.what();
  }
  model->finish_update();
  expect_identical(kernel_state(*model), kernel_state(*expected));  // the rejected chunk changed nothing
}

TEST(ReloadUpdate, PartialQuantizedModuleIsRefusedAndKeptIntact) {
  auto model = load(fixture("llama_fp32_gqa_sharded").dir, "cpu", "int8");
  const auto before = kernel_state(*model);
  std::vector<NamedWeight> only_q;
  for (auto& w : checkpoint_weights(fixture("llama_fp32_gqa_b")))
    if (w.name == "model.layers.0.self_attn.q_proj.weight") only_q.push_back(w);
  model->begin_update();
  model->update(only_q);
  try {
    model->finish_update();
    ADD_FAILURE() << "half a quantized qkv accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("model.layers.0.self_attn.qkv_proj"), std::string::npos) << e.what();
  }
  expect_identical(kernel_state(*model), before);
}

TEST(ReloadKernelFormat, NoProcessCopiesKernelTensorsStraightIn) {
  for (const std::string quant : {"none", "fp8"}) {
    auto source = load(fixture("llama_fp32_gqa_b").dir, "cpu", quant);
    TempDir tmp;
    std::vector<std::pair<std::string, at::Tensor>> kernel;
    for (auto& [name, p] : source->model().named_parameters()) kernel.emplace_back(name, p->data);
    fs::create_directories(tmp / "kernel");
    save_tensors((tmp / "kernel" / "model.safetensors").string(), kernel);
    auto model = load(fixture("llama_fp32_gqa_sharded").dir, "cpu", quant);
    const auto before = storage_facts(*model);
    EXPECT_TRUE(model->reload((tmp / "kernel").string(), /*process=*/false).pointers_stable);
    EXPECT_EQ(storage_facts(*model), before);
    expect_identical(kernel_state(*model), kernel_state(*source));
  }
}

TEST(ReloadKernelFormat, WrongShapeIsRefusedBeforeAnyCopy) {
  auto model = load(fixture("llama_fp32_gqa_sharded").dir);
  const auto before = kernel_state(*model);
  std::vector<std::pair<std::string, at::Tensor>> kernel;
  for (auto& [name, p] : model->model().named_parameters()) kernel.emplace_back(name, p->data + 1);
  kernel.back().second = kernel.back().second.narrow(0, 0, 1);
  TempDir tmp;
  fs::create_directories(tmp / "k");
  save_tensors((tmp / "k" / "model.safetensors").string(), kernel);
  EXPECT_THROW(model->reload((tmp / "k").string(), false), Error);
  expect_identical(kernel_state(*model), before);
}

// ------------------------------------------------------------------ CLI

TEST(ReloadCli, LogitsAfterReloadMatchTransformersForTheNewWeights) {
  const auto& a = fixture("llama_fp32_gqa_sharded");
  const auto& b = fixture("llama_fp32_gqa_b");
  TempDir tmp;
  auto r = run_cli({"reload", "--model", a.dir, "--from", b.dir, "--tokens", b.tokens_arg(), "--out",
                    (tmp / "l.safetensors").string(), "--report", (tmp / "r.json").string(), "--plugin-dir",
                    plugin_dir()});
  ASSERT_EQ(r.code, 0) << r.err;
  at::Tensor ours = load_tensors((tmp / "l.safetensors").string()).at(0).second;
  EXPECT_LE((ours - reference_logits(b)).abs().max().item<double>(), 1e-4);
  auto report = nlohmann::json::parse(read_bytes(tmp / "r.json"));
  for (const char* key : {"bytes", "seconds", "gb_per_s", "peak_extra_device_bytes", "pointers_stable",
                          "layers_processed", "layers_delayed"})
    EXPECT_TRUE(report.contains(key)) << key;
  EXPECT_TRUE(report["pointers_stable"].get<bool>());
  EXPECT_GT(report["layers_processed"].get<int>(), 0);
}

TEST(ReloadCli, BadSourceIsExit3) {
  TempDir tmp;
  fs::path bad = copy_fixture(fixture("llama_fp32_gqa_b"), tmp / "b");
  corrupt(bad, Corruption::MissingWeight);
  auto r = run_cli({"reload", "--model", fixture("llama_fp32_gqa_sharded").dir, "--from", bad.string(),
                    "--quantization", "fp8", "--plugin-dir", plugin_dir()});
  EXPECT_EQ(r.code, 3) << r.err;
  ASSERT_EQ(r.error_lines().size(), 1u) << r.err;
  EXPECT_NE(r.error_lines()[0].find("model.norm.weight"), std::string::npos);
}

// ------------------------------------------------------------------ GPU

// ------------------------------------------------------- fp8 details

TEST(Fp8, AllZeroWeightGivesFiniteScaleAndZeros) {
  ModelContext ctx;
  ctx.config = ModelConfig::parse("{}", "test");
  ctx.quant = registry().create_quant("fp8", ctx);
  ReplicatedLinear layer(32, 16, ctx);
  layer.param("weight").data.zero_();
  layer.process_weights_after_loading();
  at::Tensor scale = layer.param("weight_scale").data;
  EXPECT_TRUE(at::isfinite(scale).all().item<bool>());
  EXPECT_GT(scale.item<float>(), 0.0f);
  EXPECT_EQ(layer.param("weight").data.scalar_type(), at::kFloat8_e4m3fn);
  EXPECT_EQ(layer.param("weight").data.sizes(), (std::vector<int64_t>{32, 16}));  // kernel layout [in, out]
  at::Tensor y = layer.forward(at::randn({3, 32}));
  EXPECT_TRUE(at::equal(y, at::zeros({3, 16})));
}

// A quantized reload materialises each transformed module when its first weight
// arrives and reads the module's weights together: with the files' tensors
// shuffled, the result must still equal a fresh load, bit for bit.
TEST(ReloadOrdered, ShuffledCheckpointQuantizedEqualsFreshLoad) {
  TempDir tmp;
  write_llama_checkpoint(tmp / "a", 3, 3, 64, 96);  // tensors shuffled over 3 files
  write_llama_checkpoint(tmp / "b", 4, 3, 64, 96);
  for (const std::string quant : {"int8", "fp8"}) {
    auto model = load((tmp / "a").string(), "cpu", quant);
    const auto before = storage_facts(*model);
    const LoadReport& r = model->reload((tmp / "b").string());
    EXPECT_TRUE(r.pointers_stable) << quant;
    EXPECT_EQ(storage_facts(*model), before) << quant;
    auto fresh_b = load((tmp / "b").string(), "cpu", quant);
    expect_identical(kernel_state(*model), kernel_state(*fresh_b));
  }
}

// The staged CUDA path (reader threads, pinned pieces, async copies) against
// the plain mmap path: the same kernel tensors, byte for byte, with a window
// small enough that readers wait on the consumer and tensors span several pieces.
TEST(StagedLoad, EqualsThePlainPathOnCuda) {
  SKIP_WITHOUT(std::string("cuda"));
  for (const std::string quant : {"none", "fp8"})
    for (const char* name : {"llama_fp32_gqa_sharded", "llama_bf16_gqa_tied"}) {
      SCOPED_TRACE(std::string(name) + " " + quant);
      const auto& f = fixture(name);
      ::setenv("LOADKIT_STAGING", "0", 1);
      auto plain = load(f.dir, "cuda", quant);
      ::setenv("LOADKIT_STAGING", "1", 1);
      ::setenv("LOADKIT_STAGING_WINDOW_MB", "1", 1);
      ::setenv("LOADKIT_STAGING_THREADS", "3", 1);
      ::setenv("LOADKIT_STAGING_PIECE_KB", "7", 1);  // odd: pieces end mid-element, tensors span several
      ::setenv("LOADKIT_STAGING_DEPTH", "2", 1);
      auto staged = load(f.dir, "cuda", quant);
      expect_identical(kernel_state(*staged), kernel_state(*plain));
      // And a reload through the staged path (quantized: modules read together, some tensors
      // too large for the budget beside their module read from the mapping) equals the plain one's.
      const auto& b = fixture(f.reload_target);
      staged->reload(b.dir);
      ::unsetenv("LOADKIT_STAGING_PIECE_KB");
      ::unsetenv("LOADKIT_STAGING_WINDOW_MB");
      ::unsetenv("LOADKIT_STAGING_THREADS");
      ::unsetenv("LOADKIT_STAGING_DEPTH");
      ::setenv("LOADKIT_STAGING", "0", 1);
      plain->reload(b.dir);
      ::unsetenv("LOADKIT_STAGING");
      expect_identical(kernel_state(*staged), kernel_state(*plain));
    }
}

#if LOADKIT_CUDA
TEST(ReloadGpu, DeviceStatisticsTrackAllocations) {
  SKIP_WITHOUT(std::string("cuda"));
  const c10::Device cuda("cuda:0");
  at::Tensor warm = at::empty({16}, at::TensorOptions().device(cuda));
  device::reset_peak(cuda);
  const uint64_t start = device::allocated_bytes(cuda);
  {
    at::Tensor big = at::empty({64 << 20}, at::TensorOptions().device(cuda).dtype(at::kByte));
    std::cout << "[ MEASURE  ] start " << start << " with 64 MiB live " << device::allocated_bytes(cuda) << std::endl;
  }
  std::cout << "[ MEASURE  ] peak " << device::peak_allocated_bytes(cuda) << " now " << device::allocated_bytes(cuda)
            << std::endl;
  EXPECT_GE(device::peak_allocated_bytes(cuda) - start, uint64_t{64} << 20);
}

TEST(ReloadGpu, CapturedCudaGraphSeesTheReloadedWeights) {
  SKIP_WITHOUT(std::string("cuda"));
  for (const std::string quant : {"none", "fp8"}) {
    const auto& a = fixture("llama_bf16_gqa_tied");
    const auto& b = fixture("llama_bf16_gqa_tied_b");
    auto model = load(a.dir, "cuda", quant);
    at::Tensor ids = at::tensor(b.tokens, at::kLong).cuda();
    c10::cuda::CUDAStream stream = c10::cuda::getStreamFromPool();
    at::Tensor out;
    {
      c10::cuda::CUDAStreamGuard guard(stream);
      model->model().forward(ids);  // warm-up outside capture
      stream.synchronize();
      at::cuda::CUDAGraph graph;
      graph.capture_begin();
      out = model->model().forward(ids);
      graph.capture_end();
      stream.synchronize();
      model->reload(b.dir);
      graph.replay();
      stream.synchronize();
    }
    auto fresh_b = load(b.dir, "cuda", quant);
    at::Tensor eager = fresh_b->model().forward(ids);
    EXPECT_TRUE(at::allclose(out.to(at::kFloat), eager.to(at::kFloat), 1e-3, 1e-3)) << quant;
  }
}

TEST(ReloadGpu, Fp8UsesScaledMmOnHopper) {
  SKIP_WITHOUT(std::string("cuda"));
  ModelContext ctx;
  ctx.config = ModelConfig::parse("{}", "test");
  ctx.dtype = at::kBFloat16;
  ctx.device = c10::Device("cuda:0");
  ctx.quant = registry().create_quant("fp8", ctx);
  ReplicatedLinear layer(64, 48, ctx);
  layer.param("weight").data.copy_(at::randn({48, 64}, ctx.options()));
  layer.process_weights_after_loading();
  at::Tensor x = at::randn({5, 64}, ctx.options());
  at::Tensor w = layer.param("weight").data, ws = layer.param("weight_scale").data;
  // The same computation written out with at::_scaled_mm directly (rows padded to 16): one dynamic
  // activation scale for the whole input (the default, LOADKIT_FP8_ACTIVATION_SCALE unset).
  at::Tensor xs = (x.abs().amax().to(at::kFloat) / 448.0).clamp_min(1e-12);
  at::Tensor xq = (x.to(at::kFloat) / xs).clamp(-448, 448).to(at::kFloat8_e4m3fn);
  at::Tensor padded = at::zeros({16, 64}, xq.options().dtype(at::kByte));
  padded.narrow(0, 0, 5).copy_(xq.view(at::kByte));
  at::Tensor expected = at::_scaled_mm(padded.view(at::kFloat8_e4m3fn), w, xs.reshape({}), ws.reshape({}),
                                       std::nullopt, std::nullopt, at::kBFloat16).narrow(0, 0, 5);
  EXPECT_TRUE(at::equal(layer.forward(x), expected));
  at::Tensor exact = at::linear(x.to(at::kFloat), layer.param("weight").data.t().to(at::kFloat) * ws);
  EXPECT_GE(at::cosine_similarity(layer.forward(x).to(at::kFloat), exact, 1).min().item<double>(), 0.99);
}

TEST(ReloadGpu, PeakExtraMemoryStaysWithinTheLargestLayer) {
  SKIP_WITHOUT(std::string("cuda"));
  TempDir tmp;
  const int64_t hidden = 1024, inter = 2816;
  write_llama_checkpoint(tmp / "a", 1, 8, hidden, inter);
  write_llama_checkpoint(tmp / "b", 2, 8, hidden, inter);
  // Largest module in load format: gate_up_proj, bf16.
  const uint64_t largest = static_cast<uint64_t>(2 * inter * hidden) * 2;
  for (const std::string quant : {"none", "fp8"}) {
    auto model = load((tmp / "a").string(), "cuda", quant);
    const LoadReport& r = model->reload((tmp / "b").string());
    ASSERT_TRUE(r.peak_extra_device_bytes.has_value());
    const uint64_t bound = largest + largest / 20 + (4u << 20);
    EXPECT_LE(*r.peak_extra_device_bytes, bound) << quant << ": peak extra " << *r.peak_extra_device_bytes
                                                 << " bytes, largest layer " << largest;
    // fp8 must materialize each layer's load format (at least the largest one): a zero here means
    // the measurement is broken, not that the reload is free.
    if (quant == "fp8") {
      EXPECT_GE(*r.peak_extra_device_bytes, largest);
    }
    std::cout << "[ MEASURE  ] reload " << quant << " peak extra " << *r.peak_extra_device_bytes << " bytes, largest layer "
              << largest << " bytes" << std::endl;
    auto fresh_b = load((tmp / "b").string(), "cuda", quant);
    expect_identical(kernel_state(*model), kernel_state(*fresh_b));
  }
}
#endif

}  // namespace
}  // namespace loadkit::test
