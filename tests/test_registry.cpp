// Plugin discovery and refusal: broken plugins are listed with their reason,
// never stop the others, and are an exit-4 error only when needed.

#include <dlfcn.h>
#include <gtest/gtest.h>

#include <ATen/ATen.h>

#include "loadkit/error.h"
#include "loadkit/runtime/engine.h"
#include "loadkit/runtime/registry.h"
#include "test_support.h"

namespace loadkit::test {
namespace {

const PluginInfo* find_plugin(const Registry& r, const std::string& file_name) {
  for (const auto& p : r.plugins())
    if (fs::path(p.path).filename() == file_name) return &p;
  return nullptr;
}

TEST(Registry, LlamaPluginDescribesItself) {
  Registry r({plugin_dir()});
  const auto* p = find_plugin(r, "llama.so");
  ASSERT_NE(p, nullptr);
  EXPECT_EQ(p->status, "ok");
  EXPECT_EQ(p->name, "llama");
  for (const char* arch : {"LlamaForCausalLM", "LLaMAForCausalLM", "MistralForCausalLM", "InternLMForCausalLM",
                           "AquilaModel", "AquilaForCausalLM"})
    EXPECT_TRUE(r.serves(arch)) << arch;
  EXPECT_EQ(p->abi_version, 1u);
}

TEST(Registry, NonElfSharedObjectIsListedBrokenAndOthersStillLoad) {
  TempDir tmp;
  write_bytes(tmp / "aaa_text.so", std::string(200, '#') + " this is a text file, not an ELF shared object\n");
  Registry r({tmp.path().string(), plugin_dir()});
  const auto* broken = find_plugin(r, "aaa_text.so");
  ASSERT_NE(broken, nullptr);
  EXPECT_EQ(broken->status.rfind("broken: cannot open:", 0), 0u) << broken->status;
  EXPECT_NE(broken->status.find("invalid ELF header"), std::string::npos) << broken->status;
  EXPECT_TRUE(r.serves("LlamaForCausalLM"));
}

TEST(Registry, WrongAbiVersionIsRefusedNamingBothVersions) {
  Registry r({test_plugin_dir("bad_abi")});
  const auto* p = find_plugin(r, "bad_abi.so");
  ASSERT_NE(p, nullptr);
  EXPECT_EQ(p->status, "broken: Wrong ABI version on plugin 'bad_abi.so'. Got 2, supported 1.");
}

TEST(Registry, WrongTorchVersionIsRefusedNamingBothVersions) {
  Registry r({test_plugin_dir("wrong_torch")});
  const auto* p = find_plugin(r, "wrong_torch.so");
  ASSERT_NE(p, nullptr);
  EXPECT_NE(p->status.find("Wrong torch version on plugin 'wrong_torch.so'. Got 1.13.1, host has 2.11"),
            std::string::npos) << p->status;
}

TEST(Registry, LibraryWithoutEntrySymbolIsBroken) {
  Registry r({test_plugin_dir("no_entry")});
  const auto* p = find_plugin(r, "no_entry.so");
  ASSERT_NE(p, nullptr);
  EXPECT_NE(p->status.find("no entry symbol 'loadkit_plugin_v1'"), std::string::npos) << p->status;
}

TEST(Registry, ThrowingRegistrationBecomesAnErrorValue) {
  Registry r({test_plugin_dir("throwing")});
  const auto* p = find_plugin(r, "throwing.so");
  ASSERT_NE(p, nullptr);
  EXPECT_EQ(p->status, "broken: registration failed: cannot register: config table corrupt");
  EXPECT_FALSE(r.serves("ThrowingForCausalLM"));
}

TEST(Registry, FirstPluginInSearchOrderWinsAndTheOtherIsShadowed) {
  Registry r({test_plugin_dir("dup_llama"), plugin_dir()});
  const auto* llama = find_plugin(r, "llama.so");
  ASSERT_NE(llama, nullptr);
  EXPECT_EQ(llama->status, "shadowed by " + test_plugin_dir("dup_llama") + "/dup_llama.so");
  EXPECT_EQ(r.provider("LlamaForCausalLM").name, "dup_llama");
  EXPECT_EQ(r.provider("MistralForCausalLM").name, "llama");  // not shadowed: still served
}

TEST(Registry, SearchPathIsExplicitThenEnvironmentThenDefault) {
  setenv("LOADKIT_PLUGIN_PATH", "/env/a:/env/b", 1);
  auto dirs = Registry::search_path({"/explicit"});
  unsetenv("LOADKIT_PLUGIN_PATH");
  ASSERT_EQ(dirs.size(), 4u);
  EXPECT_EQ(dirs[0], "/explicit");
  EXPECT_EQ(dirs[1], "/env/a");
  EXPECT_EQ(dirs[2], "/env/b");
  // Next to libloadkit_runtime.so (build/lib), wherever the executable is.
  EXPECT_EQ(fs::weakly_canonical(dirs[3]), fs::weakly_canonical(plugin_dir()));
}

TEST(Registry, ModelKeepsItsPluginLoadedAfterTheRegistryIsGone) {
  std::unique_ptr<LoadedModel> model;
  const auto& f = fixture("llama_fp32_gqa_sharded");
  {
    Registry r({plugin_dir()});
    LoadOptions options;
    options.model_dir = f.dir;
    model = LoadedModel::load(options, r);
  }
  const std::string so = plugin_dir() + "/llama.so";
  void* handle = dlopen(so.c_str(), RTLD_NOW | RTLD_NOLOAD);
  EXPECT_NE(handle, nullptr) << "plugin unloaded under a live model";
  if (handle) dlclose(handle);
  EXPECT_EQ(model->logits(f.tokens).size(0), static_cast<int64_t>(f.tokens.size()));
}

TEST(Registry, NoPluginForArchitectureIsExit4NamingItAndTheSearch) {
  Registry r({test_plugin_dir("bad_abi")});
  try {
    r.provider("LlamaForCausalLM");
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::Plugin);
    std::string msg = e.what();
    EXPECT_NE(msg.find("'LlamaForCausalLM'"), std::string::npos) << msg;
    EXPECT_NE(msg.find("bad_abi.so is broken: Wrong ABI version"), std::string::npos) << msg;
  }
}

}  // namespace
}  // namespace loadkit::test
