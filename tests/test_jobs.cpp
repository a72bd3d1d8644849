// The YAML job schema (loadkit run): what a valid job becomes, and for every
// kind of mistake a Usage error that starts with file:line:column.

#include <gtest/gtest.h>

#include <cstdlib>
#include <fstream>
#include <typeinfo>

#include "jobs/job.h"
#include "loadkit/error.h"
#include "test_support.h"

namespace loadkit::test {
namespace {

using jobs::parse_job;
using jobs::StepKind;

TEST(JobParser, FullJobBecomesModelPluginDirsAndStepsInOrder) {
  setenv("LOADKIT_TEST_JOB_ROOT", "/data/models", 1);
  const auto job = parse_job(R"(name: nightly
model:
  path: ${LOADKIT_TEST_JOB_ROOT}/llama
  dtype: bfloat16
  device: cuda:1
  quantization: fp8
  tp_size: 2
  load_format: safetensors
plugin_dirs: [plugins, /abs/plugins]
steps:
  - load
  - logits: {tokens: [1, 2, 3], out: out/logits.safetensors}
  - logits: {tokens_from: ref.safetensors, out: l2.safetensors}
  - reload: {from: ../next, process_weights_after_loading: false}
  - reload
  - verify: {logits: l2.safetensors, reference: ref.safetensors, max_abs_diff: 1.0e-4, min_cosine: 0.999, argmax: true}
  - save_sharded: {out: sharded, max_part_size: 1000}
  - report: {path: report.json}
)",
                             "/jobs/a/job.yaml");
  unsetenv("LOADKIT_TEST_JOB_ROOT");
  EXPECT_EQ(job.name, "nightly");
  EXPECT_EQ(job.model.path, "/data/models/llama");
  EXPECT_EQ(job.model.dtype, "bfloat16");
  EXPECT_EQ(job.model.device, "cuda:1");
  EXPECT_EQ(job.model.quantization, "fp8");
  EXPECT_EQ(job.model.tp_size, 2);
  EXPECT_EQ(job.model.load_format, "safetensors");
  EXPECT_EQ(job.plugin_dirs, (std::vector<std::string>{"/jobs/a/plugins", "/abs/plugins"}));
  ASSERT_EQ(job.steps.size(), 8u);
  EXPECT_EQ(job.steps[0].kind, StepKind::Load);
  EXPECT_EQ(job.steps[0].mark.line, 11);
  EXPECT_EQ(job.steps[0].mark.column, 5);
  EXPECT_EQ(job.steps[1].tokens, (std::vector<int64_t>{1, 2, 3}));
  EXPECT_EQ(job.steps[1].out, "/jobs/a/out/logits.safetensors");
  EXPECT_EQ(job.steps[2].tokens_from, "/jobs/a/ref.safetensors");
  EXPECT_EQ(job.steps[3].from, "/jobs/a/../next");
  EXPECT_FALSE(job.steps[3].process_weights_after_loading);
  EXPECT_EQ(job.steps[4].from, "");
  EXPECT_TRUE(job.steps[4].process_weights_after_loading);
  EXPECT_EQ(*job.steps[5].max_abs_diff, 1e-4);
  EXPECT_EQ(*job.steps[5].min_cosine, 0.999);
  EXPECT_TRUE(job.steps[5].argmax);
  EXPECT_EQ(job.steps[6].kind, StepKind::SaveSharded);
  EXPECT_EQ(*job.steps[6].max_part_size, 1000u);
  EXPECT_EQ(job.steps[7].path, "/jobs/a/report.json");
}

TEST(JobParser, DefaultsAndAJobFileWithoutFolder) {
  const auto job = parse_job("model: {path: m}\nsteps: [load]\n", "job.yaml");
  EXPECT_EQ(job.model.path, "m");  // relative to the current folder, where job.yaml is
  EXPECT_EQ(job.model.dtype, "auto");
  EXPECT_EQ(job.model.device, "cpu");
  EXPECT_EQ(job.model.quantization, "auto");
  EXPECT_EQ(job.model.tp_size, 1);
  EXPECT_EQ(job.model.load_format, "auto");
}

struct BadJob {
  const char* name;
  const char* text;
  const char* message;  ///< the whole message, file:line:column included
};

void PrintTo(const BadJob& job, std::ostream* os) { *os << job.name; }  // ctest shows the name, not bytes

class JobParserRejects : public ::testing::TestWithParam<BadJob> {};

TEST_P(JobParserRejects, WithFileLineColumnAndExit2) {
  try {
    parse_job(GetParam().text, "cfg/job.yaml");
    FAIL() << "accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::Usage);
    EXPECT_EQ(exit_code(e.kind()), 2);
    EXPECT_EQ(std::string(e.what()), GetParam().message);
  }
}

const BadJob kBadJobs[] = {
    {"UnknownTopLevelKey", "model: {path: m}\nstep: [load]\n",
     "cfg/job.yaml:2:1: unknown key 'step' in the job (expected one of: name, model, plugin_dirs, steps)"},
    {"UnknownModelKey", "model:\n  path: m\n  dtyp: float32\nsteps: [load]\n",
     "cfg/job.yaml:3:3: unknown key 'dtyp' in model (expected one of: path, dtype, device, quantization, tp_size, "
     "load_format)"},
    {"MissingModel", "steps: [load]\n", "cfg/job.yaml:1:1: the job: missing required key 'model'"},
    {"MissingSteps", "model: {path: m}\n", "cfg/job.yaml:1:1: the job: missing required key 'steps'"},
    {"MissingModelPath", "model:\n  dtype: float32\nsteps: [load]\n",
     "cfg/job.yaml:2:3: model: missing required key 'path'"},
    {"EmptySteps", "model: {path: m}\nsteps: []\n", "cfg/job.yaml:2:8: 'steps' must be a non-empty list, got a list"},
    {"ModelNotAMap", "model: m\nsteps: [load]\n", "cfg/job.yaml:1:8: model must be a map, got 'm'"},
    {"BadDtype", "model: {path: m, dtype: int3}\nsteps: [load]\n",
     "cfg/job.yaml:1:25: 'dtype' must be one of auto, float32, bfloat16, float16, got 'int3'"},
    {"BadDevice", "model: {path: m, device: tpu}\nsteps: [load]\n",
     "cfg/job.yaml:1:26: 'device' must be cpu, cuda or cuda:N, got 'tpu'"},
    {"TpSizeNotAnInteger", "model: {path: m, tp_size: two}\nsteps: [load]\n",
     "cfg/job.yaml:1:27: 'tp_size' must be an integer, got 'two'"},
    {"TpSizeZero", "model: {path: m, tp_size: 0}\nsteps: [load]\n",
     "cfg/job.yaml:1:27: 'tp_size' must be between 1 and 1024, got 0"},
    {"BadLoadFormat", "model: {path: m, load_format: gguf}\nsteps: [load]\n",
     "cfg/job.yaml:1:31: 'load_format' must be one of auto, safetensors, sharded, dummy, got 'gguf'"},
    {"PathIsAList", "model: {path: [a, b]}\nsteps: [load]\n", "cfg/job.yaml:1:15: 'path' must be a string, got a list"},
    {"UnsetEnvironmentVariable", "model: {path: '${LOADKIT_SURELY_UNSET_VAR}/m'}\nsteps: [load]\n",
     "cfg/job.yaml:1:15: 'path': environment variable 'LOADKIT_SURELY_UNSET_VAR' is not set"},
    {"UnterminatedVariable", "model: {path: '${HOME'}\nsteps: [load]\n",
     "cfg/job.yaml:1:15: 'path': unterminated '${' in '${HOME'"},
    {"UnknownStep", "model: {path: m}\nsteps:\n  - load\n  - relaod: {from: x}\n",
     "cfg/job.yaml:4:5: unknown step 'relaod' (expected one of: load, logits, reload, verify, save_sharded, report)"},
    {"StepWithTwoKeys", "model: {path: m}\nsteps:\n  - {load: {}, reload: {}}\n",
     "cfg/job.yaml:3:5: a step is its name ('load') or a map with one key, its name ('logits: {...}'), got a map with 2 "
     "keys"},
    {"UnknownStepKey", "model: {path: m}\nsteps:\n  - load\n  - reload: {from: x, proces: false}\n",
     "cfg/job.yaml:4:23: unknown key 'proces' in step 'reload' (expected one of: from, process_weights_after_loading)"},
    {"LoadTakesNoKeys", "model: {path: m}\nsteps:\n  - load: {dtype: float32}\n",
     "cfg/job.yaml:3:12: unknown key 'dtype' in step 'load' (it takes none)"},
    {"ProcessFlagNotABool", "model: {path: m}\nsteps:\n  - load\n  - reload: {process_weights_after_loading: maybe}\n",
     "cfg/job.yaml:4:45: 'process_weights_after_loading' must be true or false, got 'maybe'"},
    {"LogitsWithoutOut", "model: {path: m}\nsteps:\n  - load\n  - logits: {tokens: [1]}\n",
     "cfg/job.yaml:4:13: step 'logits': missing required key 'out'"},
    {"LogitsWithBothTokenSources", "model: {path: m}\nsteps:\n  - load\n  - logits: {tokens: [1], tokens_from: t, out: o}\n",
     "cfg/job.yaml:4:13: step 'logits': give exactly one of 'tokens' or 'tokens_from'"},
    {"TokensNotIntegers", "model: {path: m}\nsteps:\n  - load\n  - logits: {tokens: [1, x], out: o}\n",
     "cfg/job.yaml:4:26: 'tokens' must be an integer, got 'x'"},
    {"NegativeToken", "model: {path: m}\nsteps:\n  - load\n  - logits: {tokens: [-4], out: o}\n",
     "cfg/job.yaml:4:23: 'tokens': token ids are not negative, got -4"},
    {"VerifyWithoutBound", "model: {path: m}\nsteps:\n  - verify: {logits: a, reference: b}\n",
     "cfg/job.yaml:3:13: step 'verify': give a bound: 'max_abs_diff', 'min_cosine' or 'argmax: true'"},
    {"NegativeTolerance", "model: {path: m}\nsteps:\n  - verify: {logits: a, reference: b, max_abs_diff: -1}\n",
     "cfg/job.yaml:3:53: 'max_abs_diff' must not be negative"},
    {"CosineOutOfRange", "model: {path: m}\nsteps:\n  - verify: {logits: a, reference: b, min_cosine: 2}\n",
     "cfg/job.yaml:3:51: 'min_cosine' must be within [-1, 1]"},
    {"ZeroPartSize", "model: {path: m}\nsteps:\n  - load\n  - save_sharded: {out: d, max_part_size: 0}\n",
     "cfg/job.yaml:4:43: 'max_part_size' must be positive, got 0"},
    {"LogitsBeforeLoad", "model: {path: m}\nsteps:\n  - logits: {tokens: [1], out: o}\n  - load\n",
     "cfg/job.yaml:3:5: step 'logits' needs a loaded model: put a 'load' step before it"},
    {"DuplicateKey", "model: {path: m}\nmodel: {path: n}\nsteps: [load]\n",
     "cfg/job.yaml:2:1: key 'model' given twice in the job"},
    {"YamlSyntaxError", "model: {path: m\nsteps: [load]\n", "cfg/job.yaml:2:6: end of map flow not found"},
    {"EmptyDocument", "", "cfg/job.yaml:1:1: the job is empty (expected keys model and steps)"},
    {"TopLevelList", "- load\n", "cfg/job.yaml:1:1: the job must be a map, got a list"},
};

INSTANTIATE_TEST_SUITE_P(Cases, JobParserRejects, ::testing::ValuesIn(kBadJobs),
                         [](const auto& info) { return std::string(info.param.name); });

// Whatever the bytes, the parser answers with a job or one Usage error that
// starts with the file name and a position, never another exception.
TEST(JobParser, MalformedInputsOnlyRaiseUsageErrorsWithAPosition) {
  const std::string nested(5000, '[');
  const char* inputs[] = {
      "model: {path: m}\nsteps: [{}]\n",
      "model: {path: m}\nsteps: [~]\n",
      "model: {path: m}\nsteps: [[load]]\n",
      "model: {path: m}\nsteps: [{? [a]: b}]\n",
      "? [a]\n: b\n",
      "model: &m {path: m}\nsteps: [*m]\n",
      "model: *undefined\nsteps: [load]\n",
      "model: {path: m, <<: {dtype: float32}}\nsteps: [load]\n",
      "\tmodel: {path: m}\n",
      "model: {path: m}\nsteps: [load]\n---\nsecond: document\n",
      "model: {path: \"\\xZZ\"}\nsteps: [load]\n",
      "model: {path: m, tp_size: 99999999999999999999}\nsteps: [load]\n",
      "model: {path: m, tp_size: 0x10}\nsteps: [load]\n",
      "model: {path: m}\nsteps:\n  - logits: {tokens: [1e3], out: o}\n",
      "model: {path: m}\nsteps:\n  - verify: {logits: a, reference: b, max_abs_diff: .nan}\n",
      "\xff\xfe\x00m\x00o",
      "'unterminated",
      nested.c_str(),
  };
  for (const char* text : inputs) {
    SCOPED_TRACE(text);
    try {
      parse_job(text, "fuzz.yaml");
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::Usage);
      EXPECT_EQ(std::string(e.what()).rfind("fuzz.yaml:", 0), 0u) << e.what();
      EXPECT_EQ(std::string(e.what()).find('\n'), std::string::npos) << e.what();
    } catch (const std::exception& e) {
      ADD_FAILURE() << "escaped as " << typeid(e).name() << ": " << e.what();
    }
  }
}

// Found by fuzz_job_yaml: yaml-cpp's own messages and our "got '<value>'" quote
// the input, raw; a newline there split the error in two. loadkit::Error now
// writes every control character as \xNN.
TEST(JobParser, ControlCharactersInTheInputStayOnOneLine) {
  const std::pair<std::string, std::string> cases[] = {
      {"model: {path: m, dtype: \"float\\n32\"}\nsteps: [load]\n",
       "cfg/job.yaml:1:25: 'dtype' must be one of auto, float32, bfloat16, float16, got 'float\\x0a32'"},
      {"model: {path: m}\nsteps:\n  - \"lo\\tad\"\n",
       "cfg/job.yaml:3:5: unknown step 'lo\\x09ad' (expected one of: load, logits, reload, verify, save_sharded, report)"},
      {std::string("\xff\0\n", 3), "cfg/job.yaml:2:1: unknown escape character: \\x0a"},  // the fuzzer's input
  };
  for (const auto& [text, message] : cases) {
    try {
      parse_job(text, "cfg/job.yaml");
      ADD_FAILURE() << "accepted: " << text;
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::Usage);
      EXPECT_EQ(std::string(e.what()), message);
    }
  }
}

TEST(JobParser, UnreadableJobFileIsExit2NamingIt) {
  try {
    jobs::load_job("/nonexistent/job.yaml");
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::Usage);
    EXPECT_EQ(std::string(e.what()), "/nonexistent/job.yaml: cannot read the job file: No such file or directory");
  }
}

// The documented examples in configs/ stay valid jobs.
TEST(JobParser, EveryConfigsExampleParses) {
  setenv("LOADKIT_FIXTURES", "/fixtures", 1);
  setenv("LOADKIT_OUT", "/out", 1);
  setenv("LOADKIT_PLUGINS", "/plugins", 1);
  int parsed = 0;
  for (const auto& entry : fs::directory_iterator(LOADKIT_TEST_CONFIGS_DIR)) {
    if (entry.path().extension() != ".yaml") continue;
    SCOPED_TRACE(entry.path().string());
    EXPECT_NO_THROW(jobs::load_job(entry.path().string()));
    ++parsed;
  }
  EXPECT_GE(parsed, 2);
}

}  // namespace
}  // namespace loadkit::test
