// libFuzzer target: the safetensors header parser on arbitrary bytes (the whole input is the file).
// A qt::Error is a correct answer; a crash, a sanitizer report or a failed check below is a bug.
// For every accepted file, each tensor's byte range is read at both ends, so AddressSanitizer
// reports any range the validation let through outside the input.
#include <cstddef>
#include <cstdint>

#include "io/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    const qt::detail::SafetensorsLayout layout = qt::detail::parse_safetensors(data, size, "fuzz");
    QT_ASSERT(layout.data_start >= 8 && layout.data_start <= size, "data_start {} of {}", layout.data_start, size);
    volatile uint8_t sink = 0;
    for (const qt::SafetensorsEntry& e : layout.entries) {
      QT_ASSERT(e.begin <= e.end && e.end <= size - layout.data_start, "'{}' [{}, {})", e.name, e.begin, e.end);
      for (int64_t d : e.shape) QT_ASSERT(d >= 0, "'{}' dim {}", e.name, d);
      QT_ASSERT(size_t(qt::shape_numel(e.shape)) * qt::dtype_size(e.dtype) == e.end - e.begin, "'{}' size", e.name);
      if (e.end > e.begin) sink = sink ^ data[layout.data_start + e.begin] ^ data[layout.data_start + e.end - 1];
    }
    (void)sink;
  } catch (const qt::Error&) {
  }
  return 0;
}
