#include "elf_check.h"

#include <elf.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <vector>

#include "loadkit/error.h"

namespace loadkit {

namespace {

static_assert(sizeof(void*) == 8, "the runtime (libtorch) is 64-bit: plugins are ELFCLASS64");

#if defined(__x86_64__)
constexpr uint16_t kHostMachine = EM_X86_64;
#elif defined(__aarch64__)
constexpr uint16_t kHostMachine = EM_AARCH64;
#elif defined(__powerpc64__)
constexpr uint16_t kHostMachine = EM_PPC64;
#elif defined(__riscv)
constexpr uint16_t kHostMachine = EM_RISCV;
#elif defined(__s390x__)
constexpr uint16_t kHostMachine = EM_S390;
#else
#error "elf_check.cpp: add this machine's ELF e_machine"
#endif

constexpr unsigned char kHostData = __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__ ? ELFDATA2LSB : ELFDATA2MSB;

std::string machine_name(uint16_t machine) {
  switch (machine) {
    case EM_X86_64: return "x86-64";
    case EM_386: return "x86";
    case EM_AARCH64: return "AArch64";
    case EM_ARM: return "ARM";
    case EM_PPC64: return "PowerPC64";
    case EM_RISCV: return "RISC-V";
    case EM_S390: return "s390";
    default: return cat("machine ", machine);
  }
}

/// Reads `bytes` at `offset`; false on a short read (the file shrank) or an error.
bool read_at(int fd, void* into, size_t bytes, uint64_t offset) {
  auto* out = static_cast<char*>(into);
  while (bytes > 0) {
    const ssize_t n = ::pread(fd, out, bytes, static_cast<off_t>(offset));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    out += n;
    bytes -= static_cast<size_t>(n);
    offset += static_cast<uint64_t>(n);
  }
  return true;
}

/// `count` entries of `entry` bytes from `offset` end within `size`? Sets `end` (overflow-safe).
bool table_fits(uint64_t offset, uint64_t count, uint64_t entry, uint64_t size, uint64_t& end) {
  uint64_t bytes = 0;
  if (__builtin_mul_overflow(count, entry, &bytes) || __builtin_add_overflow(offset, bytes, &end)) {
    end = UINT64_MAX;
    return false;
  }
  return end <= size;
}

ElfProblem incomplete(const std::string& what, uint64_t end, uint64_t size) {
  return {true, cat("incomplete ELF file: ", what, " ends at byte ",
             end == UINT64_MAX ? std::string("(beyond 2^64)") : std::to_string(end), ", the file has ", size,
             " bytes (still being copied?)")};
}

}  // namespace

std::optional<ElfProblem> elf_problem(int fd, uint64_t size) {
  // A copy that has just begun is empty or holds part of the header: incomplete, not "not ELF".
  unsigned char ident[EI_NIDENT] = {};
  const uint64_t have = std::min<uint64_t>(size, EI_NIDENT);
  if (have > 0 && !read_at(fd, ident, have, 0)) return ElfProblem{false, "cannot read its first bytes"};
  if (std::memcmp(ident, ELFMAG, std::min<uint64_t>(have, SELFMAG)) != 0)
    return ElfProblem{false, "not an ELF file (its first bytes are not \\x7fELF)"};
  if (size < sizeof(Elf64_Ehdr)) return incomplete("the ELF header", sizeof(Elf64_Ehdr), size);
  if (ident[EI_CLASS] != ELFCLASS64)
    return ElfProblem{true, cat("ELF file for another machine: ", ident[EI_CLASS] == ELFCLASS32 ? "32-bit" : "unknown class",
                                ", this host is 64-bit")};
  if (ident[EI_DATA] != kHostData)
    return ElfProblem{true, cat("ELF file for another machine: ", ident[EI_DATA] == ELFDATA2MSB ? "big" : "little",
                                "-endian, this host is not")};
  Elf64_Ehdr header{};
  if (!read_at(fd, &header, sizeof header, 0)) return incomplete("the ELF header", sizeof header, size);
  if (header.e_machine != kHostMachine)
    return ElfProblem{true, cat("ELF file for another machine: ", machine_name(header.e_machine), ", this host is ",
                                machine_name(kHostMachine))};
  if (header.e_type != ET_DYN)
    return ElfProblem{true, cat("not a shared library (ELF type ", header.e_type, ", a library is ", ET_DYN, ")")};

  uint64_t end = 0;
  if (header.e_phnum == 0) return ElfProblem{true, "corrupt ELF file: no program headers"};
  if (header.e_phentsize != sizeof(Elf64_Phdr))
    return ElfProblem{true, cat("corrupt ELF file: program header entries of ", header.e_phentsize, " bytes, expected ",
                                sizeof(Elf64_Phdr))};
  if (!table_fits(header.e_phoff, header.e_phnum, sizeof(Elf64_Phdr), size, end))
    return incomplete("the program header table", end, size);
  std::vector<Elf64_Phdr> segments(header.e_phnum);
  if (!read_at(fd, segments.data(), segments.size() * sizeof(Elf64_Phdr), header.e_phoff))
    return incomplete("the program header table", end, size);
  for (size_t i = 0; i < segments.size(); ++i) {
    const Elf64_Phdr& s = segments[i];
    if (s.p_type == PT_LOAD && !table_fits(s.p_offset, 1, s.p_filesz, size, end))
      return incomplete(cat("segment ", i, " (PT_LOAD)"), end, size);
  }
  // Section headers: not mapped by dlopen, but they sit at the very end of a linked file, so a
  // copy that stopped after the last segment is caught here.
  if (header.e_shoff != 0 && !table_fits(header.e_shoff, header.e_shnum, header.e_shentsize, size, end))
    return incomplete("the section header table", end, size);
  return std::nullopt;
}

}  // namespace loadkit
