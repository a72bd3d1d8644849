// YAML job files: schema checks with file:line:column messages (yaml-cpp marks).
// Torch-free; tests/fuzz/fuzz_job_yaml.cpp fuzzes parse_job on its own.

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdlib>
#include <initializer_list>
#include <set>

#include "formats/regular_file.h"
#include "jobs/job.h"
#include "jobs/output_guard.h"
#include "loadkit/error.h"

namespace loadkit::jobs {

const char* step_name(StepKind kind) {
  switch (kind) {
    case StepKind::Load: return "load";
    case StepKind::Logits: return "logits";
    case StepKind::Reload: return "reload";
    case StepKind::Verify: return "verify";
    case StepKind::SaveSharded: return "save_sharded";
    case StepKind::Report: return "report";
  }
  return "?";
}

std::string where(const Job& job, const Mark& mark) { return cat(job.file, ":", mark.line, ":", mark.column); }

namespace {

constexpr StepKind kAllSteps[] = {StepKind::Load,   StepKind::Logits,      StepKind::Reload,
                                  StepKind::Verify, StepKind::SaveSharded, StepKind::Report};

std::string join(std::initializer_list<const char*> items) {
  std::string out;
  for (const char* s : items) out += cat(out.empty() ? "" : ", ", s);
  return out;
}

std::string kind_of(const YAML::Node& node) {
  switch (node.Type()) {
    case YAML::NodeType::Null: return "null";
    case YAML::NodeType::Scalar: return cat("'", node.Scalar(), "'");
    case YAML::NodeType::Sequence: return "a list";
    case YAML::NodeType::Map: return "a map";
    default: return "nothing";
  }
}

class Parser {
 public:
  explicit Parser(const std::string& file) : file_(file) {
    const auto slash = file.find_last_of('/');
    dir_ = slash == std::string::npos ? "" : file.substr(0, slash + 1);
  }

  Mark mark_of(const YAML::Node& node, const Mark& fallback) const {
    const YAML::Mark m = node.Mark();
    if (m.is_null() || m.line < 0) return fallback;
    return {m.line + 1, m.column + 1};
  }

  template <class... Parts>
  [[noreturn]] void error(const Mark& mark, Parts&&... parts) const {
    fail(ErrorKind::Usage, file_, ":", mark.line, ":", mark.column, ": ", std::forward<Parts>(parts)...);
  }

  /// A map whose keys must all be in `allowed`; no key twice.
  void check_keys(const YAML::Node& map, const Mark& at, const std::string& what,
                  std::initializer_list<const char*> allowed) const {
    if (!map.IsMap()) error(at, what, " must be a map, got ", kind_of(map));
    std::set<std::string> seen;
    for (auto it = map.begin(); it != map.end(); ++it) {
      const Mark key_mark = mark_of(it->first, at);
      if (!it->first.IsScalar()) error(key_mark, what, ": keys must be names, got ", kind_of(it->first));
      const std::string& key = it->first.Scalar();
      bool known = false;
      for (const char* a : allowed) known = known || key == a;
      if (!known)
        error(key_mark, "unknown key '", key, "' in ", what,
              allowed.size() ? cat(" (expected one of: ", join(allowed), ")") : std::string(" (it takes none)"));
      if (!seen.insert(key).second) error(key_mark, "key '", key, "' given twice in ", what);
    }
  }

  YAML::Node required(const YAML::Node& map, const Mark& at, const std::string& what, const char* key) const {
    YAML::Node node = map[key];
    if (!node.IsDefined()) error(at, what, ": missing required key '", key, "'");
    return node;
  }

  std::string string_value(const YAML::Node& node, const Mark& at, const char* key) const {
    if (!node.IsScalar()) error(mark_of(node, at), "'", key, "' must be a string, got ", kind_of(node));
    return node.Scalar();
  }

  int64_t int_value(const YAML::Node& node, const Mark& at, const char* key) const {
    int64_t value = 0;
    if (!node.IsScalar() || !YAML::convert<int64_t>::decode(node, value))
      error(mark_of(node, at), "'", key, "' must be an integer, got ", kind_of(node));
    return value;
  }

  double double_value(const YAML::Node& node, const Mark& at, const char* key) const {
    double value = 0;
    if (!node.IsScalar() || !YAML::convert<double>::decode(node, value) || !std::isfinite(value))
      error(mark_of(node, at), "'", key, "' must be a finite number, got ", kind_of(node));
    return value;
  }

  bool bool_value(const YAML::Node& node, const Mark& at, const char* key) const {
    bool value = false;
    if (!node.IsScalar() || !YAML::convert<bool>::decode(node, value))
      error(mark_of(node, at), "'", key, "' must be true or false, got ", kind_of(node));
    return value;
  }

  /// `${NAME}` from the environment, then relative to the job file's folder.
  std::string path_value(const YAML::Node& node, const Mark& at, const char* key) const {
    const Mark m = mark_of(node, at);
    const std::string raw = string_value(node, at, key);
    std::string out;
    for (size_t i = 0; i < raw.size();) {
      if (raw.compare(i, 2, "${") != 0) {
        out += raw[i++];
        continue;
      }
      const size_t close = raw.find('}', i + 2);
      if (close == std::string::npos) error(m, "'", key, "': unterminated '${' in '", raw, "'");
      const std::string name = raw.substr(i + 2, close - i - 2);
      if (name.empty()) error(m, "'", key, "': empty '${}' in '", raw, "'");
      const char* value = std::getenv(name.c_str());
      if (!value) error(m, "'", key, "': environment variable '", name, "' is not set");
      out += value;
      i = close + 1;
    }
    if (out.empty()) error(m, "'", key, "' must not be empty");
    if (out[0] != '/' && !dir_.empty()) out = dir_ + out;
    return out;
  }

  ModelSpec model(const YAML::Node& node, const Mark& at) const {
    const char* what = "model";
    check_keys(node, at, what, {"path", "dtype", "device", "quantization", "tp_size", "load_format"});
    ModelSpec spec;
    spec.path = path_value(required(node, at, what, "path"), at, "path");
    if (YAML::Node n = node["dtype"]; n.IsDefined()) {
      spec.dtype = string_value(n, at, "dtype");
      if (spec.dtype != "auto" && spec.dtype != "float32" && spec.dtype != "bfloat16" && spec.dtype != "float16")
        error(mark_of(n, at), "'dtype' must be one of auto, float32, bfloat16, float16, got '", spec.dtype, "'");
    }
    if (YAML::Node n = node["device"]; n.IsDefined()) {
      spec.device = string_value(n, at, "device");
      bool ok = spec.device == "cpu" || spec.device == "cuda";
      if (spec.device.rfind("cuda:", 0) == 0 && spec.device.size() > 5) {
        ok = spec.device.size() <= 8;
        for (size_t i = 5; i < spec.device.size(); ++i) ok = ok && std::isdigit(static_cast<unsigned char>(spec.device[i]));
      }
      if (!ok) error(mark_of(n, at), "'device' must be cpu, cuda or cuda:N, got '", spec.device, "'");
    }
    if (YAML::Node n = node["quantization"]; n.IsDefined()) {
      spec.quantization = string_value(n, at, "quantization");
      if (spec.quantization.empty()) error(mark_of(n, at), "'quantization' must not be empty (use auto or none)");
    }
    if (YAML::Node n = node["tp_size"]; n.IsDefined()) {
      const int64_t tp = int_value(n, at, "tp_size");
      if (tp < 1 || tp > 1024) error(mark_of(n, at), "'tp_size' must be between 1 and 1024, got ", tp);
      spec.tp_size = static_cast<int>(tp);
    }
    if (YAML::Node n = node["load_format"]; n.IsDefined()) {
      spec.load_format = string_value(n, at, "load_format");
      if (spec.load_format != "auto" && spec.load_format != "safetensors" && spec.load_format != "sharded" &&
          spec.load_format != "dummy")
        error(mark_of(n, at), "'load_format' must be one of auto, safetensors, sharded, dummy, got '",
              spec.load_format, "'");
    }
    return spec;
  }

  std::vector<int64_t> tokens(const YAML::Node& node, const Mark& at) const {
    const Mark m = mark_of(node, at);
    if (!node.IsSequence() || node.size() == 0)
      error(m, "'tokens' must be a non-empty list of token ids, got ", kind_of(node));
    std::vector<int64_t> ids;
    for (const auto& item : node) {
      const int64_t id = int_value(item, m, "tokens");
      if (id < 0) error(mark_of(item, m), "'tokens': token ids are not negative, got ", id);
      ids.push_back(id);
    }
    return ids;
  }

  Step step(const YAML::Node& entry, const Mark& at) const {
    Step s;
    s.mark = mark_of(entry, at);
    std::string name;
    YAML::Node params;
    Mark params_mark = s.mark;
    if (entry.IsScalar()) {
      name = entry.Scalar();
    } else if (entry.IsMap() && entry.size() == 1) {
      auto it = entry.begin();
      if (!it->first.IsScalar()) error(s.mark, "a step's key must be its name, got ", kind_of(it->first));
      name = it->first.Scalar();
      params = it->second;
      params_mark = mark_of(params, mark_of(it->first, s.mark));
    } else {
      error(s.mark, "a step is its name ('load') or a map with one key, its name ('logits: {...}'), got ",
            entry.IsMap() ? cat("a map with ", entry.size(), " keys") : kind_of(entry));
    }
    bool known = false;
    for (StepKind k : kAllSteps)
      if (name == step_name(k)) s.kind = k, known = true;
    if (!known)
      error(s.mark, "unknown step '", name, "' (expected one of: load, logits, reload, verify, save_sharded, report)");
    if (!params.IsDefined() || params.IsNull()) params = YAML::Node(YAML::NodeType::Map);
    const std::string what = cat("step '", name, "'");
    const Mark& pm = params_mark;
    step_params(s, static_cast<const YAML::Node&>(params), pm, what);
    return s;
  }

  /// A path the step writes; its mark is kept for the output guard's messages.
  std::string output_path(Step& s, const YAML::Node& params, const Mark& pm, const std::string& what,
                          const char* key) const {
    const YAML::Node node = required(params, pm, what, key);
    s.out_mark = mark_of(node, pm);
    return path_value(node, pm, key);
  }

  /// Reads through a const node: yaml-cpp's non-const operator[] would add the keys it looks up.
  void step_params(Step& s, const YAML::Node& params, const Mark& pm, const std::string& what) const {
    switch (s.kind) {
      case StepKind::Load:
        check_keys(params, pm, what, {});
        break;
      case StepKind::Logits: {
        check_keys(params, pm, what, {"tokens", "tokens_from", "out"});
        const bool inline_tokens = params["tokens"].IsDefined(), from_file = params["tokens_from"].IsDefined();
        if (inline_tokens == from_file) error(pm, what, ": give exactly one of 'tokens' or 'tokens_from'");
        if (inline_tokens) s.tokens = tokens(params["tokens"], pm);
        if (from_file) s.tokens_from = path_value(params["tokens_from"], pm, "tokens_from");
        s.out = output_path(s, params, pm, what, "out");
        break;
      }
      case StepKind::Reload:
        check_keys(params, pm, what, {"from", "process_weights_after_loading"});
        if (params["from"].IsDefined()) s.from = path_value(params["from"], pm, "from");
        if (YAML::Node n = params["process_weights_after_loading"]; n.IsDefined())
          s.process_weights_after_loading = bool_value(n, pm, "process_weights_after_loading");
        break;
      case StepKind::Verify: {
        check_keys(params, pm, what, {"logits", "reference", "max_abs_diff", "min_cosine", "argmax"});
        s.logits = path_value(required(params, pm, what, "logits"), pm, "logits");
        s.reference = path_value(required(params, pm, what, "reference"), pm, "reference");
        if (YAML::Node n = params["max_abs_diff"]; n.IsDefined()) {
          s.max_abs_diff = double_value(n, pm, "max_abs_diff");
          if (*s.max_abs_diff < 0) error(mark_of(n, pm), "'max_abs_diff' must not be negative");
        }
        if (YAML::Node n = params["min_cosine"]; n.IsDefined()) {
          s.min_cosine = double_value(n, pm, "min_cosine");
          if (*s.min_cosine < -1 || *s.min_cosine > 1) error(mark_of(n, pm), "'min_cosine' must be within [-1, 1]");
        }
        if (YAML::Node n = params["argmax"]; n.IsDefined()) s.argmax = bool_value(n, pm, "argmax");
        if (!s.max_abs_diff && !s.min_cosine && !s.argmax)
          error(pm, what, ": give a bound: 'max_abs_diff', 'min_cosine' or 'argmax: true'");
        break;
      }
      case StepKind::SaveSharded:
        check_keys(params, pm, what, {"out", "max_part_size"});
        s.out = output_path(s, params, pm, what, "out");
        if (YAML::Node n = params["max_part_size"]; n.IsDefined()) {
          const int64_t size = int_value(n, pm, "max_part_size");
          if (size <= 0) error(mark_of(n, pm), "'max_part_size' must be positive, got ", size);
          s.max_part_size = static_cast<uint64_t>(size);
        }
        break;
      case StepKind::Report:
        check_keys(params, pm, what, {"path"});
        s.path = output_path(s, params, pm, what, "path");
        break;
    }
  }

  Job job(const YAML::Node& root) const {
    const Mark top{1, 1};
    if (!root.IsDefined() || root.IsNull()) error(top, "the job is empty (expected keys model and steps)");
    check_keys(root, mark_of(root, top), "the job", {"name", "model", "plugin_dirs", "steps"});
    const Mark at = mark_of(root, top);
    Job job;
    job.file = file_;
    if (YAML::Node n = root["name"]; n.IsDefined()) job.name = string_value(n, at, "name");
    YAML::Node model = required(root, at, "the job", "model");
    job.model_mark = mark_of(model, at);
    job.model = this->model(model, job.model_mark);
    if (YAML::Node dirs = root["plugin_dirs"]; dirs.IsDefined()) {
      if (dirs.IsScalar()) {
        job.plugin_dirs.push_back(path_value(dirs, at, "plugin_dirs"));
      } else if (dirs.IsSequence()) {
        for (const auto& d : dirs) job.plugin_dirs.push_back(path_value(d, mark_of(dirs, at), "plugin_dirs"));
      } else {
        error(mark_of(dirs, at), "'plugin_dirs' must be a directory or a list of them, got ", kind_of(dirs));
      }
    }
    YAML::Node steps = required(root, at, "the job", "steps");
    const Mark steps_mark = mark_of(steps, at);
    if (!steps.IsSequence() || steps.size() == 0)
      error(steps_mark, "'steps' must be a non-empty list, got ", kind_of(steps));
    bool loaded = false;
    for (const auto& entry : steps) {
      Step s = step(entry, steps_mark);
      const bool needs_model = s.kind != StepKind::Load && s.kind != StepKind::Verify;
      if (needs_model && !loaded)
        error(s.mark, "step '", step_name(s.kind), "' needs a loaded model: put a 'load' step before it");
      loaded = loaded || s.kind == StepKind::Load;
      job.steps.push_back(std::move(s));
    }
    check_outputs(job);
    return job;
  }

 private:
  std::string file_;
  std::string dir_;
};

}  // namespace

Job parse_job(const std::string& text, const std::string& file_name) {
  Parser parser(file_name);
  YAML::Node root;
  try {
    root = YAML::Load(text);
  } catch (const YAML::Exception& e) {
    parser.error({std::max(e.mark.line, 0) + 1, std::max(e.mark.column, 0) + 1}, e.msg);
  }
  try {
    return parser.job(root);
  } catch (const YAML::Exception& e) {  // yaml-cpp's own checks while reading nodes
    parser.error({std::max(e.mark.line, 0) + 1, std::max(e.mark.column, 0) + 1}, e.msg);
  }
}

Job load_job(const std::string& path) {
  return parse_job(read_regular_file(path, ErrorKind::Usage, "cannot read the job file"), path);
}

}  // namespace loadkit::jobs
