#include "loadkit/layers/rotary.h"

#include <ATen/ATen.h>

#include <cmath>
#include <vector>

#include "loadkit/config_reader.h"
#include "loadkit/error.h"

namespace loadkit {

RopeParameters rope_parameters(const ModelConfig& config, double default_theta) {
  RopeParameters rope;
  ConfigReader top(config);
  rope.theta = top.positive_number("rope_theta", default_theta);
  const bool internlm = config.is_object("rotary");
  if (config.is_object("rope_parameters")) {  // transformers >= 5
    rope.scaling = config.get_object("rope_parameters");
    rope.theta = ConfigReader(rope.scaling).positive_number("rope_theta", rope.theta);
  } else if (config.has("rope_scaling")) {
    rope.scaling = config.get_object("rope_scaling");
  } else if (internlm) {
    // InternLM's own block: "origin" is plain RoPE, "dynamic" dynamic NTK with scaling_factor.
    rope.scaling = config.get_object("rotary");
    ConfigReader r(rope.scaling);
    rope.theta = r.positive_number("base", rope.theta);
    const std::string type = rope.scaling.get_string("type", "origin");
    if (type != "origin" && type != "dynamic")
      fail(ErrorKind::Input, config.origin(), ": key 'rotary.type' is '", type,
           "', which is not supported (want origin or dynamic)");
    rope.type = type == "dynamic" ? "dynamic" : "default";
    if (rope.type == "dynamic") rope.dynamic_factor = r.positive_number("scaling_factor", 1.0);
    return rope;
  }
  if (internlm)
    fail(ErrorKind::Input, config.origin(), ": key 'rotary' (InternLM's rope settings) conflicts with ",
         config.is_object("rope_parameters") ? "'rope_parameters'" : "'rope_scaling'", "; give one of them");
  rope.type = rope.scaling.get_string("rope_type", rope.scaling.get_string("type", "default"));
  if (rope.type == "dynamic") rope.dynamic_factor = ConfigReader(rope.scaling).positive_number("factor");
  return rope;
}

namespace {

at::Tensor llama3_inv_freq(const at::Tensor& inv_freq, const ModelConfig& s) {
  ConfigReader r(s);
  const double factor = r.positive_number("factor");
  const double low_freq_factor = r.positive_number("low_freq_factor");
  const double high_freq_factor = r.positive_number("high_freq_factor");
  const double old_context = static_cast<double>(r.positive("original_max_position_embeddings"));
  // The smoothing divides by their difference.
  if (low_freq_factor == high_freq_factor)
    fail(ErrorKind::Input, s.origin(), ": keys '", s.qualified("low_freq_factor"), "' and '",
         s.qualified("high_freq_factor"), "' are both ", low_freq_factor, "; the llama3 rope divides by their difference");
  const double low_freq_wavelen = old_context / low_freq_factor;
  const double high_freq_wavelen = old_context / high_freq_factor;

  at::Tensor wavelen = 2 * M_PI / inv_freq;
  at::Tensor scaled = at::where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq);
  at::Tensor smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
  at::Tensor smoothed = (1 - smooth) * scaled / factor + smooth * scaled;
  at::Tensor medium = (wavelen >= high_freq_wavelen).logical_and(wavelen <= low_freq_wavelen);
  return at::where(medium, smoothed, scaled);
}

/// LongRoPE (Phi3): per-frequency factors divide the default frequencies; the
/// short set serves sequences up to `original_max`, the long set longer ones.
struct LongRope {
  at::Tensor short_inv_freq, long_inv_freq;
  int64_t original_max = 0;
  double attention_factor = 1.0;
};

LongRope longrope_inv_freq(const at::Tensor& exponents, const RopeParameters& rope, const ModelConfig& config,
                           int64_t rotary_dim) {
  const ModelConfig& s = rope.scaling;
  LongRope out;
  // As transformers' standardize_rope_params: a top-level original_max_position_embeddings (Phi3
  // saves it there) wins over the scaling object's, which defaults to max_position_embeddings.
  out.original_max = config.get_int("original_max_position_embeddings",
                                    s.get_int("original_max_position_embeddings",
                                              config.get_int("max_position_embeddings")));
  if (out.original_max <= 1)
    fail(ErrorKind::Input, config.origin(), ": longrope original_max_position_embeddings must exceed 1, got ",
         out.original_max);
  // Without an explicit factor, the context extension ratio sets the default attention factor.
  const double factor = s.has("factor") ? s.get_double("factor")
                                        : static_cast<double>(config.get_int("max_position_embeddings")) /
                                              static_cast<double>(out.original_max);
  out.attention_factor =
      s.has("attention_factor") ? s.get_double("attention_factor")
      : factor <= 1.0           ? 1.0
                                : std::sqrt(1.0 + std::log(factor) / std::log(static_cast<double>(out.original_max)));
  if (!(factor > 0.0)) fail(ErrorKind::Input, config.origin(), ": longrope factor must be positive, got ", factor);
  auto factors = [&](const char* key) {
    std::vector<double> values = s.get_doubles(key);
    if (static_cast<int64_t>(values.size()) != rotary_dim / 2)
      fail(ErrorKind::Input, config.origin(), ": longrope ", key, " has ", values.size(), " entries, want ",
           rotary_dim / 2, " (rotary dims / 2)");
    for (double v : values)  // frequencies are divided by them
      if (!std::isfinite(v) || v <= 0.0)
        fail(ErrorKind::Input, config.origin(), ": longrope ", key, " holds ", v, "; every entry must be positive");
    return at::tensor(values, at::kDouble).to(at::kFloat);
  };
  // 1 / (factor * theta^(2i/d)), in float32 as transformers computes it.
  at::Tensor base = at::pow(rope.theta, exponents);
  out.short_inv_freq = 1.0 / (factors("short_factor") * base);
  out.long_inv_freq = 1.0 / (factors("long_factor") * base);
  return out;
}

/// YaRN (transformers' `_compute_yarn_parameters`): interpolated frequencies
/// below the correction range, original ones above it, a linear ramp between.
/// Returns the frequencies and the factor that scales cos and sin.
std::pair<at::Tensor, double> yarn_inv_freq(const at::Tensor& pos_freqs, int64_t dim, double base,
                                            const ModelConfig& s, const ModelConfig& config) {
  ConfigReader r(s);
  const auto original = static_cast<double>(r.has("original_max_position_embeddings")
                                                ? r.positive("original_max_position_embeddings")
                                                : ConfigReader(config).positive("max_position_embeddings"));
  const double factor = s.has("factor") ? r.positive_number("factor")
                                        : static_cast<double>(config.get_int("max_position_embeddings")) / original;
  double attention_factor = yarn_mscale(factor);
  const double mscale = s.get_double("mscale", 0.0), mscale_all_dim = s.get_double("mscale_all_dim", 0.0);
  if (mscale != 0.0 && mscale_all_dim != 0.0) attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim);
  attention_factor = s.get_double("attention_factor", attention_factor);
  // A zero means "unset" for the betas, as transformers' `or` does.
  const double beta_fast = s.get_double("beta_fast", 0.0) != 0.0 ? s.get_double("beta_fast") : 32.0;
  const double beta_slow = s.get_double("beta_slow", 0.0) != 0.0 ? s.get_double("beta_slow") : 1.0;
  const bool truncate = s.get_bool("truncate", true);

  auto correction_dim = [&](double rotations) {
    return static_cast<double>(dim) * std::log(original / (rotations * 2 * M_PI)) / (2 * std::log(base));
  };
  double low = correction_dim(beta_fast), high = correction_dim(beta_slow);
  if (truncate) {
    low = std::floor(low);
    high = std::ceil(high);
  }
  low = std::max(low, 0.0);
  high = std::min(high, static_cast<double>(dim - 1));
  if (low == high) high += 0.001;  // no singularity
  at::Tensor ramp = ((at::arange(dim / 2, at::kFloat) - low) / (high - low)).clamp(0, 1);
  at::Tensor extrapolation = 1 - ramp;
  at::Tensor inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation;
  return {inv_freq, attention_factor};
}

}  // namespace

double yarn_mscale(double scale, double mscale) {
  if (scale <= 1.0) return 1.0;
  return 0.1 * mscale * std::log(scale) + 1.0;
}

RotaryEmbedding::RotaryEmbedding(int64_t head_size, int64_t rotary_dim, const RopeParameters& rope,
                                 const ModelContext& ctx, bool neox_style)
    : Module("RotaryEmbedding"), head_size_(head_size), rotary_dim_(rotary_dim), neox_style_(neox_style) {
  // As transformers: exponents from int64 arange, in float32, on the CPU.
  at::Tensor exponents = at::arange(0, rotary_dim, 2, at::kLong).to(at::kFloat) / static_cast<double>(rotary_dim);
  at::Tensor inv_freq = 1.0 / at::pow(rope.theta, exponents);
  if (rope.type == "linear") {
    inv_freq = inv_freq / ConfigReader(rope.scaling).positive_number("factor");
  } else if (rope.type == "dynamic") {
    // Plain RoPE up to max_position_embeddings; forward() rescales the base beyond it.
    dynamic_after_ = ConfigReader(ctx.config).positive("max_position_embeddings");
    dynamic_factor_ = rope.dynamic_factor;
    theta_ = rope.theta;
    if (rotary_dim <= 2)
      fail(ErrorKind::Input, ctx.config.origin(), ": dynamic rope needs more than 2 rotary dims, got ", rotary_dim);
  } else if (rope.type == "llama3") {
    inv_freq = llama3_inv_freq(inv_freq, rope.scaling);
  } else if (rope.type == "longrope") {
    LongRope longrope = longrope_inv_freq(exponents, rope, ctx.config, rotary_dim);
    inv_freq = longrope.short_inv_freq;
    add_buffer("long_inv_freq", longrope.long_inv_freq.to(ctx.device));
    long_context_after_ = longrope.original_max;
    attention_scaling_ = longrope.attention_factor;
  } else if (rope.type == "yarn") {
    std::tie(inv_freq, attention_scaling_) =
        yarn_inv_freq(at::pow(rope.theta, exponents), rotary_dim, rope.theta, rope.scaling, ctx.config);
  } else if (rope.type != "default") {
    fail(ErrorKind::Input, ctx.config.origin(), ": rope type '", rope.type, "' is not supported");
  }
  add_buffer("inv_freq", inv_freq.to(ctx.device));
}

at::Tensor RotaryEmbedding::dynamic_inv_freq(int64_t seq_len) const {
  // transformers' _compute_dynamic_ntk_parameters, op for op: the int64 length times the factor is
  // float32 from there on, so the rescaled base rounds as it does there.
  at::Tensor length = at::scalar_tensor(seq_len, at::kLong);
  at::Tensor base = theta_ * at::pow(length * dynamic_factor_ / dynamic_after_ - (dynamic_factor_ - 1),
                                     static_cast<double>(rotary_dim_) / static_cast<double>(rotary_dim_ - 2));
  at::Tensor exponents = at::arange(0, rotary_dim_, 2, at::kLong).to(at::kFloat) / static_cast<double>(rotary_dim_);
  return 1.0 / at::pow(base, exponents);
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
  auto* self = const_cast<RotaryEmbedding*>(this);
  // longrope: like transformers, the whole sequence switches to the long factors once it
  // (max position + 1) exceeds the original context.
  const bool long_context =
      long_context_after_ > 0 && positions.numel() > 0 && positions.max().item<int64_t>() + 1 > long_context_after_;
  at::Tensor inv_freq = self->buffer(long_context ? "long_inv_freq" : "inv_freq");
  if (dynamic_after_ > 0 && positions.numel() > 0) {
    const int64_t seq_len = positions.max().item<int64_t>() + 1;
    if (seq_len > dynamic_after_) inv_freq = dynamic_inv_freq(seq_len).to(inv_freq.device());
  }
  at::Tensor freqs = at::outer(positions.to(at::kFloat), inv_freq);  // [n, rotary_dim / 2]
  at::Tensor emb = neox_style_ ? at::cat({freqs, freqs}, -1) : at::repeat_interleave(freqs, 2, -1);
  // [n, 1, rotary_dim], broadcast over heads; cast like transformers before multiplying.
  at::Tensor cos = (emb.cos() * attention_scaling_).to(q.scalar_type()).unsqueeze(1);
  at::Tensor sin = (emb.sin() * attention_scaling_).to(q.scalar_type()).unsqueeze(1);
  return {rotate(q, cos, sin), rotate(k, cos, sin)};
}

}  // namespace loadkit
