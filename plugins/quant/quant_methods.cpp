// Online quantization of 16/32-bit checkpoints, provided to every architecture
// through the registry: `fp8` (per-tensor dynamic e4m3 weights, at::_scaled_mm
// on Hopper) and `int8` (weight-only, per output channel). A checkpoint that is
// already fp8 (config.json's quantization_config says quant_method "fp8") is
// served under the same name by block_fp8.cpp, as vLLM's Fp8Config serves both;
// llm-compressor's fp8 checkpoints by compressed_tensors.cpp.
//
// Both write straight into a reload's kernel tensors when given them. The
// arithmetic is fixed, whatever the device, so that a GPU and a CPU quantize to
// the same bytes:
//   fp8:  scale = max(float32(amax|w|) / 448, 1e-12), one true float32 division;
//         q = e4m3(float32(w) / scale), the quotient rounded once to float32, then
//         to the nearest e4m3 (ties to even).
//   int8: scale = max(float32(amax|row|) / 127, 1e-12) per output row;
//         q = clamp(round(float32(w) / scale), -127, 127).
// Scales divide by a tensor, never a host scalar: CUDA turns `t / 448.0` into
// `t * (1 / 448.0)`, which can miss the quotient by one bit.
//
// How many kernels that takes is the point of this file's layout. A reload
// quantizes every layer of the model; kernels of a few MiB each cost more to
// launch than to run, and the host launching them is the host that feeds the
// next module's transfer. So on CUDA fp8 is one reduction and one division
// kernel per weight: at::div_out computes in float32 and casts to e4m3 as it
// stores (no float32 copy of the weight), and the experts of a MoE layer go
// together, [E, N, K] against their [E, 1, 1] scales. On the CPU the same
// division makes a float32 temporary of its output, so the CPU quantizes in row
// chunks of bounded float32 scratch. int8 needs round and clamp between the
// division and the cast, so it always goes through float32 chunks (fewer and
// cheaper ones on CUDA than before: one reduction up front, four kernels a chunk).
// None of it reads a value back to the host: processing queues kernels and returns.

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdlib>
#include <string>

#include <loadkit/error.h>
#include <loadkit/layers/fused_moe.h>
#include <loadkit/layers/linear.h>
#include <loadkit/plugin.h>

#include "prequantized.h"

namespace {

using namespace loadkit;

constexpr double kFp8Max = 448.0;           // largest finite float8_e4m3fn
constexpr double kInt8Max = 127.0;
constexpr double kMinScale = 1e-12;         // an all-zero weight quantizes to zeros, never inf/NaN

/// Rows per float32 scratch chunk of a [rows, cols] weight: a sixteenth of the weight, within
/// 64 Ki..1 Mi elements (256 KiB..4 MiB). Small layers get a small scratch, so a reload's peak stays
/// near the layer's own size; large layers get few, large chunks (kernel launches are what a
/// small chunk costs).
int64_t rows_per_chunk(int64_t rows, int64_t cols) {
  const int64_t elements = std::clamp<int64_t>(rows * cols / 16, int64_t{1} << 16, int64_t{1} << 20);
  return std::max<int64_t>(1, elements / std::max<int64_t>(1, cols));
}

/// max(|lo|, |hi|) as float32 (exact: the maximum of 16-bit values is one of them).
at::Tensor amax_of(const std::tuple<at::Tensor, at::Tensor>& lo_hi) {
  const auto& [lo, hi] = lo_hi;
  return at::maximum(lo.abs(), hi.abs()).to(at::kFloat);
}

/// Writes max(amax / range, 1e-12) into `scale` (float32, amax's shape): a true division by a
/// tensor on amax's device (see the file comment), no temporary beyond amax's size.
void write_scale(at::Tensor scale, const at::Tensor& amax, double range) {
  at::div_out(scale, amax, at::full({}, range, amax.options()));
  scale.clamp_min_(kMinScale);
}

/// fp8 quantization of the [rows, cols] weight `w` into `out` (same shape, e4m3) with the
/// per-tensor `scale` ([1], float32). CUDA: one kernel. CPU: float32 chunks (see the file comment).
/// No clamp: |w| <= amax, so the quotient exceeds 448 by a rounding error at most, which e4m3
/// rounds back to 448. The scale must have a dimension: a 0-dim float32 scale would lose type
/// promotion to the 16-bit weight, and the division would run in bf16.
void quantize_fp8_rows(at::Tensor out, const at::Tensor& w, const at::Tensor& scale) {
  if (w.is_cuda()) {
    at::div_out(out, w, scale);
    return;
  }
  const int64_t rows = w.size(0), step = rows_per_chunk(rows, w.size(1));
  for (int64_t r = 0; r < rows; r += step) {
    const int64_t n = std::min(step, rows - r);
    at::Tensor chunk = out.narrow(0, r, n);
    at::div_out(chunk, w.narrow(0, r, n), scale);
  }
}

/// int8 quantization of the [rows, cols] weight `w` into `out` (same shape, int8) with one float32
/// scale per row, written into `scale` ([rows]). One reduction over the whole weight, then row
/// chunks of float32 scratch (one buffer, reused): divide, round, clamp, narrow to int8.
void quantize_int8_rows(const at::Tensor& out, const at::Tensor& scale, const at::Tensor& w) {
  const int64_t rows = w.size(0), cols = w.size(1), step = rows_per_chunk(rows, cols);
  write_scale(scale, amax_of(at::aminmax(w, 1)), kInt8Max);
  at::Tensor scratch = at::empty({std::min(step, rows), cols}, w.options().dtype(at::kFloat));
  for (int64_t r = 0; r < rows; r += step) {
    const int64_t n = std::min(step, rows - r);
    at::Tensor q = scratch.narrow(0, 0, n);
    at::div_out(q, w.narrow(0, r, n), scale.narrow(0, r, n).unsqueeze(1));
    out.narrow(0, r, n).copy_(q.round_().clamp_(-kInt8Max, kInt8Max));
  }
}

/// The float32 chunk that processing `block_rows` rows of a weight whose chunks are cut by
/// rows_per_chunk(rows, cols) holds at once: every other temporary is a per-row or per-tensor
/// scale. What process_scratch_bytes() reports, so that a reload sets it aside.
uint64_t chunk_scratch_bytes(int64_t rows, int64_t cols, int64_t block_rows) {
  const int64_t chunk_rows = std::min(rows_per_chunk(rows, cols), block_rows);
  return static_cast<uint64_t>(std::max<int64_t>(0, chunk_rows)) * static_cast<uint64_t>(std::max<int64_t>(0, cols)) *
         sizeof(float);
}

/// What fp8 processing on CUDA allocates besides its results: aminmax's pair, amax and the scale,
/// each a few bytes, rounded up by the caching allocator to its 512-byte blocks; the rest is margin.
constexpr uint64_t kCudaFp8Scratch = 64 << 10;

/// `targets[name]` when it is there with this shape and dtype, else a fresh tensor.
at::Tensor target_or(const KernelTargets& targets, const char* name, at::IntArrayRef shape, at::ScalarType dtype,
                     const std::function<at::Tensor()>& make) {
  auto it = targets.find(name);
  if (it != targets.end() && it->second.sizes() == shape && it->second.scalar_type() == dtype) return it->second;
  return make();
}

/// Replaces the layer's load-format "weight" by kernel-format tensors.
void install(LinearBase& layer, at::Tensor weight, at::Tensor scale) {
  WeightLoader loader = layer.param("weight").loader;
  ShardingInfo sharding = layer.param("weight").sharding;
  layer.remove_parameter("weight");
  layer.remove_parameter("weight_scale");
  layer.add_parameter("weight", std::move(weight), loader, sharding);
  layer.add_parameter("weight_scale", std::move(scale));
}

/// Online quantization: the checkpoint holds plain 16/32-bit weights, so the
/// load format is the plain [out, in] weight; processing makes the kernel format.
class OnlineQuantMethod : public LinearMethod {
 public:
  bool transforms_weights() const override { return true; }
  /// Both quantize [out, in] in chunks of rows_per_chunk(out, in) rows.
  uint64_t process_scratch_bytes(const LinearShape& shape, const ModelContext&) const override {
    return chunk_scratch_bytes(shape.output_size, shape.input_size, shape.output_size);
  }
  void create_weights(LinearBase& layer, const LinearShape& shape, WeightLoader loader, ShardingInfo sharding,
                      const ModelContext& ctx) override {
    layer.add_parameter("weight", at::empty({shape.output_size, shape.input_size}, ctx.options()), std::move(loader),
                        sharding);
  }
};

class Fp8LinearMethod final : public OnlineQuantMethod {
 public:
  std::string name() const override { return "fp8"; }
  /// CUDA: no float32 copy of the weight (quantize_fp8_rows), only scale-sized temporaries.
  uint64_t process_scratch_bytes(const LinearShape& shape, const ModelContext& ctx) const override {
    return ctx.device.is_cuda() ? kCudaFp8Scratch : OnlineQuantMethod::process_scratch_bytes(shape, ctx);
  }

  void process_weights_after_loading(LinearBase& layer, const KernelTargets& targets) override {
    const at::Tensor w = layer.param("weight").data;  // load format [out, in]
    if (w.scalar_type() == at::kFloat8_e4m3fn) return;  // already kernel format
    const int64_t out = w.size(0), in = w.size(1);
    at::Tensor scale = target_or(targets, "weight_scale", {1}, at::kFloat,
                                 [&] { return at::empty({1}, w.options().dtype(at::kFloat)); });
    write_scale(scale, amax_of(at::aminmax(w)).reshape({1}), kFp8Max);  // no full-size |w| temporary
    // Kernel layout: [in, out], column-major (the transpose of a contiguous [out, in]), as _scaled_mm wants.
    at::Tensor weight = target_or(targets, "weight", {in, out}, at::kFloat8_e4m3fn, [&] {
      return at::empty({out, in}, w.options().dtype(at::kFloat8_e4m3fn)).t();
    });
    quantize_fp8_rows(weight.t(), w, scale);  // [out, in] view of the same storage
    install(layer, weight, scale);
  }

  at::Tensor apply(LinearBase& layer, const at::Tensor& x, const at::Tensor& bias) override {
    return linear(x, layer.param("weight").data, layer.param("weight_scale").data, bias);
  }

  /// The forward of the kernel format: w [in, out] fp8, scale [1] (also serialized per-tensor fp8's).
  static at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, const at::Tensor& bias) {
    if (scaled_mm_fits(x, w)) return scaled_mm(x, w, scale, bias);
    // Elsewhere (CPU, shapes _scaled_mm cannot take): dequantize and multiply.
    at::Tensor dequant = (w.t().to(at::kFloat) * scale).to(x.scalar_type());
    return at::linear(x, dequant, bias);
  }

 private:
  /// Hopper's fp8 GEMM wants K and N multiples of 16 and a 16-bit or float output.
  static bool scaled_mm_fits(const at::Tensor& x, const at::Tensor& w) {
    if (!x.is_cuda()) return false;
    return w.size(0) % 16 == 0 && w.size(1) % 16 == 0;
  }

  /// How activations are scaled for _scaled_mm: per tensor (the default, as vLLM's online fp8 does:
  /// one dynamic scale for the whole input) or per token (LOADKIT_FP8_ACTIVATION_SCALE=token: one
  /// scale per row, for inputs whose tokens differ widely in magnitude). Measured on the GPU
  /// machine, per token did not help our small random fixtures: DeepseekV2 and Phi3 logits fell
  /// from cosine 0.990 (per tensor) to 0.963-0.987 against transformers.
  static bool per_token_activations() {
    static const bool per_token = [] {
      const char* mode = std::getenv("LOADKIT_FP8_ACTIVATION_SCALE");
      if (!mode || !*mode || std::string(mode) == "tensor") return false;
      if (std::string(mode) == "token") return true;
      fail(ErrorKind::Usage, "LOADKIT_FP8_ACTIVATION_SCALE='", mode, "' is not tensor or token");
    }();
    return per_token;
  }

  /// Scales are computed on the device (no host sync: graph-capturable). Per token, the product runs
  /// with a unit activation scale into float32 and each row is then multiplied by its token's
  /// scale: the same arithmetic as _scaled_mm's row-wise mode, on the per-tensor kernel, with a
  /// float32 result for every model dtype.
  static at::Tensor scaled_mm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& w_scale,
                              const at::Tensor& bias) {
    const int64_t in = w.size(0), out = w.size(1);
    at::Tensor x2 = x.reshape({-1, in});
    const int64_t m = x2.size(0), padded = (m + 15) / 16 * 16;
    const bool per_token = per_token_activations();
    at::Tensor amax = per_token ? x2.abs().amax(1, /*keepdim=*/true) : x2.abs().amax();
    at::Tensor x_scale = (amax.to(at::kFloat) / kFp8Max).clamp_min(kMinScale);
    at::Tensor xq = (x2.to(at::kFloat) / x_scale).clamp_(-kFp8Max, kFp8Max).to(at::kFloat8_e4m3fn);
    if (padded != m) xq = at::constant_pad_nd(xq.view(at::kByte), {0, 0, 0, padded - m}).view(at::kFloat8_e4m3fn);
    at::Tensor y;
    if (per_token) {
      at::Tensor unit = at::ones({}, x_scale.options());
      y = at::_scaled_mm(xq, w, unit, w_scale.reshape({}), std::nullopt, std::nullopt, at::kFloat);
      y = (y.narrow(0, 0, m) * x_scale).to(x.scalar_type());
    } else {
      y = at::_scaled_mm(xq, w, x_scale.reshape({}), w_scale.reshape({}), std::nullopt, std::nullopt, x.scalar_type());
      y = y.narrow(0, 0, m);
    }
    if (bias.defined()) y = y + bias;
    auto shape = x.sizes().vec();
    shape.back() = out;
    return y.reshape(shape);
  }
};

class Int8LinearMethod final : public OnlineQuantMethod {
 public:
  std::string name() const override { return "int8"; }

  void process_weights_after_loading(LinearBase& layer, const KernelTargets& targets) override {
    const at::Tensor w = layer.param("weight").data;  // [out, in]
    if (w.scalar_type() == at::kChar) return;
    const int64_t out = w.size(0), in = w.size(1);
    at::Tensor weight = target_or(targets, "weight", {out, in}, at::kChar,
                                  [&] { return at::empty({out, in}, w.options().dtype(at::kChar)); });
    at::Tensor scale = target_or(targets, "weight_scale", {out}, at::kFloat,
                                 [&] { return at::empty({out}, w.options().dtype(at::kFloat)); });
    quantize_int8_rows(weight, scale, w);
    install(layer, weight, scale);
  }

  at::Tensor apply(LinearBase& layer, const at::Tensor& x, const at::Tensor& bias) override {
    const at::Tensor& w = layer.param("weight").data;
    const at::Tensor& scale = layer.param("weight_scale").data;
    at::Tensor dequant = (w.to(at::kFloat) * scale.unsqueeze(1)).to(x.scalar_type());
    return at::linear(x, dequant, bias);
  }
};

// ------------------------------------------------------------ MoE experts
//
// Routed experts are quantized per expert: the load format is FusedMoE's plain
// stacked w13_weight [E, 2I, H] / w2_weight [E, H, I]; the kernel format keeps
// that layout in fp8/int8 with a "<name>_scale" beside it. Processing writes
// into a reload's kernel tensors when given them, like the linear methods.

/// Replaces the load-format stacked weight `name` by its kernel format and scale.
void install_experts(Module& layer, const std::string& name, at::Tensor weight, at::Tensor scale) {
  WeightLoader loader = layer.param(name).loader;
  ShardingInfo sharding = layer.param(name).sharding;
  layer.remove_parameter(name);
  layer.remove_parameter(name + "_scale");
  layer.add_parameter(name, std::move(weight), loader, sharding);
  layer.add_parameter(name + "_scale", std::move(scale));
}

class OnlineQuantMoEMethod : public FusedMoEMethod {
 public:
  bool transforms_weights() const override { return true; }
  void create_weights(FusedMoE& layer, const MoEShape& s, WeightLoader loader, ShardingInfo w13_sharding,
                      ShardingInfo w2_sharding, const ModelContext& ctx) override {
    unquantized_moe_method()->create_weights(layer, s, std::move(loader), w13_sharding, w2_sharding, ctx);
  }
  void process_weights_after_loading(FusedMoE& layer, const KernelTargets& targets) override {
    for (const char* name : {"w13_weight", "w2_weight"}) process(layer, name, targets);
  }
  /// w13 [E, 2I, H] and w2 [E, H, I] are processed one after the other: the larger chunk of the two.
  uint64_t process_scratch_bytes(const MoEShape& s, const ModelContext&) const override {
    return std::max(stacked_scratch_bytes(s.num_experts, 2 * s.intermediate_size, s.hidden_size),
                    stacked_scratch_bytes(s.num_experts, s.hidden_size, s.intermediate_size));
  }

 protected:
  virtual void process(FusedMoE& layer, const std::string& name, const KernelTargets& targets) = 0;
  /// Scratch of processing one stacked weight [experts, rows, cols].
  virtual uint64_t stacked_scratch_bytes(int64_t experts, int64_t rows, int64_t cols) const = 0;
};

/// One float32 scale per expert and stacked weight (per-tensor within the expert).
class Fp8MoEMethod final : public OnlineQuantMoEMethod {
 public:
  std::string name() const override { return "fp8"; }

  std::pair<at::Tensor, at::Tensor> expert_weights(FusedMoE& layer, int64_t e, at::ScalarType dtype) override {
    auto dequant = [&](const char* name) {
      const at::Tensor& scale = layer.param(std::string(name) + "_scale").data;
      return (layer.param(name).data.select(0, e).to(at::kFloat) * scale.narrow(0, e, 1)).to(dtype);
    };
    return {dequant("w13_weight"), dequant("w2_weight")};
  }

 private:
  void process(FusedMoE& layer, const std::string& name, const KernelTargets& targets) override {
    const at::Tensor w = layer.param(name).data;  // [E, rows, cols]
    if (w.scalar_type() == at::kFloat8_e4m3fn) return;
    const int64_t experts = w.size(0);
    at::Tensor scale = target_or(targets, (name + "_scale").c_str(), {experts}, at::kFloat,
                                 [&] { return at::empty({experts}, w.options().dtype(at::kFloat)); });
    write_scale(scale, amax_of(at::aminmax(w.reshape({experts, -1}), 1)), kFp8Max);  // one reduction, all experts
    at::Tensor weight = target_or(targets, name.c_str(), w.sizes(), at::kFloat8_e4m3fn,
                                  [&] { return at::empty(w.sizes(), w.options().dtype(at::kFloat8_e4m3fn)); });
    if (w.is_cuda()) {
      at::div_out(weight, w, scale.view({experts, 1, 1}));  // one kernel over [E, N, K]
    } else {
      for (int64_t e = 0; e < experts; ++e) quantize_fp8_rows(weight.select(0, e), w.select(0, e), scale.narrow(0, e, 1));
    }
    install_experts(layer, name, weight, scale);
  }

  /// CUDA: one division kernel over all experts, only scale-sized temporaries.
  uint64_t process_scratch_bytes(const MoEShape& s, const ModelContext& ctx) const override {
    return ctx.device.is_cuda() ? kCudaFp8Scratch : OnlineQuantMoEMethod::process_scratch_bytes(s, ctx);
  }

  /// CPU: chunks cut over all the experts' rows, each within one expert.
  uint64_t stacked_scratch_bytes(int64_t experts, int64_t rows, int64_t cols) const override {
    return chunk_scratch_bytes(experts * rows, cols, rows);
  }
};

/// One float32 scale per expert and output row (weight-only, symmetric).
class Int8MoEMethod final : public OnlineQuantMoEMethod {
 public:
  std::string name() const override { return "int8"; }

  std::pair<at::Tensor, at::Tensor> expert_weights(FusedMoE& layer, int64_t e, at::ScalarType dtype) override {
    auto dequant = [&](const char* name) {
      const at::Tensor& scale = layer.param(std::string(name) + "_scale").data;
      return (layer.param(name).data.select(0, e).to(at::kFloat) * scale.select(0, e).unsqueeze(1)).to(dtype);
    };
    return {dequant("w13_weight"), dequant("w2_weight")};
  }

 private:
  void process(FusedMoE& layer, const std::string& name, const KernelTargets& targets) override {
    const at::Tensor w = layer.param(name).data;  // [E, rows, cols]
    if (w.scalar_type() == at::kChar) return;
    const int64_t experts = w.size(0), rows = w.size(1), cols = w.size(2);
    at::Tensor weight = target_or(targets, name.c_str(), w.sizes(), at::kChar,
                                  [&] { return at::empty(w.sizes(), w.options().dtype(at::kChar)); });
    at::Tensor scale = target_or(targets, (name + "_scale").c_str(), {experts, rows}, at::kFloat,
                                 [&] { return at::empty({experts, rows}, w.options().dtype(at::kFloat)); });
    // Every expert's rows are rows of one [E * rows, cols] matrix: per-row quantization as for a linear layer.
    quantize_int8_rows(weight.view({experts * rows, cols}), scale.view({experts * rows}), w.reshape({experts * rows, cols}));
    install_experts(layer, name, weight, scale);
  }

  /// Chunks cut over all the experts' rows as one matrix.
  uint64_t stacked_scratch_bytes(int64_t experts, int64_t rows, int64_t cols) const override {
    return chunk_scratch_bytes(experts * rows, cols, experts * rows);
  }
};

template <class Method, class MoEMethod>
class SingleMethodConfig final : public QuantConfig {
 public:
  explicit SingleMethodConfig(std::string name)
      : name_(std::move(name)), method_(std::make_shared<Method>()), moe_method_(std::make_shared<MoEMethod>()) {}
  std::string name() const override { return name_; }
  std::shared_ptr<LinearMethod> linear_method(const LayerPrefix&) override { return method_; }
  std::shared_ptr<FusedMoEMethod> moe_method(const LayerPrefix&) override { return moe_method_; }

 private:
  std::string name_;
  std::shared_ptr<LinearMethod> method_;
  std::shared_ptr<FusedMoEMethod> moe_method_;
};

void register_quant(Registrar& registrar) {
  registrar.add_quant_method("fp8", [](const ModelContext& ctx) -> std::shared_ptr<QuantConfig> {
    if (ctx.config.is_object("quantization_config")) return quant::make_fp8_checkpoint_config(ctx);
    return std::make_shared<SingleMethodConfig<Fp8LinearMethod, Fp8MoEMethod>>("fp8");
  });
  registrar.add_quant_method("compressed-tensors", quant::make_compressed_tensors_config);
  registrar.add_quant_method("int8", [](const ModelContext&) {
    return std::make_shared<SingleMethodConfig<Int8LinearMethod, Int8MoEMethod>>("int8");
  });
}

}  // namespace

at::Tensor loadkit::quant::fp8_per_tensor_linear(const at::Tensor& x, const at::Tensor& w_kn, const at::Tensor& scale,
                                                 const at::Tensor& bias) {
  return Fp8LinearMethod::linear(x, w_kn, scale, bias);
}

LOADKIT_PLUGIN("quant", "1.0.0", register_quant)
