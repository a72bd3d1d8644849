// Every size a plugin divides by, multiplies with or allocates from is checked
// before it is used: through the CLI, a config.json with a bad value — zero,
// negative, -2^63, not divisible, overflowing, or needing more memory than
// this machine has — is exit 3 with one line naming the key (both keys for a
// divisibility), no signal, well within a deadline, and no message longer than
// a few KB.
//
// The table is generated: per family a fixture and the keys it reads, each
// with the bad values that apply to it, plus rows for the cases a single value
// does not make (divisibility, overflow, rope settings, InternLM's `rotary`).

#include <gtest/gtest.h>

#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <limits>

#include "test_support.h"

namespace loadkit::test {
namespace {

using json = nlohmann::ordered_json;

/// No load of these tiny models takes a minute; past it the CLI is taken for hung.
constexpr unsigned kDeadlineSeconds = 60;
/// "A few KB": the longest error line a bad config may produce.
constexpr size_t kMaxMessageBytes = 4096;

constexpr int64_t kHuge = 1'000'000'000'000;  // 10^12: any product with it needs terabytes
constexpr int64_t kMin = std::numeric_limits<int64_t>::min();

struct BadConfig {
  std::string name;     ///< test name
  std::string fixture;  ///< the checkpoint whose config.json is edited
  /// Keys set (dotted for nested objects) or, with a null value, removed.
  std::vector<std::pair<std::string, json>> edits;
  std::vector<std::string> fragments;  ///< each must be in the error line
};

enum Bad : unsigned { Zero = 1, Negative = 2, Min = 4, Huge = 8 };
constexpr unsigned kAll = Zero | Negative | Huge;

/// Keys and the bad values that must fail naming them (Huge is left out where a huge value
/// needs no memory: a layer frequency, a sparse step; Zero where 0 is valid).
using Keys = std::vector<std::pair<const char*, unsigned>>;

struct Family {
  const char* name;
  const char* fixture;
  Keys keys;
};

/// The Llama-like keys every decoder on DecoderConfig reads, with `bad` values each.
Keys decoder_keys(unsigned bad) {
  return {{"vocab_size", bad},          {"hidden_size", bad},         {"intermediate_size", bad},
          {"num_hidden_layers", bad},   {"num_attention_heads", bad}, {"num_key_value_heads", bad},
          {"head_dim", bad}};
}

Keys plus(Keys keys, const Keys& more) {
  keys.insert(keys.end(), more.begin(), more.end());
  return keys;
}

/// Every family, every key it divides by, multiplies with or allocates from. A reader shared by
/// several families (DecoderConfig, Gpt2DecoderConfig) gets every kind of bad value through one
/// of them and a zero through each of the others; a plugin's own keys get every kind.
std::vector<Family> families() {
  const Keys gpt2 = {{"vocab_size", kAll}, {"n_embd", kAll | Min}, {"n_head", kAll},
                     {"n_layer", kAll},    {"n_inner", kAll},      {"n_positions", kAll}};
  Keys gpt2_zero = gpt2;
  for (auto& [key, bad] : gpt2_zero) bad = Zero;
  return {
      {"Llama", "llama_fp32_gqa_sharded", plus(decoder_keys(kAll), {{"hidden_size", Min}})},
      {"Qwen2", "qwen2_fp32_gqa_untied", decoder_keys(Zero)},
      {"Gemma", "gemma_fp32_untied", decoder_keys(Zero)},
      {"Gemma2", "gemma2_fp32_window_softcap", plus(decoder_keys(Zero), {{"query_pre_attn_scalar", Zero | Negative}})},
      {"Phi3", "phi3_fp32_gqa", decoder_keys(Zero)},
      {"Starcoder2", "starcoder2_fp32_gqa_bias_window", decoder_keys(Zero)},
      {"Qwen3", "qwen3_fp32_gqa", decoder_keys(Zero)},
      {"Qwen3Moe", "qwen3_moe_fp32_norm_topk",
       plus(decoder_keys(Zero), {{"num_experts", kAll},
                                 {"num_experts_per_tok", kAll},
                                 {"moe_intermediate_size", kAll},
                                 {"decoder_sparse_step", Zero | Negative}})},
      {"Granite", "granite_fp32_gqa",
       plus(decoder_keys(Zero), {{"logits_scaling", Zero | Negative}, {"attention_multiplier", Zero | Negative}})},
      {"Gpt2", "gpt2_fp32_prefixed", gpt2},
      {"GptBigCode", "bigcode_fp32_mqa", gpt2_zero},
      {"DeepseekV2", "deepseek_v2_fp32_qproj_greedy_norm",
       {{"vocab_size", Zero},
        {"hidden_size", Zero | Min},
        {"intermediate_size", Zero | Huge},
        {"num_hidden_layers", Zero | Huge},
        {"num_attention_heads", Zero | Huge},
        {"kv_lora_rank", kAll},
        {"qk_rope_head_dim", kAll},
        {"qk_nope_head_dim", Negative | Huge},  // 0 is valid: no unrotated part
        {"v_head_dim", kAll},
        {"q_lora_rank", Negative | Huge},       // 0 (or null) is valid: a plain q_proj
        {"n_routed_experts", Negative | Huge},  // 0 is valid: every layer dense
        {"moe_intermediate_size", kAll},
        {"num_experts_per_tok", kAll},
        {"moe_layer_freq", Zero | Negative},
        {"first_k_dense_replace", Negative}}},
  };
}

std::string test_name(std::string text) {
  std::replace_if(text.begin(), text.end(), [](char c) { return !std::isalnum(static_cast<unsigned char>(c)); }, '_');
  return text;
}

std::string cat_name(const char* family, const char* key, Bad kind) {
  const char* value = kind == Zero ? "Zero" : kind == Negative ? "Negative" : kind == Min ? "Int64Min" : "Huge";
  return std::string(family) + "_" + key + "_" + value;
}

std::vector<BadConfig> bad_configs() {
  std::vector<BadConfig> rows;
  const std::pair<Bad, json> values[] = {{Zero, 0}, {Negative, -1}, {Min, kMin}, {Huge, kHuge}};
  for (const Family& family : families())
    for (const auto& [key, bad] : family.keys)
      for (const auto& [kind, value] : values)
        if (bad & kind)
          rows.push_back({test_name(cat_name(family.name, key, kind)), family.fixture, {{key, value}},
                          {std::string("'") + key}});
  auto row = [&](std::string name, const char* fixture, std::vector<std::pair<std::string, json>> edits,
                 std::vector<std::string> fragments) {
    rows.push_back({std::move(name), fixture, std::move(edits), std::move(fragments)});
  };
  // Both sizes the head dimension is divided from negative, the smaller as small as int64 goes.
  row("Llama_HiddenMinWithHeadsMinusOne", "llama_fp32_gqa_sharded",
      {{"hidden_size", kMin}, {"num_attention_heads", -1}}, {"'hidden_size'"});
  // Not divisible: both keys named.
  // (6 heads over 4 kv heads; Qwen3's 4 over 3.)
  for (const auto& [fixture, kv] : {std::pair{"llama_fp32_gqa_sharded", 4}, {"qwen2_fp32_gqa_untied", 4},
                                    {"qwen3_fp32_gqa", 3}})
    row(test_name(std::string(fixture) + "_KvHeadsNotDividingHeads"), fixture, {{"num_key_value_heads", kv}},
        {"'num_attention_heads'", "'num_key_value_heads' (" + std::to_string(kv) + ")", "not a multiple"});
  row("Qwen2_HiddenNotAMultipleOfHeads", "qwen2_fp32_gqa_untied", {{"num_attention_heads", 5}, {"num_key_value_heads", 5}},
      {"'hidden_size' (96)", "'num_attention_heads' (5)", "not a multiple"});
  row("Phi3_HiddenNotAMultipleOfHeads", "phi3_fp32_gqa", {{"num_attention_heads", 7}, {"num_key_value_heads", 7}},
      {"'hidden_size'", "'num_attention_heads'", "not a multiple"});
  row("Gpt2_EmbdNotAMultipleOfHeads", "gpt2_fp32_prefixed", {{"n_head", 7}}, {"'n_embd'", "'n_head'", "not a multiple"});
  // Overflowing 64 bits: n_inner's default is 4 x n_embd.
  row("Gpt2_InnerDefaultOverflows", "gpt2_fp32_prefixed", {{"n_embd", int64_t{1} << 62}, {"n_head", 1}, {"n_inner", nullptr}},
      {"'n_embd'", "overflow"});
  row("Llama_HiddenTimesHeadsOverflows", "llama_fp32_gqa_sharded",
      {{"hidden_size", int64_t{1} << 62}, {"num_attention_heads", int64_t{1} << 40}, {"num_key_value_heads", 1}},
      {"'hidden_size'", "'num_attention_heads'"});
  // More experts per token than experts.
  row("Qwen3Moe_TopKAboveExperts", "qwen3_moe_fp32_norm_topk", {{"num_experts_per_tok", 7}},
      {"'num_experts_per_tok' (7)", "'num_experts' (6)"});
  row("DeepseekV2_GroupsNotDividingExperts", "deepseek_v2_fp32_qlora_grouped_yarn", {{"n_group", 3}},
      {"'n_routed_experts'", "'n_group'"});
  row("DeepseekV2_TopkGroupAboveGroups", "deepseek_v2_fp32_qlora_grouped_yarn", {{"topk_group", 5}},
      {"'topk_group' (5)", "'n_group' (4)"});
  row("DeepseekV2_NegativeGroups", "deepseek_v2_fp32_qlora_grouped_yarn", {{"n_group", -1}}, {"'n_group'"});
  // layer_types of the wrong length.
  row("Gemma2_LayerTypesTooShort", "gemma2_fp32_window_softcap", {{"layer_types", json::array({"full_attention"})}},
      {"'layer_types'", "'num_hidden_layers'"});
  // Rope settings something is divided by.
  row("Llama3Rope_ZeroFactor", "llama_fp32_llama3_tied", {{"rope_parameters.factor", 0}}, {"'rope_parameters.factor'"});
  row("Llama3Rope_EqualFreqFactors", "llama_fp32_llama3_tied",
      {{"rope_parameters.low_freq_factor", 2.0}, {"rope_parameters.high_freq_factor", 2.0}},
      {"'rope_parameters.low_freq_factor'", "'rope_parameters.high_freq_factor'"});
  row("Llama3Rope_ZeroOriginalContext", "llama_fp32_llama3_tied",
      {{"rope_parameters.original_max_position_embeddings", 0}}, {"'rope_parameters.original_max_position_embeddings'"});
  row("Llama3Rope_LegacyNegativeFactor", "llama_fp32_llama3_legacy_config", {{"rope_scaling.factor", -8.0}},
      {"'rope_scaling.factor'"});
  row("DynamicRope_ZeroFactor", "llama_fp32_dynamic_long", {{"rope_parameters.factor", 0}}, {"'rope_parameters.factor'"});
  row("DynamicRope_MissingFactor", "llama_fp32_dynamic_legacy_config", {{"rope_scaling.factor", nullptr}},
      {"'rope_scaling.factor'"});
  row("DynamicRope_ZeroMaxPositions", "llama_fp32_dynamic_long", {{"max_position_embeddings", 0}},
      {"'max_position_embeddings'"});
  row("RopeTheta_Zero", "llama_fp32_gqa_sharded", {{"rope_parameters.rope_theta", 0.0}}, {"'rope_parameters.rope_theta'"});
  row("Phi3_ZeroPartialRotary", "phi3_fp32_gqa", {{"rope_parameters.partial_rotary_factor", 0.0}},
      {"'partial_rotary_factor'"});
  row("Yarn_ZeroOriginalContext", "deepseek_v2_fp32_qlora_grouped_yarn",
      {{"rope_parameters.original_max_position_embeddings", 0}}, {"'rope_parameters.original_max_position_embeddings'"});
  // InternLM's own rope block: honoured (arch suite), or refused naming it.
  row("InternLMRotary_UnknownType", "internlm_fp32_rotary_dynamic", {{"rotary.type", "ntk-by-parts"}},
      {"'rotary.type'", "ntk-by-parts"});
  row("InternLMRotary_ZeroScalingFactor", "internlm_fp32_rotary_dynamic", {{"rotary.scaling_factor", 0}},
      {"'rotary.scaling_factor'"});
  row("InternLMRotary_ZeroBase", "internlm_fp32_rotary_dynamic", {{"rotary.base", 0}}, {"'rotary.base'"});
  row("InternLMRotary_WithRopeScaling", "internlm_fp32_rotary_dynamic",
      {{"rope_scaling", json{{"type", "linear"}, {"factor", 2.0}}}}, {"'rotary'", "'rope_scaling'"});
  return rows;
}

/// A checkpoint directory of `base`'s weights (symlinked) with its config.json edited.
fs::path with_config_edits(const Fixture& base, const fs::path& dir,
                           const std::vector<std::pair<std::string, json>>& edits) {
  fs::create_directories(dir);
  for (const auto& entry : fs::directory_iterator(base.dir))
    if (entry.path().filename() != "config.json")
      fs::create_symlink(fs::canonical(entry.path()), dir / entry.path().filename());
  json config = json::parse(read_bytes(fs::path(base.dir) / "config.json"));
  for (const auto& [key, value] : edits) {
    json* object = &config;
    std::string rest = key;
    for (size_t dot; (dot = rest.find('.')) != std::string::npos; rest = rest.substr(dot + 1))
      object = &(*object)[rest.substr(0, dot)];
    if (value.is_null())
      object->erase(rest);
    else
      (*object)[rest] = value;
  }
  write_bytes(dir / "config.json", config.dump());
  return dir;
}

/// The CLI gets SIGALRM past the deadline: a hang is a failing test, not a stuck suite.
void deadline() { alarm(kDeadlineSeconds); }

/// ctest lists a row by its name, not its bytes.
void PrintTo(const BadConfig& row, std::ostream* os) { *os << row.name; }

class BadConfigValue : public ::testing::TestWithParam<BadConfig> {};

TEST_P(BadConfigValue, IsExit3OneShortLineNamingTheKey) {
  const BadConfig& bad = GetParam();
  TempDir tmp;
  const fs::path model = with_config_edits(fixture(bad.fixture), tmp / "model", bad.edits);
  const auto start = std::chrono::steady_clock::now();
  const CliResult r = run_cli({"load", "--model", model.string(), "--plugin-dir", plugin_dir()}, {}, deadline);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  ASSERT_NE(r.code, 128 + SIGALRM) << "no answer within " << kDeadlineSeconds << " s";
  ASSERT_LT(r.code, 128) << "killed by signal " << r.code - 128 << ": " << r.err;
  expect_failure(r, 3, bad.fragments);
  EXPECT_NE(r.err.find((model / "config.json").string()), std::string::npos) << "the file is not named: " << r.err;
  EXPECT_LE(r.err.size(), kMaxMessageBytes) << r.err.substr(0, 300) << "...";
  EXPECT_LT(seconds, kDeadlineSeconds);
}

INSTANTIATE_TEST_SUITE_P(Plugins, BadConfigValue, ::testing::ValuesIn(bad_configs()),
                         [](const auto& info) { return info.param.name; });

// A config that asks for far more layers than the checkpoint holds builds them (each fits) and
// then misses thousands of weights: the message lists the first ones and how many more.
TEST(BadConfigValue, ThousandLayersOverATwoLayerCheckpointListsTwentyAndCountsTheRest) {
  TempDir tmp;
  const fs::path model = with_config_edits(fixture("qwen3_fp32_gqa"), tmp / "model", {{"num_hidden_layers", 1000}});
  const CliResult r = run_cli({"load", "--model", model.string(), "--plugin-dir", plugin_dir()}, {}, deadline);
  ASSERT_LT(r.code, 128) << r.err;
  // Per layer: qkv_proj, o_proj, q_norm, k_norm, gate_up_proj, down_proj, two norms; 998 layers missing.
  const int missing = 998 * 8, shown = 20;
  expect_failure(r, 3, {"Some weights are not initialized from checkpoints: ", "model.layers.10.",
                        ", ... and " + std::to_string(missing - shown) + " more"});
  EXPECT_LE(r.err.size(), kMaxMessageBytes) << r.err.size() << " bytes";
}

}  // namespace
}  // namespace loadkit::test
