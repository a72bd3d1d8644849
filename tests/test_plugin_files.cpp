// Plugin files as a hot-drop leaves them: a copy still in progress (the file
// cut at points read from the real plugin's own ELF headers, here, with
// <elf.h>), a library of another machine, world-writable directories and
// files. None may stop `plugins list` or a load another plugin serves; each
// is listed broken with what is wrong. Every CLI run has a deadline: a signal
// or a hang fails the test.

#include <elf.h>
#include <gtest/gtest.h>
#include <sys/stat.h>

#include <cstring>

#include "test_support.h"

namespace loadkit::test {
namespace {

constexpr unsigned kDeadlineSeconds = 120;

/// The plugin the tests cut: a real one from the build.
std::string source_plugin() { return plugin_dir() + "/llama.so"; }

struct ElfLayout {
  Elf64_Ehdr header{};
  std::vector<Elf64_Phdr> segments;
};

ElfLayout read_layout(const std::string& bytes) {
  ElfLayout layout;
  std::memcpy(&layout.header, bytes.data(), sizeof layout.header);
  for (int i = 0; i < layout.header.e_phnum; ++i) {
    Elf64_Phdr p{};
    std::memcpy(&p, bytes.data() + layout.header.e_phoff + i * sizeof(Elf64_Phdr), sizeof p);
    layout.segments.push_back(p);
  }
  return layout;
}

/// Where a copy is cut, and the status `plugins list` must then show.
struct Cut {
  uint64_t at = 0;
  std::string status;
};

/// A copy stopped at one of these points; computed from the plugin's own headers.
enum class CutPoint { Empty, InsideTheElfHeader, InsideTheProgramHeaders, MidSegment, InsideTheSectionHeaders };

Cut cut_for(CutPoint point, const std::string& bytes) {
  const ElfLayout elf = read_layout(bytes);
  const uint64_t size = bytes.size();
  auto status = [](const std::string& what, uint64_t end, uint64_t at) {
    return "broken: incomplete ELF file: " + what + " ends at byte " + std::to_string(end) + ", the file has " +
           std::to_string(at) + " bytes (still being copied?)";
  };
  switch (point) {
    case CutPoint::Empty: return {0, status("the ELF header", sizeof(Elf64_Ehdr), 0)};
    case CutPoint::InsideTheElfHeader: return {40, status("the ELF header", sizeof(Elf64_Ehdr), 40)};
    case CutPoint::InsideTheProgramHeaders: {
      const uint64_t end = elf.header.e_phoff + uint64_t{elf.header.e_phnum} * sizeof(Elf64_Phdr);
      const uint64_t at = elf.header.e_phoff + sizeof(Elf64_Phdr) + 8;
      return {at, status("the program header table", end, at)};
    }
    case CutPoint::MidSegment: {
      // The largest loadable segment (the code), cut in its middle.
      size_t largest = 0;
      for (size_t i = 0; i < elf.segments.size(); ++i)
        if (elf.segments[i].p_type == PT_LOAD && elf.segments[i].p_filesz > elf.segments[largest].p_filesz)
          largest = i;
      const Elf64_Phdr& s = elf.segments[largest];
      EXPECT_EQ(s.p_type, uint32_t{PT_LOAD});
      // Segments before it in the table lie before it in the file (the linker's order): the first
      // one reaching past the cut is this one or an earlier one of the table; find it as the loader would.
      const uint64_t at = s.p_offset + s.p_filesz / 2;
      for (size_t i = 0; i < elf.segments.size(); ++i)
        if (elf.segments[i].p_type == PT_LOAD && elf.segments[i].p_offset + elf.segments[i].p_filesz > at)
          return {at, status("segment " + std::to_string(i) + " (PT_LOAD)",
                             elf.segments[i].p_offset + elf.segments[i].p_filesz, at)};
      ADD_FAILURE() << "no segment reaches past byte " << at;
      return {};
    }
    case CutPoint::InsideTheSectionHeaders: {
      const uint64_t end = elf.header.e_shoff + uint64_t{elf.header.e_shnum} * elf.header.e_shentsize;
      EXPECT_EQ(end, size) << "the section header table is expected last";
      for (const auto& s : elf.segments)
        EXPECT_LE(s.p_offset + s.p_filesz, size - 10) << "a segment ends in the section header table";
      return {size - 10, status("the section header table", end, size - 10)};
    }
  }
  return {};
}

struct CutCase {
  const char* name;
  CutPoint point;
};
const CutCase kCuts[] = {
    {"Empty", CutPoint::Empty},
    {"InsideTheElfHeader", CutPoint::InsideTheElfHeader},
    {"InsideTheProgramHeaders", CutPoint::InsideTheProgramHeaders},
    {"MidSegment", CutPoint::MidSegment},
    {"InsideTheSectionHeaders", CutPoint::InsideTheSectionHeaders},
};
void PrintTo(const CutCase& c, std::ostream* os) { *os << c.name; }

std::map<std::string, nlohmann::json> listing(const CliResult& r) {
  std::map<std::string, nlohmann::json> out;
  const auto parsed = nlohmann::json::parse(r.out);
  for (const auto& p : parsed["plugins"]) out[p["file"].get<std::string>()] = p;
  return out;
}

class PartialPlugin : public ::testing::TestWithParam<CutCase> {};

TEST_P(PartialPlugin, IsListedBrokenWithWhereItEndsAndTheOthersWork) {
  TempDir tmp;
  const std::string bytes = read_bytes(source_plugin());
  const Cut cut = cut_for(GetParam().point, bytes);
  fs::create_directories(tmp / "drop");
  const fs::path partial = tmp / "drop" / "llama.so";
  write_bytes(partial, bytes.substr(0, cut.at));

  auto r = run_cli({"plugins", "list", "--json", "--plugin-dir", (tmp / "drop").string(), "--plugin-dir", plugin_dir()},
                   {}, with_deadline(kDeadlineSeconds));
  ASSERT_EQ(r.code, 0) << r.err;
  auto plugins = listing(r);
  EXPECT_EQ(plugins[partial.string()]["status"], cut.status);
  // The complete copy further down the search path serves in its place, and the other plugins work.
  EXPECT_EQ(plugins[source_plugin()]["status"], "ok");
  EXPECT_EQ(plugins[plugin_dir() + "/phi3.so"]["status"], "ok");

  // Loads, with the partial file first in the search order: of its architecture (the complete
  // copy serves) and of another.
  auto load = run_cli({"load", "--model", fixture("llama_bf16_mqa").dir, "--plugin-dir", (tmp / "drop").string(),
                       "--plugin-dir", plugin_dir()},
                      {}, with_deadline(kDeadlineSeconds));
  EXPECT_EQ(load.code, 0) << load.err;
  EXPECT_NE(load.err.find(partial.string() + ": incomplete ELF file"), std::string::npos) << load.err;
  auto other = run_cli({"load", "--model", fixture("phi3_fp32_gqa").dir, "--plugin-dir", (tmp / "drop").string(),
                        "--plugin-dir", plugin_dir()},
                       {}, with_deadline(kDeadlineSeconds));
  EXPECT_EQ(other.code, 0) << other.err;
}

INSTANTIATE_TEST_SUITE_P(Cuts, PartialPlugin, ::testing::ValuesIn(kCuts),
                         [](const auto& info) { return std::string(info.param.name); });

// The copy finishes: the next command finds the plugin complete and it serves its architecture.
TEST(PluginFiles, ACopyThatCompletesServesOnTheNextCommand) {
  TempDir tmp;
  const std::string bytes = read_bytes(source_plugin());
  fs::create_directories(tmp / "drop");
  const fs::path file = tmp / "drop" / "llama.so";
  write_bytes(file, bytes.substr(0, bytes.size() / 2));
  auto before = run_cli({"inspect", "--json", "--model", fixture("llama_bf16_mqa").dir, "--plugin-dir",
                         (tmp / "drop").string()},
                        {}, with_deadline(kDeadlineSeconds));
  ASSERT_EQ(before.code, 0) << before.err;
  EXPECT_NE(nlohmann::json::parse(before.out)["plugin"], file.string());
  write_bytes(file, bytes);
  auto after = run_cli({"inspect", "--json", "--model", fixture("llama_bf16_mqa").dir, "--plugin-dir",
                        (tmp / "drop").string()},
                       {}, with_deadline(kDeadlineSeconds));
  ASSERT_EQ(after.code, 0) << after.err;
  EXPECT_EQ(nlohmann::json::parse(after.out)["plugin"], file.string());
}

// A library built for another machine is refused before dlopen, naming both machines.
TEST(PluginFiles, ALibraryOfAnotherMachineIsListedBrokenNamingIt) {
  TempDir tmp;
  std::string bytes = read_bytes(source_plugin());
  fs::create_directories(tmp / "drop");
  std::string arm = bytes;
  const uint16_t aarch64 = EM_AARCH64;
  std::memcpy(arm.data() + offsetof(Elf64_Ehdr, e_machine), &aarch64, sizeof aarch64);
  write_bytes(tmp / "drop" / "arm.so", arm);
  std::string elf32 = bytes;
  elf32[EI_CLASS] = ELFCLASS32;
  write_bytes(tmp / "drop" / "elf32.so", elf32);

  auto r = run_cli({"plugins", "list", "--json", "--plugin-dir", (tmp / "drop").string(), "--plugin-dir", plugin_dir()},
                   {}, with_deadline(kDeadlineSeconds));
  ASSERT_EQ(r.code, 0) << r.err;
  auto plugins = listing(r);
#if defined(__x86_64__)
  EXPECT_EQ(plugins[(tmp / "drop" / "arm.so").string()]["status"],
            "broken: ELF file for another machine: AArch64, this host is x86-64");
#endif
  EXPECT_EQ(plugins[(tmp / "drop" / "elf32.so").string()]["status"],
            "broken: ELF file for another machine: 32-bit, this host is 64-bit");
  EXPECT_EQ(plugins[plugin_dir() + "/llama.so"]["status"], "ok");
}

// Anyone who can write a plugin directory or file can run code in every loadkit process: warned.
TEST(PluginFiles, WorldWritableDirectoriesAndFilesAreWarnedAbout) {
  TempDir tmp;
  fs::create_directories(tmp / "open");
  fs::copy_file(source_plugin(), tmp / "open" / "llama.so");
  ASSERT_EQ(chmod((tmp / "open").c_str(), 0777), 0);
  ASSERT_EQ(chmod((tmp / "open" / "llama.so").c_str(), 0666), 0);
  auto r = run_cli({"plugins", "list", "--plugin-dir", (tmp / "open").string()}, {}, with_deadline(kDeadlineSeconds));
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.err.find("plugin directory " + (tmp / "open").string() + " is writable by every user"), std::string::npos)
      << r.err;
  EXPECT_NE(r.err.find("plugin " + (tmp / "open" / "llama.so").string() + " is writable by every user"),
            std::string::npos) << r.err;
  EXPECT_NE(r.out.find("status:        ok"), std::string::npos) << r.out;  // a warning, not a refusal

  // The build's own directory is not world-writable: no such warning there.
  auto quiet = run_cli({"plugins", "list", "--plugin-dir", plugin_dir()}, {}, with_deadline(kDeadlineSeconds));
  EXPECT_EQ(quiet.err.find("writable by every user"), std::string::npos) << quiet.err;
}

}  // namespace
}  // namespace loadkit::test
