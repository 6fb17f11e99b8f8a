// Parity of the CUDA MoE block (model/cuda_moe.h: grouped expert GEMMs, device routing) with the
// CPU reference (model/moe_mlp.h, fp32) on the same bf16-rounded inputs and weights, LoRA on the
// gate, up and down experts. Cases: top-2 with renormalisation, top-1, top-k = E without
// renormalisation, more experts than assignments (experts with no tokens), one expert taking every
// token, and LoRA dropout.
//
// Routing must be the same on both sides for a meaningful comparison. The GPU rounds the router
// logits to bf16 (as HF does in bf16), moving each by at most 2^-9 of its magnitude, so the router
// weights are redrawn until every token's k-th and (k+1)-th logits differ by more than 4 x that
// bound; the expert offsets are then required to be equal exactly.
// Tolerances as test_cuda_decoder.cpp argues for a bf16 engine: the block output within 2e-2
// relative (Frobenius); gradients (the input's and each LoRA tensor's) within 5e-2; all LoRA
// gradients together at cosine >= 0.999.
#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <random>

#include "cuda_parity.h"
#include "model/cuda_moe.h"
#include "model/moe_mlp.h"
#include "ops/cpu/ops.h"

namespace qt {
namespace {

using testing::dev_bf16;
using testing::host_f32;
using testing::randn_bf16;
using testing::randn_f32;

struct MoeCase {
  const char* name;
  int64_t N, H, I, E, k;
  bool norm;
  bool one_expert = false;  // expert 1 wins every token
  double dropout = 0;
  int64_t r = 4;        // 4: the LoRA products' SIMT paths; 16: tensor cores, the LoRA term fused into the base product
  float scale = 2.0f;   // the LoRA scale (a power of two rounds alike either way; 0.75 does not)
};

double rel_err(const std::vector<float>& got, const std::vector<float>& ref) {
  double d = 0, n = 0;
  for (size_t i = 0; i < got.size(); ++i) d += (got[i] - double(ref[i])) * (got[i] - double(ref[i])), n += double(ref[i]) * ref[i];
  return n > 0 ? std::sqrt(d / n) : std::sqrt(d);
}

// Whether every token's k-th and (k+1)-th router logits differ by more than 4 x the bf16 rounding
// bound 2^-9 (|l_k| + |l_k+1|) (always true when k == E).
bool clear_topk_margins(const std::vector<float>& x, const std::vector<float>& wr, int64_t N, int64_t H, int64_t E,
                        int64_t k) {
  if (k == E) return true;
  for (int64_t n = 0; n < N; ++n) {
    std::vector<double> l(static_cast<size_t>(E));
    for (int64_t e = 0; e < E; ++e) {
      double s = 0;
      for (int64_t h = 0; h < H; ++h) s += double(x[size_t(n * H + h)]) * wr[size_t(e * H + h)];
      l[size_t(e)] = s;
    }
    std::sort(l.begin(), l.end(), std::greater<>());
    const double a = l[size_t(k - 1)], b = l[size_t(k)];
    if (a - b <= 4.0 * 0x1p-9 * (std::fabs(a) + std::fabs(b))) return false;
  }
  return true;
}

void check_moe(const MoeCase& c) {
  QT_SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(1234 + uint64_t(c.N * 7 + c.E));
  const int64_t N = c.N, H = c.H, I = c.I, E = c.E, k = c.k, r = c.r, T = N * k;
  std::vector<float> x = randn_bf16(size_t(N * H), rng), wr;
  if (c.one_expert)
    for (int64_t n = 0; n < N; ++n) x[size_t(n * H)] = 4.0f;  // a shared feature the router keys on
  for (int attempt = 0;; ++attempt) {
    ASSERT_LT(attempt, 200) << c.name << ": no router draw with clear top-k margins";
    wr = randn_bf16(size_t(E * H), rng, 0.6f);
    if (c.one_expert) wr[size_t(1 * H)] = 8.0f;  // expert 1: logit +32 for every token
    if (clear_topk_margins(x, wr, N, H, E, k)) break;
  }
  const float sw = 1.0f / std::sqrt(float(H)), sd = 1.0f / std::sqrt(float(I));
  std::vector<float> wg = randn_bf16(size_t(E * I * H), rng, sw), wu = randn_bf16(size_t(E * I * H), rng, sw),
                     wd = randn_bf16(size_t(E * H * I), rng, sd);
  MlpWeights w;
  w.router = Tensor::from_vector(wr, {E, H});
  w.gate = Tensor::from_vector(wg, {E, I, H}), w.up = Tensor::from_vector(wu, {E, I, H});
  w.down = Tensor::from_vector(wd, {E, H, I});
  LayerLora lora, dl_cpu;
  const int64_t ins[3] = {H, H, I}, outs[3] = {I, I, H};
  for (int i = 0; i < 3; ++i) {
    LoraPair& p = lora.slot[size_t(kLoraGate + i)];
    p.A = Tensor::from_vector(randn_f32(size_t(E * r * ins[i]), rng, 0.3f), {E, r, ins[i]});
    p.B = Tensor::from_vector(randn_f32(size_t(E * outs[i] * r), rng, 0.1f), {E, outs[i], r});
    dl_cpu.slot[size_t(kLoraGate + i)].A = Tensor::zeros({E, r, ins[i]}, DType::F32);
    dl_cpu.slot[size_t(kLoraGate + i)].B = Tensor::zeros({E, outs[i], r}, DType::F32);
  }
  const float scale = c.scale;
  ExpertDropout edrop;
  CudaMoeDropout gdrop;
  if (c.dropout > 0) {
    edrop.p = gdrop.p = c.dropout;
    for (int i = 0; i < 3; ++i) edrop.key[size_t(i)] = gdrop.key[size_t(i)] = cpu::dropout_key(5, 1, 0, 2, kLoraGate + i);
  }

  // CPU reference.
  MoeMlpCache<float> cache;
  std::vector<float> y(size_t(N * H)), dy = randn_bf16(size_t(N * H), rng), dx(size_t(N * H), 0.f);
  moe_mlp_forward<float>(y.data(), cache, x.data(), N, w, lora, scale, k, c.norm, edrop);
  moe_mlp_backward<float>(dx.data(), &dl_cpu, dy.data(), cache, w, lora, scale);

  // GPU.
  cuda::Context ctx;
  auto g_router = dev_bf16(wr), g_gate = dev_bf16(wg), g_up = dev_bf16(wu), g_down = dev_bf16(wd);
  const CudaMoeWeights gw{g_router.get(), g_gate.get(), g_up.get(), g_down.get()};
  std::array<cuda::Buffer<float>, 3> A, B, dA, dB;
  CudaMoeLora gl;
  gl.r = r, gl.scale = scale;
  for (int i = 0; i < 3; ++i) {
    const LoraPair& p = lora.slot[size_t(kLoraGate + i)];
    A[i] = cuda::to_device(std::vector<float>(p.A.data<float>(), p.A.data<float>() + p.A.numel()));
    B[i] = cuda::to_device(std::vector<float>(p.B.data<float>(), p.B.data<float>() + p.B.numel()));
    dA[i] = cuda::Buffer<float>(size_t(p.A.numel())), dB[i] = cuda::Buffer<float>(size_t(p.B.numel()));
    dA[i].fill_bytes(0), dB[i].fill_bytes(0);
    gl.A[i] = A[i].get(), gl.B[i] = B[i].get(), gl.dA[i] = dA[i].get(), gl.dB[i] = dB[i].get();
  }
  const CudaMoeDims dims{N, H, I, E, k, c.norm};
  CudaMoeWork work;
  work.alloc(N, H, I, E, k, r);
  // Every work buffer starts as garbage (NaN / -1), and a second pass starts from other garbage: a
  // read before write shows up as NaN or as a difference between the passes.
  auto poison = [&](int byte) {
    for (auto* b : {&work.logits, &work.xs, &work.g, &work.u, &work.h, &work.ys, &work.t, &work.dlogits, &work.a16, &work.b16, &work.xd, &work.dxd})
      b->fill_bytes(byte);
    for (auto& b : work.xa) b.fill_bytes(byte);
    work.probs.fill_bytes(byte), work.topk_w.fill_bytes(byte), work.dtopk_w.fill_bytes(byte);
    work.topk_idx.fill_bytes(byte), work.perm.fill_bytes(byte), work.offsets.fill_bytes(byte);
  };
  poison(0xFF);
  auto x_d = dev_bf16(x), dy_d = dev_bf16(dy);
  auto out_d = dev_bf16(std::vector<float>(size_t(N * H), 0.f)), dx_d = dev_bf16(std::vector<float>(size_t(N * H), 0.f));
  cuda_moe_forward(ctx, gw, gl, dims, gdrop, work, x_d.get(), out_d.get());
  const std::vector<int64_t> offsets = (ctx.synchronize(), work.offsets.download());
  cuda_moe_backward(ctx, gw, gl, dims, gdrop, work, x_d.get(), dy_d.get(), dx_d.get());
  ctx.synchronize();
  // Deterministic: a second pass gives the same bits (no atomics, fixed reduction orders).
  {
    auto out2 = dev_bf16(std::vector<float>(size_t(N * H), 0.f)), dx2 = dev_bf16(std::vector<float>(size_t(N * H), 0.f));
    std::array<std::vector<float>, 3> dA1, dB1;
    for (int i = 0; i < 3; ++i) dA1[i] = host_f32(dA[i]), dB1[i] = host_f32(dB[i]), dA[i].fill_bytes(0), dB[i].fill_bytes(0);
    poison(0x7F);
    cuda_moe_forward(ctx, gw, gl, dims, gdrop, work, x_d.get(), out2.get());
    cuda_moe_backward(ctx, gw, gl, dims, gdrop, work, x_d.get(), dy_d.get(), dx2.get());
    ctx.synchronize();
    EXPECT_EQ(host_f32(out2), host_f32(out_d)) << c.name << ": forward not deterministic";
    EXPECT_EQ(host_f32(dx2), host_f32(dx_d)) << c.name << ": input gradient not deterministic";
    for (int i = 0; i < 3; ++i) {
      EXPECT_EQ(host_f32(dA[i]), dA1[i]) << c.name << ": dA not deterministic, projection " << i;
      EXPECT_EQ(host_f32(dB[i]), dB1[i]) << c.name << ": dB not deterministic, projection " << i;
    }
  }

  ASSERT_EQ(offsets, cache.offsets) << c.name << ": the GPU routed differently";
  int64_t empty = 0, biggest = 0;
  for (int64_t e = 0; e < E; ++e) empty += cache.tokens_of_expert(e) == 0, biggest = std::max(biggest, cache.tokens_of_expert(e));
  const double out_err = rel_err(host_f32(out_d), y), dx_err = rel_err(host_f32(dx_d), dx);
  double dot = 0, ng = 0, nc = 0, worst = 0;
  for (int i = 0; i < 3; ++i)
    for (bool is_b : {false, true}) {
      const Tensor& ref = is_b ? dl_cpu.slot[size_t(kLoraGate + i)].B : dl_cpu.slot[size_t(kLoraGate + i)].A;
      const std::vector<float> want(ref.data<float>(), ref.data<float>() + ref.numel());
      const std::vector<float> got = host_f32(is_b ? dB[i] : dA[i]);
      const double e = rel_err(got, want);
      worst = std::max(worst, e);
      EXPECT_LE(e, 5e-2) << c.name << " " << lora_slot_module(LoraSlot(kLoraGate + i)) << (is_b ? " B" : " A");
      for (size_t j = 0; j < got.size(); ++j) dot += double(got[j]) * want[j], ng += double(got[j]) * got[j], nc += double(want[j]) * want[j];
    }
  const double cosine = dot / std::sqrt(ng * nc);
  std::printf("[moe-parity] %-14s N=%ld E=%ld k=%ld T=%ld (empty experts %ld, largest %ld rows): out %.2e dx %.2e "
              "worst LoRA grad %.2e cosine %.8f\n",
              c.name, long(N), long(E), long(k), long(T), long(empty), long(biggest), out_err, dx_err, worst, cosine);
  EXPECT_LE(out_err, 2e-2) << c.name;
  EXPECT_LE(dx_err, 5e-2) << c.name;
  EXPECT_GE(cosine, 0.999) << c.name;
  if (c.one_expert) {
    EXPECT_EQ(biggest, N) << "expert 1 should take every token";
  }
}

TEST(CudaMoeLayer, Top2Renormalised) { check_moe({"top2_norm", 37, 64, 48, 8, 2, true}); }
TEST(CudaMoeLayer, Top1) { check_moe({"top1", 29, 64, 32, 4, 1, false}); }
TEST(CudaMoeLayer, TopKEqualsE) { check_moe({"topk_eq_E", 19, 32, 24, 4, 4, false}); }
TEST(CudaMoeLayer, ExpertsWithoutTokens) { check_moe({"empty_experts", 5, 64, 32, 32, 2, true}); }
TEST(CudaMoeLayer, OneExpertTakesAll) { check_moe({"one_expert", 40, 64, 32, 8, 1, true, true}); }
TEST(CudaMoeLayer, LoraDropout) { check_moe({"dropout", 33, 64, 48, 8, 2, true, false, 0.2}); }
// r = 16 with a scale that is not a power of two: xa and t carry the scale, and the LoRA terms ride in
// the base products on tensor cores (SecondProduct), with and without dropout.
TEST(CudaMoeLayer, Rank16FusedLora) { check_moe({"rank16", 37, 64, 48, 8, 2, true, false, 0, 16, 0.75f}); }
TEST(CudaMoeLayer, Rank16FusedLoraDropout) { check_moe({"rank16_dropout", 33, 64, 48, 8, 2, true, false, 0.2, 16, 0.75f}); }

}  // namespace
}  // namespace qt

namespace qt {
namespace {

// At a training-sized shape (many tiles per expert, K-grouped splits) two passes over garbage-filled
// work buffers give the same bits: no race and no read before write (routing need not match the CPU).
void check_deterministic(int64_t N, bool zero_b) {
  const int64_t H = 128, I = 64, E = 8, k = 2, r = 16;
  std::mt19937_64 rng(77);
  cuda::Context ctx;
  auto w_router = dev_bf16(randn_bf16(size_t(E * H), rng, 0.3f));
  auto w_gate = dev_bf16(randn_bf16(size_t(E * I * H), rng, 0.1f)), w_up = dev_bf16(randn_bf16(size_t(E * I * H), rng, 0.1f));
  auto w_down = dev_bf16(randn_bf16(size_t(E * H * I), rng, 0.1f));
  const CudaMoeWeights w{w_router.get(), w_gate.get(), w_up.get(), w_down.get()};
  const int64_t ins[3] = {H, H, I}, outs[3] = {I, I, H};
  std::array<cuda::Buffer<float>, 3> A, B, dA, dB;
  CudaMoeLora l;
  l.r = r, l.scale = 1.f;
  for (int i = 0; i < 3; ++i) {
    A[i] = cuda::to_device(randn_f32(size_t(E * r * ins[i]), rng, 0.1f));
    B[i] = cuda::to_device(zero_b ? std::vector<float>(size_t(E * outs[i] * r), 0.f)
                                  : randn_f32(size_t(E * outs[i] * r), rng, 0.1f));
    dA[i] = cuda::Buffer<float>(size_t(E * r * ins[i])), dB[i] = cuda::Buffer<float>(size_t(E * outs[i] * r));
    l.A[i] = A[i].get(), l.B[i] = B[i].get(), l.dA[i] = dA[i].get(), l.dB[i] = dB[i].get();
  }
  if (zero_b) l.scale = 2.f;
  auto x = dev_bf16(randn_bf16(size_t(N * H), rng)), dy = dev_bf16(randn_bf16(size_t(N * H), rng));
  const CudaMoeDims d{N, H, I, E, k, true};
  std::vector<std::vector<float>> first;
  for (int pass = 0; pass < 2; ++pass) {
    CudaMoeWork work;
    work.alloc(N, H, I, E, k, r);
    for (auto* b : {&work.logits, &work.xs, &work.g, &work.u, &work.h, &work.ys, &work.t, &work.dlogits, &work.a16, &work.b16})
      b->fill_bytes(pass ? 0x7F : 0xFF);
    for (int i = 0; i < 3; ++i) dA[i].fill_bytes(0), dB[i].fill_bytes(0);
    auto out = dev_bf16(std::vector<float>(size_t(N * H), 0.f)), dx = dev_bf16(std::vector<float>(size_t(N * H), 0.f));
    cuda_moe_forward(ctx, w, l, d, {}, work, x.get(), out.get());
    cuda_moe_backward(ctx, w, l, d, {}, work, x.get(), dy.get(), dx.get());
    ctx.synchronize();
    std::vector<std::vector<float>> got = {host_f32(out), host_f32(dx)};
    for (int i = 0; i < 3; ++i) got.push_back(host_f32(dA[i])), got.push_back(host_f32(dB[i]));
    for (const auto& v : got)
      for (float f : v) ASSERT_TRUE(std::isfinite(f)) << "pass " << pass;
    if (pass == 0) {  // a checksum of the outputs, to compare across processes
      uint64_t hash = 1469598103934665603ull;
      for (const auto& v : got)
        for (float f : v) hash = (hash ^ uint64_t(std::bit_cast<uint32_t>(f))) * 1099511628211ull;
      std::printf("[moe-determinism] N=%ld B%s outputs checksum %016llx\n", long(N), zero_b ? "=0" : "!=0",
                  static_cast<unsigned long long>(hash));
    }
    if (pass == 0) first = got;
    else
      for (size_t j = 0; j < got.size(); ++j) EXPECT_EQ(got[j], first[j]) << "output " << j << " differs between passes";
  }
}

TEST(CudaMoeLayer, DeterministicAtTrainingShape) {
  QT_SKIP_WITHOUT_GPU();
  for (int64_t N : {1024, 1000, 777, 548})
    for (bool zero_b : {false, true}) check_deterministic(N, zero_b);
}

}  // namespace
}  // namespace qt
