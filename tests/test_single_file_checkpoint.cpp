// Model directories as users have them: next to `model.safetensors` an
// adapter (adapter_model.safetensors), the same weights in another layout
// (consolidated.safetensors) or a stray file. Without an index, transformers
// reads model.safetensors alone; so do inspect, load and reload --from, and
// the log says which files were left out. With an index, the index decides.
// Results are compared with the same command on the untouched fixture.

#include <gtest/gtest.h>

#include "test_support.h"

namespace loadkit::test {
namespace {

constexpr unsigned kDeadlineSeconds = 120;

/// A copy of the single-file Llama fixture with the files users leave beside it.
fs::path crowded_copy(const TempDir& tmp) {
  const fs::path m = copy_fixture(fixture("llama_bf16_mqa"), tmp / "crowded");
  // A LoRA adapter: names no Llama parameter has.
  RawSafetensors adapter;
  adapter.header = {{"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
                     {{"dtype", "F32"}, {"shape", {2, 2}}, {"data_offsets", {0, 16}}}}};
  adapter.data = std::string(16, '\0');
  adapter.write(m / "adapter_model.safetensors");
  // The same tensors again: read together with model.safetensors, each would be defined twice.
  fs::copy_file(m / "model.safetensors", m / "consolidated.safetensors");
  return m;
}

/// `logits` of the untouched fixture, as bytes of the file it writes; no file is reported ignored.
std::string untouched_logits(const TempDir& tmp) {
  const Fixture& f = fixture("llama_bf16_mqa");
  auto r = run_cli({"logits", "--model", f.dir, "--tokens", f.tokens_arg(), "--out", (tmp / "untouched.safetensors").string()},
                   {}, with_deadline(kDeadlineSeconds));
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(r.err.find("ignored"), std::string::npos) << r.err;
  return read_bytes(tmp / "untouched.safetensors");
}

const std::string kNote = "read model.safetensors alone (no model.safetensors.index.json), as transformers does; "
                          "ignored adapter_model.safetensors, consolidated.safetensors";

TEST(SingleFileCheckpoint, LoadReadsModelSafetensorsAloneAndLogsWhatItIgnored) {
  TempDir tmp;
  const fs::path m = crowded_copy(tmp);
  const Fixture& f = fixture("llama_bf16_mqa");
  auto crowded = run_cli({"logits", "--model", m.string(), "--tokens", f.tokens_arg(), "--out", (tmp / "a.safetensors").string()},
                         {}, with_deadline(kDeadlineSeconds));
  ASSERT_EQ(crowded.code, 0) << crowded.err;
  EXPECT_NE(crowded.err.find(m.string() + ": " + kNote), std::string::npos) << crowded.err;
  EXPECT_EQ(read_bytes(tmp / "a.safetensors"), untouched_logits(tmp));
}

TEST(SingleFileCheckpoint, InspectShowsTheTensorsLoadReadsAndTheIgnoredFiles) {
  TempDir tmp;
  const fs::path m = crowded_copy(tmp);
  auto crowded = run_cli({"inspect", "--json", "--model", m.string()}, {}, with_deadline(kDeadlineSeconds));
  ASSERT_EQ(crowded.code, 0) << crowded.err;
  auto plain = run_cli({"inspect", "--json", "--model", fixture("llama_bf16_mqa").dir}, {}, with_deadline(kDeadlineSeconds));
  ASSERT_EQ(plain.code, 0) << plain.err;
  const auto a = nlohmann::json::parse(crowded.out), b = nlohmann::json::parse(plain.out);
  EXPECT_EQ(a["tensor_list"], b["tensor_list"]);
  EXPECT_EQ(a["files"], 1);
  EXPECT_EQ(a["ignored_files"], nlohmann::json::array({"adapter_model.safetensors", "consolidated.safetensors"}));
  EXPECT_EQ(b["ignored_files"], nlohmann::json::array());
  auto text = run_cli({"inspect", "--model", m.string()}, {}, with_deadline(kDeadlineSeconds));
  EXPECT_NE(text.out.find("ignored:      adapter_model.safetensors, consolidated.safetensors"), std::string::npos)
      << text.out;
}

TEST(SingleFileCheckpoint, ReloadFromItReadsTheSameFile) {
  TempDir tmp;
  const fs::path m = crowded_copy(tmp);
  const Fixture& f = fixture("llama_bf16_mqa");
  auto reload = run_cli({"reload", "--model", f.dir, "--from", m.string(), "--tokens", f.tokens_arg(), "--out",
                         (tmp / "a.safetensors").string()},
                        {}, with_deadline(kDeadlineSeconds));
  ASSERT_EQ(reload.code, 0) << reload.err;
  EXPECT_NE(reload.err.find(m.string() + ": " + kNote), std::string::npos) << reload.err;
  EXPECT_EQ(read_bytes(tmp / "a.safetensors"), untouched_logits(tmp));
}

// With an index the index decides: a model.safetensors it does not name is not read (an empty
// one here, which would fail if it were), and nothing is reported as ignored.
TEST(SingleFileCheckpoint, WithAnIndexTheIndexDecides) {
  TempDir tmp;
  const fs::path m = copy_fixture(fixture("llama_fp32_gqa_b"), tmp / "indexed");
  write_bytes(m / "model.safetensors", "");
  auto r = run_cli({"load", "--model", m.string()}, {}, with_deadline(kDeadlineSeconds));
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(r.err.find("ignored"), std::string::npos) << r.err;
}

// Without model.safetensors and without an index, every *.safetensors is read, as before.
TEST(SingleFileCheckpoint, WithoutEitherEveryFileIsRead) {
  TempDir tmp;
  const fs::path m = copy_fixture(fixture("llama_fp32_gqa_b"), tmp / "unindexed");
  fs::remove(m / "model.safetensors.index.json");
  auto r = run_cli({"inspect", "--json", "--model", m.string()}, {}, with_deadline(kDeadlineSeconds));
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(nlohmann::json::parse(r.out)["files"], 3);
  EXPECT_EQ(run_cli({"load", "--model", m.string()}, {}, with_deadline(kDeadlineSeconds)).code, 0);
}

}  // namespace
}  // namespace loadkit::test
