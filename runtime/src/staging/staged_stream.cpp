#include "staging/staged_stream.h"

#include <ATen/ATen.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <string>

#include "loadkit/error.h"
#include "tensor_io.h"

#if LOADKIT_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <fcntl.h>
#include <unistd.h>

#include <condition_variable>
#include <deque>
#include <mutex>
#include <thread>
#endif

namespace loadkit {

bool staging_enabled(const c10::Device& device) {
#if LOADKIT_CUDA
  const char* flag = std::getenv("LOADKIT_STAGING");
  return device.is_cuda() && !(flag && std::string(flag) == "0");
#else
  (void)device;
  return false;
#endif
}

#if LOADKIT_CUDA

namespace {

uint64_t env_number(const char* name, uint64_t fallback) {
  const char* text = std::getenv(name);
  if (!text || !*text) return fallback;
  char* end = nullptr;
  const unsigned long long value = std::strtoull(text, &end, 10);
  if (*end != '\0' || value == 0) fail(ErrorKind::Usage, name, "='", text, "' is not a positive integer");
  return value;
}

void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess) fail(ErrorKind::Other, "CUDA ", what, " failed: ", cudaGetErrorString(status));
}

/// One checkpoint tensor on its way to the device.
struct Item {
  const safetensors::SafetensorsFile* file = nullptr;
  const safetensors::TensorInfo* info = nullptr;
  int fd = -1;
  uint64_t offset = 0;  ///< in the file
  uint64_t bytes = 0;
  int pieces = 0;
  // Guarded by the stream's mutex:
  at::Tensor device;                 ///< allocated by the reader that takes the first piece
  cudaEvent_t allocated = nullptr;   ///< consumer stream position at allocation (reuse hazard)
  std::vector<cudaEvent_t> copied;   ///< one per piece, recorded after its copy
  int pieces_queued = 0;
  std::string error;
};

class StagedStream final : public WeightStream {
 public:
  StagedStream(const safetensors::CheckpointFiles& files, const c10::Device& device, StagingOptions options)
      : device_(device.has_index() ? device : c10::Device(c10::DeviceType::CUDA, 0)) {
    c10::cuda::CUDAGuard guard(device_);
    consumer_ = c10::cuda::getCurrentCUDAStream(device_.index()).stream();
    const int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
    const int threads = options.threads > 0 ? options.threads
                                            : static_cast<int>(env_number("LOADKIT_STAGING_THREADS", std::min(16, cores)));
    piece_bytes_ = options.piece_bytes ? options.piece_bytes : env_number("LOADKIT_STAGING_PIECE_KB", 16 << 10) << 10;
    window_bytes_ = options.window_bytes ? options.window_bytes
                                         : env_number("LOADKIT_STAGING_WINDOW_MB", 512) << 20;
    for (const auto& file : files.files) {
      const int fd = ::open(file->path().c_str(), O_RDONLY | O_CLOEXEC);
      if (fd < 0) fail(ErrorKind::Input, file->path(), ": cannot open: ", std::strerror(errno));
      fds_.push_back(fd);
      ::posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL);
      for (const auto& info : file->tensors()) {
        Item item;
        item.file = file.get();
        item.info = &info;
        item.fd = fd;
        item.offset = file->file_offset(info);
        item.bytes = info.bytes();
        item.pieces = static_cast<int>((item.bytes + piece_bytes_ - 1) / piece_bytes_);
        items_.push_back(std::move(item));
      }
    }
    files_ = files.files;  // keep the validated files (and their tensor infos) alive
    const int n = static_cast<int>(std::min<size_t>(threads, std::max<size_t>(1, files.total_bytes / piece_bytes_ + 1)));
    for (int i = 0; i < n; ++i) workers_.emplace_back([this] { work(); });
  }

  ~StagedStream() override {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& w : workers_) w.join();
    for (auto& item : items_) {
      for (cudaEvent_t e : item.copied) cudaEventDestroy(e);
      if (item.allocated) cudaEventDestroy(item.allocated);
    }
    for (int fd : fds_) ::close(fd);
  }

  bool next(NamedWeight& out) override {
    out.tensor = at::Tensor();  // the previous tensor is consumed: free it before reading further ahead
    std::unique_lock<std::mutex> lock(mutex_);
    if (next_ > 0) release(next_ - 1);
    if (next_ >= items_.size()) return false;
    Item& item = items_[next_];
    cv_.wait(lock, [&] { return item.pieces_queued == item.pieces || !item.error.empty(); });
    if (!item.error.empty()) fail(ErrorKind::Input, item.file->path(), ": reading tensor '", item.info->name, "': ", item.error);
    if (item.pieces == 0) item.device = allocate(item);
    for (cudaEvent_t e : item.copied) check_cuda(cudaStreamWaitEvent(consumer_, e, 0), "cudaStreamWaitEvent");
    out.name = item.info->name;
    out.tensor = std::move(item.device);
    item.device = at::Tensor();
    out.origin = item.file->path();
    ++next_;
    return true;
  }

 private:
  /// The consumer moved past `index`: its bytes leave the read-ahead window.
  void release(size_t index) {
    Item& item = items_[index];
    in_flight_ -= item.bytes;
    for (cudaEvent_t e : item.copied) cudaEventDestroy(e);
    item.copied.clear();
    cv_.notify_all();
  }

  at::Tensor allocate(Item& item) {
    at::Tensor t = at::empty(item.info->shape, at::TensorOptions()
                                                   .dtype(to_scalar_type(item.info->dtype))
                                                   .device(device_));
    // A block the consumer just freed may still be read by its queued copies:
    // the readers' streams wait for the consumer's stream up to this point.
    check_cuda(cudaEventCreateWithFlags(&item.allocated, cudaEventDisableTiming), "cudaEventCreate");
    check_cuda(cudaEventRecord(item.allocated, consumer_), "cudaEventRecord");
    return t;
  }

  /// Next piece to read: (item, piece index), allocating the item's tensor for its first piece.
  bool take(size_t& item_index, int& piece, std::unique_lock<std::mutex>& lock) {
    for (;;) {
      if (stop_) return false;
      while (take_item_ < items_.size() && take_piece_ >= items_[take_item_].pieces) {
        ++take_item_;
        take_piece_ = 0;
      }
      if (take_item_ >= items_.size()) return false;
      Item& item = items_[take_item_];
      if (take_piece_ == 0) {
        // Read ahead at most the window, but always at least one tensor.
        if (in_flight_ > 0 && in_flight_ + item.bytes > window_bytes_) {
          cv_.wait(lock);
          continue;
        }
        in_flight_ += item.bytes;
        try {
          item.device = allocate(item);
        } catch (const std::exception& e) {
          item.error = e.what();
          take_piece_ = item.pieces;
          cv_.notify_all();
          continue;
        }
      }
      item_index = take_item_;
      piece = take_piece_++;
      return true;
    }
  }

  void work() {
    c10::cuda::CUDAGuard guard(device_);
    cudaStream_t stream = nullptr;
    struct Buffer {
      at::Tensor host;
      cudaEvent_t done = nullptr;
      bool busy = false;
    } buffers[2];
    try {
      check_cuda(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate");
      for (auto& b : buffers) {
        b.host = at::empty({static_cast<int64_t>(piece_bytes_)}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
        check_cuda(cudaEventCreateWithFlags(&b.done, cudaEventDisableTiming), "cudaEventCreate");
      }
    } catch (const std::exception& e) {
      fail_all(e.what());
    }
    int k = 0;
    std::unique_lock<std::mutex> lock(mutex_);
    size_t index = 0;
    int piece = 0;
    while (stream && take(index, piece, lock)) {
      Item& item = items_[index];
      uint8_t* dst = static_cast<uint8_t*>(item.device.data_ptr());
      cudaEvent_t allocated = item.allocated;
      lock.unlock();
      const uint64_t begin = static_cast<uint64_t>(piece) * piece_bytes_;
      const uint64_t n = std::min(piece_bytes_, item.bytes - begin);
      Buffer& buf = buffers[k];
      k ^= 1;
      std::string error;
      cudaEvent_t copied = nullptr;
      if (buf.busy) check_cuda(cudaEventSynchronize(buf.done), "cudaEventSynchronize");
      error = read_fully(item.fd, static_cast<uint8_t*>(buf.host.data_ptr()), n, item.offset + begin);
      if (error.empty()) {
        cudaError_t st = cudaStreamWaitEvent(stream, allocated, 0);
        if (st == cudaSuccess) st = cudaMemcpyAsync(dst + begin, buf.host.data_ptr(), n, cudaMemcpyHostToDevice, stream);
        if (st == cudaSuccess) st = cudaEventRecord(buf.done, stream);
        if (st == cudaSuccess) st = cudaEventCreateWithFlags(&copied, cudaEventDisableTiming);
        if (st == cudaSuccess) st = cudaEventRecord(copied, stream);
        if (st != cudaSuccess) error = std::string("CUDA copy failed: ") + cudaGetErrorString(st);
        buf.busy = true;
      }
      lock.lock();
      if (!error.empty()) {
        if (item.error.empty()) item.error = error;
      } else {
        item.copied.push_back(copied);
        ++item.pieces_queued;
      }
      cv_.notify_all();
    }
    if (lock.owns_lock()) lock.unlock();
    // Nothing may be freed while a copy out of it is queued.
    if (stream) {
      cudaStreamSynchronize(stream);
      cudaStreamDestroy(stream);
    }
    for (auto& b : buffers)
      if (b.done) cudaEventDestroy(b.done);
  }

  void fail_all(const std::string& why) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& item : items_)
      if (item.error.empty()) item.error = why;
    cv_.notify_all();
  }

  static std::string read_fully(int fd, uint8_t* dst, uint64_t n, uint64_t offset) {
    while (n > 0) {
      const ssize_t got = ::pread(fd, dst, n, static_cast<off_t>(offset));
      if (got < 0) {
        if (errno == EINTR) continue;
        return std::strerror(errno);
      }
      if (got == 0) return "the file ends before the tensor does (truncated after it was opened?)";
      dst += got;
      n -= static_cast<uint64_t>(got);
      offset += static_cast<uint64_t>(got);
    }
    return {};
  }

  c10::Device device_;
  cudaStream_t consumer_ = nullptr;
  uint64_t piece_bytes_ = 0, window_bytes_ = 0;
  std::vector<std::shared_ptr<const safetensors::SafetensorsFile>> files_;
  std::vector<int> fds_;
  std::deque<Item> items_;
  std::vector<std::thread> workers_;

  std::mutex mutex_;
  std::condition_variable cv_;
  bool stop_ = false;
  size_t next_ = 0;        ///< consumer position
  size_t take_item_ = 0;   ///< reader position
  int take_piece_ = 0;
  uint64_t in_flight_ = 0;  ///< bytes allocated and not yet released by the consumer
};

}  // namespace

#endif  // LOADKIT_CUDA

std::unique_ptr<WeightStream> staged_safetensors_stream(const safetensors::CheckpointFiles& files,
                                                        const c10::Device& device, StagingOptions options) {
#if LOADKIT_CUDA
  return std::make_unique<StagedStream>(files, device, options);
#else
  (void)files;
  (void)options;
  fail(ErrorKind::Usage, "device ", device.str(), ": staged loading needs a CUDA build");
#endif
}

}  // namespace loadkit
