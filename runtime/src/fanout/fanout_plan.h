#pragma once
/// \file
/// Who reads which tensor when a tensor-parallel group reads a checkpoint
/// once and fans it out (fanout_stream.h), computed alike on every rank from
/// what every rank has: the tensors in delivery order and the group's size.
///
/// The delivery order is cut into rounds of at most `round_bytes` of tensor
/// data (a larger tensor is a round of its own). Inside a round, tensors go,
/// largest first (equal sizes by name), each to the rank that has read the
/// fewest bytes so far counting every earlier round (ties: the lowest rank).
/// That greedy rule keeps every rank's total within the largest tensor of the
/// average, and every round's reading spread over the ranks.
///
/// A round's buffer holds one segment per rank that reads something in it, in
/// rank order; a segment starts with kStatusBytes of status (its owner says
/// there whether its reads succeeded, so that a failed read stops every rank
/// at the same collective) followed by the owner's tensors in delivery order,
/// each at a multiple of kAlign (the bytes view as any dtype).

#include <cstdint>
#include <string>
#include <vector>

namespace loadkit::fanout {

constexpr uint64_t kAlign = 64;
constexpr uint64_t kStatusBytes = kAlign;

struct Item {
  std::string name;
  uint64_t bytes = 0;
};

struct Placement {
  size_t item = 0;      ///< index into the delivery order
  int owner = 0;        ///< the rank that reads it from storage
  uint64_t offset = 0;  ///< where its bytes lie in the round's buffer
};

struct Round {
  std::vector<Placement> placements;   ///< in delivery order
  std::vector<uint64_t> segment_begin;  ///< per rank: its segment's offset in the buffer
  std::vector<uint64_t> segment_bytes;  ///< per rank: status + data bytes; 0 when it reads nothing
  uint64_t bytes = 0;                   ///< the whole buffer
};

struct Plan {
  std::vector<Round> rounds;
  std::vector<uint64_t> read_bytes;  ///< per rank: tensor bytes it reads over all rounds
};

/// The plan for `order` (every tensor once, in the order the consumer gets them) over `ranks` ranks.
Plan make_plan(const std::vector<Item>& order, int ranks, uint64_t round_bytes);

/// A short text that differs when two ranks' tensors (names, sizes, order) or group sizes differ
/// (compared before any transfer; the round size is agreed apart).
std::string fingerprint(const std::vector<Item>& order, int ranks);

}  // namespace loadkit::fanout
