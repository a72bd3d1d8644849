#pragma once
/// \file
/// Test helpers that need libtorch and the runtime: loading a fixture, its
/// transformers reference, kernel-state snapshots and the DESIGN tolerances.

#include <ATen/core/Tensor.h>

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "test_support.h"

namespace loadkit {
class LoadedModel;
class RankGroup;
class Registry;
}  // namespace loadkit

namespace loadkit::test {

/// One registry over the build tree's plugin directory, shared by a test binary.
Registry& build_registry();

/// Loads `dir` through the C++ API (as tensor-parallel rank `tp_rank` of `tp_size`: its shard,
/// no process group).
std::unique_ptr<LoadedModel> load_model(const std::string& dir, const std::string& device = "cpu",
                                        const std::string& quant = "auto", const std::string& dtype = "auto",
                                        const std::string& format = "auto", int tp_size = 1, int tp_rank = 0);

/// Joins rank `rank` of `world` ranks that are threads of this process (a store on the loopback at
/// `port`, hosted by rank 0) on `device`.
std::unique_ptr<RankGroup> join_local_rank(int rank, int world, int port, const std::string& device = "cpu");

/// transformers' float32 logits stored with the fixture.
at::Tensor reference_logits(const Fixture& f);

/// DESIGN's tolerances: float32 max abs diff ≤ 1e-4; 16-bit cosine ≥ 0.999 per row and argmax agreement.
void expect_close(const at::Tensor& ours, const at::Tensor& ref, const std::string& dtype);

/// Every kernel tensor (parameters and buffers), cloned, by dotted name.
std::map<std::string, at::Tensor> kernel_state(LoadedModel& m);

/// Same names, dtypes, shapes and bytes.
void expect_identical(const std::map<std::string, at::Tensor>& a, const std::map<std::string, at::Tensor>& b);
/// The same comparison as a value (for "this differs" checks).
bool identical(const std::map<std::string, at::Tensor>& a, const std::map<std::string, at::Tensor>& b);

/// The module (layer) a dotted tensor name belongs to: all but its last component.
std::string module_of(const std::string& name);
/// What a failed reload's report claims (`written`, its written_modules) against the model itself:
/// every layer not listed kept its `before` tensors bit for bit, and every listed one holds
/// something new; with `expected` (a fresh load of what the reload read), every byte of a listed
/// layer's tensors is its `before` byte or its `expected` one (a plain layer is written as its
/// checkpoint tensors arrive, so a cut may fall between its weight and its scale, or between two
/// experts of a stacked tensor).
void expect_written_as_reported(const std::map<std::string, at::Tensor>& before,
                                const std::map<std::string, at::Tensor>& after, const std::vector<std::string>& written,
                                const std::map<std::string, at::Tensor>* expected = nullptr);

/// Every tensor of a checkpoint directory (all its safetensors files), by name.
std::map<std::string, at::Tensor> read_checkpoint(const fs::path& dir);

/// A bigger Llama checkpoint written here (random bf16, HF names, 16 heads, 4 kv heads, vocab
/// 4000), tensors shuffled over 3 files with an index.
void write_llama_checkpoint(const fs::path& dir, int seed, int layers, int64_t hidden, int64_t inter);

/// Random bf16 tensors of these names and shapes (values ~ N(0, 0.05²), seeded), shuffled over
/// `files` files with an index; the caller writes config.json.
void write_random_checkpoint(const fs::path& dir, std::vector<std::pair<std::string, std::vector<int64_t>>> shapes,
                             int seed, int files);

/// Another checkpoint of `f`'s shapes and config: every tensor t becomes t / 2 + noise (seeded),
/// in one file. What a trainer's next step looks like.
fs::path write_next_step(const Fixture& f, const fs::path& dir, int seed);

/// `f`'s logits through the CLI (`loadkit logits` with `extra` arguments) written to `out`;
/// a failed run fails the test and gives an undefined tensor.
at::Tensor fixture_cli_logits(const Fixture& f, const fs::path& out, std::vector<std::string> extra = {});

/// `f`'s logits on two ranks (Gloo, through the CLI) equal transformers' and one rank's.
void expect_two_ranks_match_one_and_transformers(const Fixture& f);

/// The message of the loadkit::Error `f` throws (fails the test when it throws none).
std::string error_of(const std::function<void()>& f);

/// Every parameter's storage address by name (a reload or update in place must keep them).
std::map<std::string, const void*> parameter_addresses(LoadedModel& m);

/// A copy of fixture `f` at `dest` whose file holding `tensor` is rewritten by `edit` (its tensors
/// by name; erase one to drop it, and the index then drops it too).
fs::path edited_fixture(const Fixture& f, const fs::path& dest, const std::string& tensor,
                        const std::function<void(std::map<std::string, at::Tensor>&)>& edit);

}  // namespace loadkit::test
