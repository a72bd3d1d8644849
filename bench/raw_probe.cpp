// Raw ceilings for loading files onto a CUDA device, measured with nothing but
// the CUDA runtime and POSIX reads (no torch, no loadkit): what the hardware
// and the page cache allow, so loadkit's numbers can be read against them.
//
//   raw_probe --out probe.json [--cold | --cold-only] FILE...
//
// Measures, on the given files (a checkpoint's *.safetensors):
//   - pinned host memory: cudaHostAlloc and cudaHostRegister rates (pinning is
//     part of a cold process's load time);
//   - the pinned host-to-device copy ceiling and the device-to-device copy rate;
//   - cudaMalloc of the files' bytes as one block and as a model's many tensors;
//   - parallel pread of the files from the page cache into host buffers, by
//     thread count (the "parallel raw read");
//   - the pipeline pread -> pinned ring -> async H2D, by threads and piece size;
//   - mmap + cudaHostRegister(read-only) of the page cache and a copy from it;
//   - with --cold (root): the same reads after dropping the page cache;
//     --cold-only measures those alone (the bench alternates them with loadkit's).
// Prints a table and writes JSON. A benchmark, never a test.

#include <cuda_runtime_api.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

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

std::string json_escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == '"' || c == '\\') out += '\\';
    out += c;
  }
  return out;
}

/// Everything measured with the files in the page cache.
void measure_warm(const std::vector<File>& files, uint64_t total, char*& device) {
  // Pinning rates.
  {
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
  {
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

  // Device allocation: one block, and a 10-layer Llama-3-8B's tensors one by one.
  {
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

  // Page cache -> host, by threads.
  warm(files);
  const unsigned cores = std::max(1u, std::thread::hardware_concurrency());
  std::vector<int> thread_counts = {1, 4, 8, 16, 32};
  if (cores > 16) thread_counts.push_back(static_cast<int>(cores));
  for (int t : thread_counts)
    record("page cache pread, " + std::to_string(t) + " threads, 8 MiB", total,
           best_of(2, [&] { return parallel_read(files, t, 8 << 20, false); }));
  record("page cache pread, 16 threads, 1 MiB", total, best_of(2, [&] { return parallel_read(files, 16, 1 << 20, false); }));
  record("page cache pread, 16 threads, 32 MiB", total,
         best_of(2, [&] { return parallel_read(files, 16, 32 << 20, false); }));
  record("page cache pread into pinned, 16 threads, 8 MiB", total,
         best_of(2, [&] { return parallel_read(files, 16, 8 << 20, true); }));

  // The staged pipeline, by threads, piece size and ring depth.
  struct Config {
    int threads;
    uint64_t piece;
    int depth;
  };
  for (Config c : {Config{8, 8 << 20, 2}, Config{16, 4 << 20, 2}, Config{16, 8 << 20, 2}, Config{16, 16 << 20, 2},
                   Config{16, 8 << 20, 4}, Config{24, 8 << 20, 2}, Config{32, 4 << 20, 2}}) {
    if (static_cast<unsigned>(c.threads) > 2 * cores) continue;
    double pin = 0;
    const double s = best_of(2, [&] { return pipeline(files, device, c.threads, c.piece, c.depth, &pin); });
    record("pipeline pread->pinned->H2D, " + std::to_string(c.threads) + "t x " + std::to_string(c.depth) + " x " +
               std::to_string(c.piece >> 20) + " MiB",
           total, s, "pinning the ring took " + std::to_string(pin * 1e3) + " ms");
  }

  // The page cache itself registered with CUDA (no host copy at all).
  {
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
    std::fprintf(stderr, "usage: raw_probe [--out F.json] [--cold] FILE...\n");
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
