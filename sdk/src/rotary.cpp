#include "loadkit/layers/rotary.h"

#include <ATen/ATen.h>

#include <cmath>

#include "loadkit/error.h"

namespace loadkit {

RopeParameters rope_parameters(const ModelConfig& config, double default_theta) {
  RopeParameters rope;
  rope.theta = config.get_double("rope_theta", default_theta);
  if (config.is_object("rope_parameters")) {  // transformers >= 5
    rope.scaling = config.get_object("rope_parameters");
    rope.theta = rope.scaling.get_double("rope_theta", rope.theta);
  } else if (config.has("rope_scaling")) {
    rope.scaling = config.get_object("rope_scaling");
  }
  rope.type = rope.scaling.get_string("rope_type", rope.scaling.get_string("type", "default"));
  return rope;
}

namespace {

at::Tensor llama3_inv_freq(const at::Tensor& inv_freq, const ModelConfig& s) {
  const double factor = s.get_double("factor");
  const double low_freq_factor = s.get_double("low_freq_factor");
  const double high_freq_factor = s.get_double("high_freq_factor");
  const double old_context = static_cast<double>(s.get_int("original_max_position_embeddings"));
  const double low_freq_wavelen = old_context / low_freq_factor;
  const double high_freq_wavelen = old_context / high_freq_factor;

  at::Tensor wavelen = 2 * M_PI / inv_freq;
  at::Tensor scaled = at::where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq);
  at::Tensor smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
  at::Tensor smoothed = (1 - smooth) * scaled / factor + smooth * scaled;
  at::Tensor medium = (wavelen >= high_freq_wavelen).logical_and(wavelen <= low_freq_wavelen);
  return at::where(medium, smoothed, scaled);
}

}  // namespace

RotaryEmbedding::RotaryEmbedding(int64_t head_size, int64_t rotary_dim, const RopeParameters& rope,
                                 const ModelContext& ctx, bool neox_style)
    : Module("RotaryEmbedding"), head_size_(head_size), rotary_dim_(rotary_dim), neox_style_(neox_style) {
  // As transformers: exponents from int64 arange, in float32, on the CPU.
  at::Tensor exponents = at::arange(0, rotary_dim, 2, at::kLong).to(at::kFloat) / static_cast<double>(rotary_dim);
  at::Tensor inv_freq = 1.0 / at::pow(rope.theta, exponents);
  if (rope.type == "linear") {
    inv_freq = inv_freq / rope.scaling.get_double("factor");
  } else if (rope.type == "llama3") {
    inv_freq = llama3_inv_freq(inv_freq, rope.scaling);
  } else if (rope.type != "default") {
    fail(ErrorKind::Input, ctx.config.origin(), ": rope type '", rope.type, "' is not supported");
  }
  add_buffer("inv_freq", inv_freq.to(ctx.device));
}

at::Tensor RotaryEmbedding::rotate(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) const {
  at::Tensor rot = x.narrow(-1, 0, rotary_dim_);
  at::Tensor rotated;
  if (neox_style_) {
    const int64_t half = rotary_dim_ / 2;
    rotated = at::cat({-rot.narrow(-1, half, half), rot.narrow(-1, 0, half)}, -1);
  } else {
    at::Tensor pairs = rot.unflatten(-1, {rotary_dim_ / 2, 2});
    rotated = at::stack({-pairs.select(-1, 1), pairs.select(-1, 0)}, -1).flatten(-2);
  }
  at::Tensor out = rot * cos + rotated * sin;
  if (rotary_dim_ == head_size_) return out;
  return at::cat({out, x.narrow(-1, rotary_dim_, head_size_ - rotary_dim_)}, -1);
}

std::pair<at::Tensor, at::Tensor> RotaryEmbedding::forward(const at::Tensor& positions, const at::Tensor& q,
                                                           const at::Tensor& k) const {
  const at::Tensor& inv_freq = const_cast<RotaryEmbedding*>(this)->buffer("inv_freq");
  at::Tensor freqs = at::outer(positions.to(at::kFloat), inv_freq);  // [n, rotary_dim / 2]
  at::Tensor emb = neox_style_ ? at::cat({freqs, freqs}, -1) : at::repeat_interleave(freqs, 2, -1);
  // [n, 1, rotary_dim], broadcast over heads; cast like transformers before multiplying.
  at::Tensor cos = (emb.cos() * attention_scaling_).to(q.scalar_type()).unsqueeze(1);
  at::Tensor sin = (emb.sin() * attention_scaling_).to(q.scalar_type()).unsqueeze(1);
  return {rotate(q, cos, sin), rotate(k, cos, sin)};
}

}  // namespace loadkit
