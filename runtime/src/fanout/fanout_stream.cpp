// The read-once stream: each round, every owner reads its share into the round's buffer (its
// segment), the segments are broadcast from their owners, and the round's tensors are handed out
// in delivery order as views of that buffer.

#include "fanout/fanout_stream.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <unordered_map>

#include "fanout/fanout_plan.h"
#include "loadkit/error.h"
#include "loadkit/runtime/distributed.h"
#include "loadkit/runtime/log.h"
#include "staging/staged_stream.h"  // default_window_bytes
#include "tensor_io.h"

namespace loadkit {

namespace {

/// LOADKIT_FANOUT_ROUND_KB, when set, overrides the round size (tests that want many rounds of a
/// small checkpoint; the bench).
uint64_t round_bytes(const StreamPlan& plan) {
  if (const char* kb = std::getenv("LOADKIT_FANOUT_ROUND_KB"); kb && *kb) {
    char* end = nullptr;
    const unsigned long long value = std::strtoull(kb, &end, 10);
    if (*end || value == 0)
      fail(ErrorKind::Usage, "environment variable LOADKIT_FANOUT_ROUND_KB='", kb, "' is not a positive integer");
    return value << 10;
  }
  return plan.window_bytes ? plan.window_bytes : default_window_bytes();
}

/// A segment's status word: what its owner wrote before the broadcast.
constexpr int64_t kReadOk = 1, kReadFailed = 2;

class FanoutStream final : public WeightStream {
 public:
  FanoutStream(const safetensors::CheckpointFiles& files, ProcessGroup& group, const StreamPlan& plan,
               FanoutStats* stats)
      : group_(group), stats_(stats) {
    std::unordered_map<std::string_view, Source> by_name;
    std::vector<fanout::Item> order;
    for (const auto& file : files.files)
      for (const auto& info : file->tensors()) {
        by_name.emplace(info.name, Source{file.get(), &info});
        if (plan.order.empty()) order.push_back({info.name, info.bytes()});
      }
    for (const auto& name : plan.order) {
      auto it = by_name.find(name);
      if (it == by_name.end()) fail(ErrorKind::Other, "fan-out stream: no tensor '", name, "' to order");
      order.push_back({name, it->second.info->bytes()});
    }
    if (order.size() != by_name.size())
      fail(ErrorKind::Other, "fan-out stream: an order of ", order.size(), " names for ", by_name.size(), " tensors");
    for (const auto& item : order) sources_.push_back(by_name.at(item.name));

    const uint64_t bound = agree_on_checkpoint(files, fanout::fingerprint(order, group_.size()), round_bytes(plan));
    plan_ = fanout::make_plan(order, group_.size(), bound);
    // No will_need() (read-ahead of whole files): each rank reads only its share, and on several
    // hosts a whole-file read-ahead on each would undo what the fan-out saves.
    log::debug(cat("fan-out over '", group_.name(), "': ", plan_.rounds.size(), " rounds; rank ", group_.rank(),
                   " reads ", plan_.read_bytes[group_.rank()], " of ", files.total_bytes, " bytes"));
  }

  bool next(NamedWeight& out) override {
    if (round_ < 0 || pos_ == plan_.rounds[round_].placements.size()) {
      out.tensor = at::Tensor();  // the previous round's tensors are consumed: free before the next
      buffer_ = at::Tensor();
      if (round_ + 1 == static_cast<int>(plan_.rounds.size())) return false;
      ++round_;
      pos_ = 0;
      transfer(plan_.rounds[round_]);
    }
    const fanout::Placement& p = plan_.rounds[round_].placements[pos_++];
    const Source& src = sources_[p.item];
    out.name = src.info->name;
    out.tensor = buffer_.narrow(0, static_cast<int64_t>(p.offset), static_cast<int64_t>(src.info->bytes()))
                     .view(to_scalar_type(src.info->dtype))
                     .view(src.info->shape);
    out.origin = src.file->path();
    return true;
  }

 private:
  struct Source {
    const safetensors::SafetensorsFile* file;
    const safetensors::TensorInfo* info;
  };

  /// Every rank sees the same checkpoint (names, sizes, order), or no transfer starts. Returns
  /// the round size: the smallest any rank asks for (a reload's window is its own shard's).
  uint64_t agree_on_checkpoint(const safetensors::CheckpointFiles& files, const std::string& mine, uint64_t bound) {
    const auto all = group_.exchange(cat(bound, " ", mine));
    for (int r = 0; r < group_.size(); ++r) {
      const size_t space = all[r].find(' ');
      const std::string theirs = space == std::string::npos ? all[r] : all[r].substr(space + 1);
      if (theirs != mine)
        fail(ErrorKind::Other, files.directory, ": the tensor-parallel ranks see different checkpoints there (rank ",
             group_.global_rank(group_.rank()), ": ", mine, "; rank ", group_.global_rank(r), ": ", theirs,
             "), so it cannot be read once for all of them (--no-fanout reads it on every rank)");
      bound = std::min<uint64_t>(bound, std::strtoull(all[r].c_str(), nullptr, 10));
    }
    return bound;
  }

  /// One round: this rank's share read into its segment, every segment broadcast from its owner,
  /// then every owner's status checked.
  void transfer(const fanout::Round& round) {
    const int me = group_.rank();
    const c10::Device device = group_.device();
    buffer_ = at::empty({static_cast<int64_t>(round.bytes)}, at::TensorOptions().dtype(at::kByte).device(device));
    std::string failure;  // "<exit code>\n<message>" when a read of this rank's failed
    if (const uint64_t mine = round.segment_bytes[me]) {
      at::Tensor segment = buffer_.narrow(0, static_cast<int64_t>(round.segment_begin[me]), static_cast<int64_t>(mine));
      at::Tensor host = segment;
      if (!device.is_cpu()) {
        if (!pinned_.defined() || pinned_.numel() < static_cast<int64_t>(mine))
          pinned_ = at::empty({static_cast<int64_t>(mine)}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
        host = pinned_.narrow(0, 0, static_cast<int64_t>(mine));
      }
      failure = read_share(round, host.data_ptr<uint8_t>());
      const int64_t status = failure.empty() ? kReadOk : kReadFailed;
      std::memcpy(host.data_ptr<uint8_t>(), &status, sizeof status);
      if (!host.is_same(segment)) segment.copy_(host);
    }
    std::vector<ProcessGroup::Pending> pending;
    for (int r = 0; r < group_.size(); ++r) {
      if (!round.segment_bytes[r]) continue;
      at::Tensor segment =
          buffer_.narrow(0, static_cast<int64_t>(round.segment_begin[r]), static_cast<int64_t>(round.segment_bytes[r]));
      pending.push_back(group_.broadcast(segment, r,
                                         cat("rank ", group_.global_rank(r), "'s share of fan-out round ", round_ + 1,
                                             " of ", plan_.rounds.size())));
    }
    for (auto& p : pending) p.wait();
    check_statuses(round, failure);
  }

  /// Reads this rank's tensors of `round` into its segment at `segment`; "" or "<exit code>\n<message>".
  std::string read_share(const fanout::Round& round, uint8_t* segment) {
    const int me = group_.rank();
    for (const auto& p : round.placements) {
      if (p.owner != me) continue;
      const Source& src = sources_[p.item];
      try {
        src.file->read(*src.info, segment + (p.offset - round.segment_begin[me]));
      } catch (const std::exception& e) {
        const auto* ours = dynamic_cast<const Error*>(&e);
        return cat(exit_code(ours ? ours->kind() : ErrorKind::Other), "\n", failure_message(e), " (tensor '",
                   src.info->name, "', which rank ", group_.global_rank(me), " reads for the tensor-parallel group)");
      }
      if (stats_) {
        stats_->bytes_read += src.info->bytes();
        ++stats_->tensors_read;
      }
    }
    return {};
  }

  /// After the broadcasts: any owner that failed stops every rank, with its message.
  void check_statuses(const fanout::Round& round, const std::string& mine) {
    bool any_failed = false;
    for (int r = 0; r < group_.size() && !any_failed; ++r) {
      if (!round.segment_bytes[r]) continue;
      const at::Tensor word = buffer_.narrow(0, static_cast<int64_t>(round.segment_begin[r]), sizeof(int64_t)).cpu();
      int64_t status = 0;
      std::memcpy(&status, word.data_ptr<uint8_t>(), sizeof status);
      any_failed = status != kReadOk;
    }
    if (!any_failed) return;
    buffer_ = at::Tensor();
    // Every rank saw the same statuses, so every rank makes this exchange (the members' exchanges stay in step).
    const auto said = group_.exchange(mine, [](const std::string& p) { return !p.empty(); });
    for (int r = 0; r < group_.size(); ++r) {
      if (said[r].empty()) continue;
      const size_t nl = said[r].find('\n');
      const ErrorKind kind = error_kind(std::atoi(said[r].substr(0, nl).c_str()));
      if (r == group_.rank()) fail(kind, said[r].substr(nl + 1));
      fail(kind, "rank ", group_.global_rank(r), ": ", said[r].substr(nl + 1));
    }
    fail(ErrorKind::Other, "fan-out round ", round_ + 1, ": a rank's read failed but its message did not arrive");
  }

  ProcessGroup& group_;
  FanoutStats* stats_;
  std::vector<Source> sources_;  // per item of the delivery order
  fanout::Plan plan_;
  int round_ = -1;
  size_t pos_ = 0;
  at::Tensor buffer_;  // the current round's
  at::Tensor pinned_;  // NCCL: this rank's share on the host, reused
};

}  // namespace

std::unique_ptr<WeightStream> fanout_stream(const safetensors::CheckpointFiles& files, ProcessGroup& group,
                                            const StreamPlan& plan, FanoutStats* stats) {
  return std::make_unique<FanoutStream>(files, group, plan, stats);
}

}  // namespace loadkit
