// Block fp8: weights quantized offline in bn x bk blocks (128 x 128 in every published model).
//
// Parameters, as vLLM's block-fp8 layers name them:
//   linear:   weight float8_e4m3fn [N, K], weight_scale_inv float32 [Σ ceil(part / bn), ceil(K / bk)]
//   experts:  w13_weight [E, 2I, H], w13_weight_scale_inv [E, 2 ceil(I / bn), ceil(H / bk)],
//             w2_weight [E, H, I],   w2_weight_scale_inv [E, ceil(H / bn), ceil(I / bk)]
// w ≈ float32(weight) × its block's scale. The scales are blocked parameters (layers/linear.h):
// each fused part (q, k, v; gate, up) starts a fresh block, as each is its own checkpoint tensor.
//
// Load format is kernel format: nothing is processed, so a reload of an fp8 checkpoint writes
// straight into the tensors the forward reads (same storage, bit for bit a fresh load).
//
// Quantize-on-arrival (QuantConfig::quantize_on_arrival): a 16/32-bit weight arriving for an fp8
// parameter — a trainer's bf16 weights synced into the fp8 model — is quantized here, whole, as the
// checkpoint tensor it is (before the tensor-parallel narrowing: q/k/v and gate/up are separate
// tensors with their own blocks), exactly as vLLM's per_block_cast_to_fp8 quantizes offline:
//   amax  = max |w| over the block in float32, clamped to >= 1e-4
//   scale = amax / 448                  (weight_scale_inv; a true float32 division)
//   q     = e4m3(float32(w) × (1 / scale))
// so the synced model is bit for bit a fresh load of the same weights quantized offline that way
// (tests/fixtures/fp8_quant.py is the independent reference). The weight's loader then writes
// the scale through the scale parameter's own loader, with the same shard id: a reload session
// counts, validates and journals it like any checkpoint tensor. When the flag is off (a fresh
// load, or a reload from a checkpoint that declares fp8), such a weight is a bad checkpoint.
//
// Forward of a linear layer: on CUDA, where cuBLAS takes the shapes, one block-scaled fp8 GEMM
// (at::_scaled_mm, as torch 2.11 offers it on Hopper): activations quantized per token and
// 128-column group (dynamic), the weight's blocks scaled by weight_scale_inv. It wants 128x128
// blocks, K a multiple of 512, N a multiple of 16 and a uniform block grid over the fused rows
// (every part but the last whole blocks); elsewhere (the CPU, other shapes) and for MoE experts
// the weight is dequantized to the activations' dtype and multiplied.

#include "prequantized.h"

#include <optional>

#include "ignored_layers.h"

#include <ATen/ATen.h>

#include <string>
#include <vector>

#include <loadkit/error.h>
#include <loadkit/layers/fused_moe.h>
#include <loadkit/layers/linear.h>
#include <loadkit/model_context.h>
#include <loadkit/quant_method.h>
#include <loadkit/weight_writes.h>

namespace loadkit::quant {

namespace {

constexpr double kFp8Max = 448.0;
constexpr double kMinAmax = 1e-4;

struct Block {
  int64_t rows = 128, cols = 128;
};

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

/// Calls f(r0, nr, br, c0, nc, bc) for the up to four regions of an [n, k] matrix whose blocks
/// have one size each (whole blocks; the partial last row of blocks; the partial last column;
/// the corner): region [r0, r0 + nr) x [c0, c0 + nc) in blocks of br x bc.
template <class F>
void for_each_region(int64_t n, int64_t k, const Block& b, F&& f) {
  const int64_t whole_r = n / b.rows * b.rows, whole_c = k / b.cols * b.cols;
  const int64_t row_parts[2][2] = {{0, whole_r}, {whole_r, n - whole_r}};
  const int64_t col_parts[2][2] = {{0, whole_c}, {whole_c, k - whole_c}};
  for (const auto& r : row_parts)
    for (const auto& c : col_parts)
      if (r[1] > 0 && c[1] > 0)
        f(r[0], r[1], r[0] < whole_r ? b.rows : r[1], c[0], c[1], c[0] < whole_c ? b.cols : c[1]);
}

/// The blocks of region [r0, r0 + nr) x [c0, c0 + nc) of `m` as [nr / br, br, nc / bc, bc] (a view).
at::Tensor region_blocks(const at::Tensor& m, int64_t r0, int64_t nr, int64_t br, int64_t c0, int64_t nc, int64_t bc) {
  return m.narrow(0, r0, nr).narrow(1, c0, nc).view({nr / br, br, nc / bc, bc});
}

/// The entries of a per-block [rows, cols] tensor that region (r0, nr, br, c0, nc, bc) covers.
at::Tensor region_scales(const at::Tensor& s, const Block& b, int64_t r0, int64_t nr, int64_t br, int64_t c0,
                         int64_t nc, int64_t bc) {
  return s.narrow(0, r0 / b.rows, nr / br).narrow(1, c0 / b.cols, nc / bc);
}

/// Quantizes a 2-D weight in blocks (the file comment's arithmetic): {q e4m3 [n, k], scale_inv
/// float32 [ceil(n / bn), ceil(k / bk)]}. No padded or float32 copy of the weight: per-block
/// reductions, then one multiplication per region that computes in float32 and stores e4m3.
std::pair<at::Tensor, at::Tensor> quantize_blocks(const at::Tensor& w, const Block& b) {
  const int64_t n = w.size(0), k = w.size(1);
  at::Tensor amax = at::empty({cdiv(n, b.rows), cdiv(k, b.cols)}, w.options().dtype(at::kFloat));
  // A validation pass's meta stand-in: shapes and dtypes only (not every op below has a meta kernel).
  if (w.is_meta()) return {at::empty({n, k}, w.options().dtype(at::kFloat8_e4m3fn)), amax};
  for_each_region(n, k, b, [&](int64_t r0, int64_t nr, int64_t br, int64_t c0, int64_t nc, int64_t bc) {
    at::Tensor blocks = region_blocks(w, r0, nr, br, c0, nc, bc);
    // max |w| = max(|max w|, |min w|): exact, and no |w| temporary.
    at::Tensor m = at::maximum(at::amax(blocks, {1, 3}).abs(), at::amin(blocks, {1, 3}).abs());
    region_scales(amax, b, r0, nr, br, c0, nc, bc).copy_(m);
  });
  amax.clamp_min_(kMinAmax);
  at::Tensor scale = at::div(amax, at::full({}, kFp8Max, amax.options()));
  at::Tensor factor = at::div(at::ones_like(scale), scale);
  at::Tensor q = at::empty({n, k}, w.options().dtype(at::kFloat8_e4m3fn));
  for_each_region(n, k, b, [&](int64_t r0, int64_t nr, int64_t br, int64_t c0, int64_t nc, int64_t bc) {
    at::Tensor out = region_blocks(q, r0, nr, br, c0, nc, bc);
    at::Tensor f = region_scales(factor, b, r0, nr, br, c0, nc, bc).unsqueeze(1).unsqueeze(3);
    at::mul_out(out, region_blocks(w, r0, nr, br, c0, nc, bc), f);
  });
  return {q, scale};
}

/// Quantizes a weight whose rows are `parts` (each starting a fresh block; their sum is the
/// weight's rows), as the separate tensors they were offline: {q, scales stacked by part}.
/// A 3-D weight is quantized per expert.
std::pair<at::Tensor, at::Tensor> quantize_parts(const at::Tensor& w, const std::vector<int64_t>& parts,
                                                 const Block& b) {
  if (w.dim() == 3) {
    std::vector<at::Tensor> qs, ss;
    for (int64_t e = 0; e < w.size(0); ++e) {
      auto [q, s] = quantize_parts(w.select(0, e), parts, b);
      qs.push_back(q);
      ss.push_back(s);
    }
    return {at::stack(qs), at::stack(ss)};
  }
  if (parts.size() == 1) return quantize_blocks(w, b);
  return quantize_each_part(w, parts, [&b](const at::Tensor& part) { return quantize_blocks(part, b); });
}

/// [n, k] float32 scales of a weight whose rows are `parts`, from its blocked [rows, cols] scales.
at::Tensor expand_scales(const at::Tensor& s, const std::vector<int64_t>& parts, int64_t k, const Block& b) {
  std::vector<at::Tensor> rows;
  int64_t row = 0;
  for (int64_t part : parts) {
    const int64_t nb = cdiv(part, b.rows);
    rows.push_back(s.narrow(0, row, nb).repeat_interleave(b.rows, 0).narrow(0, 0, part));
    row += nb;
  }
  at::Tensor by_row = rows.size() == 1 ? rows[0] : at::cat(rows);
  return by_row.repeat_interleave(b.cols, 1).narrow(1, 0, k);
}

/// float32(q) × its block's scale, in `dtype`.
at::Tensor dequantize(const at::Tensor& q, const at::Tensor& s, const std::vector<int64_t>& parts, const Block& b,
                      at::ScalarType dtype) {
  return (q.to(at::kFloat) * expand_scales(s, parts, q.size(1), b)).to(dtype);
}

/// The loader of an fp8 weight (arriving_fp8_weight): a 16/32-bit tensor is quantized in blocks,
/// its rows being `parts` for a shard that holds several of them.
WeightLoader fp8_weight_loader(Module& layer, WeightLoader inner, const QuantConfig* config, Block block,
                               std::string scale_name, std::function<std::vector<int64_t>(const at::Tensor&, const ShardId&)> parts) {
  return arriving_fp8_weight(
      layer, std::move(inner), config, ScaleRoute{.name = std::move(scale_name)},
      [block, parts = std::move(parts)](const at::Tensor& loaded, const ShardId& shard) {
        return quantize_parts(loaded, parts(loaded, shard), block);
      },
      "fp8");
}

/// The loader of a blocked scale: float32 only, then the layer's block loader (describing its
/// writes as that one does: loadkit/weight_writes.h).
WeightLoader scale_loader(WeightLoader inner) {
  const bool describes = describes_writes(inner, at::kFloat);
  WeightLoader loader = [inner = std::move(inner)](Parameter& p, const at::Tensor& loaded,
                                                   const ShardId& shard) -> int64_t {
    if (loaded.scalar_type() != at::kFloat)
      fail(ErrorKind::Input, "block scales must be float32, got ", c10::toString(loaded.scalar_type()));
    return inner(p, loaded, shard);
  };
  return describes ? describing_writes(std::move(loader), {at::kFloat}) : loader;
}

class BlockFp8LinearMethod final : public LinearMethod {
 public:
  BlockFp8LinearMethod(const QuantConfig* config, Block block) : config_(config), block_(block) {}
  std::string name() const override { return "fp8"; }
  bool transforms_weights() const override { return false; }

  void create_weights(LinearBase& layer, const LinearShape& shape, WeightLoader loader, ShardingInfo sharding,
                      const ModelContext& ctx) override {
    const std::vector<int64_t> parts = layer.output_parts();
    int64_t rows = 0;
    for (int64_t part : parts) rows += cdiv(part, block_.rows);
    WeightLoader blocked = layer.block_loader(block_.rows, block_.cols);
    // A fused shard (no shard id: every part in one tensor) holds the checkpoint's parts; a named one a single part.
    auto shard_parts = [parts](const at::Tensor& loaded, const ShardId& shard) {
      if (!shard.empty() || parts.size() == 1) return std::vector<int64_t>{loaded.size(0)};
      int64_t rank_total = 0;
      for (int64_t p : parts) rank_total += p;
      std::vector<int64_t> full;  // every rank's parts together: each part scaled to the checkpoint's size
      for (int64_t p : parts) full.push_back(p * loaded.size(0) / rank_total);
      return full;
    };
    layer.add_parameter("weight", at::empty({shape.output_size, shape.input_size}, ctx.options().dtype(at::kFloat8_e4m3fn)),
                        fp8_weight_loader(layer, std::move(loader), config_, block_, "weight_scale_inv", shard_parts),
                        sharding);
    layer.add_parameter("weight_scale_inv",
                        at::empty({rows, cdiv(shape.input_size, block_.cols)}, ctx.options().dtype(at::kFloat)),
                        scale_loader(std::move(blocked)), sharding);
  }

  void process_weights_after_loading(LinearBase&, const KernelTargets&) override {}

  at::Tensor apply(LinearBase& layer, const at::Tensor& x, const at::Tensor& bias) override {
    const at::Tensor& q = layer.param("weight").data;
    const at::Tensor& s = layer.param("weight_scale_inv").data;
    const std::vector<int64_t> parts = layer.output_parts();
    if (scaled_mm_fits(x, q, parts)) return block_scaled_mm(x, q, s, bias);
    return at::linear(x, dequantize(q, s, parts, block_, x.scalar_type()), bias);
  }

 private:
  /// Measured on an H200 with torch 2.11 (block-scaled _scaled_mm against the dequantized
  /// product): other block sizes and scale layouts are "Invalid scaling configuration", N not a
  /// multiple of 16 is refused, and the activation groups are 128 columns, so K must be whole
  /// groups. K/128 not a multiple of 4 (K = 256, 384, 640) is accepted but wrong: cuBLAS reads the
  /// weight's scales with a leading dimension rounded up to 4, so the product is garbage (relative
  /// error 0.05 to 10^5, different on each call); every K that is a multiple of 512 matched.
  bool scaled_mm_fits(const at::Tensor& x, const at::Tensor& q, const std::vector<int64_t>& parts) const {
    if (!x.is_cuda() || block_.rows != 128 || block_.cols != 128) return false;
    const auto dtype = x.scalar_type();
    if (dtype != at::kBFloat16 && dtype != at::kHalf) return false;  // the output types measured
    if (q.size(1) % 512 != 0 || q.size(0) % 16 != 0) return false;
    for (size_t i = 0; i + 1 < parts.size(); ++i)
      if (parts[i] % 128 != 0) return false;  // a part starting mid-grid: the scales are not one grid
    return true;
  }

  /// y = x Wᵀ with x quantized per token and 128-column group (amax / 448, dynamic). Rows padded to
  /// a multiple of 16 (cuBLAS refuses other M). Scale layouts as cuBLAS wants them: the
  /// activations' [M, K/128] column-major, the weight's [N/128, K/128] as its [K/128, N/128] view.
  static at::Tensor block_scaled_mm(const at::Tensor& x, const at::Tensor& q, const at::Tensor& s,
                                    const at::Tensor& bias) {
    const int64_t k = q.size(1), n = q.size(0), groups = k / 128;
    at::Tensor x2 = x.reshape({-1, k});
    const int64_t m = x2.size(0), padded = (m + 15) / 16 * 16;
    at::Tensor xg = x2.to(at::kFloat).view({m, groups, 128});
    at::Tensor x_scale = at::div(xg.abs().amax(-1), at::full({}, kFp8Max, xg.options())).clamp_min_(1e-12);
    at::Tensor xq = at::div(xg, x_scale.unsqueeze(-1)).clamp_(-kFp8Max, kFp8Max).to(at::kFloat8_e4m3fn).view({m, k});
    if (padded != m) {
      xq = at::constant_pad_nd(xq.view(at::kByte), {0, 0, 0, padded - m}).view(at::kFloat8_e4m3fn);
      x_scale = at::constant_pad_nd(x_scale, {0, 0, 0, padded - m}, 1.0);
    }
    at::Tensor scale_a = x_scale.t().contiguous().t();  // column-major [M, K/128]
    at::Tensor y = at::_scaled_mm(xq, q.t(), scale_a, s.t(), std::nullopt, std::nullopt, x.scalar_type());
    y = y.narrow(0, 0, m);
    if (bias.defined()) y = y + bias;
    auto shape = x.sizes().vec();
    shape.back() = n;
    return y.reshape(shape);
  }

  const QuantConfig* config_;
  Block block_;
};

class BlockFp8MoEMethod final : public FusedMoEMethod {
 public:
  BlockFp8MoEMethod(const QuantConfig* config, Block block) : config_(config), block_(block) {}
  std::string name() const override { return "fp8"; }
  bool transforms_weights() const override { return false; }

  void create_weights(FusedMoE& layer, const MoEShape& s, WeightLoader loader, ShardingInfo w13_sharding,
                      ShardingInfo w2_sharding, const ModelContext& ctx) override {
    const auto fp8 = ctx.options().dtype(at::kFloat8_e4m3fn), f32 = ctx.options().dtype(at::kFloat);
    const int64_t e = s.num_experts, inter = s.intermediate_size, hidden = s.hidden_size;
    WeightLoader blocked = layer.block_loader(block_.rows, block_.cols);
    // gate and up are separate tensors with their own blocks: a w13 tensor holding both ("w13" stacked,
    // or the per-rank stacked layout) is quantized as its two halves.
    auto w13_parts = [](const at::Tensor& loaded, const ShardId& shard) {
      const int64_t rows = loaded.size(loaded.dim() - 2);
      if (shard.name == "w1" || shard.name == "w3") return std::vector<int64_t>{rows};
      return std::vector<int64_t>{rows / 2, rows - rows / 2};
    };
    auto w2_parts = [](const at::Tensor& loaded, const ShardId&) {
      return std::vector<int64_t>{loaded.size(loaded.dim() - 2)};
    };
    layer.add_parameter("w13_weight", at::empty({e, 2 * inter, hidden}, fp8),
                        fp8_weight_loader(layer, loader, config_, block_, "w13_weight_scale_inv", w13_parts),
                        w13_sharding);
    layer.add_parameter("w13_weight_scale_inv",
                        at::empty({e, 2 * cdiv(inter, block_.rows), cdiv(hidden, block_.cols)}, f32),
                        scale_loader(blocked), w13_sharding);
    layer.add_parameter("w2_weight", at::empty({e, hidden, inter}, fp8),
                        fp8_weight_loader(layer, loader, config_, block_, "w2_weight_scale_inv", w2_parts),
                        w2_sharding);
    layer.add_parameter("w2_weight_scale_inv",
                        at::empty({e, cdiv(hidden, block_.rows), cdiv(inter, block_.cols)}, f32),
                        scale_loader(blocked), w2_sharding);
  }

  void process_weights_after_loading(FusedMoE&, const KernelTargets&) override {}

  std::pair<at::Tensor, at::Tensor> expert_weights(FusedMoE& layer, int64_t e, at::ScalarType dtype) override {
    const int64_t inter = layer.shape().intermediate_size, hidden = layer.shape().hidden_size;
    return {dequantize(layer.param("w13_weight").data.select(0, e), layer.param("w13_weight_scale_inv").data.select(0, e),
                       {inter, inter}, block_, dtype),
            dequantize(layer.param("w2_weight").data.select(0, e), layer.param("w2_weight_scale_inv").data.select(0, e),
                       {hidden}, block_, dtype)};
  }

 private:
  const QuantConfig* config_;
  Block block_;
};

/// Block fp8, or one scale per tensor (scaled_fp8.cpp), for every layer the checkpoint does not
/// leave 16-bit (ignored_layers.h).
class Fp8CheckpointConfig final : public QuantConfig {
 public:
  Fp8CheckpointConfig(std::optional<Block> block, IgnoredLayers ignored) : ignored_(std::move(ignored)) {
    if (block) {
      linear_ = std::make_shared<BlockFp8LinearMethod>(this, *block);
      moe_ = std::make_shared<BlockFp8MoEMethod>(this, *block);
    } else {
      linear_ = make_per_tensor_fp8_linear_method(this);
      moe_ = make_scaled_fp8_moe_method(this, /*per_channel=*/false, "fp8");
    }
  }
  std::string name() const override { return "fp8"; }
  std::shared_ptr<LinearMethod> linear_method(const LayerPrefix& layer) override {
    return ignored_.skips_linear(layer) ? unquantized_linear_method() : linear_;
  }
  std::shared_ptr<FusedMoEMethod> moe_method(const LayerPrefix& layer) override {
    return ignored_.skips_experts(layer) ? nullptr : moe_;
  }

 private:
  IgnoredLayers ignored_;
  std::shared_ptr<LinearMethod> linear_;
  std::shared_ptr<FusedMoEMethod> moe_;
};

}  // namespace

std::shared_ptr<QuantConfig> make_fp8_checkpoint_config(const ModelContext& ctx) {
  const ModelConfig qc = ctx.config.get_object("quantization_config");
  const std::string& file = qc.origin();
  std::optional<Block> block;
  if (qc.has("weight_block_size")) {
    const std::vector<int64_t> size = qc.get_ints("weight_block_size");
    if (size.size() != 2 || size[0] <= 0 || size[1] <= 0) {
      std::string got;
      for (int64_t v : size) got += (got.empty() ? "" : ", ") + std::to_string(v);
      fail(ErrorKind::Input, file, ": key '", qc.qualified("weight_block_size"), "' must be two positive integers, got [",
           got, "]");
    }
    block = Block{size[0], size[1]};
  }
  if (const std::string fmt = qc.get_string("fmt", "e4m3"); fmt != "e4m3")
    fail(ErrorKind::Plugin, file, ": key '", qc.qualified("fmt"), "' is '", fmt, "': only e4m3 fp8 is supported");
  if (const std::string scheme = qc.get_string("activation_scheme", "dynamic"); scheme != "dynamic")
    fail(ErrorKind::Plugin, file, ": key '", qc.qualified("activation_scheme"), "' is '", scheme,
         "': only dynamic activation scales are supported (static ones come with an input_scale per layer)");
  // vLLM reads ignored_layers, else modules_to_not_convert; a checkpoint may carry either.
  std::vector<std::string> ignored;
  std::string keys;
  for (const char* key : {"ignored_layers", "modules_to_not_convert"}) {
    if (!qc.has(key)) continue;
    for (std::string& module : qc.get_strings(key)) ignored.push_back(std::move(module));
    keys += (keys.empty() ? "" : "' / '") + qc.qualified(key);
  }
  return std::make_shared<Fp8CheckpointConfig>(
      block, IgnoredLayers(std::move(ignored), IgnoredLayers::Rules::Fp8, cat(file, ": key '", keys, "'")));
}

}  // namespace loadkit::quant
