#pragma once
/// \file
/// The checks every architecture passes, instantiated per family from
/// tests/archs/<family>.cpp:
///
///   LOADKIT_ARCH_FIXTURES(Qwen2, "qwen2_fp32_untied", "qwen2_bf16_tied")
///     logits equal transformers' (C++ API on cpu and cuda, CLI on cpu);
///     fp8 and int8 online quantization within the reload issue's cosine bounds.
///   LOADKIT_ARCH_LOGITS_FIXTURES(LlamaDynamicRope, "llama_fp32_dynamic_long")
///     logits only (a variant whose quantization another fixture covers).
///   LOADKIT_ARCH_RELOADS(Qwen2, "qwen2_bf16_tied")
///     reload into the fixture's `reload_target` (same shapes, other weights)
///     equals a fresh load of it, bit for bit, unquantized and fp8, cpu and cuda.
///
/// Every fixture of the manifest must be named by some LOADKIT_ARCH_FIXTURES
/// or be another fixture's reload target (ArchSuite.EveryFixtureIsCovered).

#include <gtest/gtest.h>

#include <set>
#include <string>
#include <tuple>
#include <vector>

namespace loadkit::test {

/// Fixture names the architecture files put under test (filled at static initialisation).
std::set<std::string>& covered_fixtures();
bool cover(std::initializer_list<const char*> names);

using ArchParam = std::tuple<std::string /*fixture*/, std::string /*device*/>;
using ArchQuantParam = std::tuple<std::string /*fixture*/, std::string /*quant*/, std::string /*device*/>;
class ArchLogits : public ::testing::TestWithParam<ArchParam> {};
class ArchQuantized : public ::testing::TestWithParam<ArchQuantParam> {};
class ArchReload : public ::testing::TestWithParam<ArchQuantParam> {};

std::string arch_param_name(const ::testing::TestParamInfo<ArchParam>& info);
std::string arch_quant_param_name(const ::testing::TestParamInfo<ArchQuantParam>& info);

}  // namespace loadkit::test

#define LOADKIT_ARCH_FIXTURES(Family, ...)                                                                     \
  [[maybe_unused]] static const bool loadkit_covered_##Family = ::loadkit::test::cover({__VA_ARGS__});         \
  INSTANTIATE_TEST_SUITE_P(Family, ArchLogits,                                                                 \
                           ::testing::Combine(::testing::Values(__VA_ARGS__), ::testing::Values("cpu", "cuda")), \
                           ::loadkit::test::arch_param_name);                                                  \
  INSTANTIATE_TEST_SUITE_P(Family, ArchQuantized,                                                              \
                           ::testing::Combine(::testing::Values(__VA_ARGS__), ::testing::Values("fp8", "int8"), \
                                              ::testing::Values("cpu", "cuda")),                               \
                           ::loadkit::test::arch_quant_param_name)

/// Fixtures whose quantization the family's others already cover (a config variant of one of
/// them, a rope setting): their logits against transformers only.
#define LOADKIT_ARCH_LOGITS_FIXTURES(Family, ...)                                                              \
  [[maybe_unused]] static const bool loadkit_covered_logits_##Family = ::loadkit::test::cover({__VA_ARGS__});  \
  INSTANTIATE_TEST_SUITE_P(Family, ArchLogits,                                                                 \
                           ::testing::Combine(::testing::Values(__VA_ARGS__), ::testing::Values("cpu", "cuda")), \
                           ::loadkit::test::arch_param_name)

/// Fixtures sized for tensor parallelism (test_tensor_parallel runs them over ranks):
/// their single-rank logits against transformers here, quantization left to the family's others.
#define LOADKIT_ARCH_TP_FIXTURES(Family, ...) LOADKIT_ARCH_LOGITS_FIXTURES(Family##Tp, __VA_ARGS__)

#define LOADKIT_ARCH_RELOADS(Family, ...)                                                                      \
  INSTANTIATE_TEST_SUITE_P(Family, ArchReload,                                                                 \
                           ::testing::Combine(::testing::Values(__VA_ARGS__), ::testing::Values("none", "fp8"), \
                                              ::testing::Values("cpu", "cuda")),                               \
                           ::loadkit::test::arch_quant_param_name)
