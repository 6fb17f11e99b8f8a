// NF4 quantization in bitsandbytes' format; see nf4.h for the math. Every step is a single fp32
// operation (no fused multiply-add: the engine is built for baseline x86-64, where the compiler
// cannot contract a*b+c).
#include "model/nf4.h"

#include <charconv>
#include <cmath>
#include <limits>
#include <nlohmann/json.hpp>

#include "io/safetensors.h"
#include "model/nf4_code.h"

namespace qt {

namespace {

constexpr int64_t kBlocksize = 64;
constexpr int64_t kNestedBlocksize = 256;

// torch.linspace(0.1, 1, steps) in float32 as torch's CPU kernel computes it element by element:
// step = (end - start) / (steps - 1); first half start + step*i, second half end - step*(steps-1-i).
std::vector<float> linspace_f32(float start, float end, int steps) {
  const float step = (end - start) / float(steps - 1);
  const int half = steps / 2;
  std::vector<float> v(static_cast<size_t>(steps));
  for (int i = 0; i < steps; ++i) {
    if (i < half) {
      const float d = step * float(i);
      v[size_t(i)] = start + d;
    } else {
      const float d = step * float(steps - 1 - i);
      v[size_t(i)] = end - d;
    }
  }
  return v;
}

std::vector<float> make_dynamic_map() {
  // create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8): for exponent i in 0..6,
  // 2^i + 1 linspace boundaries in [0.1, 1], their midpoints scaled by 10^(i-6), both signs; then 0, 1.
  std::vector<float> data;
  for (int i = 0; i < 7; ++i) {
    const std::vector<float> b = linspace_f32(0.1f, 1.0f, (1 << i) + 1);
    const float scale = float(std::pow(10.0, double(i - 6)));  // the Python scalar, cast to the tensor's dtype
    std::vector<float> means;
    for (size_t k = 0; k + 1 < b.size(); ++k) {
      const float sum = b[k] + b[k + 1];
      means.push_back(sum / 2.0f);
    }
    for (float m : means) data.push_back(scale * m);
    for (float m : means) data.push_back(-scale * m);
  }
  data.push_back(0.0f);
  data.push_back(1.0f);
  QT_ASSERT(data.size() == 256, "dynamic map has {} entries", data.size());
  std::sort(data.begin(), data.end());
  return data;
}

const char* storage_dtype_name(DType d) {
  switch (d) {
    case DType::BF16: return "bfloat16";
    case DType::F16: return "float16";
    case DType::F32: return "float32";
    default: QT_ASSERT(false, "NF4 storage dtype {}", dtype_name(d));
  }
  return "";
}

// Float32 values of a CPU tensor (F64 rounded).
std::vector<float> values_f32(const Tensor& w) {
  std::vector<float> v(static_cast<size_t>(w.numel()));
  convert_elements(v.data(), DType::F32, w.raw(), w.dtype(), v.size());
  return v;
}

float block_absmax(const float* x, int64_t n) {
  float m = -std::numeric_limits<float>::max();
  for (int64_t i = 0; i < n; ++i) m = std::fmax(m, std::fabs(x[i]));
  return m;
}

}  // namespace

const std::array<float, 16>& nf4_table() {
  static const std::array<float, 16> t = {
      -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
      -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
      0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
      0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};
  return t;
}

const std::vector<float>& bnb_dynamic_map() {
  static const std::vector<float> m = make_dynamic_map();
  return m;
}

uint8_t nf4_code(float x) { return nf4_code_of(x); }

uint8_t dynamic_map_code(const std::vector<float>& map, float x) {
  QT_ASSERT(map.size() == 256, "dynamic map of {} entries", map.size());
  // Binary search over 7 halvings from the middle, keeping the last values on either side; then the
  // nearer neighbour by the fp32 midpoint (ties to the middle pivot).
  int pivot = 127, upper_pivot = 255, lower_pivot = 0;
  float lower = -1.0f, upper = 1.0f;
  float val = map[size_t(pivot)];
  for (int i = 64; i > 0; i >>= 1) {
    if (x > val) {
      lower_pivot = pivot;
      lower = val;
      pivot += i;
    } else {
      upper_pivot = pivot;
      upper = val;
      pivot -= i;
    }
    val = map[size_t(pivot)];
  }
  if (upper_pivot == 255) upper = map[255];
  if (lower_pivot == 0) lower = map[0];
  if (x > val) {
    const float mid = (upper + val) * 0.5f;
    return uint8_t(x > mid ? upper_pivot : pivot);
  }
  const float mid = (lower + val) * 0.5f;
  return uint8_t(x < mid ? lower_pivot : pivot);
}

void nf4_double_quantize(const std::vector<float>& absmax, Nf4Tensor& q) {
  QT_ASSERT(q.blocksize == kBlocksize && int64_t(absmax.size()) == q.num_blocks(),
            "nf4_double_quantize: {} absmax for {} blocks", absmax.size(), q.num_blocks());
  q.nested_blocksize = kNestedBlocksize;
  q.nested_quant_map = bnb_dynamic_map();
  const int64_t nb = int64_t(absmax.size());
  // absmax - mean in 256-blocks against the dynamic map; the mean is a sequential double sum.
  double sum = 0.0;
  for (float a : absmax) sum += double(a);
  q.offset = nb > 0 ? float(sum / double(nb)) : 0.0f;
  q.double_quant = true;
  q.absmax.clear();
  const int64_t nb2 = (nb + kNestedBlocksize - 1) / kNestedBlocksize;
  q.absmax_codes.assign(size_t(nb), 0);
  q.nested_absmax.assign(size_t(nb2), 0.0f);
  std::vector<float> centred(static_cast<size_t>(nb));
  for (int64_t b = 0; b < nb; ++b) centred[size_t(b)] = absmax[size_t(b)] - q.offset;
  for (int64_t b2 = 0; b2 < nb2; ++b2) {
    const int64_t begin = b2 * kNestedBlocksize, count = std::min(kNestedBlocksize, nb - begin);
    const float amax = block_absmax(&centred[size_t(begin)], count);
    q.nested_absmax[size_t(b2)] = amax;
    const float inv = 1.0f / amax;
    for (int64_t j = 0; j < count; ++j)
      q.absmax_codes[size_t(begin + j)] = dynamic_map_code(q.nested_quant_map, centred[size_t(begin + j)] * inv);
  }
}

Nf4Tensor nf4_quantize(const Tensor& w, DType storage) {
  QT_ASSERT(w.device() == Device::CPU, "nf4_quantize needs a CPU tensor");
  QT_ASSERT(storage == DType::BF16 || storage == DType::F16 || storage == DType::F32, "NF4 storage {}",
            dtype_name(storage));
  Nf4Tensor q;
  q.shape = w.shape();
  q.dtype = storage;
  q.blocksize = kBlocksize;
  q.nested_blocksize = kNestedBlocksize;
  q.quant_map = nf4_table();
  q.nested_quant_map = bnb_dynamic_map();
  const std::vector<float> x = values_f32(w);
  const int64_t n = int64_t(x.size()), nb = q.num_blocks();
  q.codes.assign(size_t((n + 1) / 2), 0);
  std::vector<float> absmax(static_cast<size_t>(nb));
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t begin = b * kBlocksize, count = std::min(kBlocksize, n - begin);
    const float amax = block_absmax(&x[size_t(begin)], count);
    absmax[size_t(b)] = amax;
    const float inv = 1.0f / amax;
    for (int64_t j = 0; j < count; j += 2) {
      const uint8_t hi = nf4_code(x[size_t(begin + j)] * inv);
      const float second = j + 1 < count ? x[size_t(begin + j + 1)] : 0.0f;  // padding of a ragged block
      const uint8_t lo = nf4_code(second * inv);
      q.codes[size_t((begin + j) / 2)] = uint8_t((hi << 4) | lo);
    }
  }
  nf4_double_quantize(absmax, q);
  return q;
}

std::vector<float> nf4_absmax_f32(const Nf4Tensor& q) {
  if (!q.double_quant) return q.absmax;
  std::vector<float> a(q.absmax_codes.size());
  for (size_t b = 0; b < a.size(); ++b) {
    const float scaled = q.nested_quant_map[q.absmax_codes[b]] * q.nested_absmax[b / size_t(q.nested_blocksize)];
    a[b] = scaled + q.offset;
  }
  return a;
}

Tensor nf4_dequantize(const Nf4Tensor& q, DType dtype) {
  const std::vector<float> absmax = nf4_absmax_f32(q);
  const int64_t n = q.numel(), bs = q.blocksize;
  std::vector<float> w(static_cast<size_t>(n));
#pragma omp parallel for schedule(static)
  for (int64_t j = 0; j < n; ++j) {
    const uint8_t byte = q.codes[size_t(j / 2)];
    const uint8_t code = (j % 2 == 0) ? uint8_t(byte >> 4) : uint8_t(byte & 15);
    w[size_t(j)] = q.quant_map[code] * absmax[size_t(j / bs)];
  }
  // Cast to the stored dtype (RNE), then widen to the requested one.
  Tensor stored = Tensor::empty(q.shape, q.dtype);
  convert_elements(stored.raw(), q.dtype, w.data(), DType::F32, size_t(n));
  return dtype == q.dtype ? stored : stored.to(dtype);
}

std::string python_float_repr(double v) {
  if (std::isnan(v)) return "NaN";  // json.dumps spellings
  if (std::isinf(v)) return v > 0 ? "Infinity" : "-Infinity";
  if (v == 0.0) return std::signbit(v) ? "-0.0" : "0.0";
  char buf[64];
  auto r = std::to_chars(buf, buf + sizeof buf, v, std::chars_format::scientific);
  std::string s(buf, r.ptr);  // e.g. "-1.2345e-05"
  const size_t e = s.find('e');
  std::string mant = s.substr(0, e);
  const int exp10 = std::stoi(s.substr(e + 1));
  std::string sign;
  if (mant[0] == '-') {
    sign = "-";
    mant.erase(0, 1);
  }
  std::string digits;
  for (char ch : mant)
    if (ch != '.') digits += ch;
  if (exp10 < -4 || exp10 >= 16) {
    std::string m = digits.substr(0, 1);
    if (digits.size() > 1) m += "." + digits.substr(1);
    return fmt::format("{}{}e{}{:02d}", sign, m, exp10 < 0 ? '-' : '+', std::abs(exp10));
  }
  std::string out;
  if (exp10 < 0) {
    out = "0." + std::string(size_t(-exp10 - 1), '0') + digits;
  } else if (int(digits.size()) <= exp10 + 1) {
    out = digits + std::string(size_t(exp10 + 1 - int(digits.size())), '0') + ".0";
  } else {
    out = digits.substr(0, size_t(exp10 + 1)) + "." + digits.substr(size_t(exp10 + 1));
  }
  return sign + out;
}

std::string nf4_quant_state_json(const Nf4Tensor& q) {
  std::string shape;
  for (size_t i = 0; i < q.shape.size(); ++i) shape += fmt::format("{}{}", i ? ", " : "", q.shape[i]);
  std::string s = fmt::format(R"({{"quant_type": "nf4", "blocksize": {}, "dtype": "{}", "shape": [{}])", q.blocksize,
                              storage_dtype_name(q.dtype), shape);
  if (q.double_quant)
    s += fmt::format(R"(, "nested_blocksize": {}, "nested_dtype": "float32", "nested_offset": {})", q.nested_blocksize,
                     python_float_repr(double(q.offset)));
  return s + "}";
}

std::vector<std::pair<std::string, Tensor>> nf4_to_bnb_tensors(const std::string& name, const Nf4Tensor& q) {
  std::vector<std::pair<std::string, Tensor>> out;
  out.emplace_back(name, Tensor::from_vector(q.codes, {int64_t(q.codes.size()), 1}));
  if (q.double_quant)
    out.emplace_back(name + ".absmax", Tensor::from_vector(q.absmax_codes, {int64_t(q.absmax_codes.size())}));
  else
    out.emplace_back(name + ".absmax", Tensor::from_vector(q.absmax, {int64_t(q.absmax.size())}));
  out.emplace_back(name + ".quant_map",
                   Tensor::from_vector(std::vector<float>(q.quant_map.begin(), q.quant_map.end()), {16}));
  if (q.double_quant) {
    out.emplace_back(name + ".nested_absmax", Tensor::from_vector(q.nested_absmax, {int64_t(q.nested_absmax.size())}));
    out.emplace_back(name + ".nested_quant_map", Tensor::from_vector(q.nested_quant_map, {256}));
  }
  const std::string js = nf4_quant_state_json(q);
  out.emplace_back(name + ".quant_state.bitsandbytes__nf4",
                   Tensor::from_vector(std::vector<uint8_t>(js.begin(), js.end()), {int64_t(js.size())}));
  return out;
}

bool is_bnb_4bit_weight(const SafetensorsCheckpoint& ckpt, const std::string& name) {
  return ckpt.contains(name + ".quant_state.bitsandbytes__nf4") || ckpt.contains(name + ".quant_state.bitsandbytes__fp4");
}

std::vector<std::string> bnb_4bit_companions(const SafetensorsCheckpoint& ckpt, const std::string& name) {
  std::vector<std::string> out;
  for (const char* suffix : {".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map",
                             ".quant_state.bitsandbytes__nf4", ".quant_state.bitsandbytes__fp4"})
    if (ckpt.contains(name + suffix)) out.push_back(name + suffix);
  return out;
}

namespace {

template <typename T>
std::vector<T> read_vector(const SafetensorsCheckpoint& ckpt, const std::string& name, DType dtype, int64_t numel) {
  if (!ckpt.contains(name)) fail("nf4", "{}: missing (a 4-bit weight needs it)", name);
  const SafetensorsEntry& e = ckpt.entry(name);
  if (e.dtype != dtype) fail("nf4", "{}: dtype {}, expected {}", name, dtype_name(e.dtype), dtype_name(dtype));
  if (numel >= 0 && shape_numel(e.shape) != numel)
    fail("nf4", "{}: {} elements, expected {}", name, shape_numel(e.shape), numel);
  const Tensor t = ckpt.view(name);
  const T* p = t.data<T>();
  return std::vector<T>(p, p + t.numel());
}

DType parse_storage_dtype(const std::string& s, const std::string& name) {
  if (s == "bfloat16") return DType::BF16;
  if (s == "float16") return DType::F16;
  if (s == "float32") return DType::F32;
  fail("nf4", "{}: quant_state dtype \"{}\" is not bfloat16, float16 or float32", name, s);
}

}  // namespace

Nf4Tensor nf4_from_bnb(const SafetensorsCheckpoint& ckpt, const std::string& name) {
  if (ckpt.contains(name + ".quant_state.bitsandbytes__fp4"))
    fail("nf4", "{}: 4-bit FP4 weights are not supported (only NF4)", name);
  const std::vector<uint8_t> js = read_vector<uint8_t>(ckpt, name + ".quant_state.bitsandbytes__nf4", DType::U8, -1);
  Nf4Tensor q;
  try {
    const nlohmann::json j = nlohmann::json::parse(js.begin(), js.end());
    if (j.at("quant_type").get<std::string>() != "nf4") fail("nf4", "{}: quant_type is not nf4", name);
    q.blocksize = j.at("blocksize").get<int64_t>();
    q.dtype = parse_storage_dtype(j.at("dtype").get<std::string>(), name);
    q.shape = j.at("shape").get<Shape>();
    q.double_quant = j.contains("nested_blocksize");
    if (q.double_quant) {
      q.nested_blocksize = j.at("nested_blocksize").get<int64_t>();
      if (j.at("nested_dtype").get<std::string>() != "float32") fail("nf4", "{}: nested_dtype is not float32", name);
      q.offset = float(j.at("nested_offset").get<double>());
    }
  } catch (const nlohmann::json::exception& e) {
    fail("nf4", "{}: bad quant_state JSON ({})", name, e.what());
  }
  if (q.blocksize <= 0 || q.blocksize > (1 << 20) || q.nested_blocksize <= 0 || q.nested_blocksize > (1 << 20))
    fail("nf4", "{}: blocksize {} / nested_blocksize {} out of range", name, q.blocksize, q.nested_blocksize);
  int64_t numel = 1;
  for (int64_t d : q.shape) {
    if (d < 0) fail("nf4", "{}: negative dimension in shape {}", name, shape_str(q.shape));
    if (d > 0 && numel > (int64_t(1) << 50) / d) fail("nf4", "{}: shape {} is too large", name, shape_str(q.shape));
    numel *= d;
  }
  const int64_t n = q.numel(), nb = q.num_blocks();
  q.codes = read_vector<uint8_t>(ckpt, name, DType::U8, (n + 1) / 2);
  const std::vector<float> qmap = read_vector<float>(ckpt, name + ".quant_map", DType::F32, 16);
  std::copy(qmap.begin(), qmap.end(), q.quant_map.begin());
  if (q.quant_map != nf4_table()) fail("nf4", "{}.quant_map: not the NF4 table", name);
  if (q.double_quant) {
    q.absmax_codes = read_vector<uint8_t>(ckpt, name + ".absmax", DType::U8, nb);
    q.nested_absmax = read_vector<float>(ckpt, name + ".nested_absmax", DType::F32,
                                         (nb + q.nested_blocksize - 1) / q.nested_blocksize);
    q.nested_quant_map = read_vector<float>(ckpt, name + ".nested_quant_map", DType::F32, 256);
  } else {
    q.absmax = read_vector<float>(ckpt, name + ".absmax", DType::F32, nb);
  }
  return q;
}

}  // namespace qt
