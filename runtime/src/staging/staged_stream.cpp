#include "staging/staged_stream.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <sstream>
#include <string>
#include <unordered_map>

#include "loadkit/error.h"
#include "loadkit/runtime/log.h"
#include "tensor_io.h"

#if LOADKIT_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <fcntl.h>
#include <pthread.h>
#include <unistd.h>

#include <condition_variable>
#include <deque>
#include <thread>

#include "staging/pinned_pool.h"
#endif

namespace loadkit {

namespace {
/// A knob's value: `fallback` when unset; a Usage error unless an integer from 1 to `max` (so that
/// no setting makes a thread count, a ring or a shift out of range).
uint64_t env_number(const char* name, uint64_t fallback, uint64_t max) {
  const char* text = std::getenv(name);
  if (!text || !*text) return fallback;
  char* end = nullptr;
  errno = 0;
  const unsigned long long value = std::strtoull(text, &end, 10);
  // Digits only: strtoull would take leading blanks and a sign ("-18446744073709551615" is 1).
  if (!std::isdigit(static_cast<unsigned char>(text[0])) || *end != '\0' || errno != 0 || value == 0 || value > max)
    fail(ErrorKind::Usage, name, "='", printable(text), "' is not an integer from 1 to ", max);
  return value;
}
}  // namespace

uint64_t default_window_bytes() { return env_number("LOADKIT_STAGING_WINDOW_MB", 512, uint64_t{1} << 24) << 20; }

bool staging_enabled(const c10::Device& device) {
#if LOADKIT_CUDA
  const char* flag = std::getenv("LOADKIT_STAGING");
  return device.is_cuda() && !(flag && std::string(flag) == "0");
#else
  (void)device;
  return false;
#endif
}

namespace {
std::mutex last_profile_mutex;
std::optional<StagingProfile> last_profile;

void keep_profile(const StagingProfile& p) {
  std::lock_guard<std::mutex> lock(last_profile_mutex);
  last_profile = p;
}
}  // namespace

std::optional<StagingProfile> last_staging_profile() {
  std::lock_guard<std::mutex> lock(last_profile_mutex);
  return last_profile;
}

std::string StagingProfile::summary() const {
  std::ostringstream o;
  o.setf(std::ios::fixed);
  o.precision(1);
  o << "staging profile: " << tensors << " tensors, " << (staged_bytes >> 20) << " MiB staged, " << bypassed_tensors
    << " read whole on the host (" << (bypassed_bytes >> 20) << " MiB); window " << (window_bytes >> 20) << " MiB (bound "
    << (limit_bytes >> 20) << " MiB), " << readers << " readers; open " << open_ms << " ms, first tensor after "
    << first_tensor_ms << " ms; consumer waited " << consumer_wait_ms << " ms (" << consumer_waits
    << " waits), worked " << consumer_work_ms << " ms (" << consumer_work_after_reserved_ms
    << " after tensors of rebuilt modules; " << consumer_free_ms << " freeing tensors, " << consumer_event_ms
    << " queuing waits); readers (summed): pread " << read_ms << " ms, window waits "
    << window_wait_ms << " ms, ring waits " << ring_wait_ms << " ms, pinning " << pinning_ms << " ms";
  if (!longest_work.empty()) {
    o << "; longest consumer gaps:";
    for (const auto& [name, ms] : longest_work) o << " " << ms << " ms after '" << name << "'";
  }
  return o.str();
}

#if LOADKIT_CUDA

namespace {

using Clock = std::chrono::steady_clock;

double ms_between(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess) fail(ErrorKind::Other, "CUDA ", what, " failed: ", cudaGetErrorString(status));
}

/// A checkpoint tensor of an item, and where its bytes start in the item's.
struct Member {
  const safetensors::TensorInfo* info = nullptr;
  uint64_t offset = 0;
};

/// Small tensors ride with the tensor before them: a tensor under kSmallBytes that follows it in
/// the file (and in the order) joins its item, up to kSmallPerItem bytes of such tensors per item.
/// Each item costs the readers an allocation, an event on the consumer's stream and the mutex,
/// and the consumer the waits for its events: a block-fp8 MoE checkpoint has 1002 scales, most
/// of them 704 bytes.
constexpr uint64_t kSmallBytes = 64 << 10;
constexpr uint64_t kSmallPerItem = 2 << 20;

/// One or more consecutive checkpoint tensors (bytes contiguous in one file) on their way to the
/// device: what the readers read, allocate and signal as one.
struct Item {
  size_t file = 0;  ///< index into the stream's files
  const safetensors::TensorInfo* info = nullptr;  ///< the first tensor
  std::vector<Member> members;  ///< the tensors, in order; members[0].info == info
  uint64_t offset = 0;  ///< in the file
  uint64_t bytes = 0;
  uint64_t small_bytes = 0;  ///< of members after the first
  uint64_t reserve = 0;  ///< device bytes the consumer holds beside the stream while applying it
  int pieces = 0;
  // Guarded by the stream's mutex:
  at::Tensor device;                ///< allocated by the reader that takes the first piece
  cudaEvent_t allocated = nullptr;  ///< consumer stream position at allocation (reuse hazard)
  /// Per reader that copied a piece: an event recorded after its latest piece (its stream is in order).
  std::vector<std::pair<int, cudaEvent_t>> copied;
  int pieces_queued = 0;
  bool allocation_done = false;  ///< `device` and `allocated` are set (or `error`): pieces may be copied
  bool bypassed = false;  ///< delivered as a host view, never staged
  std::string error;
};

class StagedStream final : public WeightStream {
 public:
  StagedStream(const safetensors::CheckpointFiles& files, const c10::Device& device, StagingOptions options)
      : device_(device.has_index() ? device : c10::Device(c10::DeviceType::CUDA, 0)) {
    c10::cuda::CUDAGuard guard(device_);
    consumer_ = c10::cuda::getCurrentCUDAStream(device_.index()).stream();
    // Three readers per four cores, at most 16: the consumer (the loaders) and the CUDA driver's
    // work need cores too. On the GPU machine (16 cores) 12 readers against 16: MoE bf16 reload
    // 0.145-0.148 s against 0.153-0.164, block-fp8 0.159-0.174 against 0.165-0.196, online fp8
    // 0.163-0.172 against 0.184-0.205, the 8-layer dense reload equal (0.111 s).
    const int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
    const int threads = options.threads > 0 ? options.threads
                                            : static_cast<int>(env_number("LOADKIT_STAGING_THREADS",
                                                                          std::clamp(cores * 3 / 4, 1, 16), 64));
    piece_bytes_ = options.piece_bytes ? options.piece_bytes : env_number("LOADKIT_STAGING_PIECE_KB", 2 << 10, 1 << 20) << 10;
    depth_ = options.depth > 0 ? options.depth : static_cast<int>(env_number("LOADKIT_STAGING_DEPTH", 3, 64));
    window_bytes_ = options.window_bytes ? options.window_bytes : default_window_bytes();
    limit_bytes_ = window_bytes_ + window_bytes_ / 20;  // the bound, see the header
    pinning_at_open_ = pinning_nanoseconds().load();
    files_ = files.files;  // keep the validated files (and their tensor infos) alive
    std::vector<Item> in_file_order;
    for (size_t f = 0; f < files_.size(); ++f) {
      const auto& file = files_[f];
      file->will_need();  // read through the descriptor that was validated (formats/safetensors_file.h)
      for (const auto& info : file->tensors()) {
        Item item;
        item.file = f;
        item.info = &info;
        item.members = {{&info, 0}};
        item.offset = file->file_offset(info);
        item.bytes = info.bytes();
        in_file_order.push_back(std::move(item));
      }
    }
    std::vector<Item> ordered;
    if (options.order.empty()) {
      ordered = std::move(in_file_order);
    } else {
      std::unordered_map<std::string_view, size_t> by_name;
      for (size_t i = 0; i < in_file_order.size(); ++i) by_name.emplace(in_file_order[i].info->name, i);
      if (options.order.size() != in_file_order.size())
        fail(ErrorKind::Other, "staged stream: an order of ", options.order.size(), " names for ",
             in_file_order.size(), " tensors");
      if (!options.reserve.empty() && options.reserve.size() != options.order.size())
        fail(ErrorKind::Other, "staged stream: ", options.reserve.size(), " reserves for ", options.order.size(), " tensors");
      for (size_t i = 0; i < options.order.size(); ++i) {
        auto it = by_name.find(options.order[i]);
        if (it == by_name.end()) fail(ErrorKind::Other, "staged stream: no tensor '", options.order[i], "' to order");
        ordered.push_back(std::move(in_file_order[it->second]));
        if (!options.reserve.empty()) ordered.back().reserve = options.reserve[i];
      }
    }
    for (auto& item : ordered) {
      if (!items_.empty() && joins(items_.back(), item)) {
        Item& into = items_.back();
        into.members.push_back({item.info, into.bytes});
        into.bytes += item.bytes;
        into.small_bytes += item.bytes;
      } else {
        items_.push_back(std::move(item));
      }
    }
    for (auto& item : items_) item.pieces = static_cast<int>((item.bytes + piece_bytes_ - 1) / piece_bytes_);
    const int n = static_cast<int>(std::min<size_t>(threads, std::max<size_t>(1, files.total_bytes / piece_bytes_ + 1)));
    profile_.window_bytes = window_bytes_;
    profile_.limit_bytes = limit_bytes_;
    profile_.readers = n;
    for (int i = 0; i < n; ++i) workers_.emplace_back([this, i] { work(i); });
  }

  ~StagedStream() override {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
    }
    space_cv_.notify_all();
    for (auto& w : workers_) w.join();
    close_profile();
    for (auto& item : items_) {
      for (auto& [reader, e] : item.copied) cudaEventDestroy(e);
      if (item.allocated) cudaEventDestroy(item.allocated);
    }
    for (cudaEvent_t e : spare_events_) cudaEventDestroy(e);
  }

  bool next(NamedWeight& out) override {
    const auto freeing = Clock::now();
    out.tensor = at::Tensor();  // the previous tensor is consumed: free it before reading further ahead
    // The consumer alone moves next_ and member_; an item's members never change.
    const bool more_members = next_ > 0 && member_ < items_[next_ - 1].members.size();
    if (!more_members) item_tensor_ = at::Tensor();
    const auto called = Clock::now();
    std::unique_lock<std::mutex> lock(mutex_);
    if (applying_) note_work(ms_between(handed_out_, called));
    profile_.consumer_free_ms += ms_between(freeing, called);
    profile_.consumer_event_ms += consumer_event_ms_;
    consumer_event_ms_ = 0;
    applying_ = false;
    if (more_members) {  // read and waited for with the item's first tensor
      hand_out(items_[next_ - 1], out, lock);
      return true;
    }
    if (next_ > 0) release(next_ - 1);
    if (next_ >= items_.size()) return false;
    Item& item = items_[next_];
    auto ready = [&] { return item.pieces_queued == item.pieces || !item.error.empty() || item.bypassed; };
    if (!ready()) {
      ready_cv_.wait(lock, ready);
      profile_.consumer_wait_ms += ms_between(called, Clock::now());
      ++profile_.consumer_waits;
    }
    if (!item.error.empty()) {
      files_[item.file]->check_unchanged();  // a truncation is named as the change it is
      fail(ErrorKind::Input, files_[item.file]->path(), ": reading tensor '", item.info->name, "': ", item.error);
    }
    ++next_;
    member_ = 0;
    if (item.bypassed) {
      profile_.bypassed_bytes += item.bytes;
      profile_.bypassed_tensors += item.members.size();
    } else {
      profile_.staged_bytes += item.bytes;
      if (item.pieces == 0) item.device = item_storage(item);  // no bytes: nothing to read, no reuse hazard
      // Every piece is queued: no reader records these events again until the consumer moves on.
      consumer_events_.clear();
      for (auto& [reader, e] : item.copied) consumer_events_.push_back(e);
      item_tensor_ = std::move(item.device);
      item.device = at::Tensor();
    }
    const bool staged = !item.bypassed;
    hand_out(item, out, lock);
    // CUDA calls outside the mutex (see work()), before the consumer queues anything that reads it.
    if (staged) {
      for (cudaEvent_t e : consumer_events_) check_cuda(cudaStreamWaitEvent(consumer_, e, 0), "cudaStreamWaitEvent");
      consumer_event_ms_ += ms_between(handed_out_, Clock::now());  // counted in the profile at the next call
    }
    return true;
  }

 private:
  /// Whether `t` (one tensor, next in the order) may join `item`: see kSmallBytes. Contiguous in
  /// the same file, the same reserve, and at an offset its element type can be viewed at.
  bool joins(const Item& item, const Item& t) const {
    const uint64_t element = c10::elementSize(to_scalar_type(t.info->dtype));
    return t.file == item.file && t.offset == item.offset + item.bytes && t.reserve == item.reserve &&
           item.bytes > 0 && t.bytes > 0 && t.bytes < kSmallBytes && item.small_bytes + t.bytes <= kSmallPerItem &&
           item.bytes % element == 0;
  }

  /// The item's next member as the consumer's tensor: a view of the item's device tensor, or read
  /// on the host for a bypassed item. Called with `lock` held; returns with it released.
  void hand_out(const Item& item, NamedWeight& out, std::unique_lock<std::mutex>& lock) {
    const Member& m = item.members[member_++];
    current_ = &m;
    current_reserve_ = item.reserve;
    applying_ = true;
    const bool first = ++profile_.tensors == 1;
    lock.unlock();
    const auto& file = *files_[item.file];
    out.name = m.info->name;
    out.origin = file.path();
    if (item.bypassed) {
      out.tensor = read_tensor(file, *m.info);  // a host read of a whole tensor: the readers go on meanwhile
    } else {
      file.check_unchanged();  // every piece was read: the file must still be the version validated
      out.tensor = item.members.size() == 1 ? item_tensor_ : member_view(item_tensor_, m);
    }
    handed_out_ = Clock::now();
    if (first) profile_.first_tensor_ms = ms_between(opened_, handed_out_);
  }

  /// Member `m` of an item held as bytes: its dtype and shape at its offset (element-aligned,
  /// see joins()). Made as ATen makes an alias, without dispatching three view operations.
  static at::Tensor member_view(const at::Tensor& bytes, const Member& m) {
    const caffe2::TypeMeta dtype = c10::scalarTypeToTypeMeta(to_scalar_type(m.info->dtype));
    at::Tensor view = at::detail::make_tensor<c10::TensorImpl>(c10::TensorImpl::VIEW, c10::Storage(bytes.storage()),
                                                               bytes.key_set(), dtype);
    c10::TensorImpl* impl = view.unsafeGetTensorImpl();
    impl->set_storage_offset(static_cast<int64_t>((bytes.storage_offset() + m.offset) / dtype.itemsize()));
    impl->set_sizes_contiguous(m.info->shape);
    return view;
  }

  /// The device tensor an item is read into: the tensor itself, or the bytes of its members.
  at::Tensor item_storage(const Item& item) const {
    if (item.members.size() == 1)
      return at::empty(item.info->shape, at::TensorOptions().dtype(to_scalar_type(item.info->dtype)).device(device_));
    return at::empty({static_cast<int64_t>(item.bytes)}, at::TensorOptions().dtype(at::kByte).device(device_));
  }

  /// Bytes [begin, begin + n) of `item` into `dst`, one read (its members are contiguous in the
  /// file): "" or why not.
  std::string read_piece(const Item& item, uint64_t begin, uint8_t* dst, uint64_t n) const {
    if (item.members.size() == 1) return files_[item.file]->try_read(*item.info, begin, dst, n);
    safetensors::TensorInfo span;  // the members' bytes as one range of the data section
    span.dtype = safetensors::DType::U8;
    span.begin = item.info->begin;
    span.end = span.begin + item.bytes;
    return files_[item.file]->try_read(span, begin, dst, n);
  }

  /// The consumer moved past `index`: its bytes leave the read-ahead window.
  void release(size_t index) {
    Item& item = items_[index];
    if (!item.bypassed) in_flight_ -= item.bytes;
    for (auto& [reader, e] : item.copied) spare_events_.push_back(e);
    item.copied.clear();
    if (head_fits()) space_cv_.notify_all();
  }

  /// Whether the tensor the readers wait to start (the next one no piece of which is taken) now
  /// fits the window. Only then are they woken: waking all of them at every tensor the consumer
  /// freed made 16 readers contend for the mutex with the consumer 2000 times per MoE reload
  /// (block-fp8 scales are 704-byte tensors): on the GPU machine its stream took 308 ms, the
  /// readers summed 2974 ms of window waits and the consumer waited for data 11 ms.
  bool head_fits() const {
    if (take_item_ >= items_.size() || take_piece_ != 0) return false;  // no reader waits for the window
    const Item& head = items_[take_item_];
    return in_flight_ + head.bytes + reserve_until(take_item_) <= limit_bytes_;
  }

  /// The consumer spent `ms` applying the tensor it was handed last (its loaders; processing when
  /// it completed a module).
  void note_work(double ms) {
    profile_.consumer_work_ms += ms;
    if (current_reserve_ > 0) profile_.consumer_work_after_reserved_ms += ms;
    auto& longest = profile_.longest_work;
    constexpr size_t kKept = 5;
    if (longest.size() < kKept || ms > longest.back().second) {
      if (longest.size() == kKept) longest.pop_back();
      longest.emplace_back(current_->info->name, ms);
      std::sort(longest.begin(), longest.end(), [](const auto& a, const auto& b) { return a.second > b.second; });
    }
  }

  void close_profile() {
    profile_.consumer_event_ms += consumer_event_ms_;  // the last tensor's (readers are joined)
    profile_.opened_at = opened_;
    profile_.closed_at = Clock::now();
    profile_.open_ms = ms_between(opened_, profile_.closed_at);
    profile_.pinning_ms = (pinning_nanoseconds().load() - pinning_at_open_) / 1e6;
    log::debug(profile_.summary());
    keep_profile(profile_);
  }

  /// Next piece to read: (item, piece index); the window is charged when an item's first piece is
  /// taken, and that piece's reader allocates the item's tensor.
  /// `window_wait_ms` adds the time spent waiting for the consumer to free the window.
  bool take(size_t& item_index, int& piece, std::unique_lock<std::mutex>& lock, double& window_wait_ms) {
    for (;;) {
      if (stop_) return false;
      while (take_item_ < items_.size() && take_piece_ >= items_[take_item_].pieces) {
        ++take_item_;
        take_piece_ = 0;
      }
      if (take_item_ >= items_.size()) return false;
      Item& item = items_[take_item_];
      if (take_piece_ == 0) {
        if (item.bytes + item.reserve > limit_bytes_) {  // never fits: the consumer reads it from the mapping
          item.bypassed = true;
          ++take_item_;
          ready_cv_.notify_all();
          continue;
        }
        if (in_flight_ + item.bytes + reserve_until(take_item_) > limit_bytes_) {
          const auto waiting = Clock::now();
          space_cv_.wait(lock);  // woken by the consumer's releases
          window_wait_ms += ms_between(waiting, Clock::now());
          continue;
        }
        in_flight_ += item.bytes;  // its first piece's reader allocates it (work())
      }
      item_index = take_item_;
      piece = take_piece_++;
      return true;
    }
  }

  /// The most the consumer can hold beside the stream while items up to `last` are alive: modules
  /// come together in the order, so the one materialised is that of the item being applied (until
  /// the consumer asks for the next one, its module may still be processing) or of one read ahead.
  uint64_t reserve_until(size_t last) const {
    uint64_t r = 0;
    const size_t first = applying_ && next_ > 0 ? next_ - 1 : next_;
    for (size_t i = first; i <= last && i < items_.size(); ++i) r = std::max(r, items_[i].reserve);
    return r;
  }

  void work(int reader) {
    pthread_setname_np(pthread_self(), "loadkit-reader");  // tells them from the consumer in top, gdb and perf
    c10::cuda::CUDAGuard guard(device_);
    cudaStream_t stream = nullptr;
    struct Buffer {
      PinnedBuffer host;
      cudaEvent_t done = nullptr;
      bool busy = false;
    };
    std::vector<Buffer> buffers(depth_);
    const auto started = std::chrono::steady_clock::now();
    try {
      check_cuda(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate");
      for (auto& b : buffers) {
        b.host = acquire_pinned(piece_bytes_);
        check_cuda(cudaEventCreateWithFlags(&b.done, cudaEventDisableTiming), "cudaEventCreate");
      }
    } catch (const std::exception& e) {
      fail_all(e.what());
    }
    if (reader == 0)
      log::debug(cat("staging reader 0: stream and ", depth_, " pinned buffers ready in ",
                     std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - started).count(), " ms"));
    // Every CUDA call of a reader runs outside the mutex (the consumer takes it at every tensor):
    // the item's tensor is allocated by the reader of its first piece, the others wait for it;
    // each reader records one event per item it copies into, again after each of its pieces
    // (its stream is in order), which the consumer waits for once every piece is queued.
    std::vector<cudaEvent_t> stash;  // this reader's events in no item
    auto fresh_event = [&](cudaEvent_t& e) -> cudaError_t {
      if (!stash.empty()) {
        e = stash.back();
        stash.pop_back();
        return cudaSuccess;
      }
      return cudaEventCreateWithFlags(&e, cudaEventDisableTiming);
    };
    size_t my_item = SIZE_MAX;  // the item `my_event` belongs to
    cudaEvent_t my_event = nullptr;
    size_t k = 0;
    double read_ms = 0, ring_wait_ms = 0, window_wait_ms = 0;
    std::unique_lock<std::mutex> lock(mutex_);
    size_t index = 0;
    int piece = 0;
    while (stream && take(index, piece, lock, window_wait_ms)) {
      Item& item = items_[index];
      if (piece == 0) {
        lock.unlock();
        at::Tensor device;
        cudaEvent_t allocated = nullptr;
        std::string error;
        try {
          device = item_storage(item);
          // A block the consumer just freed may still be read by its queued copies: the readers'
          // streams wait for the consumer's stream up to this point.
          cudaError_t st = fresh_event(allocated);
          if (st == cudaSuccess) st = cudaEventRecord(allocated, consumer_);
          if (st != cudaSuccess) error = std::string("CUDA event failed: ") + cudaGetErrorString(st);
        } catch (const std::exception& e) {
          error = e.what();
        }
        lock.lock();
        item.device = std::move(device);
        item.allocated = allocated;
        item.allocation_done = true;
        if (!error.empty() && item.error.empty()) {
          item.error = error;
          ready_cv_.notify_all();
        }
        allocated_cv_.notify_all();
      } else if (!item.allocation_done) {
        allocated_cv_.wait(lock, [&] { return item.allocation_done; });
      }
      if (!item.error.empty()) continue;  // the consumer fails on it; its other pieces are not read
      uint8_t* dst = static_cast<uint8_t*>(item.device.data_ptr());
      cudaEvent_t allocated = item.allocated;
      lock.unlock();
      const uint64_t begin = static_cast<uint64_t>(piece) * piece_bytes_;
      const uint64_t n = std::min(piece_bytes_, item.bytes - begin);
      Buffer& buf = buffers[k];
      k = (k + 1) % buffers.size();
      std::string error;
      auto t = Clock::now();
      if (buf.busy) {
        // An error here goes to the item like any other (never out of the thread: that would end the process).
        if (const cudaError_t st = cudaEventSynchronize(buf.done); st != cudaSuccess)
          error = std::string("CUDA copy failed: ") + cudaGetErrorString(st);
        const auto now = Clock::now();
        ring_wait_ms += ms_between(t, now);
        t = now;
      }
      if (error.empty()) error = read_piece(item, begin, static_cast<uint8_t*>(buf.host.data()), n);
      read_ms += ms_between(t, Clock::now());
      cudaError_t st = cudaSuccess;
      cudaEvent_t new_event = nullptr;  // this reader's first piece of the item: its event, to attach
      if (error.empty()) {
        st = cudaStreamWaitEvent(stream, allocated, 0);
        if (st == cudaSuccess) st = cudaMemcpyAsync(dst + begin, buf.host.data(), n, cudaMemcpyHostToDevice, stream);
        if (st == cudaSuccess) st = cudaEventRecord(buf.done, stream);
        buf.busy = true;
        if (st == cudaSuccess && index != my_item) st = fresh_event(new_event);
        if (st == cudaSuccess) st = cudaEventRecord(index != my_item ? new_event : my_event, stream);
      }
      lock.lock();
      if (new_event) {
        item.copied.emplace_back(reader, new_event);  // owned by the item from now on
        my_item = index;
        my_event = new_event;
        while (stash.size() < 4 && !spare_events_.empty()) {
          stash.push_back(spare_events_.back());
          spare_events_.pop_back();
        }
      }
      if (error.empty() && st != cudaSuccess) error = std::string("CUDA copy failed: ") + cudaGetErrorString(st);
      if (!error.empty()) {
        if (item.error.empty()) item.error = error;
        ready_cv_.notify_all();
      } else if (++item.pieces_queued == item.pieces && index == next_) {
        ready_cv_.notify_all();  // the consumer waits for this one
      }
    }
    profile_.read_ms += read_ms;
    profile_.ring_wait_ms += ring_wait_ms;
    profile_.window_wait_ms += window_wait_ms;
    if (lock.owns_lock()) lock.unlock();
    // Nothing may go back to the pool while a copy out of it is queued.
    if (stream) {
      cudaStreamSynchronize(stream);
      cudaStreamDestroy(stream);
    }
    for (auto& b : buffers)
      if (b.done) cudaEventDestroy(b.done);
    for (cudaEvent_t e : stash) cudaEventDestroy(e);
  }

  void fail_all(const std::string& why) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& item : items_)
      if (item.error.empty()) item.error = why;
    ready_cv_.notify_all();
  }

  c10::Device device_;
  cudaStream_t consumer_ = nullptr;
  uint64_t piece_bytes_ = 0, window_bytes_ = 0, limit_bytes_ = 0;
  int depth_ = 3;
  std::vector<std::shared_ptr<const safetensors::SafetensorsFile>> files_;
  std::deque<Item> items_;
  std::vector<std::thread> workers_;

  std::mutex mutex_;
  std::condition_variable ready_cv_;  ///< the consumer waits here for its next tensor
  std::condition_variable space_cv_;  ///< readers wait here for the window (or the end)
  std::condition_variable allocated_cv_;  ///< readers wait here for the tensor of an item another reader allocates
  bool stop_ = false;
  size_t next_ = 0;        ///< consumer position: the item after the one being handed out
  size_t member_ = 0;      ///< consumer position in item next_ - 1: its next member (consumer only)
  at::Tensor item_tensor_;  ///< that item's device tensor, until its last member is consumed (consumer only)
  const Member* current_ = nullptr;  ///< the tensor handed out last (consumer only)
  uint64_t current_reserve_ = 0;    ///< its item's reserve
  bool applying_ = false;  ///< the consumer holds item next_ - 1 (between two next() calls)
  size_t take_item_ = 0;   ///< reader position
  int take_piece_ = 0;
  uint64_t in_flight_ = 0;  ///< bytes allocated and not yet released by the consumer
  std::vector<cudaEvent_t> spare_events_;  ///< waited on by the consumer already: free to record again
  std::vector<cudaEvent_t> consumer_events_;  ///< next()'s events to wait on (kept: no allocation per tensor)

  StagingProfile profile_;  ///< guarded by the mutex
  const Clock::time_point opened_ = Clock::now();
  Clock::time_point handed_out_;  ///< when the consumer got its current tensor
  double consumer_event_ms_ = 0;  ///< its waits' queuing, not yet in the profile (consumer only)
  int64_t pinning_at_open_ = 0;
};

}  // namespace

#endif  // LOADKIT_CUDA

std::unique_ptr<WeightStream> staged_safetensors_stream(const safetensors::CheckpointFiles& files,
                                                        const c10::Device& device, StagingOptions options) {
#if LOADKIT_CUDA
  return std::make_unique<StagedStream>(files, device, std::move(options));
#else
  (void)files;
  (void)options;
  fail(ErrorKind::Usage, "device ", device.str(), ": staged loading needs a CUDA build");
#endif
}

}  // namespace loadkit
