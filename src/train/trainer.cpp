// The CPU LoRA training loop (see trainer.h for the step math and the outputs).
#include "train/trainer.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "data/batch_iterator.h"
#include "data/dataset.h"
#include "model/decoder.h"
#include "model/lora.h"
#include "model/model_source.h"
#include "model/weights.h"
#include "train/evaluate.h"
#include "tokenizer/tokenizer.h"
#include "train/checkpoint.h"
#include "train/interrupt.h"
#include "train/loss_plot.h"
#include "train/progress.h"
#include "train/train_engine.h"

namespace qt {

namespace fs = std::filesystem;

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

data::DatasetFormat format_of(const std::string& type) {
  return data::parse_dataset_format(type == "chat" ? "messages" : type);
}

// Appends the sequences `which` of `src` to `dst`.
void append_sequences(data::TokenizedDataset& dst, const data::TokenizedDataset& src, const std::vector<int64_t>& which) {
  for (int64_t i : which) {
    const auto ids = src.ids(i);
    const auto labels = src.label_span(i);
    const auto docs = src.docs(i);
    dst.input_ids.insert(dst.input_ids.end(), ids.begin(), ids.end());
    dst.labels.insert(dst.labels.end(), labels.begin(), labels.end());
    dst.doc_lengths.insert(dst.doc_lengths.end(), docs.begin(), docs.end());
    dst.seq_offsets.push_back(int64_t(dst.input_ids.size()));
    dst.seq_doc_offsets.push_back(int64_t(dst.doc_lengths.size()));
  }
}

std::vector<int64_t> iota_vec(int64_t n) {
  std::vector<int64_t> v(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) v[size_t(i)] = i;
  return v;
}

}  // namespace

int64_t steps_per_epoch(int64_t batches_per_epoch, int64_t grad_accum) {
  QT_ASSERT(grad_accum >= 1, "grad_accum {}", grad_accum);
  return std::max<int64_t>(1, (batches_per_epoch + grad_accum - 1) / grad_accum);
}

int64_t total_training_steps(const TrainConfig& cfg, int64_t batches_per_epoch) {
  if (cfg.max_steps) return *cfg.max_steps;
  const double epochs = cfg.num_epochs.value_or(1.0);
  const double per = double(steps_per_epoch(batches_per_epoch, cfg.gradient_accumulation_steps));
  return std::max<int64_t>(1, int64_t(std::ceil(epochs * per)));
}

TrainResult run_training(const TrainConfig& tc, const RunOptions& run) {
  tc.validate("train");
  if (run.stop_after_steps < 0) fail("train", "--stop-after-steps {}: must be >= 1", run.stop_after_steps);
  // The checkpoint to resume from, validated before anything is loaded or written.
  ResumePoint resume;
  if (run.resume)
    resume = run.resume_from.empty() ? find_resume_checkpoint(tc.output_dir)
                                     : ResumePoint{run.resume_from, validate_checkpoint(run.resume_from)};

  const fs::path out_dir(tc.output_dir);
  std::error_code ec;
  fs::create_directories(out_dir, ec);
  if (ec) fail("train", "output_dir {}: cannot create it: {}", tc.output_dir, ec.message());
  auto write_resolved_config = [&] {
    std::ofstream f(out_dir / "qwentune_config.yaml", std::ios::trunc);
    f << train_config_to_yaml(tc);
    if (!f) fail("train", "cannot write {}", (out_dir / "qwentune_config.yaml").string());
  };
  if (!run.resume) write_resolved_config();  // on resume: once the settings are known to match

  // Model and tokenizer.
  LoadedModel model = load_model_source(tc.base_model, uint64_t(tc.seed), "train", tc.quantize_base());
  const Tokenizer tok = Tokenizer::load(model.tokenizer_path);
  if (tok.vocab_size() > model.cfg.vocab_size)
    fail("train", "the tokenizer {} has {} tokens but the model's vocab_size is {}", model.tokenizer_path,
         tok.vocab_size(), model.cfg.vocab_size);
  const std::string tok_fp = data::tokenizer_fingerprint(model.tokenizer_path);
  std::string device_note;
  const std::string device = resolve_device(tc.device, model.cfg, "train", &device_note);
  fmt::print("model: {}\ntokenizer: {}\n", model.description, model.tokenizer_path);

  // Data.
  data::TokenizedDataset all;
  for (const DatasetSpec& spec : tc.datasets) {
    data::DatasetOptions opts;
    opts.path = spec.path;
    opts.read.format = format_of(spec.type);
    opts.tokenize.chat_template = data::resolve_chat_template(
        tc.chat_template, tok, (fs::path(model.tokenizer_path) / "tokenizer_config.json").string());
    opts.tokenize.train_on_inputs = tc.train_on_inputs;
    opts.tokenize.sequence_len = tc.sequence_len;
    opts.tokenize.packing = tc.sample_packing;
    opts.cache_dir = (out_dir / "dataset_cache").string();
    const data::LoadedDataset ld = data::load_dataset(opts, tok, tok_fp);
    fmt::print("dataset {}: {} sequences, {} tokens ({} trained){}\n", spec.path, ld.data.size(),
               ld.data.stats.tokens, ld.data.stats.trained_tokens, ld.from_cache ? " [cached]" : "");
    if (!ld.cache_note.empty()) std::fprintf(stderr, "qwentune: note: %s\n", ld.cache_note.c_str());
    append_sequences(all, ld.data, iota_vec(ld.data.size()));
  }
  const int64_t n_all = all.size();
  int64_t n_val = 0;
  if (tc.val_set_size > 0)
    n_val = tc.val_set_size < 1 ? int64_t(std::llround(tc.val_set_size * double(n_all))) : int64_t(tc.val_set_size);
  if (tc.val_set_size > 0 && n_val < 1) n_val = 1;
  if (n_val >= n_all)
    fail("train", "val_set_size {} leaves no training data ({} sequences in all)", tc.val_set_size, n_all);
  data::TokenizedDataset train_ds, val_ds;
  {
    // Split permutation: the batch iterator's order function with a dedicated epoch index.
    const std::vector<int64_t> perm = n_val > 0 ? data::epoch_order(n_all, uint64_t(tc.seed), -1, true) : iota_vec(n_all);
    std::vector<int64_t> val_idx(perm.begin(), perm.begin() + n_val), train_idx(perm.begin() + n_val, perm.end());
    std::sort(val_idx.begin(), val_idx.end());
    std::sort(train_idx.begin(), train_idx.end());
    append_sequences(train_ds, all, train_idx);
    append_sequences(val_ds, all, val_idx);
  }

  const int32_t pad_id = tok.pad_id() >= 0 ? tok.pad_id() : std::max(0, tok.eos_id());
  data::BatchOptions bo;
  bo.micro_batch_size = tc.micro_batch_size;
  bo.shuffle = true;
  bo.seed = uint64_t(tc.seed);
  bo.pad_id = pad_id;
  data::BatchIterator batches(train_ds, bo);
  const int64_t batches_per_epoch = batches.batches_per_epoch();
  const int64_t ga = tc.gradient_accumulation_steps;
  const int64_t total = total_training_steps(tc, batches_per_epoch);
  const int64_t per_epoch = steps_per_epoch(batches_per_epoch, ga);
  const int64_t log_every = tc.logging_steps_for(total);
  const LrSchedule schedule(tc.scheduler_kind(), tc.learning_rate, tc.warmup_steps_for(total), total);
  const nlohmann::json fingerprint = training_fingerprint(tc, model.config_path, total, tokenized_dataset_sha256(train_ds));
  if (run.resume) {
    check_fingerprint(resume.state.fingerprint, fingerprint, resume.dir);
    write_resolved_config();
  } else if (const auto old = list_checkpoints(tc.output_dir); !old.empty()) {
    std::fprintf(stderr, "qwentune: warning: %s already holds %zu checkpoint(s) (newest %s) from an earlier run; "
                 "this run starts from step 0 (use --resume to continue instead)\n", tc.output_dir.c_str(),
                 old.size(), old.back().c_str());
  }

  // Adapter and optimizer.
  const LoraConfig lcfg = tc.lora_config();
  LoraAdapter lora = init_lora(model.cfg, lcfg, DType::F32, uint64_t(tc.seed));
  AdamW opt(lora, tc.adamw_config());
  if (run.resume) load_checkpoint_weights(resume, model.cfg, lora, opt);
  std::unique_ptr<TrainEngine> engine =
      device == "cuda" ? make_cuda_engine(model.weights, lora, opt) : make_cpu_engine(model.weights, lora, opt);
  if (device == "cuda") model.weights = ModelWeights{};  // the GPU holds its own bf16 copy
  fmt::print("device: {}{}\n", engine->describe(), device_note.empty() ? "" : " (" + device_note + ")");
  int64_t n_params = 0;
  for (const auto& layer : lora.layers)
    for (const auto& p : layer.slot)
      if (p.present()) n_params += p.A.numel() + p.B.numel();
  fmt::print("train: {} sequences, {} micro-batches of {} per epoch, {} optimizer steps per epoch; val: {}\n",
             train_ds.size(), batches_per_epoch, tc.micro_batch_size, per_epoch, val_ds.size());
  fmt::print("lora: r {}, alpha {}, modules {}, {} trainable parameters; {} steps, lr {} ({})\n", lcfg.r, lcfg.alpha,
             fmt::join(lcfg.target_modules, ","), n_params, total, tc.learning_rate,
             lr_scheduler_name(tc.scheduler_kind()));
  std::fflush(stdout);

  if (run.resume) truncate_metrics((out_dir / "metrics.jsonl").string(), resume.state.global_step);
  std::ofstream metrics(out_dir / "metrics.jsonl", run.resume ? std::ios::app : std::ios::trunc);
  if (!metrics) fail("train", "cannot write {}", (out_dir / "metrics.jsonl").string());
  auto write_metrics = [&](const nlohmann::json& j) {
    metrics << j.dump() << "\n";
    metrics.flush();
  };

  TrainResult res;
  res.total_steps = total;
  const auto t_start = Clock::now();
  auto t_log = t_start, t_step = t_start;
  ProgressReporter progress(total, {});
  int64_t tokens_since_log = 0, consecutive_bad = 0, epoch_batches_used = 0;
  double loss_since_log = 0;
  int64_t steps_since_log = 0;
  // Checkpoint state: restored on resume, captured at each save.
  TrainerState ckpt = run.resume ? resume.state : TrainerState{};
  if (run.resume) {
    res.steps_done = ckpt.steps_done;
    res.steps_skipped = ckpt.steps_skipped;
    res.first_loss = ckpt.first_loss;
    res.last_loss = ckpt.last_loss;
    consecutive_bad = ckpt.consecutive_bad;
    loss_since_log = ckpt.loss_since_log;
    steps_since_log = ckpt.steps_since_log;
    tokens_since_log = ckpt.tokens_since_log;
    if (ckpt.global_step < total) batches.seek(ckpt.epoch, ckpt.batch_in_epoch);
    epoch_batches_used = ckpt.batch_in_epoch;
    fmt::print("resumed from {} at step {}/{}\n", resume.dir, ckpt.global_step, total);
  }
  const int64_t start_step = ckpt.global_step;
  const double elapsed_before = ckpt.elapsed_s;
  auto write_checkpoint = [&](int64_t done) {
    ckpt.global_step = done;
    ckpt.total_steps = total;
    // The position of the next micro-batch (the iterator moves to the next epoch lazily).
    ckpt.epoch = batches.step() >= batches_per_epoch ? batches.epoch() + 1 : batches.epoch();
    ckpt.batch_in_epoch = batches.step() >= batches_per_epoch ? 0 : batches.step();
    ckpt.optimizer_step = opt.step_count();
    ckpt.seed = tc.seed;
    ckpt.steps_done = res.steps_done;
    ckpt.steps_skipped = res.steps_skipped;
    ckpt.consecutive_bad = consecutive_bad;
    ckpt.first_loss = res.first_loss;
    ckpt.last_loss = res.last_loss;
    ckpt.loss_since_log = loss_since_log;
    ckpt.steps_since_log = steps_since_log;
    ckpt.tokens_since_log = tokens_since_log;
    ckpt.elapsed_s = elapsed_before + seconds_since(t_start);
    ckpt.fingerprint = fingerprint;
    engine->sync_to_host(lora, opt);
    res.last_checkpoint = save_checkpoint(tc.output_dir, lora, model.cfg, opt, ckpt, tc.save_total_limit);
    write_loss_plot((out_dir / "loss.svg").string(), ckpt.train_loss, ckpt.eval_loss, "qwentune: " + tc.output_dir);
  };
  const StopSignalGuard stop_guard;
  std::vector<Batch> micro;
  for (int64_t step = start_step; step < total; ++step) {
    // Micro-batches of this step: up to `ga`, not crossing the end of an epoch.
    if (epoch_batches_used >= batches_per_epoch) epoch_batches_used = 0;
    const int64_t k = std::min(ga, batches_per_epoch - epoch_batches_used);
    epoch_batches_used += k;
    micro.resize(size_t(k));
    int64_t n_pred = 0, n_tokens = 0;
    for (auto& b : micro) {
      batches.next(b);
      n_pred += b.predicted_tokens();
      n_tokens += b.B * b.S;
    }
    const double lr = schedule.lr(step);
    EngineStepStats st;
    if (n_pred > 0) {
      engine->begin_step();
      for (size_t i = 0; i < micro.size(); ++i)
        engine->accumulate(micro[i], 1.0 / double(n_pred), {tc.lora_dropout, uint64_t(tc.seed), step, int64_t(i)});
      st = engine->finish_step(lr, tc.max_grad_norm);
    }
    const double loss = n_pred ? st.loss_sum / double(n_pred) : 0.0, gnorm = st.grad_norm;
    const bool ok = n_pred > 0 && st.applied;
    if (ok) {
      consecutive_bad = 0;
      if (res.steps_done == 0) res.first_loss = loss;
      res.last_loss = loss;
      ++res.steps_done;
      ckpt.train_loss.push_back({step + 1, loss});
      loss_since_log += loss;
      ++steps_since_log;
    } else {
      ++res.steps_skipped;
      ++consecutive_bad;
      progress.print_error(fmt::format("qwentune: warning: step {} skipped: {} (loss {}, grad norm {})", step + 1,
                                       n_pred == 0 ? "no predicted tokens" : "non-finite loss or gradients", loss,
                                       gnorm));
      if (consecutive_bad >= 5)
        fail("train", "{} steps in a row had non-finite loss or gradients (last at step {}); stopping",
             consecutive_bad, step + 1);
    }
    tokens_since_log += n_tokens;

    const int64_t done = step + 1;
    progress.on_step(done, ok ? loss : std::nan(""), lr, gnorm, n_tokens, seconds_since(t_step));
    t_step = Clock::now();
    if (done % log_every == 0 || done == total) {
      const double dt = seconds_since(t_log), elapsed = elapsed_before + seconds_since(t_start);
      const double tps = dt > 0 ? double(tokens_since_log) / dt : 0.0;
      const double eta = elapsed / double(done) * double(total - done);
      const double mean_loss = steps_since_log ? loss_since_log / double(steps_since_log) : std::nan("");
      progress.print_line(render_log_line({done, total, mean_loss, lr, gnorm, tps, elapsed, eta}));
      nlohmann::json j = {{"type", "train"}, {"step", done},       {"total_steps", total},
                          {"epoch", double(done) / double(per_epoch)}, {"lr", lr},          {"grad_norm", gnorm},
                          {"tokens_per_s", tps}, {"elapsed_s", elapsed}, {"skipped_steps", res.steps_skipped}};
      j["loss"] = steps_since_log ? nlohmann::json(mean_loss) : nlohmann::json(nullptr);
      write_metrics(j);
      t_log = Clock::now();
      tokens_since_log = 0;
      loss_since_log = 0;
      steps_since_log = 0;
    }
    const bool eval_now = val_ds.size() > 0 && ((tc.eval_steps > 0 && done % tc.eval_steps == 0) || done == total);
    if (eval_now) {
      const double vl = engine->evaluate(val_ds, tc.micro_batch_size, pad_id).loss();
      progress.print_line(fmt::format("eval  step {}/{}  eval_loss {:.4f}", done, total, vl));
      write_metrics({{"type", "eval"}, {"step", done}, {"eval_loss", vl}});
      ckpt.eval_loss.push_back({done, vl});
    }
    const int sig = done < total ? stop_signal() : 0;
    const bool stop_here = run.stop_after_steps > 0 && done - start_step >= run.stop_after_steps && done < total;
    if ((tc.save_steps > 0 && (done % tc.save_steps == 0 || done == total)) || sig || stop_here)
      write_checkpoint(done);
    if (sig || stop_here) {
      fmt::print("{} at step {}: saved {}; continue with --resume\n", sig ? "interrupted" : "stopped (--stop-after-steps)",
                 done, res.last_checkpoint);
      std::fflush(stdout);
      res.stop_signal = sig;
      res.stopped_early = true;
      return res;
    }
  }

  progress.finish();
  engine->sync_to_host(lora, opt);
  save_peft_adapter(out_dir.string(), lora, model.cfg);
  write_loss_plot((out_dir / "loss.svg").string(), ckpt.train_loss, ckpt.eval_loss, "qwentune: " + tc.output_dir);
  fmt::print("saved the adapter to {} ({} steps, {} skipped, loss {:.4f} -> {:.4f}, {})\n", tc.output_dir,
             res.steps_done, res.steps_skipped, res.first_loss, res.last_loss,
             format_duration(elapsed_before + seconds_since(t_start)));
  return res;
}

}  // namespace qt
