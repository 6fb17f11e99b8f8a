// The LoRA training loop (see trainer.h for the step math, the outputs and data parallelism). The
// device is resolved before the model is loaded: the weights are loaded for their engine
// (model_source.h WeightsFor; the CUDA engine's host copy is bf16, with QLoRA only the NF4 base).
#include "train/trainer.h"

#include <algorithm>
#include <chrono>
#include <csignal>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "data/batch_iterator.h"
#include "data/dataset.h"
#include "dist/rendezvous.h"
#include "dist/sharding.h"
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

// Every rank of a data-parallel job must train with the same settings, model and data: fails on
// every rank alike, naming the first line (a config key, a fingerprint entry) that differs.
void check_same_settings(dist::Rendezvous& rv, const std::string& settings) {
  const std::vector<std::string> all = rv.all_gather(settings);
  auto lines = [](const std::string& text) {
    std::vector<std::string> out;
    for (size_t at = 0; at <= text.size();) {
      const size_t nl = std::min(text.find('\n', at), text.size());
      out.push_back(text.substr(at, nl - at));
      at = nl + 1;
    }
    return out;
  };
  const std::vector<std::string> first = lines(all[0]);
  for (size_t r = 1; r < all.size(); ++r) {
    if (all[r] == all[0]) continue;
    const std::vector<std::string> other = lines(all[r]);
    size_t i = 0;
    while (i < first.size() && i < other.size() && first[i] == other[i]) ++i;
    auto at = [&](const std::vector<std::string>& v) { return i < v.size() ? "'" + v[i] + "'" : std::string("nothing"); };
    fail("dist", "rank {} has different training settings than rank 0: rank 0 has {}, rank {} has {}", r, at(first), r,
         at(other));
  }
}

// The expert-load statistics of MoE models for the log: per MoE layer the tokens each expert got,
// and a one-line summary (routing collapse shows as a busiest/mean ratio far above 1 and idle experts).
nlohmann::json expert_load_record(const std::vector<std::vector<int64_t>>& load, int64_t step, std::string* line) {
  double worst = 0, least = 1e300;
  int64_t worst_layer = 0, idle = 0, experts = 0;
  std::vector<double> busiest;
  for (size_t l = 0; l < load.size(); ++l) {
    int64_t total = 0, top = 0;
    for (int64_t c : load[l]) total += c, top = std::max(top, c), idle += c == 0;
    experts += int64_t(load[l].size());
    const double mean = load[l].empty() ? 0.0 : double(total) / double(load[l].size());
    const double ratio = mean > 0 ? double(top) / mean : 0.0;
    busiest.push_back(ratio);
    if (ratio > worst) worst = ratio, worst_layer = int64_t(l);
    for (int64_t c : load[l]) least = std::min(least, mean > 0 ? double(c) / mean : 0.0);
  }
  *line = fmt::format("expert load since the last log: busiest expert {:.2f}x the mean (MoE layer {}), "
                      "least {:.2f}x, {} of {} experts idle", worst, worst_layer, least, idle, experts);
  return {{"type", "expert_load"}, {"step", step}, {"busiest_over_mean", busiest}, {"idle_experts", idle},
          {"tokens_per_expert", load}};
}

std::vector<int64_t> iota_vec(int64_t n) {
  std::vector<int64_t> v(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) v[size_t(i)] = i;
  return v;
}

}  // namespace

int64_t total_training_steps(const TrainConfig& cfg, int64_t batches_per_epoch, int world_size) {
  if (cfg.max_steps) return *cfg.max_steps;
  const double epochs = cfg.num_epochs.value_or(1.0);
  const double per = double(dist::steps_per_epoch({batches_per_epoch, cfg.gradient_accumulation_steps, world_size}));
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

  // A data-parallel job: meet the other ranks (docs/distributed.md). Rank 0 alone writes output_dir.
  const dist::DistEnv& de = run.dist;
  const bool rank0 = de.is_rank0();
  std::unique_ptr<dist::Rendezvous> rv;
  if (de.distributed()) {
    dist::RendezvousOptions ro;
    ro.rank = de.rank, ro.world_size = de.world_size, ro.master_addr = de.master_addr, ro.master_port = de.master_port;
    ro.op_timeout_s = 3600;  // the CPU engine's per-step sums wait for the slowest rank's step
    rv = std::make_unique<dist::Rendezvous>(ro);
    fmt::print("data parallel: {}\n", de.describe());
  }
  // Ends the job together: no rank leaves (and makes a launcher stop the others) while rank 0 saves.
  auto leave = [&] {
    if (rv) rv->shutdown();
  };

  auto write_resolved_config = [&] {
    if (!rank0) return;
    std::ofstream f(out_dir / "qwentune_config.yaml", std::ios::trunc);
    f << train_config_to_yaml(tc);
    if (!f) fail("train", "cannot write {}", (out_dir / "qwentune_config.yaml").string());
  };
  if (!run.resume) write_resolved_config();  // on resume: once the settings are known to match

  // Device (first: the weights are loaded for the engine that uses them), model and tokenizer.
  std::string device_note;
  const std::string device = resolve_device(tc.device, "train", &device_note);
  LoadedModel model = load_model_source(tc.base_model, uint64_t(tc.seed), "train", tc.quantize_base(),
                                        weights_for(device));
  const Tokenizer tok = Tokenizer::load(model.tokenizer_path);
  if (tok.vocab_size() > model.cfg.vocab_size)
    fail("train", "the tokenizer {} has {} tokens but the model's vocab_size is {}", model.tokenizer_path,
         tok.vocab_size(), model.cfg.vocab_size);
  const std::string tok_fp = data::tokenizer_fingerprint(model.tokenizer_path);
  fmt::print("model: {}\ntokenizer: {}\n", model.description, model.tokenizer_path);

  // Data (rank 0 tokenizes and fills the cache first; the other ranks then read it).
  data::TokenizedDataset all;
  if (rv && !rank0) rv->barrier();
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
  if (rv && rank0) rv->barrier();
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
  const dist::ShardSpec shard{batches_per_epoch, tc.gradient_accumulation_steps, de.world_size};
  const int64_t total = total_training_steps(tc, batches_per_epoch, de.world_size);
  const int64_t per_epoch = dist::steps_per_epoch(shard);
  const int64_t log_every = tc.logging_steps_for(total);
  const LrSchedule schedule(tc.scheduler_kind(), tc.learning_rate, tc.warmup_steps_for(total), total);
  const nlohmann::json fingerprint =
      training_fingerprint(tc, model.config_path, total, tokenized_dataset_sha256(train_ds), de.world_size);
  if (rv) {
    check_same_settings(*rv, train_config_to_yaml(tc) + fingerprint.dump(1));
    rv->check_same("resume point", run.resume ? fmt::format("{} at step {}", fs::path(resume.dir).filename().string(),
                                                            resume.state.global_step)
                                              : "none");
  }
  if (run.resume) {
    check_fingerprint(resume.state.fingerprint, fingerprint, resume.dir);
    write_resolved_config();
  } else if (const auto old = list_checkpoints(tc.output_dir); !old.empty() && rank0) {
    std::fprintf(stderr, "qwentune: warning: %s already holds %zu checkpoint(s) (newest %s) from an earlier run; "
                 "this run starts from step 0 (use --resume to continue instead)\n", tc.output_dir.c_str(),
                 old.size(), old.back().c_str());
  }

  // Adapter and optimizer.
  const LoraConfig lcfg = tc.lora_config();
  LoraAdapter lora = init_lora(model.cfg, lcfg, DType::F32, uint64_t(tc.seed));
  AdamW opt(lora, tc.adamw_config());
  if (run.resume) load_checkpoint_weights(resume, model.cfg, lora, opt);
  if (rv) rv->barrier();  // every rank has read the checkpoint before rank 0 may save (and prune) one
  DataParallel dp;
  dp.rank = de.rank, dp.world_size = de.world_size, dp.local_rank = de.local_rank, dp.rv = rv.get();
  std::unique_ptr<TrainEngine> engine =
      device == "cuda" ? make_cuda_engine(model.weights, lora, opt, dp,
                                          {.embeddings = resolve_embeddings_on_host(tc.offload_embeddings, model.cfg,
                                                                                    model.base_4bit),
                                           .layer_inputs = tc.offload_activations,
                                           .lora_states = tc.offload_lora,
                                           .expert_chunk = tc.nf4_expert_chunk})
                       : make_cpu_engine(model.weights, lora, opt, dp);
  if (device == "cuda") model.weights = ModelWeights{};  // the GPU holds its own bf16 (or NF4) copy
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

  if (run.resume && rank0) truncate_metrics((out_dir / "metrics.jsonl").string(), resume.state.global_step);
  std::ofstream metrics;
  if (rank0) {
    metrics.open(out_dir / "metrics.jsonl", run.resume ? std::ios::app : std::ios::trunc);
    if (!metrics) fail("train", "cannot write {}", (out_dir / "metrics.jsonl").string());
  }
  auto write_metrics = [&](const nlohmann::json& j) {
    if (!rank0) return;
    metrics << j.dump() << "\n";
    metrics.flush();
  };

  TrainResult res;
  res.total_steps = total;
  const auto t_start = Clock::now();
  auto t_log = t_start, t_step = t_start;
  ProgressReporter::Options popt;
  if (!rank0) popt.mode = ProgressReporter::Mode::Plain;  // ranks 1.. log to a file (or share a terminal)
  ProgressReporter progress(total, popt);
  int64_t tokens_since_log = 0, consecutive_bad = 0;
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
    fmt::print("resumed from {} at step {}/{}\n", resume.dir, ckpt.global_step, total);
  }
  const int64_t start_step = ckpt.global_step;
  const double elapsed_before = ckpt.elapsed_s;
  auto write_checkpoint = [&](int64_t done) {
    if (!rank0) return;
    ckpt.global_step = done;
    ckpt.total_steps = total;
    // The data position of the next step (informational: the step alone determines it).
    const dist::StepSlice next = dist::global_step_slice(shard, done);
    ckpt.epoch = next.epoch;
    ckpt.batch_in_epoch = next.first;
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
  for (int64_t step = start_step; step < total; ++step) {
    // This rank's micro-batches of the step (all of them on one process): up to ga * W in all,
    // not crossing the end of an epoch; n_pred counts the whole step's predicted tokens.
    const dist::RankStep mine = dist::load_rank_step(batches, train_ds, tc.micro_batch_size, shard, de.rank, step);
    const int64_t n_pred = mine.predicted_tokens;
    int64_t n_tokens = 0;
    for (const Batch& b : mine.batches) n_tokens += b.B * b.S;
    const double lr = schedule.lr(step);
    EngineStepStats st;
    if (n_pred > 0) {
      engine->begin_step(int64_t(mine.batches.size()));
      for (size_t i = 0; i < mine.batches.size(); ++i)
        engine->accumulate(mine.batches[i], 1.0 / double(n_pred),
                           {tc.lora_dropout, uint64_t(tc.seed), step, mine.micro_index[i]});
      st = engine->finish_step(lr, tc.max_grad_norm);
    }
    // The step's tokens over all ranks, and a stop asked of any rank (all stop at this step).
    int sig = step + 1 < total ? stop_signal() : 0;
    if (rv) {
      std::vector<double> sums{double(n_tokens), double(sig != 0)};
      engine->sum_over_ranks(sums);
      n_tokens = int64_t(sums[0]);
      if (sig == 0 && sums[1] > 0) sig = SIGTERM;
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
      if (std::vector<std::vector<int64_t>> load = engine->take_expert_load(); !load.empty()) {
        if (rv) {  // over every rank's micro-batches
          std::vector<double> flat;
          for (const auto& l : load) flat.insert(flat.end(), l.begin(), l.end());
          engine->sum_over_ranks(flat);
          size_t at = 0;
          for (auto& l : load)
            for (int64_t& c : l) c = int64_t(flat[at++]);
        }
        std::string line;
        write_metrics(expert_load_record(load, done, &line));
        progress.print_line(line);
      }
      t_log = Clock::now();
      tokens_since_log = 0;
      loss_since_log = 0;
      steps_since_log = 0;
    }
    const bool eval_now =
        rank0 && val_ds.size() > 0 && ((tc.eval_steps > 0 && done % tc.eval_steps == 0) || done == total);
    if (eval_now) {
      const double vl = engine->evaluate(val_ds, tc.micro_batch_size, pad_id).loss();
      progress.print_line(fmt::format("eval  step {}/{}  eval_loss {:.4f}", done, total, vl));
      write_metrics({{"type", "eval"}, {"step", done}, {"eval_loss", vl}});
      ckpt.eval_loss.push_back({done, vl});
    }
    const bool stop_here = run.stop_after_steps > 0 && done - start_step >= run.stop_after_steps && done < total;
    if ((tc.save_steps > 0 && (done % tc.save_steps == 0 || done == total)) || sig || stop_here)
      write_checkpoint(done);
    if (sig || stop_here) {
      fmt::print("{} at step {}: {}; continue with --resume\n", sig ? "interrupted" : "stopped (--stop-after-steps)",
                 done, rank0 ? "saved " + res.last_checkpoint : "rank 0 saved the checkpoint");
      std::fflush(stdout);
      res.stop_signal = sig;
      res.stopped_early = true;
      leave();
      return res;
    }
  }

  progress.finish();
  if (rank0) {
    engine->sync_to_host(lora, opt);
    save_peft_adapter(out_dir.string(), lora, model.cfg);
    write_loss_plot((out_dir / "loss.svg").string(), ckpt.train_loss, ckpt.eval_loss, "qwentune: " + tc.output_dir);
    fmt::print("saved the adapter to {} ({} steps, {} skipped, loss {:.4f} -> {:.4f}, {})\n", tc.output_dir,
               res.steps_done, res.steps_skipped, res.first_loss, res.last_loss,
               format_duration(elapsed_before + seconds_since(t_start)));
  } else {
    fmt::print("rank {}: done ({} steps, {} skipped, loss {:.4f} -> {:.4f}); rank 0 saved the adapter\n", de.rank,
               res.steps_done, res.steps_skipped, res.first_loss, res.last_loss);
  }
  leave();
  return res;
}

}  // namespace qt
