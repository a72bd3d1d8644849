#include "formats/header_cache.h"

#include <cstring>
#include <list>
#include <mutex>
#include <string>

namespace loadkit::safetensors {

namespace {

struct Kept {
  std::string text;
  uint64_t data_len = 0;
  std::shared_ptr<const ValidatedHeader> header;
};

/// Most recently used first. A scan of at most kEntries lengths, then one memcmp of the text that
/// matches them: no hash of the whole text on the way.
struct Cache {
  std::mutex mutex;
  std::list<Kept> kept;
  size_t text_bytes = 0;
  uint64_t hits = 0;
};

Cache& cache() {
  static Cache* c = new Cache();  // never destroyed: files may be opened while the process exits
  return *c;
}

}  // namespace

std::shared_ptr<const ValidatedHeader> find_validated(std::string_view text, uint64_t data_len) {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  for (auto it = c.kept.begin(); it != c.kept.end(); ++it) {
    if (it->data_len != data_len || it->text.size() != text.size() ||
        std::memcmp(it->text.data(), text.data(), text.size()) != 0)
      continue;
    c.kept.splice(c.kept.begin(), c.kept, it);
    ++c.hits;
    return it->header;
  }
  return nullptr;
}

void keep_validated(std::string_view text, uint64_t data_len, std::shared_ptr<const ValidatedHeader> header) {
  if (text.size() > kTextBytes / 4) return;
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  for (const Kept& k : c.kept)  // validated twice at once (two threads): keep one
    if (k.data_len == data_len && k.text == text) return;
  c.kept.push_front(Kept{std::string(text), data_len, std::move(header)});
  c.text_bytes += text.size();
  while (c.kept.size() > kEntries || c.text_bytes > kTextBytes) {
    c.text_bytes -= c.kept.back().text.size();
    c.kept.pop_back();
  }
}

uint64_t validated_header_hits() {
  std::lock_guard<std::mutex> lock(cache().mutex);
  return cache().hits;
}

size_t validated_headers_kept() {
  std::lock_guard<std::mutex> lock(cache().mutex);
  return cache().kept.size();
}

}  // namespace loadkit::safetensors
