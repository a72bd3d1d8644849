#include "model_checks.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <random>
#include <set>

#include "loadkit/causal_lm.h"
#include "loadkit/error.h"
#include "loadkit/runtime/distributed.h"
#include "loadkit/runtime/engine.h"
#include "loadkit/runtime/registry.h"
#include "device.h"
#include "tensor_io.h"

namespace loadkit::test {

namespace {
// Tests compare logits computed in this process bit for bit (a reload against a fresh load):
// the same reproducible CPU math as the CLI sets up in its main, before any torch operation.
const bool kReproducibleCpuMath = (device::reproducible_cpu_math(), true);
}  // namespace

Registry& build_registry() {
  static Registry r({plugin_dir()});
  return r;
}

std::unique_ptr<RankGroup> join_local_rank(int rank, int world, int port, const std::string& device) {
  RankEnv env;
  env.rank = env.local_rank = rank;
  env.world_size = world;
  env.master_port = port;
  return RankGroup::join(env, device);
}

std::unique_ptr<LoadedModel> load_model(const std::string& dir, const std::string& device, const std::string& quant,
                                        const std::string& dtype, const std::string& format, int tp_size,
                                        int tp_rank) {
  LoadOptions o;
  o.model_dir = dir;
  o.tp_size = tp_size;
  o.tp_rank = tp_rank;
  o.device = device;
  o.quantization = quant;
  o.dtype = dtype;
  o.load_format = format;
  return LoadedModel::load(o, build_registry());
}

at::Tensor reference_logits(const Fixture& f) {
  for (auto& [name, t] : load_tensors(f.reference))
    if (name == "logits") return t;
  throw std::runtime_error("no logits in " + f.reference);
}

void expect_close(const at::Tensor& ours, const at::Tensor& ref, const std::string& dtype) {
  ASSERT_EQ(ours.sizes(), ref.sizes());
  ASSERT_EQ(ours.scalar_type(), at::kFloat);
  if (dtype == "float32") {
    EXPECT_LE((ours - ref).abs().max().item<double>(), 1e-4);
  } else {
    at::Tensor cos = at::cosine_similarity(ours, ref, 1);
    EXPECT_GE(cos.min().item<double>(), 0.999);
    EXPECT_TRUE(at::equal(ours.argmax(-1), ref.argmax(-1)));
  }
}

std::map<std::string, at::Tensor> kernel_state(LoadedModel& m) {
  std::map<std::string, at::Tensor> out;
  for (auto& [name, module] : m.model().named_modules()) {
    for (auto& [p, param] : module->parameters()) out[name.empty() ? p : name + "." + p] = param->data.clone();
    for (auto& [b, buf] : module->buffers()) out[name.empty() ? b : name + "." + b] = buf.clone();
  }
  return out;
}

bool identical(const std::map<std::string, at::Tensor>& a, const std::map<std::string, at::Tensor>& b) {
  if (a.size() != b.size()) return false;
  for (const auto& [name, t] : a) {
    auto it = b.find(name);
    if (it == b.end() || t.scalar_type() != it->second.scalar_type() || t.sizes() != it->second.sizes()) return false;
    if (!at::equal(t.contiguous().view(at::kByte), it->second.contiguous().view(at::kByte))) return false;
  }
  return true;
}

std::string module_of(const std::string& name) {
  const size_t dot = name.rfind('.');
  return dot == std::string::npos ? std::string() : name.substr(0, dot);
}

void expect_written_as_reported(const std::map<std::string, at::Tensor>& before,
                                const std::map<std::string, at::Tensor>& after, const std::vector<std::string>& written,
                                const std::map<std::string, at::Tensor>* expected) {
  auto same = [](const at::Tensor& a, const at::Tensor& b) {
    return a.sizes() == b.sizes() && a.scalar_type() == b.scalar_type() &&
           at::equal(a.cpu().view(at::kByte), b.cpu().view(at::kByte));
  };
  const std::set<std::string> listed(written.begin(), written.end());
  std::set<std::string> changed;
  ASSERT_EQ(before.size(), after.size());
  for (const auto& [name, t] : before) {
    const at::Tensor& now = after.at(name);
    const bool kept = same(now, t);
    if (!kept) changed.insert(module_of(name));
    if (!listed.count(module_of(name))) {
      EXPECT_TRUE(kept) << name << " changed, but its layer is not reported written";
    } else if (expected && !kept) {
      const at::Tensor bytes = now.cpu().contiguous().view(at::kByte), old = t.cpu().contiguous().view(at::kByte);
      const at::Tensor fresh = expected->at(name).cpu().contiguous().view(at::kByte);
      ASSERT_EQ(fresh.sizes(), bytes.sizes()) << name;
      EXPECT_TRUE(at::logical_or(bytes == old, bytes == fresh).all().item<bool>())
          << name << " holds bytes that are neither its previous ones nor the new ones";
    }
  }
  for (const auto& m : listed) EXPECT_TRUE(changed.count(m)) << "layer " << m << " is reported written but unchanged";
}

void expect_identical(const std::map<std::string, at::Tensor>& a, const std::map<std::string, at::Tensor>& b) {
  ASSERT_EQ(a.size(), b.size());
  for (const auto& [name, t] : a) {
    auto it = b.find(name);
    ASSERT_NE(it, b.end()) << name;
    ASSERT_EQ(t.scalar_type(), it->second.scalar_type()) << name;
    ASSERT_EQ(t.sizes(), it->second.sizes()) << name;
    // Bit-identical: compare the raw bytes (works for fp8, and for NaN).
    EXPECT_TRUE(at::equal(t.contiguous().view(at::kByte), it->second.contiguous().view(at::kByte))) << name;
  }
}

std::map<std::string, at::Tensor> read_checkpoint(const fs::path& dir) {
  std::map<std::string, at::Tensor> out;
  for (const auto& entry : fs::directory_iterator(dir))
    if (entry.path().extension() == ".safetensors")
      for (auto& [name, t] : load_tensors(entry.path().string())) out.emplace(name, t);
  return out;
}

void write_llama_checkpoint(const fs::path& dir, int seed, int layers, int64_t hidden, int64_t inter) {
  fs::create_directories(dir);
  const int64_t heads = 16, kv = 4, head_dim = hidden / heads, vocab = 4000;
  nlohmann::json cfg = {{"architectures", {"LlamaForCausalLM"}}, {"hidden_size", hidden}, {"intermediate_size", inter},
                        {"num_hidden_layers", layers}, {"num_attention_heads", heads}, {"num_key_value_heads", kv},
                        {"vocab_size", vocab}, {"rms_norm_eps", 1e-5}, {"torch_dtype", "bfloat16"},
                        {"tie_word_embeddings", false}, {"rope_theta", 10000.0}};
  write_bytes(dir / "config.json", cfg.dump());
  std::vector<std::pair<std::string, std::vector<int64_t>>> shapes = {
      {"model.embed_tokens.weight", {vocab, hidden}}, {"model.norm.weight", {hidden}}, {"lm_head.weight", {vocab, hidden}}};
  for (int l = 0; l < layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    shapes.push_back({p + "self_attn.q_proj.weight", {hidden, hidden}});
    shapes.push_back({p + "self_attn.k_proj.weight", {kv * head_dim, hidden}});
    shapes.push_back({p + "self_attn.v_proj.weight", {kv * head_dim, hidden}});
    shapes.push_back({p + "self_attn.o_proj.weight", {hidden, hidden}});
    shapes.push_back({p + "mlp.gate_proj.weight", {inter, hidden}});
    shapes.push_back({p + "mlp.up_proj.weight", {inter, hidden}});
    shapes.push_back({p + "mlp.down_proj.weight", {hidden, inter}});
    shapes.push_back({p + "input_layernorm.weight", {hidden}});
    shapes.push_back({p + "post_attention_layernorm.weight", {hidden}});
  }
  write_random_checkpoint(dir, std::move(shapes), seed, 3);
}

void write_random_checkpoint(const fs::path& dir, std::vector<std::pair<std::string, std::vector<int64_t>>> shapes,
                             int seed, int files) {
  std::shuffle(shapes.begin(), shapes.end(), std::mt19937(seed));
  at::manual_seed(seed);
  nlohmann::json weight_map;
  for (int f = 0; f < files; ++f) {
    std::vector<std::pair<std::string, at::Tensor>> part;
    const std::string file = "part-" + std::to_string(f) + ".safetensors";
    for (size_t i = f; i < shapes.size(); i += files) {
      part.emplace_back(shapes[i].first, (at::randn(shapes[i].second) * 0.05).to(at::kBFloat16));
      weight_map[shapes[i].first] = file;
    }
    save_tensors((dir / file).string(), part);
  }
  write_bytes(dir / "model.safetensors.index.json", nlohmann::json{{"weight_map", weight_map}}.dump());
}

fs::path write_next_step(const Fixture& f, const fs::path& dir, int seed) {
  fs::create_directories(dir);
  fs::copy_file(fs::canonical(fs::path(f.dir) / "config.json"), dir / "config.json");
  at::manual_seed(seed);
  std::vector<std::pair<std::string, at::Tensor>> next;
  for (auto& [name, t] : read_checkpoint(f.dir)) {
    at::Tensor x = t.to(at::kFloat);
    next.emplace_back(name, (x / 2 + 0.05 * at::randn_like(x)).to(t.scalar_type()));
  }
  save_tensors((dir / "model.safetensors").string(), next);
  return dir;
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  ADD_FAILURE() << "no error thrown";
  return "";
}

std::map<std::string, const void*> parameter_addresses(LoadedModel& m) {
  std::map<std::string, const void*> out;
  for (auto& [name, p] : m.model().named_parameters()) out[name] = p->data.data_ptr();
  return out;
}

fs::path edited_fixture(const Fixture& f, const fs::path& dest, const std::string& tensor,
                        const std::function<void(std::map<std::string, at::Tensor>&)>& edit) {
  fs::path dir = copy_fixture(f, dest);
  const fs::path file = file_holding(dir, tensor);
  std::map<std::string, at::Tensor> tensors;
  for (auto& [name, t] : load_tensors(file.string())) tensors[name] = t.clone();
  edit(tensors);
  fs::remove(file);
  save_tensors(file.string(), {tensors.begin(), tensors.end()});
  if (!tensors.count(tensor)) {  // the index must not promise it
    nlohmann::json index = nlohmann::json::parse(read_bytes(dir / "model.safetensors.index.json"));
    index["weight_map"].erase(tensor);
    write_bytes(dir / "model.safetensors.index.json", index.dump(2));
  }
  return dir;
}

at::Tensor fixture_cli_logits(const Fixture& f, const fs::path& out, std::vector<std::string> extra) {
  std::vector<std::string> args{"logits", "--model", f.dir, "--tokens", f.tokens_arg(), "--out", out.string(),
                                "--plugin-dir", plugin_dir(), "--log-level", "warn"};
  args.insert(args.end(), extra.begin(), extra.end());
  const CliResult r = run_cli(args);
  EXPECT_EQ(r.code, 0) << r.err;
  if (r.code != 0) return {};
  for (auto& [name, t] : load_tensors(out.string()))
    if (name == "logits") return t;
  return {};
}

void expect_two_ranks_match_one_and_transformers(const Fixture& f) {
  TempDir tmp;
  at::Tensor one = fixture_cli_logits(f, tmp / "tp1.safetensors");
  at::Tensor two = fixture_cli_logits(f, tmp / "tp2.safetensors", {"--tp-size", "2"});
  ASSERT_TRUE(one.defined() && two.defined());
  expect_close(two, reference_logits(f), f.dtype);
  expect_close(two, one, f.dtype);
}

}  // namespace loadkit::test
