// Tensor parallelism over c10d (Gloo on the CPU here, NCCL on the GPU
// machine) and vLLM's sharded-state format, through the CLI as users run it.

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <chrono>
#include <future>
#include <set>

#include "loadkit/module.h"
#include "loadkit/runtime/distributed.h"
#include "loadkit/runtime/engine.h"
#include "device_skip.h"
#include "model_checks.h"
#include "tensor_io.h"

namespace loadkit::test {
namespace {

using json = nlohmann::ordered_json;
using Clock = std::chrono::steady_clock;

at::Tensor read_logits(const fs::path& path) {
  for (auto& [name, t] : load_tensors(path.string()))
    if (name == "logits") return t;
  ADD_FAILURE() << "no tensor 'logits' in " << path;
  return {};
}

std::map<std::string, at::Tensor> read_all(const fs::path& path) {
  std::map<std::string, at::Tensor> out;
  for (auto& [name, t] : load_tensors(path.string())) out.emplace(name, t);
  return out;
}

std::vector<std::string> with_plugins(std::vector<std::string> args) {
  args.insert(args.end(), {"--plugin-dir", plugin_dir(), "--log-level", "warn"});
  return args;
}

/// `loadkit logits` of fixture-like `model` with `extra` options; fails the test unless it exits 0.
at::Tensor cli_logits(const std::string& model, const std::string& tokens, const fs::path& out,
                      std::vector<std::string> extra = {}) {
  std::vector<std::string> args{"logits", "--model", model, "--tokens", tokens, "--out", out.string()};
  args.insert(args.end(), extra.begin(), extra.end());
  const CliResult r = run_cli(with_plugins(args));
  EXPECT_EQ(r.code, 0) << r.err;
  if (r.code != 0) return {};
  return read_logits(out);
}

CliResult save_sharded(const std::string& model, const fs::path& out, std::vector<std::string> extra = {}) {
  std::vector<std::string> args{"save-sharded", "--model", model, "--out", out.string()};
  args.insert(args.end(), extra.begin(), extra.end());
  return run_cli(with_plugins(args));
}

std::vector<fs::path> rank_files(const fs::path& dir, int rank) {
  std::vector<fs::path> out;
  const std::string prefix = "model-rank-" + std::to_string(rank) + "-part-";
  for (const auto& entry : fs::directory_iterator(dir))
    if (entry.path().filename().string().rfind(prefix, 0) == 0) out.push_back(entry.path());
  return out;
}

// ------------------------------------------------------------ TP logits

/// One line per fixture and tensor-parallel size. Other families add their
/// fixtures here: heads, kv heads (or a multiple of the size), intermediate
/// size and the vocabulary padded to 64 must divide by the size.
struct TpCase {
  const char* fixture;
  int tp;
};
/// How gtest prints a case in a failure (otherwise its bytes).
void PrintTo(const TpCase& c, std::ostream* os) { *os << c.fixture << " at TP=" << c.tp; }
const TpCase kTpCases[] = {
    {"llama_fp32_gqa_sharded", 2},  // 2 kv heads split, vocab 1000 padded to 1024
    {"llama_fp32_llama3_tied", 2},  // tied embeddings: one parameter, sharded once
    {"llama_fp32_tp_mqa", 2},       // 1 kv head replicated on both ranks, biases after the all-reduce
    {"llama_fp32_tp_mqa", 3},       // 1 kv head on 3 ranks; rank 2 holds the vocab padding
    {"llama_bf16_gqa_tied", 2},
    {"mistral_fp32_window", 2},
    {"internlm_fp32_bias", 2},
    {"qwen2_fp32_gqa_untied", 2},                 // q/k/v biases split with their heads
    {"gemma_fp32_untied", 2},
    {"phi3_fp32_gqa", 2},                         // fused qkv/gate_up checkpoint tensors split per rank
    {"starcoder2_fp32_gqa_bias_window", 2},
    {"gpt2_fp32_prefixed", 2},                    // Conv1D transposed, fused c_attn split
    {"bigcode_fp32_mha", 2},                      // per-head c_attn regrouped, then split
    {"deepseek_v2_fp32_qproj_greedy_norm", 2},    // MLA heads and the experts' intermediate dim split
    {"deepseek_v2_fp32_qlora_grouped_yarn", 2},
    {"qwen2_fp32_tp3", 3},                        // one kv head a rank, vocab 950 padded to 960
    {"gpt2_fp32_tp3", 2},
    {"gpt2_fp32_tp3", 3},
    {"phi3_fp32_tp3", 2},                         // one kv head replicated on every rank
    {"phi3_fp32_tp3", 3},
    {"deepseek_v2_fp32_tp3", 2},
    {"deepseek_v2_fp32_tp3", 3},
    {"qwen3_fp32_tp2", 2},                        // per-head q/k norms on each rank's heads
    {"qwen3_moe_fp32_tp2", 2},                    // experts' intermediate dim split, router replicated
    {"qwen3_moe_fp32_norm_topk", 2},              // a dense layer among sparse ones
    {"granite_fp32_gqa", 2},                      // the example plugin: multipliers on every rank
    {"deepseek_v3_fp32_qlora", 2},                // noaux_tc routing: the router and its bias replicated
    {"deepseek_v3_blockfp8_tp", 2},               // block fp8 incl. kv_b_proj: scales split with their weights
};

std::string case_name(const ::testing::TestParamInfo<TpCase>& info) {
  return std::string(info.param.fixture) + "_tp" + std::to_string(info.param.tp);
}

class TpLogits : public ::testing::TestWithParam<TpCase> {};

TEST_P(TpLogits, MatchTransformersAndOneRank) {
  SKIP_WITHOUT_TP_BACKEND("cpu");
  const Fixture& f = fixture(GetParam().fixture);
  const std::string tp = std::to_string(GetParam().tp);
  TempDir tmp;
  at::Tensor one = cli_logits(f.dir, f.tokens_arg(), tmp / "tp1.safetensors");
  at::Tensor many = cli_logits(f.dir, f.tokens_arg(), tmp / "tpn.safetensors", {"--tp-size", tp});
  ASSERT_TRUE(one.defined() && many.defined());
  expect_close(many, reference_logits(f), f.dtype);
  expect_close(many, one, f.dtype);
}

INSTANTIATE_TEST_SUITE_P(Cpu, TpLogits, ::testing::ValuesIn(kTpCases), case_name);

TEST(TensorParallel, SizeThatDoesNotDivideTheHeadsIsAUsageError) {
  SKIP_WITHOUT_TP_BACKEND("cpu");
  const Fixture& f = fixture("llama_fp32_gqa_sharded");  // 6 heads, 2 kv heads
  TempDir tmp;
  const CliResult r = run_cli(with_plugins({"load", "--model", f.dir, "--tp-size", "4"}));
  expect_failure(r, 2, {"tensor parallel size 4"});
}

TEST(TensorParallel, ReportHasEveryRanksThroughput) {
  SKIP_WITHOUT_TP_BACKEND("cpu");
  const Fixture& f = fixture("llama_fp32_tp_mqa");
  TempDir tmp;
  const CliResult r = run_cli(with_plugins({"load", "--model", f.dir, "--tp-size", "3", "--report",
                                            (tmp / "r.json").string()}));
  ASSERT_EQ(r.code, 0) << r.err;
  const json report = json::parse(read_bytes(tmp / "r.json"));
  ASSERT_EQ(report["tp_size"], 3);
  ASSERT_EQ(report["ranks"].size(), 3u);
  uint64_t bytes = 0;
  for (const auto& rank : report["ranks"]) {
    EXPECT_GT(rank["seconds"].get<double>(), 0.0);
    bytes += rank["bytes"].get<uint64_t>();
  }
  // Each rank reads the whole HF checkpoint (its loaders narrow what they keep).
  EXPECT_EQ(bytes, 3 * report["bytes"].get<uint64_t>());
}

// ------------------------------------------------------------ failures

TEST(TensorParallel, RankWithABadShardStopsEveryRankWithItsMessage) {
  SKIP_WITHOUT_TP_BACKEND("cpu");
  const Fixture& f = fixture("llama_fp32_tp_mqa");
  TempDir tmp;
  ASSERT_EQ(save_sharded(f.dir, tmp / "s", {"--tp-size", "2"}).code, 0);
  // Only rank 1 reads this file; rank 0 loads fine and must not wait for ever.
  const fs::path bad = tmp / "s" / "model-rank-1-part-0.safetensors";
  fs::resize_file(bad, 100);
  const auto start = Clock::now();
  const CliResult r = run_cli(with_plugins({"logits", "--model", (tmp / "s").string(), "--load-format", "sharded",
                                            "--tp-size", "2", "--tokens", "1,2", "--out", (tmp / "o").string()}));
  EXPECT_LT(Clock::now() - start, std::chrono::seconds(60));
  expect_failure(r, 3, {bad.string()});
  EXPECT_FALSE(fs::exists(tmp / "o"));
}

TEST(TensorParallel, RankThatDiesSilentlyStopsEveryRank) {
  SKIP_WITHOUT_TP_BACKEND("cpu");
  const Fixture& f = fixture("llama_fp32_tp_mqa");
  TempDir tmp;
  const auto start = Clock::now();
  const CliResult r = run_cli(with_plugins({"logits", "--model", f.dir, "--tp-size", "2", "--tokens", "1,2", "--out",
                                            (tmp / "o").string()}),
                              {{"LOADKIT_TEST_ABORT_RANK", "1"}});
  EXPECT_LT(Clock::now() - start, std::chrono::seconds(60));
  expect_failure(r, 1, {"rank 1", "signal"});
  EXPECT_FALSE(fs::exists(tmp / "o"));
}

TEST(TensorParallel, JoinsATorchrunStyleGroupFromTheEnvironment) {
  SKIP_WITHOUT_TP_BACKEND("cpu");
  const Fixture& f = fixture("llama_fp32_tp_mqa");
  TempDir tmp;
  const std::string port = std::to_string(free_port());
  std::vector<std::future<CliResult>> ranks;
  for (int r = 0; r < 2; ++r)
    ranks.push_back(std::async(std::launch::async, [&, r] {
      return run_cli(with_plugins({"logits", "--model", f.dir, "--tp-size", "2", "--tokens", f.tokens_arg(), "--out",
                                   (tmp / ("rank" + std::to_string(r))).string()}),
                     {{"RANK", std::to_string(r)},
                      {"LOCAL_RANK", std::to_string(r)},
                      {"WORLD_SIZE", "2"},
                      {"MASTER_ADDR", "127.0.0.1"},
                      {"MASTER_PORT", port}});
    }));
  for (auto& rank : ranks) {
    const CliResult r = rank.get();
    EXPECT_EQ(r.code, 0) << r.err;
  }
  ASSERT_TRUE(fs::exists(tmp / "rank0"));
  EXPECT_FALSE(fs::exists(tmp / "rank1")) << "only rank 0 writes outputs";
  expect_close(read_logits(tmp / "rank0"), reference_logits(f), f.dtype);
}

// ------------------------------------------------------------ reload under TP

TEST(TensorParallel, EachRankReloadsItsShardBitIdenticalToAFreshLoad) {
  const Fixture& a = fixture("llama_fp32_gqa_sharded");
  const Fixture& b = fixture(a.reload_target);
  for (int rank = 0; rank < 2; ++rank) {
    LoadOptions o;
    o.tp_size = 2;
    o.tp_rank = rank;
    o.model_dir = a.dir;
    auto model = LoadedModel::load(o, build_registry());
    const LoadReport& r = model->reload(b.dir);
    EXPECT_TRUE(r.pointers_stable);
    o.model_dir = b.dir;
    auto fresh = LoadedModel::load(o, build_registry());
    SCOPED_TRACE("rank " + std::to_string(rank));
    expect_identical(kernel_state(*model), kernel_state(*fresh));
  }
}

TEST(TensorParallel, ReloadOnTwoRanksGivesTheTargetsLogits) {
  SKIP_WITHOUT_TP_BACKEND("cpu");
  const Fixture& a = fixture("llama_fp32_gqa_sharded");
  const Fixture& b = fixture(a.reload_target);
  TempDir tmp;
  const CliResult r = run_cli(with_plugins({"reload", "--model", a.dir, "--from", b.dir, "--tp-size", "2", "--tokens",
                                            b.tokens_arg(), "--out", (tmp / "re").string()}));
  ASSERT_EQ(r.code, 0) << r.err;
  at::Tensor fresh = cli_logits(b.dir, b.tokens_arg(), tmp / "fresh", {"--tp-size", "2"});
  at::Tensor reloaded = read_logits(tmp / "re");
  EXPECT_TRUE(at::equal(reloaded, fresh)) << (reloaded - fresh).abs().max().item<double>();
  expect_close(reloaded, reference_logits(b), b.dtype);
}

// ------------------------------------------------------------ sharded state

TEST(ShardedState, SaveThenLoadShardedGivesTheSameLogits) {
  SKIP_WITHOUT_TP_BACKEND("cpu");
  const Fixture& f = fixture("llama_fp32_llama3_tied");
  TempDir tmp;
  const CliResult saved = save_sharded(f.dir, tmp / "s", {"--tp-size", "2"});
  ASSERT_EQ(saved.code, 0) << saved.err;
  EXPECT_EQ(rank_files(tmp / "s", 0).size(), 1u);
  EXPECT_EQ(rank_files(tmp / "s", 1).size(), 1u);
  EXPECT_TRUE(fs::exists(tmp / "s" / "config.json"));
  at::Tensor hf = cli_logits(f.dir, f.tokens_arg(), tmp / "hf", {"--tp-size", "2"});
  at::Tensor sharded =
      cli_logits((tmp / "s").string(), f.tokens_arg(), tmp / "sh", {"--tp-size", "2", "--load-format", "sharded"});
  ASSERT_TRUE(hf.defined() && sharded.defined());
  EXPECT_TRUE(at::equal(hf, sharded)) << (hf - sharded).abs().max().item<double>();
  expect_close(sharded, reference_logits(f), f.dtype);
}

// A YAML job with tp_size 2 runs its steps on both ranks: save_sharded writes
// each rank's parts, and a second job loads them sharded; logits equal transformers'.
TEST(ShardedState, JobAtTpTwoSavesAndLoadsShardedState) {
  SKIP_WITHOUT_TP_BACKEND("cpu");
  const Fixture& f = fixture("gpt2_fp32_tp3");
  TempDir tmp;
  std::string tokens;
  for (auto t : f.tokens) tokens += (tokens.empty() ? "" : ", ") + std::to_string(t);
  write_bytes(tmp / "save.yaml", "model: {path: '" + f.dir + "', tp_size: 2}\nplugin_dirs: ['" + plugin_dir() +
                                     "']\nsteps:\n  - load\n  - save_sharded: {out: s, max_part_size: 200000}\n"
                                     "  - logits: {tokens: [" + tokens + "], out: hf.safetensors}\n");
  write_bytes(tmp / "load.yaml", "model: {path: s, tp_size: 2, load_format: sharded}\nplugin_dirs: ['" +
                                     plugin_dir() + "']\nsteps:\n  - load\n  - logits: {tokens: [" + tokens +
                                     "], out: sharded.safetensors}\n");
  const CliResult saved = run_cli({"run", (tmp / "save.yaml").string(), "--log-level", "warn"});
  ASSERT_EQ(saved.code, 0) << saved.err << saved.out;
  EXPECT_GT(rank_files(tmp / "s", 0).size(), 1u);  // the part limit split rank 0's state
  EXPECT_GT(rank_files(tmp / "s", 1).size(), 1u);
  const CliResult loaded = run_cli({"run", (tmp / "load.yaml").string(), "--log-level", "warn"});
  ASSERT_EQ(loaded.code, 0) << loaded.err << loaded.out;
  const at::Tensor hf = read_logits(tmp / "hf.safetensors");
  const at::Tensor sharded = read_logits(tmp / "sharded.safetensors");
  ASSERT_TRUE(hf.defined() && sharded.defined());
  EXPECT_TRUE(at::equal(hf, sharded));
  expect_close(sharded, reference_logits(f), f.dtype);
}

TEST(ShardedState, OneRankRoundTripIsBitIdentical) {
  const Fixture& f = fixture("llama_fp32_gqa_sharded");
  TempDir tmp;
  ASSERT_EQ(save_sharded(f.dir, tmp / "s").code, 0);
  auto hf = load_model(f.dir);
  auto sharded = load_model((tmp / "s").string(), "cpu", "none", "auto", "sharded");
  expect_identical(kernel_state(*sharded), kernel_state(*hf));
}

TEST(ShardedState, SmallMaxPartSizeWritesSeveralPartsThatLoadBack) {
  SKIP_WITHOUT_TP_BACKEND("cpu");
  const Fixture& f = fixture("llama_fp32_tp_mqa");
  TempDir tmp;
  const uint64_t limit = 40000;
  ASSERT_EQ(save_sharded(f.dir, tmp / "s", {"--tp-size", "3", "--max-part-size", std::to_string(limit)}).code, 0);
  for (int rank = 0; rank < 3; ++rank) {
    const auto parts = rank_files(tmp / "s", rank);
    EXPECT_GT(parts.size(), 3u) << "rank " << rank;
    for (const auto& part : parts) {
      const auto tensors = read_all(part);
      uint64_t bytes = 0;
      for (auto& [name, t] : tensors) bytes += t.nbytes();
      // A part only exceeds the limit when it holds one tensor that does.
      if (tensors.size() > 1) {
        EXPECT_LE(bytes, limit) << part;
      }
    }
  }
  at::Tensor hf = cli_logits(f.dir, f.tokens_arg(), tmp / "hf", {"--tp-size", "3"});
  at::Tensor sharded =
      cli_logits((tmp / "s").string(), f.tokens_arg(), tmp / "sh", {"--tp-size", "3", "--load-format", "sharded"});
  ASSERT_TRUE(hf.defined() && sharded.defined());
  EXPECT_TRUE(at::equal(hf, sharded));
}

/// vLLM's layout, computed here from the HF tensors: qkv = [q rows of the
/// rank; its kv head's k rows; v rows], gate_up = [gate rows; up rows],
/// row-parallel weights split on columns, the vocabulary padded to 64 and split.
TEST(ShardedState, FilesHoldVllmNamesAndLayout) {
  SKIP_WITHOUT_TP_BACKEND("cpu");
  const Fixture& f = fixture("llama_fp32_tp_mqa");  // 6 heads of 16, 1 kv head, vocab 950, intermediate 192, untied
  TempDir tmp;
  ASSERT_EQ(save_sharded(f.dir, tmp / "s", {"--tp-size", "3"}).code, 0);
  const auto hf = read_checkpoint(f.dir);
  const int64_t head = 16, vocab_rows = 960 / 3, inter = 192 / 3;
  std::set<std::string> all_names;
  for (int rank = 0; rank < 3; ++rank) {
    SCOPED_TRACE("rank " + std::to_string(rank));
    const auto files = rank_files(tmp / "s", rank);
    ASSERT_EQ(files.size(), 1u);
    const auto state = read_all(files[0]);
    for (auto& [name, t] : state) all_names.insert(name);
    const std::string l = "model.layers.1.";
    auto q = hf.at(l + "self_attn.q_proj.weight").narrow(0, rank * 2 * head, 2 * head);
    auto k = hf.at(l + "self_attn.k_proj.weight");  // the only kv head, on every rank
    auto v = hf.at(l + "self_attn.v_proj.weight");
    EXPECT_TRUE(at::equal(state.at(l + "self_attn.qkv_proj.weight"), at::cat({q, k, v})));
    auto qb = hf.at(l + "self_attn.q_proj.bias").narrow(0, rank * 2 * head, 2 * head);
    EXPECT_TRUE(at::equal(state.at(l + "self_attn.qkv_proj.bias"),
                          at::cat({qb, hf.at(l + "self_attn.k_proj.bias"), hf.at(l + "self_attn.v_proj.bias")})));
    EXPECT_TRUE(at::equal(state.at(l + "self_attn.o_proj.weight"),
                          hf.at(l + "self_attn.o_proj.weight").narrow(1, rank * 2 * head, 2 * head)));
    EXPECT_TRUE(at::equal(state.at(l + "self_attn.o_proj.bias"), hf.at(l + "self_attn.o_proj.bias")));
    EXPECT_TRUE(at::equal(state.at(l + "mlp.gate_up_proj.weight"),
                          at::cat({hf.at(l + "mlp.gate_proj.weight").narrow(0, rank * inter, inter),
                                   hf.at(l + "mlp.up_proj.weight").narrow(0, rank * inter, inter)})));
    EXPECT_TRUE(at::equal(state.at(l + "mlp.down_proj.weight"),
                          hf.at(l + "mlp.down_proj.weight").narrow(1, rank * inter, inter)));
    for (const char* name : {"model.embed_tokens.weight", "lm_head.weight"}) {
      const at::Tensor full = hf.at(name);
      at::Tensor expected = at::zeros({vocab_rows, full.size(1)});
      const int64_t start = rank * vocab_rows, rows = std::min<int64_t>(vocab_rows, full.size(0) - start);
      expected.narrow(0, 0, rows).copy_(full.narrow(0, start, rows));
      EXPECT_TRUE(at::equal(state.at(name), expected)) << name;
    }
    EXPECT_TRUE(at::equal(state.at("model.norm.weight"), hf.at("model.norm.weight")));
  }
  EXPECT_FALSE(fs::exists(tmp / "s" / "model.safetensors.index.json"));
  // Names: vLLM's parameters, none of the checkpoint's unfused ones.
  EXPECT_TRUE(all_names.count("model.layers.0.mlp.gate_up_proj.bias"));
  for (auto& name : all_names) EXPECT_EQ(name.find("q_proj"), std::string::npos) << name;
}

TEST(ShardedState, TiedEmbeddingIsSavedOnceUnderTheSmallerKey) {
  const Fixture& f = fixture("llama_fp32_llama3_tied");
  TempDir tmp;
  ASSERT_EQ(save_sharded(f.dir, tmp / "s").code, 0);
  const auto state = read_all(rank_files(tmp / "s", 0).at(0));
  // vLLM's _filter_subtensors: "lm_head.weight" < "model.embed_tokens.weight".
  EXPECT_TRUE(state.count("lm_head.weight"));
  EXPECT_FALSE(state.count("model.embed_tokens.weight"));
}

TEST(ShardedState, QuantizedKernelTensorsAreSavedAsTheyAre) {
  SKIP_WITHOUT_TP_BACKEND("cpu");
  const Fixture& f = fixture("llama_fp32_tp_mqa");
  TempDir tmp;
  ASSERT_EQ(save_sharded(f.dir, tmp / "s", {"--tp-size", "2", "--quantization", "fp8"}).code, 0);
  const auto state = read_all(rank_files(tmp / "s", 1).at(0));
  EXPECT_EQ(state.at("model.layers.0.self_attn.qkv_proj.weight").scalar_type(), at::kFloat8_e4m3fn);
  at::Tensor hf = cli_logits(f.dir, f.tokens_arg(), tmp / "hf", {"--tp-size", "2", "--quantization", "fp8"});
  at::Tensor sharded = cli_logits((tmp / "s").string(), f.tokens_arg(), tmp / "sh",
                                  {"--tp-size", "2", "--quantization", "fp8", "--load-format", "sharded"});
  ASSERT_TRUE(hf.defined() && sharded.defined());
  EXPECT_TRUE(at::equal(hf, sharded));
}

TEST(ShardedState, CustomPatternRoundTrip) {
  const Fixture& f = fixture("llama_fp32_gqa_sharded");
  TempDir tmp;
  ASSERT_EQ(save_sharded(f.dir, tmp / "s", {"--sharded-pattern", "w{rank}_{part}.safetensors"}).code, 0);
  EXPECT_TRUE(fs::exists(tmp / "s" / "w0_0.safetensors"));
  at::Tensor sharded = cli_logits((tmp / "s").string(), f.tokens_arg(), tmp / "sh",
                                  {"--load-format", "sharded", "--sharded-pattern", "w{rank}_{part}.safetensors"});
  ASSERT_TRUE(sharded.defined());
  expect_close(sharded, reference_logits(f), f.dtype);
}

TEST(ShardedState, NoFileMatchingThePatternFailsNamingIt) {
  const Fixture& f = fixture("llama_fp32_gqa_sharded");
  TempDir tmp;
  const CliResult r = run_cli(with_plugins({"load", "--model", f.dir, "--load-format", "sharded"}));
  expect_failure(r, 3, {"model-rank-{rank}-part-{part}.safetensors", "model-rank-0-part-0.safetensors"});
}

TEST(ShardedState, MissingKeysFailListingThem) {
  const Fixture& f = fixture("llama_fp32_gqa_sharded");
  TempDir tmp;
  ASSERT_EQ(save_sharded(f.dir, tmp / "s", {"--max-part-size", "1"}).code, 0);  // one tensor a part
  std::vector<std::string> removed;
  for (const auto& part : rank_files(tmp / "s", 0)) {
    const auto names = read_all(part);
    const std::string name = names.begin()->first;
    if (name == "model.norm.weight" || name == "model.layers.2.mlp.down_proj.weight") {
      removed.push_back(name);
      fs::remove(part);
    }
  }
  ASSERT_EQ(removed.size(), 2u);
  const CliResult r = run_cli(with_plugins({"load", "--model", (tmp / "s").string(), "--load-format", "sharded"}));
  expect_failure(r, 3, removed);
}

TEST(ShardedState, StateOfMoreRanksIsRefused) {
  SKIP_WITHOUT_TP_BACKEND("cpu");
  const Fixture& f = fixture("llama_fp32_gqa_sharded");
  TempDir tmp;
  ASSERT_EQ(save_sharded(f.dir, tmp / "s", {"--tp-size", "2"}).code, 0);
  const CliResult r = run_cli(with_plugins({"load", "--model", (tmp / "s").string(), "--load-format", "sharded"}));
  expect_failure(r, 3, {"--tp-size"});
}

TEST(ShardedState, SmallerTensorLoadsIntoTheLeadingPartWithAWarning) {
  const Fixture& f = fixture("llama_fp32_gqa_sharded");
  TempDir tmp;
  ASSERT_EQ(save_sharded(f.dir, tmp / "s", {"--max-part-size", "1"}).code, 0);
  // Cut the embedding's zero padding rows (1000 real of 1024), as a writer that does not pad would.
  for (const auto& part : rank_files(tmp / "s", 0)) {
    auto tensors = read_all(part);
    if (!tensors.count("model.embed_tokens.weight")) continue;
    save_tensors(part.string(), {{"model.embed_tokens.weight", tensors.at("model.embed_tokens.weight").narrow(0, 0, 1000)}});
  }
  const CliResult r = run_cli({"logits", "--model", (tmp / "s").string(), "--load-format", "sharded", "--tokens",
                               f.tokens_arg(), "--out", (tmp / "o").string(), "--plugin-dir", plugin_dir()});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.err.find("model.embed_tokens.weight"), std::string::npos) << r.err;
  expect_close(read_logits(tmp / "o"), reference_logits(f), f.dtype);
}

TEST(ShardedState, ReloadNoProcessFromShardedStateOnTwoRanks) {
  SKIP_WITHOUT_TP_BACKEND("cpu");
  const Fixture& a = fixture("llama_fp32_gqa_sharded");
  const Fixture& b = fixture(a.reload_target);
  TempDir tmp;
  ASSERT_EQ(save_sharded(b.dir, tmp / "sb", {"--tp-size", "2"}).code, 0);
  const CliResult r = run_cli(with_plugins({"reload", "--model", a.dir, "--from", (tmp / "sb").string(), "--no-process",
                                            "--tp-size", "2", "--tokens", b.tokens_arg(), "--out",
                                            (tmp / "re").string()}));
  ASSERT_EQ(r.code, 0) << r.err;
  at::Tensor fresh = cli_logits(b.dir, b.tokens_arg(), tmp / "fresh", {"--tp-size", "2"});
  EXPECT_TRUE(at::equal(read_logits(tmp / "re"), fresh));
}

// ------------------------------------------------------------ GPU machine

/// `f`'s logits over NCCL at TP 2 equal one GPU's and transformers'.
void expect_two_gpus_match_one(const Fixture& f, const TempDir& tmp) {
  at::Tensor one = cli_logits(f.dir, f.tokens_arg(), tmp / "one", {"--device", "cuda"});
  at::Tensor two = cli_logits(f.dir, f.tokens_arg(), tmp / "two", {"--device", "cuda", "--tp-size", "2"});
  ASSERT_TRUE(one.defined() && two.defined());
  expect_close(two, one, f.dtype);
  expect_close(two, reference_logits(f), f.dtype);
}

/// Qwen3-MoE over NCCL: each GPU holds every expert's slice of the intermediate dim and the
/// partial expert outputs are summed across ranks, q/k norms per rank's heads.
TEST(TensorParallelGpu, NcclTwoRanksQwen3MoeMatchOneGpu) {
  SKIP_WITHOUT(std::string("cuda"));
  if (at::getNumGPUs() < 2) GTEST_SKIP() << "needs 2 GPUs (device kind nvidia-h200-x2), found " << at::getNumGPUs();
  SKIP_WITHOUT_TP_BACKEND("cuda");
  TempDir tmp;
  expect_two_gpus_match_one(fixture("qwen3_moe_fp32_tp2"), tmp);
}

/// NCCL with one GPU per rank; prints what the lead reports: load throughput
/// per rank, HF format against sharded state (LOADKIT_TP_BENCH_MODEL: a
/// bigger checkpoint to time, default the fixture).
TEST(TensorParallelGpu, NcclTwoRanksMatchOneGpu) {
  SKIP_WITHOUT(std::string("cuda"));
  if (at::getNumGPUs() < 2) GTEST_SKIP() << "needs 2 GPUs (device kind nvidia-h100-x2), found " << at::getNumGPUs();
  SKIP_WITHOUT_TP_BACKEND("cuda");
  const Fixture& f = fixture("llama_fp32_gqa_sharded");
  TempDir tmp;
  expect_two_gpus_match_one(f, tmp);
  if (HasFatalFailure()) return;

  const char* bench = std::getenv("LOADKIT_TP_BENCH_MODEL");
  const std::string model = bench ? bench : f.dir;
  ASSERT_EQ(save_sharded(model, tmp / "s", {"--device", "cuda", "--tp-size", "2"}).code, 0);
  for (const auto& [format, dir] : {std::pair<std::string, std::string>{"safetensors", model},
                                    {"sharded", (tmp / "s").string()}}) {
    const CliResult r = run_cli(with_plugins({"load", "--model", dir, "--device", "cuda", "--tp-size", "2",
                                              "--load-format", format, "--report", (tmp / "r.json").string()}));
    ASSERT_EQ(r.code, 0) << r.err;
    const json report = json::parse(read_bytes(tmp / "r.json"));
    for (const auto& rank : report["ranks"])
      std::cout << "[ throughput ] " << format << " rank " << rank["rank"] << ": " << rank["bytes"] << " bytes in "
                << rank["seconds"] << " s = " << rank["gb_per_s"] << " GB/s\n";
  }
}

}  // namespace
}  // namespace loadkit::test
