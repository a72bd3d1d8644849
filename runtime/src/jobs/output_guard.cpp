#include "jobs/output_guard.h"

#include <filesystem>
#include <vector>

#include "loadkit/error.h"

namespace loadkit::jobs {

namespace fs = std::filesystem;

namespace {

/// Absolute, symlinks resolved where the path exists, no trailing separator. Never throws
/// for odd paths (the job parser is fuzzed): what cannot be resolved stays as written.
fs::path resolved(const std::string& path) {
  std::error_code ec;
  fs::path p = fs::absolute(path, ec);
  if (ec) p = path;
  fs::path canonical = fs::weakly_canonical(p, ec);
  p = ec ? p.lexically_normal() : canonical;
  while (!p.has_filename() && p.has_relative_path()) p = p.parent_path();  // "dir/" → "dir"
  return p;
}

struct Input {
  std::string path;
  std::string reader;  ///< "the model directory" or "the checkpoint step N 'reload' reads (file:line:col)"
};

}  // namespace

bool writes_into(const std::string& output, const std::string& input) {
  const fs::path out = resolved(output), in = resolved(input);
  auto o = out.begin();
  for (auto i = in.begin(); i != in.end(); ++i, ++o)
    if (o == out.end() || *o != *i) return false;
  return true;
}

void check_outputs(const Job& job) {
  std::vector<Input> inputs{{job.model.path, "the model directory"}};
  for (size_t i = 0; i < job.steps.size(); ++i) {
    const Step& s = job.steps[i];
    if (s.kind != StepKind::Reload || s.from.empty()) continue;
    bool saved_here = false;  // written by an earlier save_sharded step: the job's own product
    for (size_t k = 0; k < i; ++k)
      saved_here = saved_here || (job.steps[k].kind == StepKind::SaveSharded && writes_into(s.from, job.steps[k].out) &&
                                  writes_into(job.steps[k].out, s.from));
    if (!saved_here)
      inputs.push_back({s.from, cat("the checkpoint step ", i + 1, " 'reload' reads (", where(job, s.mark), ")")});
  }
  for (const Step& s : job.steps) {
    const std::string& out = s.kind == StepKind::Report ? s.path : s.out;
    if (out.empty()) continue;
    for (const Input& in : inputs)
      if (writes_into(out, in.path))
        fail(ErrorKind::Usage, where(job, s.out_mark), ": '", s.kind == StepKind::Report ? "path" : "out", "' ", out,
             " writes into ", in.path, ", ", in.reader, ": a job never writes into a checkpoint it reads");
  }
}

}  // namespace loadkit::jobs
