#include "reload/reload_engine.h"

#include "caller_tensor.h"
#include "loadkit/auto_weights_loader.h"
#include "loadkit/error.h"
#include "loadkit/model_context.h"
#include "reload/staging_plan.h"
#include "weight_sources.h"

namespace loadkit {

using reload::Phase;

ReloadStats ReloadEngine::reload(const safetensors::CheckpointFiles& files, const Loader& load_weights,
                                 Rollback rollback, std::vector<std::string>* written, const DataSource& data) {
  reload::Session& session = *session_;
  if (written) written->clear();
  session.begin(Phase::Reloading, rollback);
  try {
    // 0. Where the plan does not depend on what validation sees (no module is rebuilt: the files'
    //    order), the stream opens first and its readers fill the window while step 1 runs. That
    //    is staging memory only: nothing reaches the model before step 2, and a failed validation
    //    drops the stream. (Not for another data source: a fan-out stream is collective.)
    //    So does a stream whose modules are rebuilt, in the order the last validated reload of
    //    the same layout used (stream_plan_): validation's own plan is checked against it below.
    std::unique_ptr<WeightStream> stream;
    const bool in_file_order = !data && !reload::plan_needs_validation(session.modules());
    const bool kept_order = !data && !in_file_order && stream_plan_ && stream_plan_->layout.matches(files);
    if (in_file_order)
      stream = open_weight_stream(files, ctx_.device, reload::plan_apply(session.modules(), {}, ctx_));
    else if (kept_order)
      stream = open_weight_stream(files, ctx_.device, stream_plan_->plan);
    // 1-2 by plan: a checkpoint laid out as the last recorded reload's, coming in its order, takes
    //    that reload's writes (reload_plan.h), tensor by tensor as they arrive: no validation, no
    //    loader (rebuilt modules are materialised and processed as step 2 does).
    std::unique_ptr<reload::ReloadPlan> record;
    bool order_kept = false;
    static const std::vector<std::string> files_order;
    if ((in_file_order || kept_order) &&
        session.fits_reload_plan(files, in_file_order ? files_order : stream_plan_->plan.order)) {
      session.apply_by_plan(*stream);
      order_kept = kept_order;
    } else {
      // 1. The whole checkpoint through the loaders on meta stand-ins: nothing written yet.
      reload::ValidationRecord seen;
      session.validate(*safetensors_header_stream(files), load_weights, &seen);
      fail_if_missing(session.incomplete_after_validation());
      // 2. Its data, each transformed module's weights together, within the largest layer's size;
      //    recorded for the next reload (not a tensor-parallel group's collective stream).
      if (in_file_order) {
        record = reload::ReloadPlan::start(files);
      } else {
        StreamPlan plan = reload::plan_apply(session.modules(), seen, ctx_);
        order_kept = kept_order && plan == stream_plan_->plan;
        if (!order_kept) {
          stream.reset();  // one stream's window at a time
          stream = data ? data(plan) : open_weight_stream(files, ctx_.device, plan);
          if (!data) stream_plan_ = KeptStreamPlan{reload::CheckpointLayout::of(files), std::move(plan)};
        }
        if (!data) record = reload::ReloadPlan::start(files, stream_plan_->plan.order);
      }
      session.apply(*stream, load_weights, record.get());
    }
    // 3. Attention-like modules, and every module back to its own loaders.
    ReloadStats stats = session.finish();
    stats.reload_order_kept = order_kept;
    session.journal().clear();  // a reload is not undone later: its copies go at once
    session.keep_reload_plan(std::move(record));
    return stats;
  } catch (...) {
    if (session.open()) session.abort();
    if (written) *written = session.written_modules();
    throw;
  }
}

void ReloadEngine::begin_update(Rollback rollback) { session_->begin(Phase::Updating, rollback); }

void ReloadEngine::update(const std::vector<NamedWeight>& chunk, const Loader& load_weights, Borrowed borrowed) {
  if (session_->phase() != Phase::Updating) fail(ErrorKind::Usage, "update() without begin_update()");
  for (const auto& w : chunk) require_plain_data(w.tensor, w.origin, w.name);  // rejected whole, as by validation
  // A chunk like one applied before goes by its plan (update_plan.h); any other, or one the
  // plan's count checks doubt, is validated whole through the loaders, its plan recorded.
  try {
    if (session_->apply_planned(chunk, load_weights)) {
      if (borrowed == Borrowed::UntilReturn) session_->own_borrowed(chunk);
      return;
    }
  } catch (...) {
    session_->abort();
    throw;
  }
  auto plan = reload::PlanCache::start(chunk);
  VectorWeightStream check(chunk);
  session_->validate(check, load_weights, nullptr, plan.get());  // a bad chunk is rejected whole; earlier chunks stay applied
  try {
    session_->apply_chunk(chunk, load_weights, plan.get());
    if (borrowed == Borrowed::UntilReturn) session_->own_borrowed(chunk);
  } catch (...) {
    session_->abort();
    throw;
  }
  session_->keep_plan(std::move(plan));
}

void ReloadEngine::validate_update(const std::vector<NamedWeight>& planned, const Loader& load_weights, bool complete) {
  if (session_->phase() != Phase::Updating) fail(ErrorKind::Usage, "validate_update() without begin_update()");
  VectorWeightStream check(planned);
  session_->validate(check, load_weights);
  if (complete) fail_if_missing(session_->incomplete_after_validation());
}

ReloadStats ReloadEngine::finish_update() {
  if (session_->phase() != Phase::Updating) fail(ErrorKind::Usage, "finish_update() without begin_update()");
  return session_->finish();
}

void ReloadEngine::rollback() {
  if (session_->open()) {
    session_->abort();
  } else {
    session_->journal().restore();
  }
}

void ReloadEngine::commit() { session_->journal().clear(); }

bool ReloadEngine::updating() const { return session_->open(); }

ReloadEngine::ReloadEngine(Module& root, const ModelContext& ctx)
    : ctx_(ctx), session_(std::make_unique<reload::Session>(root, ctx)) {}
ReloadEngine::~ReloadEngine() = default;

int ReloadEngine::layers() const { return static_cast<int>(session_->modules().size()); }

void ReloadEngine::release_load_format() { session_->release_load_format(); }

}  // namespace loadkit
