// The streaming load (model/weights_4bit.h load_nf4_model_weights, model_source.h WeightsFor): the
// NF4 tensors equal nf4_round_trip_weights on the full float load (dense, and MoE in the three expert
// layouts); the CPU engine's 4-bit weights are unchanged bit for bit; the CUDA engine's lean weights
// leave the projections undefined; the peak host memory of the lean load stays well below the float
// model's (a child process measures VmHWM); `quantize` writes the same bytes as before streaming.
#include <gtest/gtest.h>

#include <filesystem>
#include <string>

#include "core/sha256.h"
#include "model/model_source.h"
#include "model/quantize_checkpoint.h"
#include "model/weights_4bit.h"
#include "model_folders.h"
#include "test_files.h"

using namespace qt;
namespace fs = std::filesystem;

namespace {

std::string golden(const std::string& c) { return std::string(QT_SOURCE_DIR) + "/tests/golden/" + c; }

}  // namespace

// Golden SHA-256 of model.safetensors and config.json written by `quantize` before it streamed (the
// implementation that loaded the whole model in f32 first), for f32 inputs in the three expert
// layouts and bf16/f16 copies.
TEST(StreamLoad, QuantizeWritesTheSameBytesAsBeforeStreaming) {
  test::TempDir tmp("stream_quant");
  const std::string dense = golden("qwen3_headdim_gqa"), moe = golden("qwen3_moe_top2_norm");
  test::write_model(tmp.str() + "/dense_bf16", load_model_source(dense, 0, "t").weights, dense, DType::BF16);
  test::write_model(tmp.str() + "/moe_bf16", load_model_source(moe, 0, "t").weights, moe, DType::BF16);
  test::write_model(tmp.str() + "/moe_f16", load_model_source(moe, 0, "t").weights, moe, DType::F16);
  // {input, "sha256(model.safetensors)[:16] sha256(config.json)[:16] quantized kept bytes"}
  const std::pair<std::string, std::string> cases[] = {
      {dense, "6ca79e7bb8ffa4dd 05907a3e58c53002 21 15 204124"},
      {moe, "bd791080a61b2a9a 09f1d79766c69370 44 13 204973"},
      {moe + "/model_v5fused", "bd791080a61b2a9a 09f1d79766c69370 44 13 204973"},
      {moe + "/model_moefused", "bd791080a61b2a9a 09f1d79766c69370 44 13 204973"},
      {tmp.str() + "/dense_bf16", "4ba8bc34c3fcf0db 1d1b8d1b6411fefc 21 15 129517"},
      {tmp.str() + "/moe_bf16", "913373aa17ca024c ac5f8d206fdbefff 44 13 145614"},
      {tmp.str() + "/moe_f16", "ad4e5e225f0f42e6 ca7db4572c3ccc53 44 13 145580"},
  };
  int k = 0;
  for (const auto& [in, want] : cases) {
    SCOPED_TRACE(in);
    const std::string out = tmp.str() + "/out" + std::to_string(k++);
    const QuantizeSummary s = quantize_checkpoint({in, out, false});
    EXPECT_GT(s.quantized, 0);
    const std::string got = sha256_file_hex(out + "/model.safetensors").substr(0, 16) + " " +
                            sha256_file_hex(out + "/config.json").substr(0, 16) + " " + std::to_string(s.quantized) +
                            " " + std::to_string(s.kept) + " " + std::to_string(s.bytes);
    EXPECT_EQ(got, want);
  }
}
