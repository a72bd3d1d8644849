#include "sync/sync_protocol.h"

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>
#include <optional>

#include "loadkit/error.h"
#include "loadkit/module.h"
#include "loadkit/runtime/distributed.h"
#include "loadkit/runtime/engine.h"
#include "tensor_io.h"

namespace loadkit::sync {

namespace {

constexpr int kManifestVersion = 1;

}  // namespace

uint64_t ManifestEntry::bytes() const {
  uint64_t n = c10::elementSize(dtype);
  for (int64_t d : shape) n *= static_cast<uint64_t>(d);
  return n;
}

std::string describe(const ManifestEntry& entry) {
  return cat("'", entry.name, "' ", shape_str(entry.shape), " ", c10::toString(entry.dtype));
}

std::string encode(const std::vector<ManifestEntry>& entries, uint64_t bucket_bytes) {
  nlohmann::json tensors = nlohmann::json::array();
  for (const auto& e : entries)
    tensors.push_back({{"name", e.name},
                       {"dtype", safetensors::dtype_name(to_safetensors_dtype(e.dtype))},
                       {"shape", e.shape},
                       {"offset", e.offset}});
  return nlohmann::json{{"version", kManifestVersion}, {"bucket_bytes", bucket_bytes}, {"tensors", tensors}}.dump();
}

std::vector<ManifestEntry> decode(const std::string& text, const std::string& origin, uint64_t* bucket_bytes) {
  std::vector<ManifestEntry> entries;
  try {
    const auto j = nlohmann::json::parse(text);
    if (j.at("version").get<int>() != kManifestVersion)
      fail(ErrorKind::Input, origin, ": manifest version ", j.at("version").dump(), ", this build reads ",
           kManifestVersion);
    if (bucket_bytes) *bucket_bytes = j.at("bucket_bytes").get<uint64_t>();
    for (const auto& t : j.at("tensors")) {
      ManifestEntry e;
      e.name = t.at("name").get<std::string>();
      const std::string dtype = t.at("dtype").get<std::string>();
      const auto parsed = safetensors::parse_dtype(dtype);
      if (!parsed) fail(ErrorKind::Input, origin, ": tensor '", e.name, "' has unknown dtype '", dtype, "'");
      e.dtype = to_scalar_type(*parsed);
      e.shape = t.at("shape").get<std::vector<int64_t>>();
      for (int64_t d : e.shape)
        if (d < 0) fail(ErrorKind::Input, origin, ": tensor '", e.name, "' has a negative dimension");
      e.offset = t.at("offset").get<uint64_t>();
      entries.push_back(std::move(e));
    }
  } catch (const nlohmann::json::exception& e) {
    fail(ErrorKind::Input, origin, ": malformed manifest: ", e.what());
  }
  return entries;
}

std::vector<NamedWeight> meta_weights(const std::vector<ManifestEntry>& entries, const std::string& origin) {
  std::vector<NamedWeight> out;
  out.reserve(entries.size());
  for (const auto& e : entries)
    out.push_back({e.name, at::empty(e.shape, at::TensorOptions().dtype(e.dtype).device(at::kMeta)), origin});
  return out;
}

std::vector<std::string> agree(ProcessGroup& group, const std::function<std::string()>& step,
                               const std::function<std::string(int)>& who) {
  std::string verdict;
  std::optional<Error> own;
  try {
    verdict = "ok\n" + step();
  } catch (const Error& e) {
    own.emplace(e.kind(), failure_message(e));
  } catch (const std::exception& e) {
    own.emplace(ErrorKind::Other, failure_message(e));
  }
  if (own) verdict = cat("fail\n", exit_code(own->kind()), "\n", own->what());
  auto failed = [](const std::string& v) { return v.rfind("fail\n", 0) == 0; };
  std::vector<std::string> all;
  try {
    all = group.exchange(verdict, failed);
  } catch (const Error&) {
    if (own) throw Error(own->kind(), who(group.rank()) + own->what());  // ours says more than "store gone"
    throw;
  }
  for (int r = 0; r < static_cast<int>(all.size()); ++r) {
    if (!failed(all[r])) continue;
    const size_t nl = all[r].find('\n', 5);
    throw Error(error_kind(std::atoi(all[r].substr(5, nl - 5).c_str())), who(r) + all[r].substr(nl + 1));
  }
  for (auto& v : all) v.erase(0, 3);  // "ok\n"
  return all;
}

void commit_everywhere(LoadedModel& model, ProcessGroup& group, const std::optional<Error>& failure,
                       const std::function<std::string(int)>& who) {
  try {
    agree(
        group,
        [&] {
          if (failure) throw *failure;
          model.finish_update();
          return std::string();
        },
        who);
  } catch (...) {
    model.rollback_update();
    throw;
  }
  model.commit_update();
}

}  // namespace loadkit::sync
