// Quantize-on-arrival (QuantConfig::quantize_on_arrival): the weight loaders of every pre-quantized
// fp8 method (block_fp8.cpp, scaled_fp8.cpp) take a trainer's 16/32-bit weight, quantize it as
// the checkpoint tensor it is, and write its scale beside it (prequantized.h).

#include "prequantized.h"

#include <ATen/ATen.h>

#include <loadkit/error.h>
#include <loadkit/quant_method.h>
#include <loadkit/weight_writes.h>

namespace loadkit::quant {

namespace {

bool is_16_or_32_bit_float(const at::Tensor& t) {
  const auto d = t.scalar_type();
  return d == at::kBFloat16 || d == at::kHalf || d == at::kFloat;
}

}  // namespace

Quantized quantize_each_part(const at::Tensor& w, const std::vector<int64_t>& parts,
                             const std::function<Quantized(const at::Tensor&)>& quantize) {
  std::vector<at::Tensor> qs, ss;
  int64_t row = 0;
  for (int64_t rows : parts) {
    auto [q, s] = quantize(w.narrow(0, row, rows));
    qs.push_back(q);
    ss.push_back(s);
    row += rows;
  }
  return {at::cat(qs), at::cat(ss)};
}

WeightLoader arriving_fp8_weight(Module& layer, WeightLoader inner, const QuantConfig* config, ScaleRoute route,
                                 std::function<Quantized(const at::Tensor&, const ShardId&)> quantizer,
                                 std::string what) {
  // An fp8 tensor goes to `inner` as it is: this loader describes those writes when `inner` does
  // (loadkit/weight_writes.h); a quantized 16-bit one is a temporary, written at once.
  const bool describes = describes_writes(inner, at::kFloat8_e4m3fn);
  WeightLoader loader = [&layer, inner = std::move(inner), config, route = std::move(route),
                         quantizer = std::move(quantizer),
                         what = std::move(what)](Parameter& p, const at::Tensor& loaded, const ShardId& shard) -> int64_t {
    if (loaded.scalar_type() == at::kFloat8_e4m3fn) return inner(p, loaded, shard);
    if (!config->quantize_on_arrival() || !is_16_or_32_bit_float(loaded))
      fail(ErrorKind::Input, "the weight is ", c10::toString(loaded.scalar_type()), ", but the checkpoint's ",
           "quantization_config (", what, ") says float8_e4m3fn");
    auto [q, s] = quantizer(loaded, shard);
    const int64_t written = inner(p, q, shard);
    Parameter& scale = layer.param(route.name);
    // A processing method's weight written for real may be a reload's kept call, replayed: the
    // host saw its scale when the call came (see ScaleRoute).
    if (route.transforms && !p.data.is_meta() && *route.own)
      (*route.own)(scale, s, shard);
    else
      scale.loader(scale, s, shard);
    return written;
  };
  return describes ? describing_writes(std::move(loader), {at::kFloat8_e4m3fn}) : loader;
}

}  // namespace loadkit::quant
