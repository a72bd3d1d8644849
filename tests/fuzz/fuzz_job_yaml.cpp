// libFuzzer target: a YAML job file's text through parse_job. Every input must
// either become a Job that keeps the schema's promises (a model path, a tp_size
// in range, at least one step, no model step before a load) or be refused with
// one Usage error, one line, that starts with `fuzz.yaml:LINE:COLUMN: `.
// Anything else (another exception, a sanitizer report, a leak, a crash, a
// hang) is a finding.
#include <cctype>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

#include "jobs/job.h"
#include "loadkit/error.h"

namespace {

/// "fuzz.yaml:" then "<digits>:<digits>: ".
bool starts_with_position(const char* message) {
  constexpr char kFile[] = "fuzz.yaml:";
  if (std::strncmp(message, kFile, sizeof kFile - 1) != 0) return false;
  const char* p = message + sizeof kFile - 1;
  for (int field = 0; field < 2; ++field) {
    if (!std::isdigit(static_cast<unsigned char>(*p))) return false;
    while (std::isdigit(static_cast<unsigned char>(*p))) ++p;
    if (*p++ != ':') return false;
  }
  return *p == ' ';
}

}  // namespace

// The variables configs/*.yaml (our seeds) expand, so that they parse past the model.
extern "C" int LLVMFuzzerInitialize(int*, char***) {
  setenv("LOADKIT_FIXTURES", "/fixtures", 1);
  setenv("LOADKIT_OUT", "/out", 1);
  setenv("LOADKIT_PLUGINS", "/plugins", 1);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using loadkit::jobs::StepKind;
  try {
    const auto job = loadkit::jobs::parse_job(std::string(reinterpret_cast<const char*>(data), size), "fuzz.yaml");
    if (job.file != "fuzz.yaml" || job.model.path.empty() || job.steps.empty()) std::abort();
    if (job.model.tp_size < 1 || job.model.tp_size > 1024) std::abort();
    bool loaded = false;
    for (const auto& step : job.steps) {
      if (step.kind != StepKind::Load && step.kind != StepKind::Verify && !loaded) std::abort();
      loaded = loaded || step.kind == StepKind::Load;
    }
  } catch (const loadkit::Error& e) {
    if (e.kind() != loadkit::ErrorKind::Usage) std::abort();
    if (std::strchr(e.what(), '\n') || !starts_with_position(e.what())) std::abort();
  }
  return 0;
}
