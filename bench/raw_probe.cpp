// Raw ceilings for loading files onto a CUDA device, measured with nothing but
// the CUDA runtime and POSIX reads (no torch, no loadkit): what the hardware
// and the page cache allow, so loadkit's numbers can be read against them.
//
//   raw_probe --out probe.json [--cold | --cold-only] [--sections LIST] FILE...
//
// Measures, on the given files (a checkpoint's *.safetensors), by section
// (--sections, comma-separated; all by default):
//   - pinning: how fast a staging ring (16 readers x 3 x 2 MiB) can be pinned,
//     the way runtime/src/staging/pinned_pool.cpp does it today (a mapping and a
//     cudaHostRegister per buffer, from the readers' threads) against one
//     registration of the whole ring, transparent huge pages (madvise
//     MADV_HUGEPAGE before the pages are touched, then cudaHostRegister),
//     explicit huge pages (MAP_HUGETLB, where the host has some reserved) and
//     cudaHostAlloc; plus the 256 MiB rates (pinning is most of a fresh
//     process's set-up);
//   - copies: the pinned host-to-device ceiling and the device-to-device rate;
//   - alloc: cudaMalloc of the files' bytes as one block and as a model's tensors;
//   - contention: what the consumer's copies and stream waits cost its thread while 12 readers
//     stream the files in (their calls per piece as the staged stream made them, and two);
//   - smallcopies: what a copy per tensor costs the host, device to device, one
//     cudaMemcpyAsync per tensor against one cudaMemcpyBatchAsync for them all
//     (20 000 tensors of 32 KiB, and 1028 of 5.5 MiB: an update's floor per tensor);
//   - the pinned host-to-device copy ceiling and the device-to-device copy rate;
//   - cudaMalloc of the files' bytes as one block and as a model's many tensors;
//   - reads: parallel pread of the files from the page cache into host buffers,
//     by thread count (the "parallel raw read");
//   - pipeline: pread -> pinned ring -> async H2D, by threads and piece size;
//   - mapping: mmap + cudaHostRegister(read-only) of the page cache and a copy from it;
//   - with --cold (root): the same reads after dropping the page cache;
//     --cold-only measures those alone (the bench alternates them with loadkit's).
// Prints a table and writes JSON. A benchmark, never a test.

#include <cuda_runtime_api.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <set>
#include <sstream>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <string>
#include <thread>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;

void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    std::fprintf(stderr, "raw_probe: %s failed: %s\n", what, cudaGetErrorString(status));
    std::exit(1);
  }
}

double seconds_since(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }

struct File {
  std::string path;
  int fd = -1;
  uint64_t size = 0;
};

struct Result {
  std::string name;
  uint64_t bytes = 0;
  double seconds = 0;
  std::string note;
};

std::vector<Result> results;

void record(const std::string& name, uint64_t bytes, double seconds, const std::string& note = "") {
  results.push_back({name, bytes, seconds, note});
  std::printf("%-44s %10.3f GB %9.4f s %8.2f GB/s  %s\n", name.c_str(), bytes / 1e9, seconds,
              seconds > 0 ? bytes / seconds / 1e9 : 0.0, note.c_str());
  std::fflush(stdout);
}

/// Best of `repeats` runs of `fn` (seconds).
double best_of(int repeats, const std::function<double()>& fn) {
  double best = 1e30;
  for (int i = 0; i < repeats; ++i) best = std::min(best, fn());
  return best;
}

/// One piece of the files: (file, offset, length).
struct Piece {
  int file;
  uint64_t offset, bytes, dst;  ///< dst: byte position in the concatenation of all files
};

std::vector<Piece> pieces_of(const std::vector<File>& files, uint64_t piece) {
  std::vector<Piece> out;
  uint64_t dst = 0;
  for (size_t f = 0; f < files.size(); ++f)
    for (uint64_t off = 0; off < files[f].size; off += piece) {
      const uint64_t n = std::min(piece, files[f].size - off);
      out.push_back({static_cast<int>(f), off, n, dst + off});
    }
  for (const auto& f : files) dst += f.size;
  return out;
}

void read_fully(int fd, char* dst, uint64_t n, uint64_t offset) {
  while (n > 0) {
    const ssize_t got = ::pread(fd, dst, n, static_cast<off_t>(offset));
    if (got <= 0) {
      std::perror("pread");
      std::exit(1);
    }
    dst += got;
    n -= static_cast<uint64_t>(got);
    offset += static_cast<uint64_t>(got);
  }
}

/// Parallel pread of every piece into per-thread host buffers (pinned or not); no device copy.
double parallel_read(const std::vector<File>& files, int threads, uint64_t piece, bool pinned, bool direct = false) {
  std::vector<int> fds;
  for (const auto& f : files) {
    const int fd = direct ? ::open(f.path.c_str(), O_RDONLY | O_DIRECT) : f.fd;
    if (fd < 0) {
      std::perror("open O_DIRECT");
      return -1;
    }
    fds.push_back(fd);
  }
  const auto pieces = pieces_of(files, piece);
  std::atomic<size_t> next{0};
  std::vector<char*> buffers(threads);
  for (auto& b : buffers) {
    if (pinned) {
      check(cudaHostAlloc(reinterpret_cast<void**>(&b), piece, cudaHostAllocDefault), "cudaHostAlloc");
    } else {
      if (posix_memalign(reinterpret_cast<void**>(&b), 4096, piece) != 0) std::exit(1);
      std::memset(b, 1, piece);
    }
  }
  const auto start = Clock::now();
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t)
    pool.emplace_back([&, t] {
      for (size_t i; (i = next++) < pieces.size();) {
        const Piece& p = pieces[i];
        // O_DIRECT needs aligned lengths: round up (the file's tail reads short, which is fine).
        const uint64_t n = direct ? (p.bytes + 4095) / 4096 * 4096 : p.bytes;
        if (direct) {
          const ssize_t got = ::pread(fds[p.file], buffers[t], n, static_cast<off_t>(p.offset));
          if (got < 0) {
            std::perror("pread O_DIRECT");
            std::exit(1);
          }
        } else {
          read_fully(fds[p.file], buffers[t], n, p.offset);
        }
      }
    });
  for (auto& th : pool) th.join();
  const double s = seconds_since(start);
  for (auto& b : buffers) {
    if (pinned)
      cudaFreeHost(b);
    else
      std::free(b);
  }
  if (direct)
    for (int fd : fds) ::close(fd);
  return s;
}

/// pread -> pinned ring (`depth` buffers per thread) -> cudaMemcpyAsync on the thread's stream into `device`.
double pipeline(const std::vector<File>& files, char* device, int threads, uint64_t piece, int depth,
                double* pin_seconds) {
  const auto pieces = pieces_of(files, piece);
  std::atomic<size_t> next{0};
  struct Ring {
    std::vector<char*> host;
    std::vector<cudaEvent_t> done;
    cudaStream_t stream;
  };
  std::vector<Ring> rings(threads);
  const auto pin_start = Clock::now();
  for (auto& r : rings) {
    check(cudaStreamCreateWithFlags(&r.stream, cudaStreamNonBlocking), "cudaStreamCreate");
    for (int d = 0; d < depth; ++d) {
      char* h = nullptr;
      check(cudaHostAlloc(reinterpret_cast<void**>(&h), piece, cudaHostAllocDefault), "cudaHostAlloc");
      r.host.push_back(h);
      cudaEvent_t e;
      check(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "cudaEventCreate");
      r.done.push_back(e);
    }
  }
  if (pin_seconds) *pin_seconds = seconds_since(pin_start);
  check(cudaDeviceSynchronize(), "sync");
  const auto start = Clock::now();
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t)
    pool.emplace_back([&, t] {
      Ring& r = rings[t];
      std::vector<bool> used(depth, false);
      int k = 0;
      for (size_t i; (i = next++) < pieces.size();) {
        const Piece& p = pieces[i];
        if (used[k]) check(cudaEventSynchronize(r.done[k]), "cudaEventSynchronize");
        read_fully(files[p.file].fd, r.host[k], p.bytes, p.offset);
        check(cudaMemcpyAsync(device + p.dst, r.host[k], p.bytes, cudaMemcpyHostToDevice, r.stream), "H2D");
        check(cudaEventRecord(r.done[k], r.stream), "cudaEventRecord");
        used[k] = true;
        k = (k + 1) % depth;
      }
      check(cudaStreamSynchronize(r.stream), "cudaStreamSynchronize");
    });
  for (auto& th : pool) th.join();
  const double s = seconds_since(start);
  for (auto& r : rings) {
    for (char* h : r.host) cudaFreeHost(h);
    for (auto e : r.done) cudaEventDestroy(e);
    cudaStreamDestroy(r.stream);
  }
  return s;
}

bool drop_page_cache() {
  ::sync();
  std::ofstream out("/proc/sys/vm/drop_caches");
  if (!out) return false;
  out << "3\n";
  out.flush();
  return static_cast<bool>(out);
}

void warm(const std::vector<File>& files) { parallel_read(files, 16, 16 << 20, false); }

// ------------------------------------------------------------ pinning

/// kB of anonymous memory backed by transparent huge pages in this process (/proc/self/smaps_rollup).
long anon_huge_kb() {
  std::ifstream in("/proc/self/smaps_rollup");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("AnonHugePages:", 0) == 0) return std::atol(line.c_str() + 14);
  return -1;
}

std::string first_line(const char* path) {
  std::ifstream in(path);
  std::string line;
  std::getline(in, line);
  return in ? line : std::string("(unreadable)");
}

/// Host memory to pin: mapped (2 MiB-aligned for huge pages), optionally advised, touched.
struct HostBlock {
  void* base = nullptr;  ///< what to unmap
  size_t mapped = 0;
  char* data = nullptr;  ///< what to register
  size_t bytes = 0;
};

enum class Pages { Populate, Touch, Huge, HugeTlb };

/// Maps `bytes`: Populate: MAP_POPULATE (the pool's way); Touch: map, then write every page;
/// Huge: map 2 MiB-aligned, madvise(MADV_HUGEPAGE), then write; HugeTlb: MAP_HUGETLB (fails
/// without reserved huge pages). Returns an empty block on failure.
HostBlock map_block(size_t bytes, Pages pages) {
  HostBlock b;
  b.bytes = bytes;
  const size_t align = 2 << 20;
  int flags = MAP_PRIVATE | MAP_ANONYMOUS;
  if (pages == Pages::Populate) flags |= MAP_POPULATE;
  if (pages == Pages::HugeTlb) flags |= MAP_HUGETLB;
  b.mapped = pages == Pages::Huge ? bytes + align : bytes;
  b.base = ::mmap(nullptr, b.mapped, PROT_READ | PROT_WRITE, flags, -1, 0);
  if (b.base == MAP_FAILED) return {};
  b.data = static_cast<char*>(b.base);
  if (pages == Pages::Huge) {
    b.data = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(b.base) + align - 1) / align * align);
    ::madvise(b.data, bytes, MADV_HUGEPAGE);
  }
  if (pages != Pages::Populate)
    for (size_t off = 0; off < bytes; off += 4096) b.data[off] = 1;
  return b;
}

void unmap_block(HostBlock& b) {
  if (b.base) ::munmap(b.base, b.mapped);
  b = {};
}

/// Pins `count` buffers of `piece` bytes, `per_thread` of them on each of count / per_thread threads
/// (as the staged readers do), mapping each with `pages`; returns the wall time of map + register.
double pin_ring(int count, size_t piece, int per_thread, Pages pages, bool* failed) {
  std::vector<HostBlock> blocks(count);
  std::atomic<bool> bad{false};
  const int threads = std::max(1, count / per_thread);
  const auto start = Clock::now();
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t)
    pool.emplace_back([&, t] {
      for (int i = t; i < count; i += threads) {
        blocks[i] = map_block(piece, pages);
        if (!blocks[i].data || cudaHostRegister(blocks[i].data, piece, cudaHostRegisterDefault) != cudaSuccess) {
          cudaGetLastError();
          bad = true;
        }
      }
    });
  for (auto& th : pool) th.join();
  const double s = seconds_since(start);
  for (auto& b : blocks) {
    if (b.data) cudaHostUnregister(b.data);
    unmap_block(b);
  }
  cudaGetLastError();
  if (failed) *failed = bad;
  return s;
}

/// One block of `bytes`, mapped with `pages`, registered once; `touch_seconds` gets the mapping part.
double pin_block(size_t bytes, Pages pages, double* touch_seconds, std::string* note) {
  const long huge_before = anon_huge_kb();
  auto t = Clock::now();
  HostBlock b = map_block(bytes, pages);
  const double touch = seconds_since(t);
  if (!b.data) {
    if (note) *note = std::string("mmap failed: ") + std::strerror(errno);
    return -1;
  }
  if (note) {
    std::ostringstream o;
    o << "AnonHugePages +" << (anon_huge_kb() - huge_before) << " kB";
    *note = o.str();
  }
  t = Clock::now();
  const cudaError_t st = cudaHostRegister(b.data, bytes, cudaHostRegisterDefault);
  const double reg = seconds_since(t);
  if (st != cudaSuccess) {
    if (note) *note += std::string("; cudaHostRegister failed: ") + cudaGetErrorString(st);
    cudaGetLastError();
    unmap_block(b);
    return -1;
  }
  cudaHostUnregister(b.data);
  unmap_block(b);
  if (touch_seconds) *touch_seconds = touch;
  return touch + reg;
}

/// Pinning rates: today's pool against one registration, huge pages and cudaHostAlloc.
void measure_pinning() {
  std::printf("transparent huge pages: enabled %s, defrag %s\n",
              first_line("/sys/kernel/mm/transparent_hugepage/enabled").c_str(),
              first_line("/sys/kernel/mm/transparent_hugepage/defrag").c_str());
  {  // the driver's one-time costs out of the way
    bool failed = false;
    pin_ring(1, 2 << 20, 1, Pages::Populate, &failed);
  }
  const int count = 16 * 3;
  const size_t piece = 2 << 20, ring = count * piece;
  for (int repeat = 0; repeat < 2; ++repeat) {
    const std::string r = repeat ? " (again)" : "";
    bool failed = false;
    double s = pin_ring(count, piece, 3, Pages::Populate, &failed);
    record("pin ring 48 x 2 MiB, today's pool, 16 threads" + r, ring, s, failed ? "some failed" : "");
    s = pin_ring(count, piece, count, Pages::Populate, &failed);
    record("pin ring 48 x 2 MiB, today's pool, 1 thread" + r, ring, s, failed ? "some failed" : "");
    s = pin_ring(count, piece, 3, Pages::Huge, &failed);
    record("pin ring 48 x 2 MiB, THP, 16 threads" + r, ring, s, failed ? "some failed" : "");
    for (Pages pages : {Pages::Populate, Pages::Touch, Pages::Huge, Pages::HugeTlb}) {
      const char* how = pages == Pages::Populate ? "MAP_POPULATE"
                        : pages == Pages::Touch  ? "touched"
                        : pages == Pages::Huge   ? "THP (madvise before touching)"
                                                 : "MAP_HUGETLB";
      double touch = 0;
      std::string note;
      s = pin_block(ring, pages, &touch, &note);
      if (s < 0) {
        std::printf("pin ring as one 96 MiB block, %s: %s\n", how, note.c_str());
        continue;
      }
      record(std::string("pin ring as one 96 MiB block, ") + how + r, ring, s,
             "mapping/touching " + std::to_string(touch * 1e3) + " ms; " + note);
    }
    char* h = nullptr;
    auto t = Clock::now();
    check(cudaHostAlloc(reinterpret_cast<void**>(&h), ring, cudaHostAllocDefault), "cudaHostAlloc");
    record("pin ring with one cudaHostAlloc of 96 MiB" + r, ring, seconds_since(t));
    cudaFreeHost(h);
  }
  for (Pages pages : {Pages::Populate, Pages::Huge}) {
    double touch = 0;
    std::string note;
    const double s = pin_block(256ull << 20, pages, &touch, &note);
    if (s >= 0)
      record(std::string("pin 256 MiB, ") + (pages == Pages::Huge ? "THP" : "MAP_POPULATE"), 256ull << 20, s,
             "mapping/touching " + std::to_string(touch * 1e3) + " ms; " + note);
  }
}


std::string json_escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == '"' || c == '\\') out += '\\';
    out += c;
  }
  return out;
}

// ------------------------------------------------------------ small copies

/// `count` device-to-device copies of `bytes` each: one cudaMemcpyAsync a copy, then one batched
/// call for all of them; host seconds to issue and total seconds to finish, per copy.
void measure_small_copies(int count, size_t bytes) {
  char *src = nullptr, *dst = nullptr;
  if (cudaMalloc(reinterpret_cast<void**>(&src), count * bytes) != cudaSuccess ||
      cudaMalloc(reinterpret_cast<void**>(&dst), count * bytes) != cudaSuccess) {
    cudaGetLastError();
    std::printf("small copies %d x %zu: not enough device memory\n", count, bytes);
    cudaFree(src);
    return;
  }
  cudaStream_t stream;
  check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate");
  const std::string what = std::to_string(count) + " x " + std::to_string(bytes >> 10) + " KiB D2D";
  for (int repeat = 0; repeat < 2; ++repeat) {
    check(cudaDeviceSynchronize(), "sync");
    auto t = Clock::now();
    for (int i = 0; i < count; ++i)
      check(cudaMemcpyAsync(dst + i * bytes, src + i * bytes, bytes, cudaMemcpyDeviceToDevice, stream), "D2D");
    const double issue = seconds_since(t);
    check(cudaStreamSynchronize(stream), "sync");
    const double total = seconds_since(t);
    if (repeat)
      record("copies, one cudaMemcpyAsync each: " + what, count * bytes, total,
             "host " + std::to_string(issue / count * 1e6) + " us per copy to issue, " +
                 std::to_string(total / count * 1e6) + " us per copy done");
  }
#if CUDART_VERSION >= 12080
  std::vector<void*> dsts(count), srcs(count);
  std::vector<size_t> sizes(count, bytes);
  for (int i = 0; i < count; ++i) {
    dsts[i] = dst + i * bytes;
    srcs[i] = src + i * bytes;
  }
  cudaMemcpyAttributes attr{};
  attr.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
  size_t attr_index = 0;
  for (int repeat = 0; repeat < 2; ++repeat) {
    check(cudaDeviceSynchronize(), "sync");
    auto t = Clock::now();
#if CUDART_VERSION >= 13000
    const cudaError_t st = cudaMemcpyBatchAsync(dsts.data(), srcs.data(), sizes.data(), count, &attr, &attr_index, 1, stream);
#else
    size_t fail = 0;
    const cudaError_t st =
        cudaMemcpyBatchAsync(dsts.data(), srcs.data(), sizes.data(), count, &attr, &attr_index, 1, &fail, stream);
#endif
    const double issue = seconds_since(t);
    if (st != cudaSuccess) {
      std::printf("cudaMemcpyBatchAsync: %s\n", cudaGetErrorString(st));
      cudaGetLastError();
      break;
    }
    check(cudaStreamSynchronize(stream), "sync");
    const double total = seconds_since(t);
    if (repeat)
      record("copies, one cudaMemcpyBatchAsync: " + what, count * bytes, total,
             "host " + std::to_string(issue / count * 1e6) + " us per copy to issue, " +
                 std::to_string(total / count * 1e6) + " us per copy done");
  }
#endif
  cudaStreamDestroy(stream);
  cudaFree(src);
  cudaFree(dst);
}

// ------------------------------------------------------------ contention

/// Host microseconds per call: median and mean of `us`.
std::string call_costs(std::vector<double> us) {
  if (us.empty()) return "no calls";
  double sum = 0;
  for (double u : us) sum += u;
  std::sort(us.begin(), us.end());
  char text[160];
  std::snprintf(text, sizeof text, "median %.2f us, mean %.2f us, p90 %.2f us", us[us.size() / 2], sum / us.size(),
                us[us.size() * 9 / 10]);
  return text;
}

/// What a consumer's CUDA calls cost its thread while readers stream the files onto the device,
/// the staged stream's case (runtime/src/staging/staged_stream.cpp): `readers` threads run the
/// pipeline over the files again and again, in 2 MiB pieces through 3 pinned buffers each, making
/// per piece either the calls the stream made before (`heavy`: an event recorded on the consumer's
/// stream, a wait for it, the copy and two events) or two (the copy and its buffer's event), while
/// this thread issues 1028 device-to-device copies of 2.75 MiB (an fp8 expert of the MoE shape)
/// and a stream wait after each, every call timed on its own. readers = 0 is the idle host.
void measure_contention(const std::vector<File>& files, char* device, int readers, bool heavy) {
  constexpr uint64_t kPiece = 2 << 20;
  constexpr int kDepth = 3, kCopies = 1028;
  constexpr size_t kExpert = 1408 * 2048;
  char* scratch = nullptr;
  if (cudaMalloc(reinterpret_cast<void**>(&scratch), 2 * kExpert) != cudaSuccess) {
    cudaGetLastError();
    std::printf("contention: not enough device memory\n");
    return;
  }
  cudaStream_t consumer;
  cudaEvent_t mark;
  check(cudaStreamCreateWithFlags(&consumer, cudaStreamNonBlocking), "cudaStreamCreate");
  check(cudaEventCreateWithFlags(&mark, cudaEventDisableTiming), "cudaEventCreate");
  check(cudaEventRecord(mark, consumer), "cudaEventRecord");
  const auto pieces = pieces_of(files, kPiece);
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> calls{0};
  std::vector<std::thread> pool;
  for (int r = 0; r < readers; ++r)
    pool.emplace_back([&, r] {
      cudaStream_t stream;
      check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate");
      std::vector<char*> host(kDepth);
      std::vector<cudaEvent_t> done(kDepth);
      cudaEvent_t allocated, item;
      for (int d = 0; d < kDepth; ++d) {
        check(cudaHostAlloc(reinterpret_cast<void**>(&host[d]), kPiece, cudaHostAllocDefault), "cudaHostAlloc");
        check(cudaEventCreateWithFlags(&done[d], cudaEventDisableTiming), "cudaEventCreate");
      }
      check(cudaEventCreateWithFlags(&allocated, cudaEventDisableTiming), "cudaEventCreate");
      check(cudaEventCreateWithFlags(&item, cudaEventDisableTiming), "cudaEventCreate");
      std::vector<bool> used(kDepth, false);
      uint64_t made = 0;
      for (size_t i = static_cast<size_t>(r), k = 0; !stop.load(std::memory_order_relaxed);
           i = (i + static_cast<size_t>(readers)) % pieces.size(), k = (k + 1) % kDepth) {
        const Piece& p = pieces[i];
        if (used[k]) check(cudaEventSynchronize(done[k]), "cudaEventSynchronize");
        read_fully(files[p.file].fd, host[k], p.bytes, p.offset);
        if (heavy) {
          check(cudaEventRecord(allocated, consumer), "cudaEventRecord");
          check(cudaStreamWaitEvent(stream, allocated, 0), "cudaStreamWaitEvent");
          made += 2;
        }
        check(cudaMemcpyAsync(device + p.dst, host[k], p.bytes, cudaMemcpyHostToDevice, stream), "H2D");
        check(cudaEventRecord(done[k], stream), "cudaEventRecord");
        made += 2;
        if (heavy) {
          check(cudaEventRecord(item, stream), "cudaEventRecord");
          ++made;
        }
        used[k] = true;
      }
      check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
      calls += made;
      for (int d = 0; d < kDepth; ++d) {
        cudaFreeHost(host[d]);
        cudaEventDestroy(done[d]);
      }
      cudaEventDestroy(allocated);
      cudaEventDestroy(item);
      cudaStreamDestroy(stream);
    });
  if (readers) std::this_thread::sleep_for(std::chrono::milliseconds(20));  // the readers under way
  std::vector<double> copy_us, wait_us;
  const auto start = Clock::now();
  for (int i = 0; i < kCopies; ++i) {
    auto t = Clock::now();
    check(cudaMemcpyAsync(scratch + (i % 2) * kExpert, scratch + ((i + 1) % 2) * kExpert, kExpert,
                          cudaMemcpyDeviceToDevice, consumer),
          "D2D");
    auto u = Clock::now();
    check(cudaStreamWaitEvent(consumer, mark, 0), "cudaStreamWaitEvent");
    copy_us.push_back(std::chrono::duration<double, std::micro>(u - t).count());
    wait_us.push_back(std::chrono::duration<double, std::micro>(Clock::now() - u).count());
  }
  const double span = seconds_since(start);
  stop = true;
  for (auto& th : pool) th.join();
  check(cudaStreamSynchronize(consumer), "sync");
  const std::string who = readers ? std::to_string(readers) + " readers making " + (heavy ? "5" : "2") + " calls per piece"
                                  : std::string("an idle host");
  record("consumer calls beside " + who, static_cast<uint64_t>(kCopies) * kExpert, span,
         "cudaMemcpyAsync D2D: " + call_costs(copy_us) + "; cudaStreamWaitEvent: " + call_costs(wait_us) +
             (readers ? "; readers' calls in all: " + std::to_string(calls.load()) : std::string()));
  cudaEventDestroy(mark);
  cudaStreamDestroy(consumer);
  cudaFree(scratch);
}

std::set<std::string> sections;  ///< empty: all
bool wanted(const std::string& section) { return sections.empty() || sections.count(section); }

/// Everything measured with the files in the page cache.
void measure_warm(const std::vector<File>& files, uint64_t total, char*& device) {
  if (wanted("pinning")) measure_pinning();
  // Pinning rates of whole blocks, as earlier runs recorded them.
  if (wanted("pinning")) {
    const uint64_t n = 256ull << 20;
    char* h = nullptr;
    auto t = Clock::now();
    check(cudaHostAlloc(reinterpret_cast<void**>(&h), n, cudaHostAllocDefault), "cudaHostAlloc");
    record("cudaHostAlloc 256 MiB", n, seconds_since(t));
    cudaFreeHost(h);
    void* m = nullptr;
    if (posix_memalign(&m, 4096, n) != 0) std::exit(1);
    std::memset(m, 1, n);
    t = Clock::now();
    check(cudaHostRegister(m, n, cudaHostRegisterDefault), "cudaHostRegister");
    record("cudaHostRegister 256 MiB (touched malloc)", n, seconds_since(t));
    cudaHostUnregister(m);
    std::free(m);
  }

  // Copy ceilings.
  if (wanted("copies")) {
    const uint64_t n = std::min<uint64_t>(total, 4ull << 30);
    char* h = nullptr;
    check(cudaHostAlloc(reinterpret_cast<void**>(&h), n, cudaHostAllocDefault), "cudaHostAlloc");
    std::memset(h, 1, n);
    double s = best_of(3, [&] {
      auto t = Clock::now();
      check(cudaMemcpy(device, h, n, cudaMemcpyHostToDevice), "H2D");
      return seconds_since(t);
    });
    record("pinned H2D, one copy", n, s);
    cudaStream_t streams[4];
    for (auto& st : streams) check(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking), "stream");
    s = best_of(3, [&] {
      auto t = Clock::now();
      const uint64_t piece = 16 << 20;
      int k = 0;
      for (uint64_t off = 0; off < n; off += piece, ++k)
        check(cudaMemcpyAsync(device + off, h + off, std::min(piece, n - off), cudaMemcpyHostToDevice, streams[k % 4]),
              "H2D");
      check(cudaDeviceSynchronize(), "sync");
      return seconds_since(t);
    });
    record("pinned H2D, 16 MiB pieces on 4 streams", n, s);
    for (auto& st : streams) cudaStreamDestroy(st);
    cudaFreeHost(h);
    const uint64_t half = std::min<uint64_t>(total / 2, 4ull << 30);
    s = best_of(3, [&] {
      auto t = Clock::now();
      check(cudaMemcpy(device + half, device, half, cudaMemcpyDeviceToDevice), "D2D");
      check(cudaDeviceSynchronize(), "sync");
      return seconds_since(t);
    });
    record("device-to-device copy (bytes copied)", half, s);
  }

  if (wanted("smallcopies")) {
    measure_small_copies(20000, 32 << 10);
    measure_small_copies(1028, 1408 * 2048 * 2);
  }

  if (wanted("contention")) {
    measure_contention(files, device, 0, false);
    for (bool heavy : {true, false}) measure_contention(files, device, 12, heavy);
  }

  // Device allocation: one block, and a 10-layer Llama-3-8B's tensors one by one.
  if (wanted("alloc")) {
    cudaFree(device);
    auto t = Clock::now();
    check(cudaMalloc(reinterpret_cast<void**>(&device), total), "cudaMalloc");
    record("cudaMalloc, one block of the files' size", total, seconds_since(t));
    cudaFree(device);
    std::vector<uint64_t> sizes = {128256ull * 4096 * 2, 128256ull * 4096 * 2, 4096 * 2};
    for (int l = 0; l < 10; ++l)
      for (uint64_t s : {4096ull * 4096 * 2, 6144ull * 4096 * 2, 4096ull * 4096 * 2, 28672ull * 4096 * 2,
                         14336ull * 4096 * 2, 4096ull * 2, 4096ull * 2})
        sizes.push_back(s);
    std::vector<void*> ptrs;
    uint64_t bytes = 0;
    t = Clock::now();
    for (uint64_t s : sizes) {
      void* p = nullptr;
      check(cudaMalloc(&p, s), "cudaMalloc");
      ptrs.push_back(p);
      bytes += s;
    }
    record("cudaMalloc, " + std::to_string(sizes.size()) + " tensors", bytes, seconds_since(t));
    t = Clock::now();
    for (void* p : ptrs) cudaFree(p);
    record("cudaFree of those", bytes, seconds_since(t));
    check(cudaMalloc(reinterpret_cast<void**>(&device), total), "cudaMalloc");
  }

  const unsigned cores = std::max(1u, std::thread::hardware_concurrency());
  // Page cache -> host, by threads.
  if (wanted("reads")) {
    warm(files);
    std::vector<int> thread_counts = {1, 4, 8, 16, 32};
    if (cores > 16) thread_counts.push_back(static_cast<int>(cores));
    for (int t : thread_counts)
      record("page cache pread, " + std::to_string(t) + " threads, 8 MiB", total,
             best_of(2, [&] { return parallel_read(files, t, 8 << 20, false); }));
    record("page cache pread, 16 threads, 1 MiB", total,
           best_of(2, [&] { return parallel_read(files, 16, 1 << 20, false); }));
    record("page cache pread, 16 threads, 32 MiB", total,
           best_of(2, [&] { return parallel_read(files, 16, 32 << 20, false); }));
    record("page cache pread into pinned, 16 threads, 8 MiB", total,
           best_of(2, [&] { return parallel_read(files, 16, 8 << 20, true); }));
  }

  // The staged pipeline, by threads, piece size and ring depth.
  struct Config {
    int threads;
    uint64_t piece;
    int depth;
  };
  if (wanted("pipeline")) {
    for (Config c : {Config{8, 8 << 20, 2}, Config{16, 4 << 20, 2}, Config{16, 8 << 20, 2}, Config{16, 16 << 20, 2},
                     Config{16, 8 << 20, 4}, Config{24, 8 << 20, 2}, Config{32, 4 << 20, 2}}) {
      if (static_cast<unsigned>(c.threads) > 2 * cores) continue;
      double pin = 0;
      const double s = best_of(2, [&] { return pipeline(files, device, c.threads, c.piece, c.depth, &pin); });
      record("pipeline pread->pinned->H2D, " + std::to_string(c.threads) + "t x " + std::to_string(c.depth) + " x " +
                 std::to_string(c.piece >> 20) + " MiB",
             total, s, "pinning the ring took " + std::to_string(pin * 1e3) + " ms");
    }
  }

  // The page cache itself registered with CUDA (no host copy at all).
  if (wanted("mapping")) {
    double reg = 0, copy = 0, unreg = 0;
    bool ok = true;
    std::vector<std::pair<void*, uint64_t>> maps;
    for (const auto& f : files) {
      void* p = ::mmap(nullptr, f.size, PROT_READ, MAP_SHARED | MAP_POPULATE, f.fd, 0);
      if (p == MAP_FAILED) {
        ok = false;
        break;
      }
      maps.emplace_back(p, f.size);
    }
    if (ok) {
      auto t = Clock::now();
      for (auto& [p, n] : maps) {
        const cudaError_t st = cudaHostRegister(p, n, cudaHostRegisterReadOnly);
        if (st != cudaSuccess) {
          std::printf("cudaHostRegister(read-only) of a file mapping failed: %s\n", cudaGetErrorString(st));
          cudaGetLastError();
          ok = false;
          break;
        }
      }
      reg = seconds_since(t);
      if (ok) {
        t = Clock::now();
        uint64_t dst = 0;
        for (auto& [p, n] : maps) {
          check(cudaMemcpyAsync(device + dst, p, n, cudaMemcpyHostToDevice, nullptr), "H2D from mapping");
          dst += n;
        }
        check(cudaDeviceSynchronize(), "sync");
        copy = seconds_since(t);
        t = Clock::now();
        for (auto& [p, n] : maps) cudaHostUnregister(p);
        unreg = seconds_since(t);
        record("mmap + cudaHostRegister(read-only)", total, reg);
        record("H2D from the registered mapping", total, copy);
        record("cudaHostUnregister", total, unreg);
        record("register + copy + unregister", total, reg + copy + unreg);
      }
    }
    for (auto& [p, n] : maps) ::munmap(p, n);
  }
}

}  // namespace

int main(int argc, char** argv) {
  std::string out_path = "raw_probe.json";
  bool cold = false, cold_only = false;
  std::vector<File> files;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--out" && i + 1 < argc) {
      out_path = argv[++i];
    } else if (arg == "--cold") {
      cold = true;
    } else if (arg == "--cold-only") {
      cold = cold_only = true;
    } else if (arg == "--sections" && i + 1 < argc) {
      std::stringstream list(argv[++i]);
      for (std::string item; std::getline(list, item, ',');) sections.insert(item);
    } else {
      File f;
      f.path = arg;
      f.fd = ::open(arg.c_str(), O_RDONLY);
      struct stat st{};
      if (f.fd < 0 || ::fstat(f.fd, &st) != 0) {
        std::perror(arg.c_str());
        return 2;
      }
      f.size = static_cast<uint64_t>(st.st_size);
      files.push_back(f);
    }
  }
  if (files.empty()) {
    std::fprintf(stderr, "usage: raw_probe [--out F.json] [--cold | --cold-only] [--sections LIST] FILE...\n");
    return 2;
  }
  uint64_t total = 0;
  for (const auto& f : files) total += f.size;
  cudaDeviceProp prop{};
  check(cudaGetDeviceProperties(&prop, 0), "cudaGetDeviceProperties");
  check(cudaFree(nullptr), "context");
  std::printf("device %s, %zu files, %.3f GB, %u cores\n", prop.name, files.size(), total / 1e9,
              std::thread::hardware_concurrency());

  char* device = nullptr;
  check(cudaMalloc(reinterpret_cast<void**>(&device), total), "cudaMalloc");
  if (!cold_only) measure_warm(files, total, device);

  if (cold) {
    if (!drop_page_cache()) {
      std::printf("cold: cannot write /proc/sys/vm/drop_caches (not root?): skipped\n");
    } else {
      for (int t : {4, 16, 32}) {
        drop_page_cache();
        record("cold pread, " + std::to_string(t) + " threads, 8 MiB", total, parallel_read(files, t, 8 << 20, false));
      }
      drop_page_cache();
      record("cold O_DIRECT pread, 16 threads, 8 MiB", total, parallel_read(files, 16, 8 << 20, false, true));
      drop_page_cache();
      record("cold O_DIRECT pread, 32 threads, 8 MiB", total, parallel_read(files, 32, 8 << 20, false, true));
      drop_page_cache();
      if (!cold_only) {
        double pin = 0;
        record("cold pipeline 16t x 2 x 8 MiB", total, pipeline(files, device, 16, 8 << 20, 2, &pin));
      }
      warm(files);
    }
  }

  std::ofstream out(out_path);
  out << "{\"device\": \"" << json_escape(prop.name) << "\", \"bytes\": " << total << ", \"results\": [\n";
  for (size_t i = 0; i < results.size(); ++i) {
    const Result& r = results[i];
    out << "  {\"name\": \"" << json_escape(r.name) << "\", \"bytes\": " << r.bytes << ", \"seconds\": " << r.seconds
        << ", \"gb_per_s\": " << (r.seconds > 0 ? r.bytes / r.seconds / 1e9 : 0) << ", \"note\": \""
        << json_escape(r.note) << "\"}" << (i + 1 < results.size() ? "," : "") << "\n";
  }
  out << "]}\n";
  cudaFree(device);
  return 0;
}
