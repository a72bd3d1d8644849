#include "fanout/fanout_plan.h"

#include <algorithm>
#include <numeric>

#include "loadkit/error.h"

namespace loadkit::fanout {

namespace {

uint64_t align_up(uint64_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

/// One round: owners chosen by the greedy rule (header comment), then the buffer laid out.
Round place(const std::vector<Item>& order, size_t first, size_t end, std::vector<uint64_t>& load) {
  const int ranks = static_cast<int>(load.size());
  std::vector<size_t> by_size(end - first);
  std::iota(by_size.begin(), by_size.end(), first);
  std::sort(by_size.begin(), by_size.end(), [&](size_t a, size_t b) {
    if (order[a].bytes != order[b].bytes) return order[a].bytes > order[b].bytes;
    return order[a].name < order[b].name;
  });
  std::vector<int> owner(end - first);
  for (size_t i : by_size) {
    const int r = static_cast<int>(std::min_element(load.begin(), load.end()) - load.begin());
    owner[i - first] = r;
    load[r] += order[i].bytes;
  }

  Round round;
  round.segment_begin.assign(ranks, 0);
  round.segment_bytes.assign(ranks, 0);
  std::vector<uint64_t> next(ranks, 0);  // per rank: bytes of its segment so far
  round.placements.resize(end - first);
  for (size_t i = first; i < end; ++i) {
    const int r = owner[i - first];
    if (next[r] == 0) next[r] = kStatusBytes;
    round.placements[i - first] = {i, r, next[r]};  // relative to the segment until laid out below
    next[r] = align_up(next[r] + order[i].bytes);
  }
  for (int r = 0; r < ranks; ++r) {
    round.segment_begin[r] = round.bytes;
    round.segment_bytes[r] = next[r];
    round.bytes += next[r];
  }
  for (auto& p : round.placements) p.offset += round.segment_begin[p.owner];
  return round;
}

}  // namespace

Plan make_plan(const std::vector<Item>& order, int ranks, uint64_t round_bytes) {
  if (ranks < 1) fail(ErrorKind::Other, "fan-out plan over ", ranks, " ranks");
  Plan plan;
  plan.read_bytes.assign(ranks, 0);
  size_t first = 0;
  while (first < order.size()) {
    size_t end = first;
    uint64_t bytes = 0;
    // At least one tensor a round, however large; then as many as fit.
    while (end < order.size() && (end == first || bytes + order[end].bytes <= round_bytes)) bytes += order[end++].bytes;
    plan.rounds.push_back(place(order, first, end, plan.read_bytes));
    first = end;
  }
  return plan;
}

std::string fingerprint(const std::vector<Item>& order, int ranks) {
  // FNV-1a over the names and sizes: equal inputs give equal text on every rank.
  uint64_t h = 1469598103934665603ull;
  auto mix = [&](const void* data, size_t n) {
    for (size_t i = 0; i < n; ++i) h = (h ^ static_cast<const unsigned char*>(data)[i]) * 1099511628211ull;
  };
  for (const auto& item : order) {
    mix(item.name.data(), item.name.size() + 1);  // with its terminator: "ab","c" differs from "a","bc"
    mix(&item.bytes, sizeof item.bytes);
  }
  return cat(order.size(), " tensors, ", ranks, " ranks, hash ", h);
}

}  // namespace loadkit::fanout
