// The staging pool's host memory (runtime/src/staging/pinned_pool.h): 2 MiB-aligned mappings advised
// MADV_HUGEPAGE before their first touch where transparent huge pages are on, the same mapping in
// small pages where they are not; every byte zero and writable either way. The pinned pool itself
// (registration, reuse) needs CUDA and skips here.

#include <ATen/Context.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "staging/pinned_pool.h"

namespace loadkit::test {
namespace {

constexpr size_t kHuge = size_t{2} << 20;

/// Kilobytes of AnonHugePages /proc/self/smaps shows for the mapping that starts at `data`.
long anon_huge_kb(const void* data) {
  std::ifstream smaps("/proc/self/smaps");
  std::ostringstream start;
  start << std::hex << reinterpret_cast<uintptr_t>(data) << "-";
  std::string line;
  bool inside = false;
  while (std::getline(smaps, line)) {
    if (line.find('-') != std::string::npos && line.find(' ') > line.find('-') && std::isxdigit(line[0]))
      inside = line.rfind(start.str(), 0) == 0;
    if (inside && line.rfind("AnonHugePages:", 0) == 0) return std::stol(line.substr(14));
  }
  return -1;
}

void expect_usable(const StagingMapping& m, size_t bytes) {
  ASSERT_NE(m.data, nullptr);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(m.data) % kHuge, 0u);
  EXPECT_EQ(m.bytes, bytes);
  EXPECT_GE(m.mapped, bytes);
  EXPECT_EQ(m.mapped % kHuge, 0u);
  const auto* p = static_cast<const unsigned char*>(m.data);
  std::vector<unsigned char> zeros(1 << 16, 0);
  for (size_t off = 0; off < bytes; off += zeros.size())
    ASSERT_EQ(std::memcmp(p + off, zeros.data(), std::min(zeros.size(), bytes - off)), 0) << "at " << off;
  auto* w = static_cast<unsigned char*>(m.data);
  for (size_t i = 0; i < bytes; ++i) w[i] = static_cast<unsigned char>(i * 131 + 7);
  for (size_t i = 0; i < bytes; i += 4099) ASSERT_EQ(w[i], static_cast<unsigned char>(i * 131 + 7)) << i;
}

TEST(StagingMemory, AdvisedMappingIsAlignedZeroAndWritable) {
  const size_t bytes = 5 * kHuge + 12345;  // not a whole number of huge pages
  const StagingMapping m = map_staging_memory(bytes, /*advise_huge=*/true);
  expect_usable(m, bytes);
  // madvise(MADV_HUGEPAGE) is refused only by kernels without THP; where the setting allows
  // huge pages it is accepted. Whether the kernel found free huge pages is its business: shown.
  if (transparent_huge_pages_on()) {
    EXPECT_TRUE(m.huge_advised);
  }
  std::cout << "[ MEASURE  ] THP " << (transparent_huge_pages_on() ? "on" : "off") << ", advice "
            << (m.huge_advised ? "accepted" : "refused") << ", AnonHugePages " << anon_huge_kb(m.data) << " kB of "
            << m.mapped / 1024 << " kB" << std::endl;
  unmap_staging_memory(m);
}

TEST(StagingMemory, WithoutHugePagesTheSameMappingInSmallPages) {
  // What the pool does where transparent huge pages are off: no advice, the same alignment.
  const size_t bytes = 3 * kHuge - 1;
  const StagingMapping m = map_staging_memory(bytes, /*advise_huge=*/false);
  EXPECT_FALSE(m.huge_advised);
  expect_usable(m, bytes);
  unmap_staging_memory(m);
}

TEST(StagingMemory, SmallBuffersAndManyOfThemDoNotOverlap) {
  std::vector<StagingMapping> maps;
  for (size_t bytes : {size_t{1}, size_t{4096}, kHuge, kHuge + 1}) maps.push_back(map_staging_memory(bytes, true));
  for (size_t i = 0; i < maps.size(); ++i) {
    expect_usable(maps[i], maps[i].bytes);
    for (size_t j = 0; j < i; ++j) {
      const auto a = reinterpret_cast<uintptr_t>(maps[i].data), b = reinterpret_cast<uintptr_t>(maps[j].data);
      EXPECT_TRUE(a + maps[i].mapped <= b || b + maps[j].mapped <= a) << i << " overlaps " << j;
    }
  }
  for (const auto& m : maps) unmap_staging_memory(m);
}

TEST(PinnedPool, BuffersAreAlignedWritableAndReused) {
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device here; runs on the GPU machine (device tool)";
  const size_t bytes = 3 * kHuge + 4096;
  void* first = nullptr;
  {
    PinnedBuffer b = acquire_pinned(bytes);
    ASSERT_TRUE(b);
    EXPECT_EQ(b.size(), bytes);
    EXPECT_EQ(reinterpret_cast<uintptr_t>(b.data()) % kHuge, 0u);
    std::memset(b.data(), 0x5a, bytes);
    first = b.data();
  }
  PinnedBuffer again = acquire_pinned(bytes);  // back from the pool: nothing pinned anew
  EXPECT_EQ(again.data(), first);
  EXPECT_EQ(static_cast<unsigned char*>(again.data())[bytes - 1], 0x5a);
}

}  // namespace
}  // namespace loadkit::test
