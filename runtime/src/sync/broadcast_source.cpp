// The broadcast source (checkpoint-engine's idea): one sender streams
// buckets over c10d broadcast to receivers that apply them with their own
// tensor-parallel sharding. Three agreements through the store frame the
// transfer: the manifest, every receiver's verdict on it, and every
// receiver's outcome; a failure anywhere rolls every receiver back.

#include <ATen/ATen.h>

#include <array>
#include <chrono>
#include <optional>
#include <unordered_map>
#include <unordered_set>

#include "caller_tensor.h"
#include "loadkit/error.h"
#include "loadkit/runtime/distributed.h"
#include "loadkit/runtime/log.h"
#include "loadkit/runtime/weight_sync.h"
#include "sync/sync_protocol.h"

namespace loadkit {

namespace {

using Clock = std::chrono::steady_clock;

/// Tensor offsets are multiples of this, so that a bucket's bytes view as any dtype.
constexpr uint64_t kAlign = 64;

uint64_t align_up(uint64_t n, uint64_t to) { return (n + to - 1) / to * to; }

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

/// Where every tensor lies in the stream of buckets: a tensor that fits in a bucket never
/// straddles two (it moves to the next one); a larger one starts a bucket and spans several.
struct Layout {
  std::vector<sync::ManifestEntry> entries;
  uint64_t bucket_bytes = 0;
  uint64_t total = 0;
  int buckets = 0;

  Layout(std::vector<sync::ManifestEntry> e, uint64_t bucket) : entries(std::move(e)), bucket_bytes(bucket) {
    for (const auto& entry : entries) total = std::max(total, entry.offset + entry.bytes());
    buckets = static_cast<int>((total + bucket_bytes - 1) / bucket_bytes);
  }
  uint64_t begin(int k) const { return static_cast<uint64_t>(k) * bucket_bytes; }
  uint64_t size(int k) const { return std::min(total, begin(k + 1)) - begin(k); }
  /// Bucket of an entry's first (and last) byte; empty tensors go with bucket 0.
  int first(const sync::ManifestEntry& e) const { return e.bytes() ? static_cast<int>(e.offset / bucket_bytes) : 0; }
  int last(const sync::ManifestEntry& e) const {
    return e.bytes() ? static_cast<int>((e.offset + e.bytes() - 1) / bucket_bytes) : 0;
  }
};

Layout plan(const std::vector<NamedWeight>& weights, uint64_t bucket_bytes) {
  std::vector<sync::ManifestEntry> entries;
  std::unordered_set<std::string> names;
  uint64_t offset = 0;
  for (const auto& w : weights) {
    if (!names.insert(w.name).second) fail(ErrorKind::Input, "weight sync: tensor '", w.name, "' is given twice");
    require_plain_data(w.tensor, "weight sync", w.name);
    sync::ManifestEntry e{w.name, w.tensor.scalar_type(), w.tensor.sizes().vec(), 0};
    const uint64_t bytes = e.bytes();
    uint64_t start = align_up(offset, kAlign);
    const bool straddles = bytes && start / bucket_bytes != (start + bytes - 1) / bucket_bytes;
    if (bytes > bucket_bytes ? start % bucket_bytes != 0 : straddles) start = align_up(start, bucket_bytes);
    e.offset = start;
    offset = start + bytes;
    entries.push_back(std::move(e));
  }
  return Layout(std::move(entries), bucket_bytes);
}

/// A received layout that does not add up is refused before anything is written.
void check_layout(const Layout& layout, const std::string& origin) {
  if (layout.bucket_bytes == 0 || layout.bucket_bytes % kAlign != 0)
    fail(ErrorKind::Input, origin, ": bucket size ", layout.bucket_bytes, " is not a positive multiple of ", kAlign);
  for (const auto& e : layout.entries)
    if (e.offset % kAlign != 0) fail(ErrorKind::Input, origin, ": tensor '", e.name, "' starts at an unaligned offset");
}

/// The bytes of `t`, flat (a view of a contiguous tensor).
at::Tensor bytes_of(const at::Tensor& t) { return t.contiguous().reshape({-1}).view(at::kByte); }

/// Copies the part of every tensor that lies in bucket `k` into `bucket`.
void pack(const Layout& layout, const std::vector<NamedWeight>& weights, int k, at::Tensor& bucket) {
  const uint64_t lo = layout.begin(k), hi = lo + layout.size(k);
  for (size_t i = 0; i < weights.size(); ++i) {
    const auto& e = layout.entries[i];
    const uint64_t begin = std::max(lo, e.offset), end = std::min(hi, e.offset + e.bytes());
    if (begin >= end) continue;
    const auto n = static_cast<int64_t>(end - begin);
    bucket.narrow(0, static_cast<int64_t>(begin - lo), n)
        .copy_(bytes_of(weights[i].tensor).narrow(0, static_cast<int64_t>(begin - e.offset), n));
  }
}

std::string bucket_label(int k, int count) { return cat("bucket ", k + 1, " of ", count); }

std::function<std::string(int)> roles(const ProcessGroup& sync, int sender) {
  return [&sync, sender](int r) {
    return cat(r == sender ? "sender" : "receiver", " rank ", sync.global_rank(r), ": ");
  };
}

void check_sender(const ProcessGroup& sync, int sender) {
  if (sender < 0 || sender >= sync.size())
    fail(ErrorKind::Usage, "weight sync: sender rank ", sender, " is not a rank of process group '", sync.name(),
         "' (", sync.size(), " ranks)");
  if (sync.size() < 2) fail(ErrorKind::Usage, "weight sync: process group '", sync.name(), "' has no receiver");
}

/// Receiver-side application of the buckets: views of tensors inside a bucket go straight to the
/// model (borrowed: the buffer is reused two buckets later); tensors spanning buckets are
/// assembled in a tensor of their own first.
class Applier {
 public:
  Applier(LoadedModel& model, const Layout& layout, const c10::Device& device, std::string origin)
      : model_(model), layout_(layout), device_(device), origin_(std::move(origin)) {
    by_bucket_.resize(std::max(layout.buckets, 1));
    for (size_t i = 0; i < layout.entries.size(); ++i)
      for (int k = layout.first(layout.entries[i]); k <= layout.last(layout.entries[i]); ++k) by_bucket_[k].push_back(i);
  }

  void apply(int k, const at::Tensor& bucket) {
    const uint64_t lo = layout_.begin(k);
    std::vector<NamedWeight> views, assembled;
    for (size_t i : by_bucket_[k]) {
      const auto& e = layout_.entries[i];
      const auto opts = at::TensorOptions().dtype(e.dtype).device(device_);
      if (e.bytes() == 0) {
        views.push_back({e.name, at::empty(e.shape, opts), origin_});
        continue;
      }
      if (layout_.first(e) == layout_.last(e)) {
        at::Tensor v = bucket.narrow(0, static_cast<int64_t>(e.offset - lo), static_cast<int64_t>(e.bytes()));
        views.push_back({e.name, v.view(e.dtype).view(e.shape), origin_});
        continue;
      }
      at::Tensor& whole = spanning_[i];
      if (!whole.defined()) whole = at::empty(e.shape, opts);
      const uint64_t begin = std::max(lo, e.offset), end = std::min(lo + layout_.size(k), e.offset + e.bytes());
      bytes_of(whole)
          .narrow(0, static_cast<int64_t>(begin - e.offset), static_cast<int64_t>(end - begin))
          .copy_(bucket.narrow(0, static_cast<int64_t>(begin - lo), static_cast<int64_t>(end - begin)));
      if (layout_.last(e) == k) {
        assembled.push_back({e.name, whole, origin_});
        spanning_.erase(i);
      }
    }
    if (!views.empty()) model_.update(views, Borrowed::UntilReturn);
    if (!assembled.empty()) model_.update(assembled);  // our own tensors: nothing to clone
  }

 private:
  LoadedModel& model_;
  const Layout& layout_;
  c10::Device device_;
  std::string origin_;
  std::vector<std::vector<size_t>> by_bucket_;
  std::unordered_map<size_t, at::Tensor> spanning_;
};

at::Tensor byte_buffer(uint64_t bytes, const c10::Device& device) {
  return at::empty({static_cast<int64_t>(bytes)}, at::TensorOptions().dtype(at::kByte).device(device));
}

}  // namespace

BroadcastReport send_weights(ProcessGroup& sync, const std::vector<NamedWeight>& weights,
                             const BroadcastOptions& options) {
  const int sender = options.sender;
  check_sender(sync, sender);
  if (sync.rank() != sender)
    fail(ErrorKind::Usage, "weight sync: send_weights() on rank ", sync.global_rank(sync.rank()), ", the sender is rank ",
         sync.global_rank(sender));
  const auto who = roles(sync, sender);
  const auto start = Clock::now();
  BroadcastReport report;
  // 1. The manifest, through the store (a sender that cannot make one says so to everyone).
  std::optional<Layout> layout;
  sync::agree(
      sync,
      [&] {
        layout.emplace(plan(weights, align_up(std::max<uint64_t>(options.bucket_bytes, 1), kAlign)));
        return sync::encode(layout->entries, layout->bucket_bytes);
      },
      who);
  report.tensors = weights.size();
  report.buckets = layout->buckets;
  for (const auto& e : layout->entries) report.bytes += e.bytes();
  // 2. Every receiver's verdict on it.
  sync::agree(sync, [] { return std::string(); }, who);
  // 3. The buckets, double-buffered: bucket k is packed while bucket k-1 is in flight.
  std::optional<Error> failure;
  const auto transfer_start = Clock::now();
  try {
    std::array<at::Tensor, 2> buffers;
    std::array<ProcessGroup::Pending, 2> inflight;
    const int count = layout->buckets;
    for (int k = 0; k < count; ++k) {
      const int b = k % 2;
      inflight[b].wait();  // bucket k-2: its buffer is free again
      if (!buffers[b].defined()) buffers[b] = byte_buffer(std::min(layout->bucket_bytes, layout->total), sync.device());
      at::Tensor bucket = buffers[b].narrow(0, 0, static_cast<int64_t>(layout->size(k)));
      pack(*layout, weights, k, bucket);
      inflight[b] = sync.broadcast(bucket, sender, bucket_label(k, count));
      if (k > 0) {
        inflight[1 - b].wait();
        if (options.on_bucket) options.on_bucket(k - 1, count);
      }
    }
    if (count > 0) {
      inflight[(count - 1) % 2].wait();
      if (options.on_bucket) options.on_bucket(count - 1, count);
    }
  } catch (const std::exception& e) {
    failure.emplace(ErrorKind::Other, cat("weight sync: sending failed: ", failure_message(e)));
  }
  report.transfer_seconds = seconds_since(transfer_start);
  // 4. Every receiver's outcome (and ours): applied everywhere, or rolled back everywhere.
  sync::agree(
      sync,
      [&] {
        if (failure) throw *failure;
        return std::string();
      },
      who);
  report.seconds = seconds_since(start);
  log::info(cat("weight sync: sent ", report.tensors, " tensors (", report.bytes, " bytes) in ", report.buckets,
                " buckets, ", report.gb_per_s(), " GB/s"));
  return report;
}

const LoadReport& receive_weights(LoadedModel& model, ProcessGroup& sync, const BroadcastOptions& options) {
  const int sender = options.sender;
  check_sender(sync, sender);
  if (sync.rank() == sender)
    fail(ErrorKind::Usage, "weight sync: receive_weights() on the sender, rank ", sync.global_rank(sender));
  const auto who = roles(sync, sender);
  const std::string origin = cat("weight sync from sender rank ", sync.global_rank(sender));
  // 1. The manifest.
  const auto payloads = sync::agree(sync, [] { return std::string(); }, who);
  uint64_t bucket_bytes = 0;
  std::vector<sync::ManifestEntry> entries;
  // 2. Our verdict on it: the whole update through the model's loaders, on meta tensors.
  bool began = false;
  std::optional<Layout> layout;
  try {
    sync::agree(
        sync,
        [&] {
          entries = sync::decode(payloads[sender], origin, &bucket_bytes);
          layout.emplace(entries, bucket_bytes);
          check_layout(*layout, origin);
          model.begin_update(Rollback::Journal);
          began = true;
          model.validate_update(sync::meta_weights(entries, origin), options.complete);
          return std::string();
        },
        who);
  } catch (...) {
    if (began) model.rollback_update();
    throw;
  }
  // 3. The buckets: bucket k is applied while bucket k+1 is in transfer.
  std::optional<Error> failure;
  const int count = layout->buckets;
  {
    Applier applier(model, *layout, sync.device(), origin);
    std::array<at::Tensor, 2> buffers;
    std::array<ProcessGroup::Pending, 2> inflight;
    auto receive = [&](int k) {
      const int b = k % 2;
      if (!buffers[b].defined()) buffers[b] = byte_buffer(std::min(layout->bucket_bytes, layout->total), sync.device());
      at::Tensor bucket = buffers[b].narrow(0, 0, static_cast<int64_t>(layout->size(k)));
      inflight[b] = sync.broadcast(bucket, sender, bucket_label(k, count));
      return bucket;
    };
    std::array<at::Tensor, 2> buckets;
    int at = 0;  // the bucket in question, for the message
    bool receiving = true;
    try {
      if (count > 0) buckets[0] = receive(0);
      for (int k = 0; k < count; ++k) {
        at = k;
        receiving = true;
        inflight[k % 2].wait();
        if (k + 1 < count) {
          at = k + 1;
          buckets[(k + 1) % 2] = receive(k + 1);
        }
        at = k;
        receiving = false;
        applier.apply(k, buckets[k % 2]);
        if (options.on_bucket) options.on_bucket(k, count);
      }
      if (count == 0) applier.apply(0, at::Tensor());  // only empty tensors
    } catch (const std::exception& e) {
      failure.emplace(ErrorKind::Other, cat(bucket_label(at, count), " from sender rank ", sync.global_rank(sender),
                                            receiving ? " did not arrive: " : " could not be applied: ",
                                            failure_message(e)));
      for (auto& pending : inflight) {
        try {
          pending.wait();  // nothing may still write into our buffers
        } catch (const std::exception&) {
        }
      }
    }
  }
  // 4. Every receiver's outcome: all commit, or all roll back.
  try {
    sync::commit_everywhere(model, sync, failure, who);
  } catch (const Error& e) {
    fail(e.kind(), "weight sync failed, ", e.what(), "; receiver rank ", sync.global_rank(sync.rank()),
         " rolled back: its weights are as before the update");
  }
  return model.report();
}

}  // namespace loadkit
