// Loading base weights from a safetensors checkpoint (names: REFERENCE.md section 3) and random
// initialisation.
//
// Loading is planned first and copied second: every destination tensor is described by copy
// blocks (source tensor, element offset, count -> destination offset), so that fused layouts
// (gate_up_proj (E,2I,H) -> gate (E,I,H) + up (E,I,H)) and per-expert files (E tensors (I,H) ->
// (E,I,H)) are the same operation. The blocks are cut into ~1M-element chunks converted in
// parallel (OpenMP) from the memory-mapped file to the requested dtype; a source tensor's mapped
// pages are released (madvise) after its last use.
// Streaming (WeightsLoadOptions::projection): the projections are planned the same way but filled
// last, one matrix (one expert's) at a time, handed to the hook as a view of the mapped source; their
// tensors are allocated only with keep_projections.
// Every checkpoint tensor must be consumed by the plan; the only ones tolerated unused are a
// tied lm_head.weight and legacy rotary_emb.inv_freq buffers (transformers ignores both).
// Pre-quantized bitsandbytes 4-bit weights (X + X.absmax, X.quant_map, ... X.quant_state.*) are
// dequantized (model/nf4.h, bit-exact) to their stored dtype and then converted like any tensor.
#include "model/weights.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <random>
#include <set>

#include "io/safetensors.h"
#include "model/lora.h"
#include "model/nf4.h"
#include "model/weights_4bit.h"

namespace qt {

namespace {

struct CopyBlock {
  std::string src;       // checkpoint tensor name
  int64_t src_offset;    // elements
  Tensor* dst;
  int64_t dst_offset;    // elements
  int64_t count;         // elements
};

// One conversion: count elements of src from src_offset to dst (dst_dtype).
struct Copy {
  const Tensor* src;
  int64_t src_offset;
  void* dst;
  DType dst_dtype;
  int64_t count;
};

// Converts every copy, in parallel over ~1M-element chunks.
void convert_copies(const std::vector<Copy>& copies) {
  struct Chunk { const Copy* c; int64_t off, n; };
  constexpr int64_t kChunk = int64_t(1) << 20;
  std::vector<Chunk> chunks;
  for (const Copy& c : copies)
    for (int64_t off = 0; off < c.count; off += kChunk) chunks.push_back({&c, off, std::min(kChunk, c.count - off)});
  const int64_t n_chunks = int64_t(chunks.size());
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t i = 0; i < n_chunks; ++i) {
    const Chunk& k = chunks[size_t(i)];
    const Copy& c = *k.c;
    const size_t ssz = dtype_size(c.src->dtype()), dsz = dtype_size(c.dst_dtype);
    const char* src = static_cast<const char*>(c.src->raw()) + size_t(c.src_offset + k.off) * ssz;
    char* dst = static_cast<char*>(c.dst) + size_t(k.off) * dsz;
    convert_elements(dst, c.dst_dtype, src, c.src->dtype(), size_t(k.n));
  }
}

class LoadPlan {
 public:
  LoadPlan(const SafetensorsCheckpoint& ckpt, const WeightsLoadOptions& opt)
      : ckpt_(ckpt), opt_(opt), streaming_(opt.projection || !opt.keep_projections) {}

  bool has(const std::string& name) const { return ckpt_.contains(name); }

  // Checks that `name` exists with `shape` and marks it consumed.
  void expect(const std::string& name, const Shape& shape) {
    if (!ckpt_.contains(name)) fail("weights", "{}: missing from the checkpoint (expected shape {})", name, shape_str(shape));
    if (is_bnb_4bit_weight(ckpt_, name)) {
      Nf4Tensor q = nf4_from_bnb(ckpt_, name);
      if (q.shape != shape)
        fail("weights", "{}: shape {} in the 4-bit quant state, expected {}", name, shape_str(q.shape), shape_str(shape));
      for (const std::string& c : bnb_4bit_companions(ckpt_, name)) consumed_.insert(c);
      quantized_.emplace(name, std::move(q));
    } else {
      const SafetensorsEntry& e = ckpt_.entry(name);
      if (e.shape != shape)
        fail("weights", "{}: shape {} in the checkpoint, expected {}", name, shape_str(e.shape), shape_str(shape));
      if (e.dtype != DType::F32 && e.dtype != DType::BF16 && e.dtype != DType::F16 && e.dtype != DType::F64)
        fail("weights", "{}: dtype {} is not a float type (F32, BF16, F16, F64)", name, dtype_name(e.dtype));
    }
    if (!consumed_.insert(name).second) fail("weights", "{}: used twice", name);
  }

  // dst gets `shape` in the load's dtype when the plan executes (unless it is a projection left out).
  void alloc(Tensor* dst, const Shape& shape) { shapes_[dst] = shape; }
  // dst <- the whole of `name`, which must have dst's shape.
  void whole(Tensor* dst, const std::string& name, const Shape& shape) {
    expect(name, shape);
    alloc(dst, shape);
    blocks_.push_back({name, 0, dst, 0, shape_numel(shape)});
  }
  // dst[dst_offset : +count] <- name[src_offset : +count] (name already checked by expect()).
  void part(Tensor* dst, int64_t dst_offset, const std::string& name, int64_t src_offset, int64_t count) {
    blocks_.push_back({name, src_offset, dst, dst_offset, count});
  }
  void ignore(const std::string& name) { consumed_.insert(name); }
  // Marks dst (planned already) as a decoder projection holding one matrix per Hub name (E for experts).
  void projection(Tensor* dst, std::vector<std::string> hub_names) {
    projections_.push_back({dst, std::move(hub_names)});
  }

  void check_all_consumed() const {
    std::vector<std::string> extra;
    for (const std::string& n : ckpt_.names())
      if (!consumed_.count(n)) extra.push_back(n);
    if (extra.empty()) return;
    std::string list;
    for (size_t i = 0; i < extra.size() && i < 5; ++i) list += (i ? ", " : "") + extra[i];
    if (extra.size() > 5) list += fmt::format(" (and {} more)", extra.size() - 5);
    fail("weights", "{}: unexpected tensor in the checkpoint for this config (unused: {})", extra[0], list);
  }

  // Allocates and fills every tensor; then, streaming, hands the projections to the hook one matrix
  // at a time. A source's mapped pages are released after its last use.
  void execute() {
    std::set<const Tensor*> deferred;  // projections, when streaming
    if (streaming_)
      for (const Projection& pr : projections_) deferred.insert(pr.dst);
    for (const auto& [dst, shape] : shapes_)
      if (!deferred.count(dst) || opt_.keep_projections) *dst = Tensor::empty(shape, opt_.dtype);
    std::vector<Copy> copies;
    std::set<std::string> used;
    for (const CopyBlock& b : blocks_) {
      if (deferred.count(b.dst)) continue;
      const size_t off = size_t(b.dst_offset) * dtype_size(opt_.dtype);
      copies.push_back({&source(b.src), b.src_offset, static_cast<char*>(b.dst->raw()) + off, opt_.dtype, b.count});
      used.insert(b.src);
    }
    convert_copies(copies);
    for (const std::string& n : used) release(n);
    if (opt_.projection) stream_projections();
  }

 private:
  struct Projection {
    Tensor* dst;
    std::vector<std::string> names;  // one per matrix
  };

  // The source values of a checkpoint tensor (dequantized once for a 4-bit weight), until release().
  const Tensor& source(const std::string& name) {
    auto it = live_.find(name);
    if (it != live_.end()) return it->second;
    auto q = quantized_.find(name);
    if (q == quantized_.end()) return live_.emplace(name, ckpt_.view(name)).first->second;
    Tensor t = nf4_dequantize(q->second, q->second.dtype);
    quantized_.erase(q);
    return live_.emplace(name, std::move(t)).first->second;
  }
  void release(const std::string& name) {
    live_.erase(name);
    ckpt_.release(name);
  }

  // Matrix u of each projection in turn: its values (a view of the source, or gathered in F32 from
  // the blocks that fill it), the hook called, and the sources whose last matrix it was released.
  void stream_projections() {
    struct Unit { const Projection* pr; int64_t index; };
    std::map<const Tensor*, std::vector<const CopyBlock*>> by_dst;
    for (const CopyBlock& b : blocks_) by_dst[b.dst].push_back(&b);
    auto range = [&](const Unit& u) {
      const int64_t n = shape_numel(shapes_.at(u.pr->dst)) / int64_t(u.pr->names.size());
      return std::pair<int64_t, int64_t>(u.index * n, (u.index + 1) * n);
    };
    auto overlaps = [](const CopyBlock& b, std::pair<int64_t, int64_t> r) {
      return b.dst_offset < r.second && r.first < b.dst_offset + b.count;
    };
    std::vector<Unit> units;
    std::map<std::string, size_t> last_use;
    for (const Projection& pr : projections_)
      for (int64_t u = 0; u < int64_t(pr.names.size()); ++u) {
        units.push_back({&pr, u});
        for (const CopyBlock* b : by_dst[pr.dst])
          if (overlaps(*b, range(units.back()))) last_use[b->src] = units.size() - 1;
      }
    for (size_t i = 0; i < units.size(); ++i) {
      const Unit& u = units[i];
      const Shape& full = shapes_.at(u.pr->dst);
      const Shape matrix = full.size() == 3 ? Shape{full[1], full[2]} : full;
      const auto [lo, hi] = range(u);
      Tensor values;
      std::vector<Copy> copies;
      std::vector<int64_t> dst_offsets;  // of each copy in the projection tensor
      std::vector<std::string> srcs;
      int64_t covered = 0;
      for (const CopyBlock* b : by_dst[u.pr->dst]) {
        if (!overlaps(*b, {lo, hi})) continue;
        const int64_t s = std::max(b->dst_offset, lo), e = std::min(b->dst_offset + b->count, hi);
        copies.push_back({&source(b->src), b->src_offset + (s - b->dst_offset), nullptr, DType::F32, e - s});
        dst_offsets.push_back(s);
        srcs.push_back(b->src);
        covered += e - s;
      }
      QT_ASSERT(covered == hi - lo, "{}: the plan covers {} of {} elements", u.pr->names[size_t(u.index)], covered,
                hi - lo);
      if (copies.size() == 1) {
        // One contiguous piece of one source (every layout): the hook reads it where it lies.
        const Tensor& src = *copies[0].src;
        const int64_t at = copies[0].src_offset;
        values = src.reshape({src.numel()}).slice_rows(at, at + (hi - lo)).reshape(matrix);
      } else {
        values = Tensor::empty(matrix, DType::F32);
        for (size_t k = 0; k < copies.size(); ++k)
          copies[k].dst = static_cast<float*>(values.raw()) + (dst_offsets[k] - lo);
        convert_copies(copies);
      }
      Tensor dst;
      if (opt_.keep_projections)
        dst = full.size() == 3 ? u.pr->dst->slice_rows(u.index, u.index + 1).reshape(matrix) : *u.pr->dst;
      opt_.projection(u.pr->names[size_t(u.index)], values, dst);
      for (const std::string& n : srcs)
        if (last_use.at(n) == i && live_.count(n)) release(n);
    }
  }

  const SafetensorsCheckpoint& ckpt_;
  const WeightsLoadOptions& opt_;
  const bool streaming_;  // projections handed to the hook or left out
  std::set<std::string> consumed_;
  std::map<std::string, Nf4Tensor> quantized_;  // 4-bit weights planned, dequantized when first read
  std::map<std::string, Tensor> live_;          // source values in use
  std::map<Tensor*, Shape> shapes_;             // pointers into ModelWeights, stable once the layers vector is sized
  std::vector<CopyBlock> blocks_;
  std::vector<Projection> projections_;
};

// Fused expert weights of one MoE layer in whichever of the three layouts the checkpoint uses.
void plan_experts(LoadPlan& p, const ModelConfig& c, const std::string& pre, MlpWeights& m) {
  const int64_t E = c.num_experts, I = c.moe_intermediate_size, H = c.hidden_size;
  const Shape gu_shape{E, I, H}, down_shape{E, H, I};
  const std::string v5_gate_up = pre + "mlp.experts.gate_up_proj", v5_down = pre + "mlp.experts.down_proj";
  if (p.has(v5_gate_up) || p.has(v5_down)) {
    // transformers v5: gate_up_proj (E,2I,H), gate rows first; down_proj (E,H,I).
    p.expect(v5_gate_up, {E, 2 * I, H});
    p.alloc(&m.gate, gu_shape);
    p.alloc(&m.up, gu_shape);
    for (int64_t e = 0; e < E; ++e) {
      p.part(&m.gate, e * I * H, v5_gate_up, e * 2 * I * H, I * H);
      p.part(&m.up, e * I * H, v5_gate_up, e * 2 * I * H + I * H, I * H);
    }
    p.whole(&m.down, v5_down, down_shape);
    return;
  }
  if (p.has(pre + "mlp.gate_proj.weight") || p.has(pre + "mlp.up_proj.weight") || p.has(pre + "mlp.down_proj.weight")) {
    // transformers-qwen3-moe-fused: mlp.{gate,up,down}_proj.weight (E,out,in).
    p.whole(&m.gate, pre + "mlp.gate_proj.weight", gu_shape);
    p.whole(&m.up, pre + "mlp.up_proj.weight", gu_shape);
    p.whole(&m.down, pre + "mlp.down_proj.weight", down_shape);
    return;
  }
  // The Hub's per-expert tensors.
  p.alloc(&m.gate, gu_shape);
  p.alloc(&m.up, gu_shape);
  p.alloc(&m.down, down_shape);
  for (int64_t e = 0; e < E; ++e) {
    const std::string ep = fmt::format("{}mlp.experts.{}.", pre, e);
    p.expect(ep + "gate_proj.weight", {I, H});
    p.part(&m.gate, e * I * H, ep + "gate_proj.weight", 0, I * H);
    p.expect(ep + "up_proj.weight", {I, H});
    p.part(&m.up, e * I * H, ep + "up_proj.weight", 0, I * H);
    p.expect(ep + "down_proj.weight", {H, I});
    p.part(&m.down, e * H * I, ep + "down_proj.weight", 0, H * I);
  }
}

// Registers layer l's projections under their Hub names (projection_hub_name; per expert for a MoE
// layer's gate/up/down).
void plan_projections(LoadPlan& p, const ModelConfig& c, int64_t l, LayerWeights& L) {
  const auto ts = projection_tensors(L);
  for (int s = 0; s < kNumProjections; ++s) {
    std::vector<std::string> names;
    if (L.is_moe && s >= kLoraGate)
      for (int64_t e = 0; e < c.num_experts; ++e) names.push_back(projection_hub_name(l, s, e));
    else
      names.push_back(projection_hub_name(l, s));
    p.projection(ts[size_t(s)], std::move(names));
  }
}

void check_float_dtype(DType dtype, const char* what) {
  if (dtype != DType::F32 && dtype != DType::F64 && dtype != DType::BF16 && dtype != DType::F16)
    fail("weights", "{}: dtype {} is not a float type", what, dtype_name(dtype));
}

// Allocates every tensor of `cfg` (undefined where the model has none); used by the random init.
template <typename Fn>
void for_each_weight(ModelWeights& w, Fn&& fn) {
  // fn(Tensor&, Shape, kind) with kind 0 = matrix, 1 = norm, 2 = bias
  const ModelConfig& c = w.cfg;
  const int64_t H = c.hidden_size, V = c.vocab_size;
  fn(w.embed, Shape{V, H}, 0);
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    LayerWeights& L = w.layers[size_t(l)];
    fn(L.input_norm, Shape{H}, 1);
    fn(L.attn.q_w, Shape{c.q_dim(), H}, 0);
    fn(L.attn.k_w, Shape{c.kv_dim(), H}, 0);
    fn(L.attn.v_w, Shape{c.kv_dim(), H}, 0);
    fn(L.attn.o_w, Shape{H, c.q_dim()}, 0);
    if (c.attention_bias) {
      fn(L.attn.q_b, Shape{c.q_dim()}, 2);
      fn(L.attn.k_b, Shape{c.kv_dim()}, 2);
      fn(L.attn.v_b, Shape{c.kv_dim()}, 2);
    }
    if (c.qk_norm) {
      fn(L.attn.q_norm, Shape{c.head_dim}, 1);
      fn(L.attn.k_norm, Shape{c.head_dim}, 1);
    }
    fn(L.post_norm, Shape{H}, 1);
    if (L.is_moe) {
      const int64_t E = c.num_experts, I = c.moe_intermediate_size;
      fn(L.mlp.router, Shape{E, H}, 0);
      fn(L.mlp.gate, Shape{E, I, H}, 0);
      fn(L.mlp.up, Shape{E, I, H}, 0);
      fn(L.mlp.down, Shape{E, H, I}, 0);
    } else {
      const int64_t I = c.intermediate_size;
      fn(L.mlp.gate, Shape{I, H}, 0);
      fn(L.mlp.up, Shape{I, H}, 0);
      fn(L.mlp.down, Shape{H, I}, 0);
    }
  }
  fn(w.final_norm, Shape{H}, 1);
  if (!c.tie_word_embeddings) fn(w.lm_head, Shape{V, H}, 0);
}

uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

}  // namespace

ModelWeights load_model_weights(const std::string& dir, DType dtype) {
  return load_model_weights(dir, load_hf_config(dir), dtype);
}

ModelWeights load_model_weights(const std::string& dir, const ModelConfig& cfg, DType dtype) {
  WeightsLoadOptions opt;
  opt.dtype = dtype;
  return load_model_weights(dir, cfg, opt);
}

ModelWeights load_model_weights(const std::string& dir, const ModelConfig& cfg, const WeightsLoadOptions& opt) {
  check_float_dtype(opt.dtype, dir.c_str());
  SafetensorsCheckpoint ckpt(dir);
  LoadPlan p(ckpt, opt);
  const ModelConfig& c = cfg;
  const int64_t H = c.hidden_size, V = c.vocab_size;
  ModelWeights w;
  w.cfg = cfg;
  w.layers.resize(size_t(c.num_hidden_layers));  // sized before any pointer into it is taken

  p.whole(&w.embed, "model.embed_tokens.weight", {V, H});
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    LayerWeights& L = w.layers[size_t(l)];
    const std::string pre = fmt::format("model.layers.{}.", l);
    L.is_moe = c.is_moe_layer(l);
    p.whole(&L.input_norm, pre + "input_layernorm.weight", {H});
    p.whole(&L.post_norm, pre + "post_attention_layernorm.weight", {H});
    const std::string a = pre + "self_attn.";
    p.whole(&L.attn.q_w, a + "q_proj.weight", {c.q_dim(), H});
    p.whole(&L.attn.k_w, a + "k_proj.weight", {c.kv_dim(), H});
    p.whole(&L.attn.v_w, a + "v_proj.weight", {c.kv_dim(), H});
    p.whole(&L.attn.o_w, a + "o_proj.weight", {H, c.q_dim()});
    if (c.attention_bias) {
      p.whole(&L.attn.q_b, a + "q_proj.bias", {c.q_dim()});
      p.whole(&L.attn.k_b, a + "k_proj.bias", {c.kv_dim()});
      p.whole(&L.attn.v_b, a + "v_proj.bias", {c.kv_dim()});
    }
    if (c.qk_norm) {
      p.whole(&L.attn.q_norm, a + "q_norm.weight", {c.head_dim});
      p.whole(&L.attn.k_norm, a + "k_norm.weight", {c.head_dim});
    }
    if (ckpt.contains(a + "rotary_emb.inv_freq")) p.ignore(a + "rotary_emb.inv_freq");
    if (L.is_moe) {
      p.whole(&L.mlp.router, pre + "mlp.gate.weight", {c.num_experts, H});
      plan_experts(p, c, pre, L.mlp);
    } else {
      const int64_t I = c.intermediate_size;
      p.whole(&L.mlp.gate, pre + "mlp.gate_proj.weight", {I, H});
      p.whole(&L.mlp.up, pre + "mlp.up_proj.weight", {I, H});
      p.whole(&L.mlp.down, pre + "mlp.down_proj.weight", {H, I});
    }
    plan_projections(p, c, l, L);
  }
  p.whole(&w.final_norm, "model.norm.weight", {H});
  if (c.tie_word_embeddings) {
    if (ckpt.contains("lm_head.weight")) p.ignore("lm_head.weight");  // transformers ties and ignores it
  } else {
    p.whole(&w.lm_head, "lm_head.weight", {V, H});
  }
  p.check_all_consumed();
  p.execute();
  if (c.tie_word_embeddings) w.lm_head = w.embed;
  return w;
}

ModelWeights random_model_weights(const ModelConfig& cfg, DType dtype, uint64_t seed, double std) {
  check_float_dtype(dtype, "random_model_weights");
  ModelWeights w;
  w.cfg = cfg;
  w.layers.resize(size_t(cfg.num_hidden_layers));
  for (int64_t l = 0; l < cfg.num_hidden_layers; ++l) w.layers[size_t(l)].is_moe = cfg.is_moe_layer(l);

  // Matrices: chunk j of tensor t draws from mt19937_64 seeded with splitmix(seed, t, j), so the
  // values do not depend on the thread count. Box-Muller on 53-bit uniforms; no std::
  // distributions (their output differs between standard libraries).
  struct Job { Tensor* t; int64_t index, chunk; };
  constexpr int64_t kChunk = int64_t(1) << 16;
  std::vector<Job> jobs;
  int64_t index = 0;
  for_each_weight(w, [&](Tensor& t, const Shape& shape, int kind) {
    t = Tensor::empty(shape, dtype);
    if (kind == 0) {
      for (int64_t c = 0; c * kChunk < t.numel(); ++c) jobs.push_back({&t, index, c});
    } else {
      std::vector<double> v(size_t(t.numel()), kind == 1 ? 1.0 : 0.0);
      convert_elements(t.raw(), dtype, v.data(), DType::F64, v.size());
    }
    ++index;
  });
  const int64_t n_jobs = int64_t(jobs.size());
#pragma omp parallel for schedule(dynamic, 4)
  for (int64_t i = 0; i < n_jobs; ++i) {
    const Job& j = jobs[size_t(i)];
    std::mt19937_64 rng(splitmix64(seed ^ splitmix64(uint64_t(j.index) * 0x100000001b3ull + uint64_t(j.chunk))));
    const int64_t begin = j.chunk * kChunk, n = std::min(kChunk, j.t->numel() - begin);
    std::vector<double> v(static_cast<size_t>(n));
    for (int64_t k = 0; k < n; k += 2) {
      double u1 = double((rng() >> 11) + 1) * 0x1.0p-53;  // (0, 1]
      double u2 = double(rng() >> 11) * 0x1.0p-53;        // [0, 1)
      double rad = std::sqrt(-2.0 * std::log(u1)), ang = 2.0 * M_PI * u2;
      v[size_t(k)] = std * rad * std::cos(ang);
      if (k + 1 < n) v[size_t(k + 1)] = std * rad * std::sin(ang);
    }
    char* dst = static_cast<char*>(j.t->raw()) + size_t(begin) * dtype_size(dtype);
    convert_elements(dst, dtype, v.data(), DType::F64, size_t(n));
  }
  if (cfg.tie_word_embeddings) w.lm_head = w.embed;
  return w;
}

}  // namespace qt
